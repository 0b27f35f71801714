//! `TurnLock`: the lock around a producer's publishing state.
//!
//! Two threads publish through one producer only rarely (the producer is
//! `Sync`, so they may), and publishing itself never waits for another
//! thread of this process. So the lock is built for the uncontended case:
//! taking it is one atomic swap, giving it back one plain release store
//! (`std::sync::Mutex` needs a second read-modify-write on unlock to learn
//! whether to wake a waiter). A thread that finds it taken spins briefly,
//! then yields, then sleeps in short slices: the holder may be waiting for
//! room on a full `block` ring, which takes as long as a consumer needs.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A value that one thread at a time may use.
pub(crate) struct TurnLock<T> {
    busy: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through a `Turn`, and at most one
// `Turn` exists at a time (`busy` swap); moving `T: Send` between the
// threads that take turns is what `Send` allows.
unsafe impl<T: Send> Sync for TurnLock<T> {}

impl<T> TurnLock<T> {
    pub(crate) fn new(value: T) -> TurnLock<T> {
        TurnLock {
            busy: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Waits for this thread's turn.
    #[inline]
    pub(crate) fn lock(&self) -> Turn<'_, T> {
        // Acquire pairs with the previous holder's Release in `Turn::drop`:
        // its writes to the value happen before ours.
        if self.busy.swap(true, Ordering::Acquire) {
            self.lock_contended();
        }
        Turn { lock: self }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut n = 0u32;
        loop {
            // Read before trying again, so waiters do not keep stealing the
            // line from the holder.
            if !self.busy.load(Ordering::Relaxed) && !self.busy.swap(true, Ordering::Acquire) {
                return;
            }
            n = n.saturating_add(1);
            if n < 64 {
                std::hint::spin_loop();
            } else if n < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

/// This thread's turn: the value, until dropped.
pub(crate) struct Turn<'a, T> {
    lock: &'a TurnLock<T>,
}

impl<T> Deref for Turn<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this `Turn` is the only one (`busy` is ours), so no
        // `&mut` to the value exists elsewhere.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for Turn<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the only view.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for Turn<'_, T> {
    fn drop(&mut self) {
        // Release: our writes to the value happen before the next turn.
        self.lock.busy.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::TurnLock;
    use std::sync::Arc;

    /// Turns exclude each other: increments from four threads all count.
    #[test]
    fn turns_exclude_each_other() {
        let lock = Arc::new(TurnLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = lock.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let mut v = lock.lock();
                        let seen = *v;
                        std::hint::black_box(&seen);
                        *v = seen + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.lock(), 80_000);
    }
}
