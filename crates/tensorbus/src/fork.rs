//! Fork semantics: a child's inherited handles are inert.
//!
//! After `fork()` the child has a copy of every [`crate::Client`],
//! producer, consumer, stage, loan and received tensor of the parent, and
//! they all point at the very same broker connection (the socket is shared)
//! and shared memory (holder bits, rings, event counts). Were the child to
//! use or drop them like its own, it would close the parent's handles at
//! the broker, release the parent's holds and take the parent's tensors.
//! So each client records the process *generation* it was connected in:
//! a process-wide counter that a `pthread_atfork` child handler (installed
//! at the first connect) bumps in every forked child. A handle whose
//! generation is not the current one belongs to an ancestor: using it
//! fails with [`ForkedChild`], dropping it does nothing outside this
//! process. The check is one relaxed load of that counter: no syscall, so
//! the hot path (loan, publish, recv, release) stays free of them.
//!
//! The child handler also replaces, in the child only, each inherited
//! broker socket by `/dev/null` (`dup3`): the child then holds no reference
//! to the parent's connection, so the broker still notices at once when
//! the parent dies, however long the child lives.
//!
//! Only `fork()` through libc runs the handler (`os.fork`, `multiprocessing`'s
//! fork and forkserver start methods, `libc::fork`); a raw `clone` without
//! it is caught on the control path (requests and closes compare the pid
//! too), not on the hot path.

use crate::error::ForkedChild;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Once;

/// How many forks deep this process is (0 in a process that never forked
/// since tensorbus was first used). Only the atfork child handler writes it.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Installs the atfork handler, once per process.
static INSTALL: Once = Once::new();

/// How many broker sockets the child handler can replace; a client beyond
/// that still works and is still inert in a child, but the child keeps its
/// copy of the socket open until it drops the client or exits.
const TRACKED: usize = 256;

/// Broker sockets of live clients (-1: free entry). Lock-free, because the
/// child handler runs in the child of a possibly multi-threaded parent and
/// may only make async-signal-safe calls: no locks, no allocation.
static SOCKETS: [AtomicI32; TRACKED] = [const { AtomicI32::new(-1) }; TRACKED];

/// The `pthread_atfork` child handler: bumps the generation and detaches
/// the child from every inherited broker connection.
extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    // SAFETY: open, dup3 and close are async-signal-safe and touch only this
    // (new, single-threaded) process's descriptor table; the path is a
    // NUL-terminated literal.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null < 0 {
            return; // the child keeps the copies (see TRACKED)
        }
        for s in &SOCKETS {
            let fd = s.load(Ordering::Relaxed);
            if fd >= 0 && fd != null {
                // Atomically swaps the child's copy of the socket for
                // /dev/null: the fd number stays valid (its owner closes it
                // later), the parent's connection loses this reference.
                libc::dup3(null, fd, libc::O_CLOEXEC);
            }
        }
        libc::close(null);
    }
}

/// The process a client (and every handle opened from it) belongs to.
#[derive(Debug)]
pub(crate) struct Origin {
    generation: u64,
    pid: u32,
    /// Index into [`SOCKETS`] of this client's socket, if tracked.
    tracked: Option<usize>,
}

impl Origin {
    /// The current process, for a client whose broker socket is `socket`
    /// (tracked until this `Origin` drops: drop it before the socket).
    pub(crate) fn here(socket: RawFd) -> Origin {
        INSTALL.call_once(|| {
            // SAFETY: registers a handler that is a plain `extern "C" fn`
            // with no captured state; it stays valid for the process's life.
            // Failure (ENOMEM) leaves fork detection to the pid check of
            // the control path.
            unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        });
        let tracked = SOCKETS.iter().position(|s| {
            s.compare_exchange(-1, socket, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        });
        Origin {
            generation: GENERATION.load(Ordering::Relaxed),
            pid: std::process::id(),
            tracked,
        }
    }

    /// Tracks `socket` instead of the client's previous broker socket
    /// (after a reconnect): call it before the old socket closes, so that a
    /// fork in between leaves the old number alone and detaches the new.
    pub(crate) fn retrack(&self, socket: RawFd) {
        if let Some(i) = self.tracked {
            SOCKETS[i].store(socket, Ordering::Relaxed);
        }
    }

    /// `Err` in a process forked after this origin was recorded: one
    /// relaxed load, no syscall (the hot path's check).
    #[inline(always)]
    pub(crate) fn check(&self) -> Result<(), ForkedChild> {
        if GENERATION.load(Ordering::Relaxed) == self.generation {
            Ok(())
        } else {
            Err(self.forked())
        }
    }

    /// Like [`Origin::check`], and also compares the pid (one `getpid`):
    /// for the control path, where a syscall costs nothing next to the
    /// broker round trip, and which then also catches a child made by a
    /// raw `clone` that ran no atfork handler.
    pub(crate) fn check_slow(&self) -> Result<(), ForkedChild> {
        self.check()?;
        if std::process::id() == self.pid {
            Ok(())
        } else {
            Err(self.forked())
        }
    }

    /// Whether this process is a forked child of the origin's (hot path).
    #[inline(always)]
    pub(crate) fn is_forked(&self) -> bool {
        self.check().is_err()
    }

    #[cold]
    fn forked(&self) -> ForkedChild {
        ForkedChild { pid: self.pid }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(i) = self.tracked {
            // Untracked before the socket closes: a fork from now on leaves
            // the number alone (it may be reused for another file).
            SOCKETS[i].store(-1, Ordering::Relaxed);
        }
    }
}
