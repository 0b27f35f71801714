//! Consumers: receive read-only views of the very bytes a producer wrote.

use crate::client::{Inner, PoolRef};
use crate::element::{cast_slice, check_typed, Element};
use crate::error::{ForkedChild, RecvError, RequestError, TryRecvError, TypeError};
use crate::producer::SlotId;
use crate::readiness::Readiness;
use std::cell::Cell;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tensorbus_core::proto::ChannelInfo;
use tensorbus_core::proto::{Request, Response};
use tensorbus_core::receive::SubscriberPath;
use tensorbus_core::sync::spin_hint;
use tensorbus_core::{DType, Descriptor, Policy, TensorMeta};
use tensorbus_shm::futex::FutexParker;

/// How `recv` waits when nothing is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Spin without ever sleeping: lowest latency, burns a core.
    BusyPoll,
    /// Spin for up to `spin` then sleep on a futex (the default: 50 µs).
    SpinThenPark {
        /// How long to spin before parking.
        spin: Duration,
    },
    /// Sleep on a futex at once.
    Park,
}

impl Default for WaitStrategy {
    fn default() -> Self {
        WaitStrategy::SpinThenPark {
            spin: Duration::from_micros(50),
        }
    }
}

/// Longest single futex sleep; waits re-check their deadline this often.
const PARK_SLICE: Duration = Duration::from_millis(100);

/// The reading end of a channel (one subscription).
///
/// ```no_run
/// # let client = tensorbus::Client::connect()?;
/// let consumer = client.consumer("camera/raw")?;
/// let t = consumer.recv()?;                      // read-only view, no copy
/// println!("seq {} shape {:?} {}", t.seq(), t.shape(), t.dtype());
/// let sum: u64 = t.iter().map(|&b| u64::from(b)).sum();
/// drop(t);                                       // releases the slot
/// # let _ = sum;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Consumer {
    pub(crate) inner: Arc<Inner>,
    pub(crate) handle: u32,
    pub(crate) bit: u64,
    pub(crate) sub: usize,
    pub(crate) channel: ChannelInfo,
    pub(crate) policy: Policy,
    pub(crate) depth: u32,
    pub(crate) pools: Vec<Option<PoolRef>>,
    pub(crate) cursor: Cell<usize>,
    pub(crate) wait: WaitStrategy,
    /// The eventfd and waiter thread of [`Consumer::readiness`], made on
    /// first use (never touched by `recv`).
    pub(crate) readiness: OnceLock<Readiness>,
    /// [`Consumer::detach`] ran: receives find nothing.
    pub(crate) detached: Cell<bool>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("channel", &self.channel.name)
            .field("handle", &self.handle)
            .field("policy", &self.policy)
            .field("depth", &self.depth)
            .finish()
    }
}

/// A received tensor's raw parts, before a view is made of them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Received {
    pub id: SlotId,
    pub ptr: *mut u8,
    pub meta: TensorMeta,
}

