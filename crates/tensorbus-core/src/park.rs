//! How a blocked party sleeps: implemented with futexes once, by
//! `tensorbus_shm::futex::FutexParker` (used by the client library and the
//! broker alike), and by a spinning stand-in in tests. This crate makes no
//! syscalls. Waiters do not call a parker directly but go through
//! [`EventCount::wait_unless`](crate::event::EventCount::wait_unless), and
//! wakers through [`EventCount::notify`](crate::event::EventCount::notify).

use crate::sync::AtomicU32;
use std::time::Duration;

/// Sleeps on and wakes a 32-bit word in shared memory.
pub trait Parker {
    /// Sleeps while `*word == expected`, at most `timeout` (spurious returns allowed).
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration);
    /// Wakes every process sleeping on `word`.
    fn wake_all(&self, word: &AtomicU32);
}

/// A parker that never sleeps (yields instead); for tests and simulations.
#[derive(Debug, Default, Clone, Copy)]
pub struct YieldParker;

impl Parker for YieldParker {
    fn wait(&self, _word: &AtomicU32, _expected: u32, _timeout: Duration) {
        std::thread::yield_now();
    }
    fn wake_all(&self, _word: &AtomicU32) {}
}
