//! The broker's socket path: what may be taken over, who may reach the
//! socket, and removing only the socket this broker created.
//!
//! * **Taking over a path.** Only a stale tensorbus socket is replaced: a
//!   socket file (checked with `lstat`) on which nothing listens any more
//!   (`connect` gives `ECONNREFUSED`). A regular file, a directory, a
//!   symbolic link, a device or FIFO, a live socket of another type
//!   (stream, datagram), a live seqpacket socket that does not answer a
//!   hello as a tensorbus broker, and of course a live broker are refused
//!   with a message naming the path and what is there.
//! * **Modes.** By default only the broker's own uid and root are admitted:
//!   directories the broker creates are 0700 and the socket is 0600. When
//!   `allowed_uids` names another user or `allowed_gids` is not empty, the
//!   directories it creates are 0711 (others may pass through, not list or
//!   create) and the socket is 0666: every local user can reach the socket,
//!   and SO_PEERCRED admission is the gate, so a user who is not allowed
//!   gets the broker's own message naming their uid and the config key
//!   rather than a bare "Permission denied". A directory that already
//!   existed is never changed (see [`tensorbus_shm::prepare_socket_dir`]);
//!   if it keeps the admitted users out, the broker says so on stderr.
//! * **Removal.** After `bind` the broker remembers the socket's (device,
//!   inode); at stop it removes the path only if it is still that inode, so
//!   a newer broker that took the path over keeps its socket.

use crate::server::StartError;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tensorbus_core::proto::{encode_frames, parse_frame, Request, MAX_MESSAGE};
use tensorbus_shm::SeqpacketConn;

/// How long a live socket at the path has to answer a hello before it is
/// taken for another program's.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Modes for the directories the broker creates and for its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Access {
    /// Mode of directories the broker creates (existing ones are not changed).
    pub dir_mode: u32,
    /// Mode of the socket file.
    pub socket_mode: u32,
    /// Whether users other than the broker's own uid and root are admitted.
    pub shared: bool,
}

impl Access {
    /// The modes for a broker running as `me` that admits `uids` (empty:
    /// `me` and root) and `gids`.
    pub fn new(me: u32, uids: &[u32], gids: &[u32]) -> Access {
        let shared = uids.iter().any(|&u| u != me && u != 0) || !gids.is_empty();
        if shared {
            Access {
                dir_mode: 0o711,
                socket_mode: 0o666,
                shared,
            }
        } else {
            Access {
                dir_mode: 0o700,
                socket_mode: 0o600,
                shared,
            }
        }
    }
}

