//! Process-shared futexes on an [`AtomicU32`].
//!
//! The futex word normally lives in a `MAP_SHARED` mapping of a memfd that
//! several processes map, so these calls deliberately do **not** use
//! `FUTEX_PRIVATE_FLAG`: the kernel then keys the wait queue on the
//! underlying file page and offset, and a waker in one process finds the
//! waiters in another. (It also works for ordinary process-local memory,
//! just slightly slower than a private futex.)
//!
//! As with every futex, [`wait`] may return spuriously; callers must
//! re-check the word in a loop.

use std::sync::atomic::AtomicU32;
use std::time::Duration;
use tensorbus_core::park::Parker;

/// Why [`wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitOutcome {
    /// The call slept and was woken (by [`wake`], or spuriously).
    Woken,
    /// The word did not hold `expected` when the call started (`EAGAIN`);
    /// it returned without sleeping.
    ValueChanged,
    /// The timeout elapsed (`ETIMEDOUT`).
    TimedOut,
    /// A signal handler interrupted the wait (`EINTR`).
    Interrupted,
}

/// Sleeps while `*word == expected`, until woken by [`wake`], until
/// `timeout` (relative) elapses, or until a signal arrives
/// (`FUTEX_WAIT`, shared).
///
/// The comparison and the sleep are atomic with respect to [`wake`]: if
/// another thread or process changes the word and then calls `wake`, this
/// call cannot miss it.
///
/// The futex syscall cannot fail in other ways for a valid reference; any
/// unexpected error is reported as [`WaitOutcome::Woken`], i.e. as a
/// spurious wake-up, so callers re-check the word as they must anyway.
///
/// ```
/// use std::sync::atomic::AtomicU32;
/// use std::time::Duration;
/// use tensorbus_shm::futex::{wait, WaitOutcome};
///
/// let word = AtomicU32::new(1);
/// assert_eq!(wait(&word, 0, None), WaitOutcome::ValueChanged);
/// assert_eq!(wait(&word, 1, Some(Duration::from_millis(1))), WaitOutcome::TimedOut);
/// ```
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> WaitOutcome {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        // Always below 1e9, so it fits in c_long.
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, 4-byte aligned AtomicU32 for the duration of
    // the call, which the kernel only reads atomically; `ts_ptr` is null or
    // points to `ts`, which outlives the call. uaddr2/val3 are ignored by
    // FUTEX_WAIT.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if ret == 0 {
        return WaitOutcome::Woken;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => WaitOutcome::ValueChanged,
        Some(libc::ETIMEDOUT) => WaitOutcome::TimedOut,
        Some(libc::EINTR) => WaitOutcome::Interrupted,
        _ => WaitOutcome::Woken,
    }
}

/// Wakes up to `count` waiters blocked in [`wait`] on `word`, in any
/// process (`FUTEX_WAKE`, shared). Pass `i32::MAX` to wake all.
///
/// Returns how many waiters were woken. A `count` of zero or less wakes
/// nobody and returns 0 (the raw syscall would wake one for `count <= 0`);
/// an unexpected syscall failure also returns 0.
///
/// ```
/// use std::sync::atomic::AtomicU32;
///
/// let word = AtomicU32::new(0);
/// assert_eq!(tensorbus_shm::futex::wake(&word, i32::MAX), 0);
/// ```
pub fn wake(word: &AtomicU32, count: i32) -> usize {
    if count <= 0 {
        return 0;
    }
    // SAFETY: `word` is a live, aligned AtomicU32; FUTEX_WAKE only uses its
    // address as a key and does not dereference the timeout/uaddr2 slots,
    // which are passed as null.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            count,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    usize::try_from(ret).unwrap_or(0)
}

/// The futex [`Parker`]: what the client library and the broker both hand
/// to `tensorbus-core`'s data path and to
/// [`EventCount::wait_unless`](tensorbus_core::event::EventCount::wait_unless).
/// Sleeps with [`wait`] and wakes with [`wake`] (all waiters), shared
/// futexes, so it works across processes on a word in a shared mapping.
///
/// ```
/// use std::time::Duration;
/// use tensorbus_core::event::EventCount;
/// use tensorbus_shm::futex::FutexParker;
///
/// let ev = EventCount::new();
/// // The condition holds: no sleep.
/// assert!(ev.wait_unless(&FutexParker, || true, Duration::from_secs(10)));
/// // It does not: sleeps (here until the timeout), then reports it.
/// assert!(!ev.wait_unless(&FutexParker, || false, Duration::from_millis(1)));
/// ev.notify(&FutexParker); // nobody announced: no syscall
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct FutexParker;

