//! Per-pool loan counters in the control segment (issue 17.1): how often a
//! size class ran dry.
//!
//! A producer loans from the smallest pool whose slots fit the tensor and
//! falls back to larger ones when it is full. Two things are worth knowing
//! about a pool that runs dry, and both are counted against the *smallest
//! fitting* pool (the size class the tensor belongs to):
//!
//! * `spilled`: a loan that found it full and was served by a larger pool
//!   (the class starves while a bigger one pays for it);
//! * `refused`: a loan that failed because every fitting pool was full
//!   (`LoanError::PoolExhausted`, or `Timeout` of a waiting loan, counted
//!   once per call).
//!
//! Both are off the hot path: a loan that finds a free slot in its own
//! class touches neither. Any producer of any process may count, so they
//! are `fetch_add`s (relaxed: they are statistics, read by the broker for
//! `stat` and ordered with nothing). Plain std atomics even under loom:
//! nothing here is model-checked, and the size must match
//! [`POOL_COUNTERS_STRIDE`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of one pool's counters in the control segment (one cache line, so
/// two classes running dry at once do not share a line).
pub const POOL_COUNTERS_STRIDE: usize = 64;

/// One pool's counters (see the module comment).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct PoolCounters {
    /// Loans refused: every pool that fits was full.
    pub refused: AtomicU64,
    /// Loans served by a larger pool because this one was full.
    pub spilled: AtomicU64,
    _reserved: [AtomicU64; 6],
}

const _: () = assert!(core::mem::size_of::<PoolCounters>() == POOL_COUNTERS_STRIDE);

impl PoolCounters {
    /// Counts a refused loan.
    #[cold]
    pub fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a loan served by a larger pool.
    #[cold]
    pub fn count_spilled(&self) {
        self.spilled.fetch_add(1, Ordering::Relaxed);
    }

    /// `(refused, spilled)` now.
    pub fn load(&self) -> (u64, u64) {
        (
            self.refused.load(Ordering::Relaxed),
            self.spilled.load(Ordering::Relaxed),
        )
    }
}
