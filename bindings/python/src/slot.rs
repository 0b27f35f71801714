//! The Rust handle behind each Python handle, and how `close()` ends it.
//!
//! A Python `Producer`, `Consumer` or `Stage` owns a [`Slot`]: the Rust
//! handle in an `Arc`, until `close()` (or the Python object's end) takes it
//! out. Calls clone the `Arc` for their duration, so a thread blocked in
//! `recv()` keeps the handle it waits on. Tensors need no part of this: the
//! Rust tensors own their handle's core (loans and staged tensors also keep
//! the handle here, as [`crate::tensor`] explains).
//!
//! Closing while someone else still holds the handle (a thread in `recv`,
//! a tensor) ends the handle's deliveries at once ([`Handle::detach`]); the
//! handle itself goes when its last holder lets go.

use crate::errors::{closed, forked_err, open_err};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};
use tensorbus::error::ForkedChild;
use tensorbus::{Client, Consumer, Producer, Stage};

/// Locks a mutex, ignoring poison (the guarded data stays consistent: every
/// critical section here only moves values in and out).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A Rust handle a Python handle owns.
pub(crate) trait Handle: Send + Sync + 'static {
    /// `Err` in a process forked after the handle was opened (one relaxed
    /// load): the handle is inert there.
    fn fork_check(&self) -> Result<(), ForkedChild>;
    /// `close()` was called (the handle is still open).
    fn closing(&self) {}
    /// Ends deliveries now, although others still hold the handle.
    fn detach(&self) {}
}

impl Handle for Producer {
    fn fork_check(&self) -> Result<(), ForkedChild> {
        Producer::fork_check(self)
    }
}

/// Something a client closes when it is closed.
pub(crate) trait Closable: Send + Sync {
    /// Closes it (see [`Slot::close`]).
    fn close(&self);
}

/// A Python handle's Rust handle, `None` once closed.
pub(crate) struct Slot<H: Handle> {
    /// The handle, until `close()`.
    keep: Mutex<Option<Arc<H>>>,
    /// The same handle, to reach it without the lock (see [`Slot::get`]).
    weak: Weak<H>,
    /// `close()` was called.
    closed: AtomicBool,
    /// "producer", "consumer", "stage": for messages.
    what: &'static str,
}

impl<H: Handle> Slot<H> {
    /// A slot holding `handle`.
    pub(crate) fn new(handle: H, what: &'static str) -> Arc<Slot<H>> {
        let h = Arc::new(handle);
        Arc::new(Slot {
            weak: Arc::downgrade(&h),
            keep: Mutex::new(Some(h)),
            closed: AtomicBool::new(false),
            what,
        })
    }

    /// Whether `close()` was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The handle, `Ok(None)` after `close()`, or `ForkedChild` in a process
    /// forked after the handle was opened.
    ///
    /// Takes no lock (a lock some thread of the parent held at a fork stays
    /// locked in the child forever): the handle is reached through a weak
    /// reference, which fails once `close()` dropped it and nobody else
    /// holds it.
    pub(crate) fn get_open(&self) -> PyResult<Option<Arc<H>>> {
        if self.is_closed() {
            return Ok(None);
        }
        let Some(h) = self.weak.upgrade() else {
            return Ok(None);
        };
        h.fork_check().map_err(forked_err)?;
        Ok(Some(h))
    }

    /// The handle, or `Closed` ("this {what} is closed") after `close()`,
    /// or `ForkedChild` (see [`Slot::get_open`]).
    pub(crate) fn get(&self) -> PyResult<Arc<H>> {
        self.get_open()?.ok_or_else(|| closed(self.what))
    }

    /// Closes the handle: no more calls through this slot; deliveries end
    /// at once; the Rust handle goes when its last holder lets go.
    ///
    /// In a forked child the handle is the parent's: it is only let go of
    /// here (the Rust handle's drop does nothing to the parent's).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let forked = self.weak.upgrade().is_some_and(|h| h.fork_check().is_err());
        let taken = if forked {
            // A parent thread may have held the lock at the fork: never wait.
            match self.keep.try_lock() {
                Ok(mut g) => g.take(),
                Err(TryLockError::Poisoned(p)) => p.into_inner().take(),
                Err(TryLockError::WouldBlock) => None,
            }
        } else {
            lock(&self.keep).take()
        };
        let Some(h) = taken else {
            return;
        };
        if forked {
            drop(h);
            return;
        }
        h.closing();
        match Arc::try_unwrap(h) {
            // Ours was the only reference: the handle's own drop ends it
            // (detaching first if tensors from it are alive).
            Ok(h) => drop(h),
            // Another thread uses it right now (a `recv`), or tensors keep
            // it: stop its deliveries now; the last holder drops it.
            Err(h) => h.detach(),
        }
    }
}