impl Parker for FutexParker {
    #[inline]
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration) {
        // The outcome does not matter: the caller re-checks its condition.
        let _ = wait(word, expected, Some(timeout));
    }
    #[inline]
    fn wake_all(&self, word: &AtomicU32) {
        wake(word, i32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn waiter_is_woken() {
        let word = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&word);
        let t = std::thread::spawn(move || {
            while w2.load(Ordering::Acquire) == 0 {
                let out = wait(&w2, 0, Some(Duration::from_secs(10)));
                assert_ne!(out, WaitOutcome::TimedOut);
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        word.store(1, Ordering::Release);
        wake(&word, i32::MAX);
        t.join().unwrap();
    }

    #[test]
    fn wake_reports_woken_count() {
        let word = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&word);
        let t = std::thread::spawn(move || wait(&w2, 0, Some(Duration::from_secs(10))));
        // Wait until the thread is asleep in the kernel.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut woken = 0;
        while woken == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            woken = wake(&word, 1);
        }
        assert_eq!(woken, 1);
        assert_eq!(t.join().unwrap(), WaitOutcome::Woken);
    }

    #[test]
    fn timeout_elapses() {
        let word = AtomicU32::new(5);
        let start = Instant::now();
        assert_eq!(
            wait(&word, 5, Some(Duration::from_millis(30))),
            WaitOutcome::TimedOut
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert_eq!(wait(&word, 5, Some(Duration::ZERO)), WaitOutcome::TimedOut);
    }

    #[test]
    fn mismatch_returns_immediately() {
        let word = AtomicU32::new(5);
        let start = Instant::now();
        assert_eq!(wait(&word, 4, None), WaitOutcome::ValueChanged);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn wake_nonpositive_count_is_noop() {
        let word = AtomicU32::new(0);
        assert_eq!(wake(&word, 0), 0);
        assert_eq!(wake(&word, -1), 0);
    }

    #[test]
    fn works_across_processes_on_shared_mapping() {
        let map = crate::Mapping::anonymous(4096).unwrap();
        // SAFETY: the mapping is 4096 bytes, page aligned and zero-filled, so
        // it holds a valid AtomicU32 at offset 0 for as long as `map` lives.
        let word: &AtomicU32 = unsafe { &*map.as_ptr().cast::<AtomicU32>() };
        // SAFETY: fork has no memory-safety preconditions; the child only
        // runs the futex syscall and atomics (async-signal-safe) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut code = 1;
            for _ in 0..1000 {
                if word.load(Ordering::Acquire) == 1 {
                    code = 0;
                    break;
                }
                wait(word, 0, Some(Duration::from_millis(10)));
            }
            // SAFETY: _exit terminates the child without running the parent's
            // destructors or atexit handlers.
            unsafe { libc::_exit(code) };
        }
        std::thread::sleep(Duration::from_millis(20));
        word.store(1, Ordering::Release);
        wake(word, i32::MAX);
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    /// issue 13.5: the one futex parker, with the core's wait helper, wakes a
    /// waiter in another process sleeping on an event count in a shared
    /// mapping (as a blocked publish or a parked recv does), and the
    /// waiter count returns to zero. The child's sleeps are long (10 s), so
    /// a lost wake-up shows as a failure, not as a slow pass.
    #[test]
    fn futex_parker_wakes_event_count_waiter_in_other_process() {
        use tensorbus_core::event::EventCount;
        let map = crate::Mapping::anonymous(4096).unwrap();
        // SAFETY: the mapping is 4096 bytes, page aligned and zero-filled;
        // an all-zero EventCount (two AtomicU32) is valid and fresh, and the
        // flag word at offset 64 is in bounds; both live as long as `map`.
        let (ev, flag): (&EventCount, &AtomicU32) = unsafe {
            (
                &*map.as_ptr().cast::<EventCount>(),
                &*map.as_ptr().add(64).cast::<AtomicU32>(),
            )
        };
        // SAFETY: fork has no memory-safety preconditions; the child only
        // runs atomics and the futex syscall (async-signal-safe) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let start = std::time::Instant::now();
            while !ev.wait_unless(
                &FutexParker,
                || flag.load(Ordering::Acquire) == 1,
                Duration::from_secs(10),
            ) {}
            let code = i32::from(start.elapsed() >= Duration::from_secs(10));
            // SAFETY: _exit terminates the child without running the parent's
            // destructors or atexit handlers.
            unsafe { libc::_exit(code) };
        }
        // Wait (bounded) until the child is announced, so the wake path runs.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ev.waiters.load(Ordering::Acquire) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        flag.store(1, Ordering::Release);
        ev.notify(&FutexParker);
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `pid` is our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child missed the wake-up (status {status:#x})"
        );
        assert_eq!(ev.waiters.load(Ordering::Acquire), 0);
    }
}