impl Consumer {
    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.channel.name
    }
    /// Broker handle id.
    pub fn handle(&self) -> u32 {
        self.handle
    }
    /// Policy in effect.
    pub fn policy(&self) -> Policy {
        self.policy
    }
    /// Ring depth in effect.
    pub fn depth(&self) -> u32 {
        self.depth
    }
    /// `Err(ForkedChild)` in a process forked after this consumer's client
    /// connected: the consumer is inert here (see [`crate::Client`]'s fork
    /// semantics). One relaxed load.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.inner.origin.check()
    }
    /// Changes how `recv` waits.
    pub fn set_wait_strategy(&mut self, wait: WaitStrategy) {
        self.wait = wait;
    }
    /// Tensors that producers dropped for this subscriber since it
    /// subscribed (`drop_oldest`: released unread; `drop_newest`: never
    /// queued; `latest`: replaced); always 0 under `block`. The counter
    /// `tensorbus stat` shows, read from the subscriber's shared record with
    /// one relaxed load: no syscall, cheap enough to poll per frame.
    ///
    /// ```no_run
    /// # use tensorbus::{Client, ConsumerOptions, Policy};
    /// let client = Client::connect()?;
    /// let frames = client.consumer_with("camera/raw", ConsumerOptions::default().policy(Policy::Latest))?;
    /// let t = frames.recv()?;
    /// println!("seq {} ({} frames skipped so far)", t.seq(), frames.dropped());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dropped(&self) -> u64 {
        self.record()
            .map_or(0, |s| s.dropped.load(Ordering::Relaxed))
    }
    /// Tensors this subscriber has received since it subscribed (the
    /// `delivered` counter of `tensorbus stat`).
    pub fn received(&self) -> u64 {
        self.record()
            .map_or(0, |s| s.delivered.load(Ordering::Relaxed))
    }

    /// This subscriber's shared record (statistics only: Relaxed loads of
    /// counters that order nothing else).
    fn record(&self) -> Option<&tensorbus_core::records::SubscriberRecord> {
        self.inner
            .control
            .subscriber(self.channel.index as usize, self.sub)
    }

    #[inline]
    fn path(&self) -> SubscriberPath<'_> {
        SubscriberPath {
            ctl: &self.inner.control,
            channel: self.channel.index as usize,
            sub: self.sub,
            bit: self.bit,
            lossless: self.policy == Policy::Block,
        }
    }

    /// Ends this subscription's deliveries at once, while tensors received
    /// from it stay valid until they are dropped: the subscriber leaves its
    /// channel at the broker (producers stop delivering to it, a `block`
    /// producer no longer waits for it; its queued tensors are released, or
    /// handed to the other workers of a work queue). Afterwards `try_recv`
    /// finds nothing (`Empty`) and `recv`/`recv_timeout` return
    /// [`RecvError::Detached`]. Dropping the consumer closes the handle.
    /// Bindings use it for `close()` while tensors are alive; detaching twice
    /// does nothing.
    ///
    /// ```no_run
    /// # let client = tensorbus::Client::connect()?;
    /// let frames = client.consumer("camera/raw")?;
    /// let keep = frames.recv()?;          // still in use below
    /// frames.detach()?;                   // no more deliveries from here on
    /// println!("{}", keep.len());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn detach(&self) -> Result<(), RequestError> {
        if self.detached.replace(true) {
            return Ok(());
        }
        match self.inner.request(&Request::Detach {
            handle: self.handle,
        })? {
            (Response::Ok, _) => Ok(()),
            (Response::Error { message, .. }, _) => Err(RequestError::Protocol(message)),
            (other, _) => Err(RequestError::Protocol(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    #[inline]
    pub(crate) fn try_take(&self) -> Result<Received, TryRecvError> {
        // An inherited consumer takes nothing from the parent's queue.
        self.inner.origin.check()?;
        if self.detached.get() {
            return Err(TryRecvError::Empty);
        }
        let path = self.path();
        let mut cursor = self.cursor.get();
        let desc = path.pop(&mut cursor, &FutexParker);
        self.cursor.set(cursor);
        let desc: Descriptor = desc.ok_or(TryRecvError::Empty)?;
        let pools = &self.pools;
        // The pool index comes from shared memory: look it up, never index.
        let r = pools.get(usize::from(desc.pool)).copied().flatten();
        let mut received = Received {
            id: SlotId {
                pool: desc.pool,
                index: desc.index,
                generation: 0,
            },
            ptr: std::ptr::null_mut(),
            meta: TensorMeta::EMPTY,
        };
        received.id.generation = path.validate_into(
            desc,
            |p| pools.get(p).copied().flatten().map(|r| r.slot_size),
            &mut received.meta,
        )?;
        // Validation succeeded, so `capacity(pool)` was `Some`: `r` is too.
        let Some(r) = r else {
            return Err(TryRecvError::Corrupted(
                tensorbus_core::receive::Corruption::ForeignPool { pool: desc.pool },
            ));
        };
        path.count_delivered();
        // SAFETY: validate checked index < slots, and the mapping spans
        // slots * stride bytes.
        received.ptr = unsafe { r.base.add(desc.index as usize * r.stride as usize) };
        Ok(received)
    }

    #[inline]
    pub(crate) fn take_timeout(&self, timeout: Option<Duration>) -> Result<Received, RecvError> {
        let start = std::time::Instant::now();
        let expired = || timeout.is_some_and(|t| start.elapsed() >= t);
        let spin = match self.wait {
            WaitStrategy::BusyPoll => None,
            WaitStrategy::SpinThenPark { spin } => Some(spin),
            WaitStrategy::Park => Some(Duration::ZERO), // handled before spinning
        };
        let mut spins = 0u32;
        loop {
            match self.try_take() {
                Ok(r) => return Ok(r),
                Err(TryRecvError::Corrupted(c)) => return Err(RecvError::Corrupted(c)),
                Err(TryRecvError::Empty) if self.detached.get() => return Err(RecvError::Detached),
                Err(TryRecvError::ForkedChild(f)) => return Err(RecvError::ForkedChild(f)),
                // Only stages report it, and not from `try_take`.
                Err(TryRecvError::NotExclusive(d)) => return Err(RecvError::NotExclusive(d)),
                Err(TryRecvError::Empty) => {}
            }
            if self.wait == WaitStrategy::Park {
                if expired() {
                    return Err(RecvError::Timeout(timeout.unwrap_or_default()));
                }
                self.park(timeout.map(|t| t.saturating_sub(start.elapsed())));
                continue;
            }
            spins = spins.wrapping_add(1);
            // Check the clock only every 64 spins (it costs tens of ns).
            if spins % 64 != 0 {
                spin_hint();
                continue;
            }
            if expired() {
                return Err(RecvError::Timeout(timeout.unwrap_or_default()));
            }
            match spin {
                None => spin_hint(),
                Some(s) if start.elapsed() < s => spin_hint(),
                Some(_) => self.park(timeout.map(|t| t.saturating_sub(start.elapsed()))),
            }
        }
    }

    /// Sleeps until a producer signals (or the slice/remaining time ends).
    fn park(&self, remaining: Option<Duration>) {
        let Some(sub) = self
            .inner
            .control
            .subscriber(self.channel.index as usize, self.sub)
        else {
            std::thread::sleep(Duration::from_millis(1));
            return;
        };
        let slice = remaining.map_or(PARK_SLICE, |r| r.min(PARK_SLICE));
        // Producers push, then notify this event; `has_entry` is the re-check.
        sub.config
            .data
            .wait_unless(&FutexParker, || self.path().has_entry(), slice);
    }

    /// Returns the next tensor if one is queued, without waiting.
    #[inline]
    pub fn try_recv(&self) -> Result<Tensor<'_>, TryRecvError> {
        self.try_take().map(|r| Tensor { consumer: self, r })
    }

    /// Waits for the next tensor (spinning, then sleeping, per the wait strategy).
    #[inline]
    pub fn recv(&self) -> Result<Tensor<'_>, RecvError> {
        self.take_timeout(None)
            .map(|r| Tensor { consumer: self, r })
    }

    /// Waits at most `timeout` for the next tensor.
    #[inline]
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Tensor<'_>, RecvError> {
        self.take_timeout(Some(timeout))
            .map(|r| Tensor { consumer: self, r })
    }

    /// The consumer's [`Readiness`]: an eventfd that becomes readable when
    /// a tensor is queued (while armed), for event loops that cannot block
    /// in [`Consumer::recv`] (asyncio, epoll, tokio). The first call creates
    /// the eventfd and one waiter thread; both live as long as the consumer.
    /// In a forked child it fails (see [`ForkedChild`]).
    /// `recv` and `try_recv` are unchanged by it: no syscall and no
    /// allocation while it is not armed.
    ///
    /// ```no_run
    /// # let client = tensorbus::Client::connect()?;
    /// let consumer = client.consumer("camera/raw")?;
    /// let ready = consumer.readiness()?;
    /// if consumer.try_recv().is_err() {
    ///     ready.arm();        // ready.fd() turns readable when a tensor is queued
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn readiness(&self) -> std::io::Result<&Readiness> {
        self.fork_check().map_err(std::io::Error::other)?;
        if let Some(r) = self.readiness.get() {
            return Ok(r);
        }
        let made = Readiness::new(
            self.inner.clone(),
            self.channel.index as usize,
            self.sub,
            self.bit,
            self.policy == Policy::Block,
        )?;
        // Another thread may have won the race; then `made` is dropped (its
        // thread stopped) and theirs is used.
        let _ = self.readiness.set(made);
        Ok(self.readiness.get().expect("set above"))
    }

    /// Shorthand for `readiness()?.fd()`: the eventfd to watch (see
    /// [`Readiness`] for the arm / watch / clear protocol).
    pub fn readiness_fd(&self) -> std::io::Result<BorrowedFd<'_>> {
        self.readiness().map(Readiness::fd)
    }

    /// Releases a slot this subscriber holds (not in a forked child: there
    /// the hold is the parent's).
    pub(crate) fn release(&self, id: SlotId) {
        if self.inner.origin.is_forked() {
            return;
        }
        if let Some(slot) = self
            .inner
            .control
            .slot(usize::from(id.pool), id.index as usize)
        {
            slot.release(self.bit);
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Stop the waiter thread before the subscriber record goes back to
        // the broker (it parks on that record's event count). In a forked
        // child both are no-ops (see `Readiness`'s drop, `Inner::request`).
        drop(self.readiness.take());
        self.inner.close_handle(self.handle);
    }
}

