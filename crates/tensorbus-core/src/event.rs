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
//!
//! Waiters use [`EventCount::wait_unless`] (announce, re-check, sleep,
//! withdraw, in that order) and wakers [`EventCount::notify`]; nothing else
//! in the workspace spells the sequence out. `prepare_wait`, `cancel_wait`
//! and `notify_needed` stay public as the steps those two are made of.

use crate::park::Parker;
use crate::sync::{fence, AtomicU32, Ordering};
use std::time::Duration;

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

    /// Sleeps on this event for at most `timeout` unless `ready()` holds
    /// once this waiter is announced. Returns `true` when `ready()` held
    /// (nothing slept) and `false` after a sleep, which may have ended by a
    /// wake-up, by the timeout or spuriously: the caller loops and looks
    /// again, as with any futex.
    ///
    /// `ready` is called exactly once, after the announcement, and must read
    /// the state the waker changes before it calls [`EventCount::notify`]
    /// (or, after a SeqCst fence or SeqCst store of its own, as the broker's
    /// retirement and the readiness kick do, [`EventCount::bump`]). That is
    /// the whole contract; the orderings:
    ///
    /// * `prepare_wait` increments `waiters`, issues a SeqCst fence, then
    ///   loads `seq` (the key). `ready()` runs after the fence, so its loads
    ///   are ordered after the increment whatever orderings they use.
    /// * The waker stores its change, then [`EventCount::notify`] issues a
    ///   SeqCst fence and loads `waiters`. The two fences are totally
    ///   ordered: if the waiter's fence is first, the waker's load sees the
    ///   increment, bumps `seq` and wakes; if the waker's fence is first,
    ///   `ready()` sees the change and we do not sleep.
    /// * In the first case, the key load may or may not see the bump. If it
    ///   sees it, it reads a Release RMW with Acquire, so the waker's change
    ///   (stored before the bump) happens before `ready()`, which then sees
    ///   it and we do not sleep. If it reads an older value, the parker's
    ///   wait compares `seq` with the key atomically with respect to the
    ///   wake (a futex does): it either sees the bumped value and returns,
    ///   or is already asleep when the wake comes.
    /// * `cancel_wait` runs on every path, so the count of announced waiters
    ///   goes back down and later notifications skip the wake-up again.
    ///
    /// No allocation; the only syscall is the parker's sleep, made only when
    /// `ready()` is false.
    #[inline]
    pub fn wait_unless(
        &self,
        parker: &impl Parker,
        ready: impl FnOnce() -> bool,
        timeout: Duration,
    ) -> bool {
        let key = self.prepare_wait();
        let ready = ready();
        if !ready {
            parker.wait(&self.seq, key, timeout);
        }
        self.cancel_wait();
        ready
    }

    /// Wakes the waiters of this event, if any, after the caller made its
    /// change visible (see [`EventCount::wait_unless`] for why no waiter is
    /// missed). With nobody announced this is one fence and one load: no
    /// syscall, which keeps the data path free of them.
    #[inline]
    pub fn notify(&self, parker: &impl Parker) {
        if self.notify_needed() {
            parker.wake_all(&self.seq);
        }
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

    /// A futex as loom can model it: the compare and the sleep happen under
    /// one lock that the wake takes too (the kernel's hash-bucket lock), and
    /// the sleep has no timeout, so a lost wake-up is a deadlock loom
    /// reports. Counts the sleeps so tests can tell the paths apart.
    struct LoomFutex {
        lock: loom::sync::Mutex<()>,
        cv: loom::sync::Condvar,
        sleeps: AtomicU32,
        wakes: AtomicU32,
    }

    impl LoomFutex {
        fn new() -> LoomFutex {
            LoomFutex {
                lock: loom::sync::Mutex::new(()),
                cv: loom::sync::Condvar::new(),
                sleeps: AtomicU32::new(0),
                wakes: AtomicU32::new(0),
            }
        }
    }

    impl Parker for LoomFutex {
        fn wait(&self, word: &AtomicU32, expected: u32, _timeout: Duration) {
            let g = self.lock.lock().unwrap();
            if word.load(Ordering::Relaxed) == expected {
                self.sleeps.fetch_add(1, Ordering::Relaxed);
                drop(self.cv.wait(g).unwrap());
            }
        }
        fn wake_all(&self, _word: &AtomicU32) {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            let _g = self.lock.lock().unwrap();
            self.cv.notify_all();
        }
    }

    /// issue 13.5: the shared wait helper. A waiter loops on
    /// `wait_unless` with an unbounded sleep until it sees a flag; a waker
    /// sets the flag and calls `notify`. In every interleaving the waiter
    /// finishes (no lost wake-up: loom would report the deadlock), the
    /// waiter count is back to zero, and a waiter that never slept cost the
    /// waker no wake-up unless it was announced when the waker looked.
    #[test]
    fn wait_unless_never_loses_a_notify() {
        loom::model(|| {
            let ev = Arc::new(EventCount::new());
            let flag = Arc::new(AtomicBool::new(false));
            let futex = Arc::new(LoomFutex::new());
            let (e2, f2, p2) = (ev.clone(), flag.clone(), futex.clone());
            let waker = loom::thread::spawn(move || {
                f2.store(true, Ordering::Relaxed);
                e2.notify(&*p2);
            });
            // The recheck reads the flag Relaxed on purpose: the fences in
            // `prepare_wait` and `notify` must suffice.
            while !ev.wait_unless(&*futex, || flag.load(Ordering::Relaxed), Duration::MAX) {}
            waker.join().unwrap();
            assert_eq!(ev.waiters.load(Ordering::Relaxed), 0);
            // Every sleep was matched by a wake-up.
            assert!(futex.sleeps.load(Ordering::Relaxed) <= futex.wakes.load(Ordering::Relaxed));
        });
    }

    /// issue 13.5: with nobody waiting, `notify` never calls the parker (the
    /// data path makes no syscall), and a waiter whose condition already
    /// holds never sleeps.
    #[test]
    fn wait_unless_fast_paths() {
        loom::model(|| {
            let ev = EventCount::new();
            let futex = LoomFutex::new();
            ev.notify(&futex);
            assert_eq!(futex.wakes.load(Ordering::Relaxed), 0);
            assert!(ev.wait_unless(&futex, || true, Duration::MAX));
            assert_eq!(futex.sleeps.load(Ordering::Relaxed), 0);
            assert_eq!(ev.waiters.load(Ordering::Relaxed), 0);
            ev.notify(&futex);
            assert_eq!(futex.wakes.load(Ordering::Relaxed), 0);
        });
    }

    /// issue 13.5: two waiters on one event (a producer blocked on a ring and
    /// the readiness thread share a subscriber's data event): one notify
    /// after the change releases both.
    #[test]
    fn wait_unless_two_waiters() {
        // Three threads with retry loops: bounded preemptions keep the
        // model to seconds (the two-thread model above is exhaustive).
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let ev = Arc::new(EventCount::new());
            let flag = Arc::new(AtomicBool::new(false));
            let futex = Arc::new(LoomFutex::new());
            let (e2, f2, p2) = (ev.clone(), flag.clone(), futex.clone());
            let other = loom::thread::spawn(move || {
                while !e2.wait_unless(&*p2, || f2.load(Ordering::Acquire), Duration::MAX) {}
            });
            let (e3, f3, p3) = (ev.clone(), flag.clone(), futex.clone());
            let waker = loom::thread::spawn(move || {
                f3.store(true, Ordering::Release);
                e3.notify(&*p3);
            });
            while !ev.wait_unless(&*futex, || flag.load(Ordering::Acquire), Duration::MAX) {}
            other.join().unwrap();
            waker.join().unwrap();
            assert_eq!(ev.waiters.load(Ordering::Relaxed), 0);
        });
    }
}
