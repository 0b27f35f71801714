//! A tiny wrapper around `poll(2)` for readability.
//!
//! [`poll_readable`] is meant for simple event loops (such as the broker's)
//! that watch a listener and a few hundred connections: it reports which
//! descriptors have data, a hang-up or an error pending, so that the next
//! `accept`/`recv` on them will not block.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use crate::invalid_input;

/// Waits until at least one of `fds` is readable, or `timeout` elapses
/// (`None` waits forever).
///
/// On return, `ready[i]` is `true` if `fds[i]` has `POLLIN`, `POLLHUP` or
/// `POLLERR` (or `POLLNVAL`) pending and `false` otherwise, for every
/// `i < fds.len()`; the function returns how many are ready (0 on timeout).
/// If a signal interrupts the call (`EINTR`) it returns `Ok(0)` with all
/// entries `false`. The timeout is rounded up to whole milliseconds.
///
/// ```
/// use std::os::fd::AsFd;
/// use std::time::Duration;
/// use tensorbus_shm::{poll_readable, SeqpacketConn};
///
/// let (a, b) = SeqpacketConn::pair()?;
/// let mut ready = [false];
/// assert_eq!(poll_readable(&[b.as_fd()], &mut ready, Some(Duration::ZERO))?, 0);
/// a.send(b"hi", &[])?;
/// assert_eq!(poll_readable(&[b.as_fd()], &mut ready, None)?, 1);
/// assert!(ready[0]);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// `InvalidInput` if `ready` is shorter than `fds`; otherwise the OS error
/// of `poll` (for example `ENOMEM`, or `EINVAL` for too many descriptors).
pub fn poll_readable(
    fds: &[BorrowedFd<'_>],
    ready: &mut [bool],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    if ready.len() < fds.len() {
        return Err(invalid_input(format!(
            "poll_readable: {} descriptors but only {} ready slots",
            fds.len(),
            ready.len()
        )));
    }
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    ready[..fds.len()].fill(false);
    if !wait(&mut pollfds, timeout)? {
        return Ok(0);
    }
    let mut count = 0;
    for (slot, pfd) in ready.iter_mut().zip(&pollfds) {
        if pfd.revents & READ_MASK != 0 {
            *slot = true;
            count += 1;
        }
    }
    Ok(count)
}

/// What [`poll_ready`] found for one descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// `POLLIN`, `POLLHUP`, `POLLERR` or `POLLNVAL`: the next `recv` (or
    /// `accept`) will not block.
    pub read: bool,
    /// `POLLOUT` (asked for): the next send of a message that fits will not
    /// block.
    pub write: bool,
}

/// Like [`poll_readable`], but each descriptor comes with whether to watch
/// it for writability too (`POLLOUT`), for event loops that queue output to
/// slow peers. `ready[i]` is set for every `i < fds.len()`; returns how
/// many descriptors have anything ready (0 on timeout or `EINTR`).
///
/// ```
/// use std::os::fd::AsFd;
/// use std::time::Duration;
/// use tensorbus_shm::poll::{poll_ready, Ready};
/// use tensorbus_shm::SeqpacketConn;
///
/// let (a, _b) = SeqpacketConn::pair()?;
/// let mut ready = [Ready::default()];
/// assert_eq!(poll_ready(&[(a.as_fd(), true)], &mut ready, Some(Duration::ZERO))?, 1);
/// assert_eq!(ready[0], Ready { read: false, write: true });
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// As [`poll_readable`].
pub fn poll_ready(
    fds: &[(BorrowedFd<'_>, bool)],
    ready: &mut [Ready],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    if ready.len() < fds.len() {
        return Err(invalid_input(format!(
            "poll_ready: {} descriptors but only {} ready slots",
            fds.len(),
            ready.len()
        )));
    }
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, write)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: if *write {
                libc::POLLIN | libc::POLLOUT
            } else {
                libc::POLLIN
            },
            revents: 0,
        })
        .collect();
    ready[..fds.len()].fill(Ready::default());
    if !wait(&mut pollfds, timeout)? {
        return Ok(0);
    }
    let mut count = 0;
    for (slot, pfd) in ready.iter_mut().zip(&pollfds) {
        slot.read = pfd.revents & READ_MASK != 0;
        slot.write = pfd.revents & libc::POLLOUT != 0;
        if slot.read || slot.write {
            count += 1;
        }
    }
    Ok(count)
}

/// Events that make a descriptor count as readable.
const READ_MASK: libc::c_short = libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;

/// Runs `poll(2)`; `Ok(false)` when interrupted by a signal.
fn wait(pollfds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<bool> {
    let timeout_ms: libc::c_int = match timeout {
        None => -1,
        Some(d) => {
            // Round up so that a short timeout does not become a busy poll.
            let ms = d.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    };
    let nfds = libc::nfds_t::try_from(pollfds.len())
        .map_err(|_| invalid_input("poll: too many descriptors"))?;
    // SAFETY: `pollfds` is a valid, writable array of `nfds` pollfd entries
    // that outlives the call; the descriptors are borrowed, hence open.
    let ret = unsafe { libc::poll(pollfds.as_mut_ptr(), nfds, timeout_ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeqpacketConn;
    use std::os::fd::AsFd;
    use std::time::Instant;

    #[test]
    fn reports_readable_and_hangup() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let (c, d) = SeqpacketConn::pair().unwrap();
        let mut ready = [true, true, true];
        let start = Instant::now();
        let n = poll_readable(
            &[b.as_fd(), d.as_fd(), a.as_fd()],
            &mut ready,
            Some(Duration::from_millis(20)),
        )
        .unwrap();
        assert_eq!(n, 0);
        assert_eq!(ready, [false, false, false]);
        assert!(start.elapsed() >= Duration::from_millis(20));

        a.send(b"x", &[]).unwrap();
        drop(c);
        let n = poll_readable(&[b.as_fd(), d.as_fd(), a.as_fd()], &mut ready, None).unwrap();
        assert_eq!(n, 2);
        assert_eq!(ready, [true, true, false]);
    }

    #[test]
    fn short_ready_slice_is_invalid() {
        let (a, _b) = SeqpacketConn::pair().unwrap();
        let e = poll_readable(&[a.as_fd()], &mut [], Some(Duration::ZERO)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn poll_ready_reports_write_only_when_asked() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let mut ready = [Ready::default(); 2];
        let n = poll_ready(
            &[(a.as_fd(), false), (b.as_fd(), true)],
            &mut ready,
            Some(Duration::ZERO),
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(ready[0], Ready::default());
        assert_eq!(
            ready[1],
            Ready {
                read: false,
                write: true
            }
        );
        // Fill a's queue to b: a is no longer writable.
        while a.try_send(&[0u8; 4096], &[]).is_ok() {}
        let n = poll_ready(
            &[(a.as_fd(), true), (b.as_fd(), false)],
            &mut ready,
            Some(Duration::ZERO),
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(ready[0], Ready::default());
        assert!(ready[1].read);
    }

    #[test]
    fn empty_set_times_out() {
        assert_eq!(
            poll_readable(&[], &mut [], Some(Duration::from_millis(1))).unwrap(),
            0
        );
    }
}