/// A received tensor: a read-only view of the slot the producer wrote.
/// Dropping it releases the slot (the last release frees it).
pub struct Tensor<'c> {
    consumer: &'c Consumer,
    r: Received,
}

impl std::fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("slot", &self.r.id)
            .field("meta", &self.r.meta)
            .finish()
    }
}

impl Tensor<'_> {
    /// Where the slot is.
    pub fn slot_id(&self) -> SlotId {
        self.r.id
    }
    /// All metadata (validated against the slot bounds at receive time).
    pub fn meta(&self) -> &TensorMeta {
        &self.r.meta
    }
    /// Extents.
    pub fn shape(&self) -> &[u32] {
        self.r.meta.shape()
    }
    /// Byte strides.
    pub fn strides(&self) -> &[i64] {
        self.r.meta.strides()
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.r.meta.dtype
    }
    /// Per-producer sequence number.
    pub fn seq(&self) -> u64 {
        self.r.meta.seq
    }
    /// CLOCK_MONOTONIC nanoseconds at publish.
    pub fn timestamp_ns(&self) -> u64 {
        self.r.meta.timestamp_ns
    }
    /// Id of the publishing client.
    pub fn producer_id(&self) -> u32 {
        self.r.meta.producer
    }
    /// The user header.
    pub fn user_header(&self) -> &[u8] {
        self.r.meta.user_header()
    }
    /// Address of the first payload byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.r.ptr
    }
    /// `Err(ForkedChild)` in a process forked after this tensor's consumer
    /// was opened: the hold is the parent's; dropping it releases nothing.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.consumer.fork_check()
    }
    /// The tensor as a typed slice (dtype must match; contiguous).
    pub fn as_slice_of<T: Element>(&self) -> Result<&[T], TypeError> {
        let len = check_typed::<T>(&self.r.meta)?;
        // SAFETY: see `Deref`; `cast_slice` checks alignment and size.
        unsafe { cast_slice::<T>(self.r.ptr, len) }.ok_or(TypeError::NotContiguous)
    }
}

impl std::ops::Deref for Tensor<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: validation checked nbytes <= slot_size, so the range lies
        // inside our slot of a mapping the consumer's client keeps alive; we
        // hold the slot (our holder bit) until drop, so no producer may loan
        // and rewrite it meanwhile.
        unsafe { std::slice::from_raw_parts(self.r.ptr, self.r.meta.nbytes as usize) }
    }
}

impl Drop for Tensor<'_> {
    fn drop(&mut self) {
        self.consumer.release(self.r.id);
    }
}
