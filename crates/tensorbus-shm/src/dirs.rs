//! Private runtime directories.
//!
//! Sockets and other rendezvous files of tensorbus live in a directory that
//! only the current user may enter. [`ensure_private_dir`] creates it with
//! mode 0700, or verifies an existing one and tightens its mode.

use std::ffi::CString;
use std::fs::DirBuilder;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use crate::memfd::fstat;
use crate::{cvt, invalid_input, with_context};

/// Makes sure `path` is a directory private to the current user.
///
/// * If it does not exist, it is created with mode 0700, together with any
///   missing parents (which also get mode 0700, subject to the umask).
/// * It is then opened without following a final symbolic link and checked:
///   it must be a directory owned by the effective uid. If its mode grants
///   anything to group or others, it is changed to 0700 (`fchmod` on the
///   opened directory, so there is no race with a rename of `path`).
///
/// ```
/// let dir = std::env::temp_dir().join(format!("tb-doc-{}", std::process::id()));
/// tensorbus_shm::ensure_private_dir(&dir)?;
/// # std::fs::remove_dir(&dir)?;
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// `PermissionDenied` if the directory is owned by another user; an error
/// naming the path if it exists but is not a directory or is a symbolic
/// link; `InvalidInput` if the path contains a NUL byte; otherwise the OS
/// error of `mkdir`, `open`, `fstat` or `fchmod`, with the path in the
/// message.
pub fn ensure_private_dir(path: &Path) -> io::Result<()> {
    let shown = path.display();
    match DirBuilder::new().recursive(true).mode(0o700).create(path) {
        Ok(()) => {}
        // `recursive` already accepts an existing directory; anything else
        // (a file, a dangling link) is reported precisely by the open below.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(with_context(e, format!("cannot create directory {shown}"))),
    }

    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| invalid_input(format!("path {shown} contains a NUL byte")))?;
    // SAFETY: `cpath` is a valid NUL-terminated string that outlives the
    // call; open does not retain the pointer.
    let raw = cvt(unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
    .map_err(|e| {
        // With O_DIRECTORY | O_NOFOLLOW a symbolic link gives ENOTDIR (or
        // ELOOP), so look at the path itself to say what is wrong.
        let is_link = std::fs::symlink_metadata(path)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        match e.raw_os_error() {
            _ if is_link => with_context(e, format!("{shown} is a symbolic link, not a directory")),
            Some(libc::ENOTDIR) => {
                with_context(e, format!("{shown} exists but is not a directory"))
            }
            _ => with_context(e, format!("cannot open directory {shown}")),
        }
    })?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    let dir = unsafe { OwnedFd::from_raw_fd(raw) };

    let st = fstat(dir.as_fd()).map_err(|e| with_context(e, format!("cannot stat {shown}")))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if st.st_uid != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "directory {shown} is owned by uid {}, not by the current user (uid {euid}); \
                 refusing to use it",
                st.st_uid
            ),
        ));
    }
    if st.st_mode & 0o077 != 0 {
        // SAFETY: `dir` is an open descriptor; fchmod touches no memory.
        cvt(unsafe { libc::fchmod(dir.as_raw_fd(), 0o700) })
            .map_err(|e| with_context(e, format!("cannot chmod 0700 {shown}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tb-dirs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_with_0700_including_parents() {
        let root = scratch("create");
        let dir = root.join("a/b");
        ensure_private_dir(&dir).unwrap();
        assert!(dir.is_dir());
        assert_eq!(mode(&dir), 0o700);
        // Idempotent.
        ensure_private_dir(&dir).unwrap();
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn tightens_open_mode() {
        let dir = scratch("tighten");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_file_and_symlink() {
        let root = scratch("reject");
        fs::create_dir(&root).unwrap();
        let file = root.join("file");
        fs::write(&file, b"x").unwrap();
        let e = ensure_private_dir(&file).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");

        let target = root.join("target");
        fs::create_dir(&target).unwrap();
        let link = root.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn rejects_directory_of_other_user() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let (dir, owner, cleanup) = if euid == 0 {
            // As root, make a directory owned by "nobody".
            let dir = scratch("other");
            fs::create_dir(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            (dir, 65534, true)
        } else {
            // "/" is owned by root, not by us.
            (PathBuf::from("/"), 0, false)
        };
        let e = ensure_private_dir(&dir).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            e.to_string().contains(&format!("owned by uid {owner}")),
            "{e}"
        );
        if cleanup {
            fs::remove_dir_all(&dir).unwrap();
        }
    }
}
