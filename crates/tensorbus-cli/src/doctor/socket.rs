//! Checks of the socket: its directory (as the broker checks it) and
//! whether a broker answers there.

use super::{Finding, Level};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use tensorbus::error::ConnectError;
use tensorbus::Client;

/// The socket's directory: exists or can be created, owned by this user
/// (or root), not group/world-writable without the sticky bit. Uses the
/// broker's own check (`tensorbus_shm::prepare_socket_dir`), only on
/// directories that exist, so nothing is created or changed.
pub fn socket_dir(socket: &Path) -> Finding {
    let dir = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let advice = format!(
        "the broker refuses this directory: give --socket a path in a directory of your own with mode 0700 (for example /tmp/tensorbus-{euid}/broker.sock), or fix it (`chown {euid} {0}`, `chmod go-w {0}`)",
        dir.display()
    );
    let existing = dir
        .ancestors()
        .find(|p| p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok())
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("/"));
    match tensorbus_shm::prepare_socket_dir(existing, 0o700) {
        Err(e) => Finding::new("socket-dir", Level::Fail, e.to_string(), advice),
        Ok(d) if existing == dir => Finding::ok(
            "socket-dir",
            format!(
                "{} is usable (owner uid {}, mode {:04o})",
                dir.display(),
                d.uid,
                d.mode
            ),
        ),
        Ok(_) => {
            let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
                existing.as_os_str(),
            ));
            // SAFETY: the pointer is a valid NUL-terminated string for the
            // call; access does not keep it.
            let writable =
                c.is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 });
            if writable {
                Finding::ok(
                    "socket-dir",
                    format!(
                        "{} does not exist yet; the broker creates it (mode 0700) in {}",
                        dir.display(),
                        existing.display()
                    ),
                )
            } else {
                Finding::new(
                    "socket-dir",
                    Level::Fail,
                    format!(
                        "{} does not exist and cannot be created: {} is not writable for uid {euid}",
                        dir.display(),
                        existing.display()
                    ),
                    advice,
                )
            }
        }
    }
}

/// Whether a broker answers on `socket`: its pid and pools (ok), a stale
/// socket file (warn), or nothing there (ok: none running).
pub fn broker(socket: &Path) -> Finding {
    let shown = socket.display();
    let meta = match std::fs::symlink_metadata(socket) {
        Err(_) => {
            return Finding::new(
                "broker",
                Level::Ok,
                format!("no broker running (no socket at {shown})"),
                "start one with `tensorbus broker`",
            )
        }
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Finding::new(
            "broker",
            Level::Fail,
            format!("{shown} exists and is not a socket"),
            "the broker never replaces it: remove it or pick another --socket path",
        );
    }
    match Client::connect_to(Some(socket), "tensorbus-doctor") {
        Ok(client) => {
            let pools: Vec<String> = client.pools().into_iter().map(|p| p.name).collect();
            match client.stat() {
                Ok(r) => Finding::ok(
                    "broker",
                    format!(
                        "broker pid {} answers at {shown} (pools: {})",
                        r.broker_pid,
                        pools.join(", ")
                    ),
                ),
                Err(e) => Finding::new(
                    "broker",
                    Level::Warn,
                    format!("a broker accepted the connection at {shown} but stat failed: {e}"),
                    "check the broker's log (tensorbus broker -v)",
                ),
            }
        }
        Err(e @ ConnectError::BrokerUnavailable { .. }) => Finding::new(
            "broker",
            Level::Warn,
            format!("stale socket: {shown} exists but no broker answers ({e})"),
            "a broker left it behind; a new `tensorbus broker` replaces it, or remove it",
        ),
        Err(e) => Finding::new(
            "broker",
            Level::Warn,
            format!("a broker at {shown} did not admit this process: {e}"),
            "see the broker's [broker] allowed_uids / allowed_gids, or its version",
        ),
    }
}
