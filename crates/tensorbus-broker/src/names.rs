//! Validation of channel and pool names.

/// Longest channel or pool name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a channel or pool name: 1 to 128 bytes of `[A-Za-z0-9_./-]`, no
/// `..` component, not starting or ending with `/`.
///
/// ```
/// use tensorbus_broker::validate_name;
/// assert!(validate_name("camera/front/raw").is_ok());
/// assert!(validate_name("../etc").is_err());
/// ```
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name {:?}... is {} bytes; at most {MAX_NAME_LEN} are allowed",
            &name[..name.char_indices().nth(32).map_or(name.len(), |(i, _)| i)],
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')))
    {
        return Err(format!(
            "name {name:?} contains {c:?}; only letters, digits and _ . / - are allowed"
        ));
    }
    if name
        .split('/')
        .any(|part| part == ".." || part == "." || part.is_empty())
    {
        return Err(format!("name {name:?} has an empty, '.' or '..' component"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "camera/front/raw", "model.input-0", "A_b/c.d"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(129);
        for bad in [
            "",
            "..",
            "a/../b",
            "/abs",
            "trail/",
            "a//b",
            "sp ace",
            "nul\0",
            "ctl\n",
            "é",
            long.as_str(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