impl<H: Handle> Closable for Slot<H> {
    fn close(&self) {
        Slot::close(self);
    }
}

impl<H: Handle> Drop for Slot<H> {
    fn drop(&mut self) {
        // The Python handle is gone without `close()`: close it now, so that
        // a subscription never waits for the cycle collector (issue 11.2).
        self.close();
    }
}

// -------------------------------------------------------------- consumer ---

/// A consumer and whether `recv_async` uses its readiness fd.
pub(crate) struct ConsumerHandle {
    /// The subscription.
    pub(crate) consumer: Consumer,
    /// Whether the readiness (eventfd and waiter thread) was made: then
    /// `close()` wakes the event loops that watch it.
    pub(crate) aio: AtomicBool,
    /// The counters as `close()` found them, shared with the Python
    /// consumer, which reads them after the handle is gone.
    pub(crate) last: Arc<FinalCounts>,
}

/// A consumer's `dropped` and `received` counters as they were at
/// `close()`: readable after it (issue 14.3), when the subscription record
/// they live in may already belong to another subscriber.
#[derive(Default)]
pub(crate) struct FinalCounts {
    /// Set (Release) once `dropped` and `received` hold the final values.
    pub(crate) taken: AtomicBool,
    /// Tensors producers dropped for the subscriber.
    pub(crate) dropped: AtomicU64,
    /// Tensors the subscriber received.
    pub(crate) received: AtomicU64,
}

impl Handle for ConsumerHandle {
    fn fork_check(&self) -> Result<(), ForkedChild> {
        self.consumer.fork_check()
    }

    fn closing(&self) {
        // Before the subscription ends: its counters as of `close()`.
        self.last
            .dropped
            .store(self.consumer.dropped(), Ordering::Relaxed);
        self.last
            .received
            .store(self.consumer.received(), Ordering::Relaxed);
        self.last.taken.store(true, Ordering::Release);
        // Wakes `recv_async` waiters so that they see the consumer closed.
        if self.aio.load(Ordering::Acquire) {
            if let Ok(r) = self.consumer.readiness() {
                r.wake();
            }
        }
    }

    fn detach(&self) {
        // Best effort: a broker that is gone delivers nothing anyway.
        let _ = self.consumer.detach();
    }
}

// ----------------------------------------------------------------- stage ---

/// A stage, and the producers it opened for `forward("other channel")`.
pub(crate) struct StageHandle {
    /// The stage.
    pub(crate) stage: Stage,
    /// The output channel's name.
    output: String,
    /// The client the stage came from: opens producers for `forward(name)`.
    client: Client,
    /// Producers this stage opened for `forward(name)` to other channels.
    extra: Mutex<Vec<(String, Arc<Producer>)>>,
}

impl StageHandle {
    /// The handle of `stage` (opened from `client`, output `output`).
    pub(crate) fn new(stage: Stage, output: &str, client: Client) -> StageHandle {
        StageHandle {
            stage,
            output: output.to_owned(),
            client,
            extra: Mutex::new(Vec::new()),
        }
    }

    /// The output channel's name.
    pub(crate) fn output_name(&self) -> &str {
        &self.output
    }

    /// The producer `forward(channel)` uses for a channel other than the
    /// output: opened (GIL released) on first use, then kept.
    pub(crate) fn producer_for(&self, py: Python<'_>, channel: &str) -> PyResult<Arc<Producer>> {
        if let Some((_, p)) = lock(&self.extra).iter().find(|(n, _)| n == channel) {
            return Ok(p.clone());
        }
        // Open outside the lock: the broker request runs without the GIL.
        let p = py
            .detach(|| self.client.producer(channel))
            .map_err(open_err)?;
        let mut extra = lock(&self.extra);
        if let Some((_, q)) = extra.iter().find(|(n, _)| n == channel) {
            return Ok(q.clone()); // another thread opened it meanwhile
        }
        let p = Arc::new(p);
        extra.push((channel.to_owned(), p.clone()));
        Ok(p)
    }
}

impl Handle for StageHandle {
    fn fork_check(&self) -> Result<(), ForkedChild> {
        self.stage.fork_check()
    }

    fn detach(&self) {
        // Stops the input subscription now (staged tensors stay valid and
        // can still be forwarded).
        let _ = self.stage.detach();
    }
}
