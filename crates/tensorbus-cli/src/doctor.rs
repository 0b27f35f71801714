//! `tensorbus doctor`: checks whether this machine (and this user) can run
//! a broker and its clients, and says what to change where it cannot.
//!
//! Each check gives one [`Finding`]: a level (`ok`, `warn`, `fail`), a
//! one-line message and advice. The exit status is 1 when some finding is
//! `fail` (something blocks operation), 0 otherwise. The checks are listed
//! in docs/observability.md.

mod socket;
mod system;

use crate::{CliError, SocketArg};
use std::path::PathBuf;
use std::process::ExitCode;
use tensorbus_broker::{Config, ConfigError};

/// Arguments of `tensorbus doctor`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Broker configuration whose pools are checked (default: the built-in pools).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArg,
    /// Print the findings as JSON (stable keys, for scripts).
    #[arg(long)]
    json: bool,
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Nothing to do.
    Ok,
    /// Works, but worth a look.
    Warn,
    /// Blocks operation.
    Fail,
}

impl Level {
    /// The JSON name: `ok`, `warn`, `fail`.
    fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }

    /// The plain-text prefix: `ok`, `WARN`, `FAIL` (padded to 4 columns).
    fn prefix(self) -> &'static str {
        match self {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// The result of one check.
#[derive(Clone, Debug)]
pub struct Finding {
    /// Which check (`memfd`, `memory`, `nofile`, ...).
    pub check: &'static str,
    /// How bad.
    pub level: Level,
    /// One line: what was found.
    pub message: String,
    /// What to do about it (may be empty for `ok`).
    pub advice: String,
}

impl Finding {
    /// A finding of `level`.
    pub fn new(
        check: &'static str,
        level: Level,
        message: impl Into<String>,
        advice: impl Into<String>,
    ) -> Finding {
        Finding {
            check,
            level,
            message: message.into(),
            advice: advice.into(),
        }
    }

    /// An `ok` finding without advice.
    pub fn ok(check: &'static str, message: impl Into<String>) -> Finding {
        Finding::new(check, Level::Ok, message, "")
    }
}

/// Runs every check and prints the findings; the exit status is 1 when
/// some finding is `fail`. Only a closed stdout is an error.
pub fn run(args: Args) -> Result<ExitCode, CliError> {
    let mut findings = Vec::new();
    findings.push(system::memfd());
    let config = match &args.config {
        None => Some(Config::default()),
        Some(path) => match Config::from_file(path) {
            Ok(c) => {
                findings.push(Finding::ok(
                    "config",
                    format!("{} is valid ({} pools)", path.display(), c.pools.len()),
                ));
                Some(c)
            }
            Err(e) => {
                let message = match e {
                    ConfigError::Read { .. } => e.to_string(),
                    _ => format!("{}: {e}", path.display()),
                };
                findings.push(Finding::new(
                    "config",
                    Level::Fail,
                    message,
                    "fix the configuration file; the pool checks below were skipped",
                ));
                None
            }
        },
    };
    if let Some(c) = &config {
        findings.extend(system::memory(c));
        findings.push(system::hugepages(c));
    }
    findings.push(system::memlock());
    findings.push(system::nofile(config.as_ref().map_or(3, |c| c.pools.len())));
    findings.extend(system::namespaces());
    findings.push(system::remove_ipc());
    let socket = args
        .socket
        .socket
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.broker.socket.clone()))
        .unwrap_or_else(tensorbus::Client::default_socket_path);
    findings.push(socket::socket_dir(&socket));
    findings.push(socket::broker(&socket));

    let failed = findings.iter().any(|f| f.level == Level::Fail);
    if args.json {
        crate::print_stdout(&format!("{}\n", render_json(&findings)))?;
    } else {
        crate::print_stdout(&render_text(&findings))?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `{"findings":[{"check","level","message","advice"}...], "ok": bool}`.
fn render_json(findings: &[Finding]) -> String {
    let list: Vec<serde_json::Value> = findings
        .iter()
        .map(|f| {
            serde_json::json!({
                "check": f.check,
                "level": f.level.name(),
                "message": f.message,
                "advice": f.advice,
            })
        })
        .collect();
    let ok = !findings.iter().any(|f| f.level == Level::Fail);
    let doc = serde_json::json!({ "findings": list, "ok": ok });
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
}

/// One line per finding, advice indented below, and a summary line.
fn render_text(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!(
            "{} {:<12} {}\n",
            f.level.prefix(),
            f.check,
            f.message
        ));
        if !f.advice.is_empty() {
            out.push_str(&format!("       {}\n", f.advice));
        }
    }
    let count = |l: Level| findings.iter().filter(|f| f.level == l).count();
    out.push_str(&format!(
        "{} checks: {} ok, {} warnings, {} failures\n",
        findings.len(),
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Fail)
    ));
    out
}

/// Bytes as a short human-readable size (`1.5 GiB`).
pub fn size(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if n >= unit {
            return format!("{:.1} {name}", n as f64 / unit as f64);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_shapes() {
        let f = vec![
            Finding::ok("memfd", "works"),
            Finding::new("nofile", Level::Fail, "too low", "raise it"),
        ];
        let t = render_text(&f);
        assert!(t.starts_with("ok   memfd"), "{t}");
        assert!(
            t.contains("FAIL nofile") && t.contains("\n       raise it\n"),
            "{t}"
        );
        let v: serde_json::Value = serde_json::from_str(&render_json(&f)).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["findings"][1]["level"], "fail");
        assert_eq!(size(3 << 29), "1.5 GiB");
    }
}
