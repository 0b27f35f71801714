//! A file descriptor that becomes readable when a consumer has a tensor
//! queued: how event loops (Python's asyncio, epoll, tokio, ...) wait for
//! tensors without blocking a thread in [`Consumer::recv`].
//!
//! A producer wakes sleeping consumers through the subscriber's event count
//! in shared memory (a futex, see `tensorbus_core::event`), and a futex
//! cannot be polled. So a [`Readiness`] owns a Linux eventfd plus one
//! waiter thread, both created on first use. While *armed*, the thread
//! parks on the very futex a blocking `recv` parks on (it counts as a
//! waiter there, so producers wake it exactly as they wake a sleeping
//! `recv`) and, once a tensor is queued, disarms itself and writes the
//! eventfd. Disarmed, it sleeps on a private condition variable and is not
//! counted as a waiter: the producer's hot path stays free of syscalls.
//!
//! The protocol for an event loop:
//!
//! 1. [`Consumer::try_recv`]; if it returns a tensor, done.
//! 2. [`Readiness::arm`], then watch [`Readiness::fd`] for readability.
//!    (A tensor that arrived between 1 and 2 is seen by the armed thread,
//!    which makes the fd readable at once: no wake-up is lost.)
//! 3. When the fd is readable: [`Readiness::clear`], then go to 1.
//!
//! Arming is one-shot: each readable event needs a new `arm()`. A readable
//! fd means "try again", never "a tensor is certainly there" (another
//! thread may have taken it, [`Readiness::wake`] may have been called).
//!
//! After `fork()`, an inherited readiness is inert in the child: its
//! waiter thread did not survive the fork and its eventfd is the parent's
//! (one object, shared). So `arm`, `disarm`, `clear` and `wake` do nothing
//! there (clearing would swallow the parent's notification, waking would
//! fake one), and dropping it neither wakes nor joins anything.
//!
//! [`Consumer::recv`]: crate::Consumer::recv
//! [`Consumer::try_recv`]: crate::Consumer::try_recv

use crate::client::Inner;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tensorbus_core::park::Parker;
use tensorbus_core::receive::SubscriberPath;
use tensorbus_core::wide::HolderId;
use tensorbus_shm::futex::FutexParker;

/// Longest single futex sleep of the waiter thread (it re-checks its flags
/// and the rings after each; wake-ups normally end the sleep much earlier).
const PARK_SLICE: Duration = Duration::from_millis(100);

/// An eventfd that becomes readable when its consumer has a tensor queued,
/// while armed. Get it with [`crate::Consumer::readiness`]; it lives (and
/// its thread runs) as long as the consumer.
///
/// ```no_run
/// use std::os::fd::AsRawFd;
/// use tensorbus::TensorView;
/// # let client = tensorbus::Client::connect()?;
/// let consumer = client.consumer("camera/raw")?;
/// let ready = consumer.readiness()?;
/// loop {
///     if let Ok(t) = consumer.try_recv() {
///         println!("seq {}", t.seq());
///         continue;
///     }
///     ready.arm();
///     // Hand ready.fd() to your event loop; here, a plain poll(2):
///     let mut pfd = libc::pollfd { fd: ready.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
///     // SAFETY: one valid pollfd for the call's duration.
///     unsafe { libc::poll(&mut pfd, 1, -1) };
///     ready.clear();
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Readiness {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("fd", &self.shared.efd.as_raw_fd())
            .field("armed", &self.is_armed())
            .finish()
    }
}

