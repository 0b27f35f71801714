//! Where the broker's socket is.

use std::path::{Path, PathBuf};

/// Environment variable that overrides the default socket path
/// (`Client::SOCKET_ENV`).
pub(crate) const SOCKET_ENV: &str = "TENSORBUS_SOCKET";

/// The socket path to use: `explicit` if given, else the default
/// (`Client::default_socket_path`).
pub(crate) fn socket_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("tensorbus").join("broker.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/tensorbus-{uid}/broker.sock"))
}

/// A default socket path that fits in a socket address (at most 107
/// bytes), ignoring `$TENSORBUS_SOCKET`: `$XDG_RUNTIME_DIR/tensorbus/broker.sock`
/// if short enough, else `/tmp/tensorbus-$UID/broker.sock`. Suggested when
/// a given path is too long.
pub(crate) fn short_default_socket() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(dir).join("tensorbus").join("broker.sock");
        if p.as_os_str().len() <= tensorbus_shm::socket::MAX_SOCKET_PATH {
            return p;
        }
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/tensorbus-{uid}/broker.sock"))
}