/// The socket's directory (`.` for a bare file name).
pub(crate) fn socket_dir(socket: &Path) -> &Path {
    match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn occupied(path: &Path, what: impl Into<String>) -> StartError {
    StartError::Occupied {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn socket_error(path: &Path, source: std::io::Error) -> StartError {
    StartError::Socket {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `socket` free for binding: nothing there, or a stale tensorbus
/// socket, which is removed. Anything else is refused.
pub(crate) fn take_over(socket: &Path) -> Result<bool, StartError> {
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(socket_error(socket, e)),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let what = if ft.is_symlink() {
            let target = std::fs::read_link(socket)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            format!("it is a symbolic link (to {target})")
        } else if ft.is_dir() {
            "it is a directory".to_owned()
        } else if ft.is_file() {
            format!("it is a regular file ({} bytes)", meta.len())
        } else if ft.is_fifo() {
            "it is a FIFO".to_owned()
        } else {
            "it is a device file".to_owned()
        };
        return Err(occupied(socket, what));
    }
    match SeqpacketConn::connect_nonblocking(socket) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            // Stale: nobody listens. Remove it only if it is still the file
            // we looked at.
            let again = std::fs::symlink_metadata(socket).map_err(|e| socket_error(socket, e))?;
            if (again.dev(), again.ino()) != (meta.dev(), meta.ino()) {
                return Err(occupied(
                    socket,
                    "it was replaced while the broker looked at it",
                ));
            }
            std::fs::remove_file(socket)
                .map(|()| true)
                .map_err(|e| socket_error(socket, e))
        }
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => Err(occupied(
            socket,
            "another program listens on it (a stream or datagram socket, not a tensorbus broker)",
        )),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(occupied(
            socket,
            "a program listens on it (its backlog is full, so it may be a busy or stopped broker)",
        )),
        Err(e) => Err(occupied(
            socket,
            format!("it is a socket the broker cannot probe ({e})"),
        )),
        Ok(conn) => {
            if answers_as_broker(&conn) {
                Err(StartError::AlreadyRunning(socket.to_path_buf()))
            } else {
                Err(occupied(
                    socket,
                    format!(
                        "a program listens on it but did not answer as a tensorbus broker within {PROBE_TIMEOUT:?}"
                    ),
                ))
            }
        }
    }
}

/// Sends a hello and waits briefly for anything a broker would answer.
fn answers_as_broker(conn: &SeqpacketConn) -> bool {
    // A stat before the hello: every broker answers it at once (with "say
    // hello first"), even one that holds hellos back while survivors of a
    // dead broker hand their bus over, and nobody is welcomed into its bus.
    let Ok(bytes) = serde_json::to_vec(&Request::Stat) else {
        return false;
    };
    // One frame of request id 1 (a hello is far below a frame's size).
    let Some(frame) = encode_frames(1, &bytes).into_iter().next() else {
        return false;
    };
    if conn.set_read_timeout(Some(PROBE_TIMEOUT)).is_err() || conn.send(&frame, &[]).is_err() {
        return false;
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    // A broker answers with a frame of our request's id (its welcome, or an
    // error); anything else is another program.
    match conn.recv(&mut buf, &mut fds) {
        Ok(n) if n > 0 => parse_frame(&buf[..n]).is_ok_and(|(h, _)| h.id == 1),
        _ => false,
    }
}

/// The socket file this broker created: its path and (device, inode).
#[derive(Clone, Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    /// Records the socket just bound at `path` and gives it `mode`.
    pub fn bound(path: &Path, mode: u32) -> std::io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::other(format!(
                "{} is not the socket just bound there",
                path.display()
            )));
        }
        // The directory is ours (0700/0711) or sticky, or not writable by
        // others: nobody else can have swapped the file, and it is a socket.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Removes the path if it still is this broker's socket; returns
    /// whether it did.
    pub fn remove_if_ours(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => std::fs::remove_file(&self.path).is_ok(),
            _ => false,
        }
    }
}

/// With other users admitted: says on stderr which existing directory on
/// the way to the socket keeps them out (the broker does not change
/// directories it did not create).
pub(crate) fn warn_if_unreachable(socket: &Path, gids: &[u32]) {
    let dir = socket_dir(socket);
    let Ok(abs) = std::path::absolute(dir) else {
        return;
    };
    for d in abs.ancestors() {
        let Ok(m) = std::fs::metadata(d) else {
            continue;
        };
        let mode = m.mode();
        let others = mode & 0o001 != 0;
        let group = mode & 0o010 != 0 && gids.contains(&m.gid());
        if !others && !group {
            eprintln!(
                "tensorbus broker: warning: the config admits other users, but directory {} (mode {:04o}, \
                 not created by this broker, so not changed) does not let them reach {}; \
                 they will get \"Permission denied\" until you run `chmod o+x {}` or pick another --socket",
                d.display(),
                mode & 0o7777,
                socket.display(),
                d.display()
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_the_admitted_users() {
        let private = Access::new(1000, &[], &[]);
        assert_eq!((private.dir_mode, private.socket_mode), (0o700, 0o600));
        assert_eq!(Access::new(1000, &[1000, 0], &[]), private);
        let shared = Access::new(1000, &[1001], &[]);
        assert_eq!((shared.dir_mode, shared.socket_mode), (0o711, 0o666));
        assert_eq!(Access::new(1000, &[], &[44]), shared);
    }
}