/// What the consumer and the waiter thread share.
///
/// Orderings: every access to `armed` and `closed` is `SeqCst`. The flag
/// handshake with the futex sleep is a Dekker pair: the consumer stores a
/// flag, then bumps the event's `seq` (`kick`); the thread takes its wait
/// key from `seq` (`prepare_wait`, inside `EventCount::wait_unless`), then
/// loads the flags. SeqCst on the flag
/// accesses, together with the RMWs on the event count, forbids the
/// outcome where the thread misses the new flag and still sleeps on a key
/// newer than the bump. None of this is on the receive path: `try_recv` and
/// `recv` never touch these flags.
struct Shared {
    efd: OwnedFd,
    /// Set by `arm`, cleared by `disarm` or by the thread when it fires.
    armed: AtomicBool,
    /// Set once, when the readiness is dropped: the thread exits.
    closed: AtomicBool,
    /// The disarmed thread sleeps here (not on the shared futex).
    idle: Mutex<()>,
    cv: Condvar,
    /// Keeps the control segment mapped for the thread.
    inner: Arc<Inner>,
    channel: usize,
    sub: usize,
    id: HolderId,
    lossless: bool,
    /// Fire at end of stream too (the consumer reports it).
    end_of_stream: bool,
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn path(&self) -> SubscriberPath<'_> {
        SubscriberPath {
            ctl: &self.inner.control,
            channel: self.channel,
            sub: self.sub,
            id: self.id,
            lossless: self.lossless,
        }
    }

    /// Adds one to the eventfd counter: the fd becomes readable.
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. The
        // only possible failure (EAGAIN: counter at its maximum) leaves the
        // fd readable, which is all we want.
        unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Gets the thread out of its futex sleep after `armed` or `closed`
    /// changed: bumps the event's sequence (so a sleep that is about to
    /// start returns at once) and wakes the futex. The thread reads the
    /// flag after its wait key (`prepare_wait` in `wait_unless`), so either it sees the new
    /// flag or its key is older than the bump.
    fn kick(&self) {
        {
            let _g = lock(&self.idle);
            self.cv.notify_all();
        }
        if let Some(rec) = self.inner.control.subscriber(self.channel, self.sub) {
            let ev = &rec.config.data;
            ev.bump();
            FutexParker.wake_all(&ev.seq);
        }
    }

    /// The waiter thread.
    fn run(&self) {
        loop {
            {
                let mut g = lock(&self.idle);
                while !self.armed.load(Ordering::SeqCst) && !self.closed.load(Ordering::SeqCst) {
                    g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
            }
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let Some(rec) = self.inner.control.subscriber(self.channel, self.sub) else {
                // No record (cannot happen with a valid layout): never fire.
                std::thread::sleep(PARK_SLICE);
                continue;
            };
            // `wait_unless` announces us first, then looks: a producer that
            // pushes after our look sees us and wakes us. The look includes
            // the flags (`kick` bumps the event after changing them, see
            // `Shared`): closed or disarmed, go back to the top at once.
            let mut fire = false;
            let ready = || {
                if self.closed.load(Ordering::SeqCst) || !self.armed.load(Ordering::SeqCst) {
                    return true;
                }
                let path = self.path();
                fire = path.has_entry() || (self.end_of_stream && path.ended());
                fire
            };
            rec.config.data.wait_unless(&FutexParker, ready, PARK_SLICE);
            if fire && self.armed.swap(false, Ordering::SeqCst) {
                self.signal();
            }
        }
    }
}

impl Readiness {
    /// Creates the eventfd and starts the waiter thread for one subscriber.
    pub(crate) fn new(
        inner: Arc<Inner>,
        channel: usize,
        sub: usize,
        id: HolderId,
        lossless: bool,
        end_of_stream: bool,
    ) -> io::Result<Readiness> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            efd,
            armed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            idle: Mutex::new(()),
            cv: Condvar::new(),
            inner,
            channel,
            sub,
            id,
            lossless,
            end_of_stream,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tensorbus-ready".into())
            .spawn(move || s.run())?;
        Ok(Readiness {
            shared,
            thread: Some(thread),
        })
    }

    /// The eventfd (non-blocking, close-on-exec). Readable after a tensor
    /// was queued while armed, or after [`Readiness::wake`]; stays readable
    /// until [`Readiness::clear`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.efd.as_fd()
    }

    /// Asks for one notification: the fd becomes readable as soon as a
    /// tensor is queued for this consumer (at once if one already is).
    /// Then the readiness disarms itself; arm again for the next one.
    /// (Nothing in a forked child: see the module docs.)
    pub fn arm(&self) {
        if self.forked() {
            return;
        }
        if !self.shared.armed.swap(true, Ordering::SeqCst) {
            let _g = lock(&self.shared.idle);
            self.shared.cv.notify_all();
        }
    }

    /// Withdraws an [`Readiness::arm`] (a cancelled wait): the thread stops
    /// watching the channel. The fd may still be readable from before.
    pub fn disarm(&self) {
        if self.forked() {
            return;
        }
        if self.shared.armed.swap(false, Ordering::SeqCst) {
            self.shared.kick();
        }
    }

    /// Whether a notification is pending (armed and not fired yet).
    pub fn is_armed(&self) -> bool {
        self.shared.armed.load(Ordering::SeqCst)
    }

    /// Makes the fd unreadable again (reads the eventfd counter). Call it
    /// when the fd was readable, before trying to receive.
    pub fn clear(&self) {
        if self.forked() {
            return;
        }
        let mut buf: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from an eventfd we
        // own; non-blocking, so EAGAIN (nothing pending) returns at once.
        unsafe {
            libc::read(
                self.shared.efd.as_raw_fd(),
                (&mut buf as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Makes the fd readable now, armed or not: tells a waiting event loop
    /// to look again (for instance because the consumer is being closed).
    pub fn wake(&self) {
        if self.forked() {
            return;
        }
        self.shared.signal();
    }

    /// Whether this is a forked child's copy (then every method is a no-op).
    fn forked(&self) -> bool {
        self.shared.inner.origin.is_forked()
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        if self.forked() {
            // The waiter thread is the parent's (a join would wait forever)
            // and the event count too (a kick would wake the parent's
            // sleepers): leak the handle and the shared state, which the
            // dead thread's copied stack still counts as referenced.
            std::mem::forget(self.thread.take());
            return;
        }
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.armed.store(false, Ordering::SeqCst);
        self.shared.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
