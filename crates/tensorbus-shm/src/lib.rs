//! OS layer of tensorbus: thin, honest wrappers over the Linux system calls
//! that zero-copy shared-memory IPC needs.
//!
//! The crate is in the spirit of `memmap2` and `nix`: every `unsafe` block
//! lives here, at the edge, next to a `// SAFETY:` comment, and the API it
//! exposes is safe wherever that can be honestly promised.
//!
//! * [`memfd`]: sealed anonymous memory files (`memfd_create`) that back
//!   tensor segments, and read-only re-opens of them for consumers.
//! * [`mapping`]: `mmap` of such files, optionally at a large alignment
//!   (for example 2 MiB), unmapped on drop.
//! * [`futex`]: process-shared futex wait/wake on an `AtomicU32` that lives
//!   in a shared mapping, and [`futex::FutexParker`], the one implementation
//!   of `tensorbus_core::park::Parker` that the client and the broker use.
//! * [`socket`]: Unix `SOCK_SEQPACKET` sockets with `SCM_RIGHTS` file
//!   descriptor passing and `SO_PEERCRED`.
//! * [`poll`]: a tiny `poll(2)` wrapper for event loops.
//! * [`dirs`]: socket directories: created with a chosen mode, or, if they
//!   exist, checked (owner, mode) and left unchanged.
//! * [`clock`]: a cheap monotonic clock.
//!
//! # Errors
//!
//! Errors are [`std::io::Error`]. Failures of a system call are returned as
//! `io::Error::last_os_error()` unchanged, so `raw_os_error()` keeps working
//! (callers may, for instance, test for `ENOMEM` after a hugetlb request).
//! Where a path is involved (socket paths, directories) the error is rebuilt
//! with the same [`std::io::ErrorKind`] and a message naming the path.
//! Invalid arguments are reported as [`std::io::ErrorKind::InvalidInput`].
//! Nothing in this crate panics on an error.
//!
//! The crate targets Linux (x86_64 and aarch64).

pub mod clock;
pub mod dirs;
pub mod futex;
pub mod mapping;
pub mod memfd;
pub mod poll;
pub mod socket;

pub use clock::monotonic_ns;
pub use dirs::{ensure_private_dir, prepare_socket_dir, SocketDir};
pub use futex::WaitOutcome;
pub use mapping::{Access, Mapping};
pub use memfd::{fd_identity, fd_len, Memfd};
pub use poll::{poll_readable, poll_ready, Ready};
pub use socket::{PeerCred, SeqpacketConn, SeqpacketListener};

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fallback page size used only if `sysconf(_SC_PAGESIZE)` fails, which does
/// not happen on Linux.
const FALLBACK_PAGE_SIZE: usize = 4096;

/// Returns the system page size in bytes (`sysconf(_SC_PAGESIZE)`).
///
/// The value is queried once and cached.
///
/// ```
/// let page = tensorbus_shm::page_size();
/// assert!(page.is_power_of_two());
/// ```
pub fn page_size() -> usize {
    static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
    let cached = PAGE_SIZE.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: sysconf has no memory-safety preconditions; it only reads a
    // configuration value.
    let raw = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let size = match usize::try_from(raw) {
        Ok(size) if size.is_power_of_two() => size,
        _ => FALLBACK_PAGE_SIZE,
    };
    PAGE_SIZE.store(size, Ordering::Relaxed);
    size
}

/// Converts the return value of a libc call that signals failure with `-1`
/// (and sets `errno`) into an `io::Result`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`], but retries the call while it fails with `EINTR`.
pub(crate) fn cvt_r(mut f: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    loop {
        match cvt(f()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Rebuilds `err` with the same kind and a message prefixed by `context`.
pub(crate) fn with_context(err: io::Error, context: impl std::fmt::Display) -> io::Error {
    io::Error::new(err.kind(), format!("{context}: {err}"))
}

/// Shorthand for an `InvalidInput` error with a message.
pub(crate) fn invalid_input(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_is_sane() {
        let p = page_size();
        assert!(p >= 4096 && p.is_power_of_two());
        assert_eq!(page_size(), p);
    }
}
