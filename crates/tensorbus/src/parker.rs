//! Futex-backed parking for the core's data path.

use std::sync::atomic::AtomicU32;
use std::time::Duration;
use tensorbus_core::park::Parker;

/// Sleeps with a shared futex (works across processes).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FutexParker;

impl Parker for FutexParker {
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration) {
        tensorbus_shm::futex::wait(word, expected, Some(timeout));
    }
    fn wake_all(&self, word: &AtomicU32) {
        tensorbus_shm::futex::wake(word, i32::MAX);
    }
}
