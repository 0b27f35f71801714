//! An event count: the parking protocol that lets a waker skip the wake-up
//! syscall when nobody sleeps.
//!
//! The waiter announces itself, reads the sequence word, re-checks its
//! condition and only then sleeps on the sequence word (a futex in shared
//! memory; the syscall lives in `tensorbus-shm`, this crate only holds the
//! atomics). The waker makes its change visible, then looks at the waiter
//! count; only if it is non-zero does it bump the sequence and wake.
//!
//! Why no wake-up is lost (a Dekker-style argument): the waiter does
//! `waiters += 1; fence(SeqCst); check condition`, the waker does
//! `make condition true; fence(SeqCst); read waiters`. The two SeqCst fences
//! are totally ordered, so either the waker's read sees the increment (and
//! wakes), or the waiter's check sees the condition (and does not sleep).
//! If the waiter read `seq` before the waker bumped it, the futex wait sees a
//! changed value and returns at once.

use crate::sync::{fence, AtomicU32, Ordering};

/// Sequence word plus waiter count; 8 bytes, lives inside shared records.
#[repr(C)]
#[derive(Debug)]
pub struct EventCount {
    /// Bumped by every notification that found a waiter; the futex word.
    pub seq: AtomicU32,
    /// Number of processes between [`EventCount::prepare_wait`] and
    /// [`EventCount::cancel_wait`].
    pub waiters: AtomicU32,
}

impl Default for EventCount {
    fn default() -> Self {
        EventCount::new()
    }
}

impl EventCount {
    /// A fresh event count (for tests and loom; shared memory starts zeroed).
    pub fn new() -> EventCount {
        EventCount {
            seq: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
        }
    }

    /// Announces a waiter and returns the key to sleep on. The caller must
    /// re-check its condition after this and before sleeping on `seq` with
    /// the key, and must call [`EventCount::cancel_wait`] afterwards.
    #[inline]
    pub fn prepare_wait(&self) -> u32 {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        // SeqCst fence: pairs with the fence in `notify_needed` (see module docs).
        fence(Ordering::SeqCst);
        self.seq.load(Ordering::Acquire)
    }

    /// Withdraws a waiter announced by [`EventCount::prepare_wait`].
    #[inline]
    pub fn cancel_wait(&self) {
        // Saturating: a corrupted count must not wrap to "always wake".
        let _ = self
            .waiters
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| w.checked_sub(1));
    }

    /// Called by a waker after making its change visible. Returns `true` when
    /// a waiter may be asleep: the sequence was bumped and the caller must now
    /// wake the futex at `seq`. Returns `false` (no syscall needed) otherwise.
    #[inline]
    pub fn notify_needed(&self) -> bool {
        // SeqCst fence: pairs with the fence in `prepare_wait` (see module docs).
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.seq.fetch_add(1, Ordering::Release);
        true
    }

    /// Bumps the sequence unconditionally (used by the broker after a reclaim
    /// to wake anyone who might wait for the dead peer). Returns `true` when
    /// waiters are registered.
    pub fn bump(&self) -> bool {
        self.seq.fetch_add(1, Ordering::Release);
        self.waiters.load(Ordering::Relaxed) != 0
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;

    /// Either the waker sees the waiter, or the waiter sees the condition.
    #[test]
    fn no_lost_wakeup() {
        loom::model(|| {
            let ev = Arc::new(EventCount::new());
            let flag = Arc::new(AtomicBool::new(false));
            let (e2, f2) = (ev.clone(), flag.clone());
            let waker = loom::thread::spawn(move || {
                f2.store(true, Ordering::Release);
                e2.notify_needed()
            });
            let key = ev.prepare_wait();
            let saw_condition = flag.load(Ordering::Acquire);
            let woke = waker.join().unwrap();
            // If the waiter would sleep, the waker must have bumped seq.
            if !saw_condition {
                assert!(woke);
                assert_ne!(ev.seq.load(Ordering::Acquire), key);
            }
            ev.cancel_wait();
        });
    }
}
