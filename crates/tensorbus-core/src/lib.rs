//! # tensorbus-core
//!
//! The shared-memory layout and the lock-free algorithms of tensorbus, with
//! no syscalls, so that every lock-free structure can be model-checked with
//! `loom` (`RUSTFLAGS="--cfg loom" cargo test -p tensorbus-core --release`).
//!
//! * [`slot`]: slot headers and the holder word (ownership that survives a
//!   kill -9 at any instruction);
//! * [`ring`]: the single-producer single-consumer descriptor ring;
//! * [`event`]: the event count that makes wake-ups free when nobody sleeps,
//!   and its one wait helper ([`event::EventCount::wait_unless`]);
//! * [`park`]: the [`park::Parker`] trait the syscall-making crates implement;
//! * [`layout`] and [`control`]: where everything lives in the control segment;
//! * [`publish`], [`receive`], [`reclaim`]: the data path and the broker's
//!   repairs, written against [`control::Control`].
//!
//! Everything read from shared memory is treated as untrusted: indices are
//! range-checked, metadata is copied out and validated, garbage yields an
//! error value and never a panic or an out-of-bounds access.

#![deny(missing_docs)]

pub mod bits;
pub mod desc;
pub mod dtype;
pub mod event;
pub mod latency;
pub mod layout;
pub mod meta;
pub mod park;
pub mod pool_counters;
pub mod records;
pub mod ring;
pub mod slot;
pub mod subset;
pub mod sync;

#[cfg(not(loom))]
pub mod control;
#[cfg(not(loom))]
pub mod proto;
#[cfg(not(loom))]
pub mod publish;
#[cfg(not(loom))]
pub mod receive;
#[cfg(not(loom))]
pub mod reclaim;
pub mod registry;
pub mod wide;

pub use desc::{Descriptor, DESC_MASK, MAX_POOLS, MAX_SLOTS_PER_POOL};
pub use dtype::DType;
pub use meta::{ShapeError, TensorMeta, MAX_DIMS, USER_HEADER_LEN};
pub use records::{Mode, Policy};

/// Aligns its content to a cache line (64 bytes) so that fields written by
/// different processes do not share a line.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct CacheLine<T>(pub T);

impl<T> core::ops::Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
