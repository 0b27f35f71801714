//! Consumers: receive read-only views of the very bytes a producer wrote.

use crate::client::{Inner, PoolRef};
use crate::error::{ForkedChild, RecvError, RequestError, TryRecvError};
use crate::readiness::Readiness;
use crate::view::{Placed, SlotId, SlotPtr, TensorView};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tensorbus_core::proto::ChannelInfo;
use tensorbus_core::proto::{Request, Response};
use tensorbus_core::receive::SubscriberPath;
use tensorbus_core::sync::spin_hint;
use tensorbus_core::wide::HolderId;
use tensorbus_core::{Descriptor, Policy, TensorMeta};
use tensorbus_shm::futex::FutexParker;

/// How `recv` waits when nothing is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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

/// The reading end of a channel (one subscription): a handle over shared
/// state. Received tensors ([`Tensor`]) own what they need: they may outlive
/// the `Consumer` value and move to other threads. `Consumer` is
/// `Send + Sync`: several threads may receive through one `&Consumer`
/// (each tensor goes to one of them), and [`Consumer::detach`] may be
/// called from any thread, also while another one waits in `recv`.
///
/// Dropping the consumer while tensors received from it are alive ends
/// the subscription's deliveries at once ([`Consumer::detach`]); the
/// broker handle closes when the last of those tensors is dropped.
///
/// ```no_run
/// use tensorbus::TensorView;
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
    pub(crate) core: Arc<ConsumerCore>,
    pub(crate) wait: WaitStrategy,
}

/// What a consumer's handle and its received tensors share.
pub(crate) struct ConsumerCore {
    pub(crate) inner: Arc<Inner>,
    pub(crate) handle: u32,
    pub(crate) id: HolderId,
    pub(crate) sub: usize,
    pub(crate) channel: ChannelInfo,
    pub(crate) policy: Policy,
    pub(crate) depth: u32,
    pub(crate) pools: Vec<Option<PoolRef>>,
    /// Which producer row the next pop starts at. Read and written only by
    /// the thread that holds `taking` (Relaxed: the lock orders it).
    pub(crate) cursor: AtomicUsize,
    /// A try-lock around taking from the rings: the rings are
    /// single-consumer, so two threads must not pop at once. A thread that
    /// finds it taken sees "nothing queued" (the other thread is taking).
    pub(crate) taking: AtomicBool,
    /// The eventfd and waiter thread of [`Consumer::readiness`], made on
    /// first use (never touched by `recv`).
    pub(crate) readiness: OnceLock<Readiness>,
    /// [`Consumer::detach`] ran: receives find nothing.
    pub(crate) detached: AtomicBool,
    /// Report end of stream ([`crate::ConsumerOptions::end_of_stream`]).
    pub(crate) end_of_stream: bool,
    /// Which receives record their latency (`tensorbus_core::latency`),
    /// read once from the record the broker activated.
    pub(crate) sample_mask: u64,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("channel", &self.core.channel.name)
            .field("handle", &self.core.handle)
            .field("policy", &self.core.policy)
            .field("depth", &self.core.depth)
            .finish()
    }
}

/// Releases the take lock when dropped (also if validation unwinds).
struct Taking<'a>(&'a AtomicBool);

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        // Release: this thread's ring accesses and cursor store happen
        // before the next taker's Acquire swap.
        self.0.store(false, Ordering::Release);
    }
}

impl Consumer {
    pub(crate) fn new(core: ConsumerCore, wait: WaitStrategy) -> Consumer {
        Consumer {
            core: Arc::new(core),
            wait,
        }
    }
    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.core.channel.name
    }
    /// Broker handle id.
    pub fn handle(&self) -> u32 {
        self.core.handle
    }
    /// Policy in effect.
    pub fn policy(&self) -> Policy {
        self.core.policy
    }
    /// Ring depth in effect.
    pub fn depth(&self) -> u32 {
        self.core.depth
    }
    /// `Err(ForkedChild)` in a process forked after this consumer's client
    /// connected: the consumer is inert here (see [`crate::Client`]'s fork
    /// semantics). One relaxed load.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.core.inner.origin.check()
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
    /// # use tensorbus::{Client, ConsumerOptions, Policy, TensorView};
    /// let client = Client::connect()?;
    /// let frames = client.consumer_with("camera/raw", ConsumerOptions::default().policy(Policy::Latest))?;
    /// let t = frames.recv()?;
    /// println!("seq {} ({} frames skipped so far)", t.seq(), frames.dropped());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dropped(&self) -> u64 {
        self.core
            .record()
            .map_or(0, |s| s.dropped.load(Ordering::Relaxed))
    }
    /// Tensors this subscriber has received since it subscribed (the
    /// `delivered` counter of `tensorbus stat`).
    pub fn received(&self) -> u64 {
        self.core
            .record()
            .map_or(0, |s| s.delivered.load(Ordering::Relaxed))
    }

    /// Ends this subscription's deliveries at once, while tensors received
    /// from it stay valid until they are dropped: the subscriber leaves its
    /// channel at the broker (producers stop delivering to it, a `block`
    /// producer no longer waits for it; its queued tensors are released, or
    /// handed to the other workers of a work queue). Afterwards `try_recv`
    /// finds nothing (`Empty`) and `recv`/`recv_timeout` return
    /// [`RecvError::Detached`] (also in a thread waiting in `recv` right
    /// now, within its next park slice of at most 100 ms). Dropping a
    /// consumer whose tensors are alive detaches it. Detaching twice does
    /// nothing.
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
        self.core.detach()
    }

    #[inline]
    pub(crate) fn take_timeout(&self, timeout: Option<Duration>) -> Result<Placed, RecvError> {
        self.core.take_timeout(self.wait, timeout)
    }

    /// Returns the next tensor if one is queued, without waiting.
    #[inline]
    pub fn try_recv(&self) -> Result<Tensor, TryRecvError> {
        self.core.try_take().map(|at| self.tensor(at))
    }

    /// Waits for the next tensor (spinning, then sleeping, per the wait strategy).
    #[inline]
    pub fn recv(&self) -> Result<Tensor, RecvError> {
        self.take_timeout(None).map(|at| self.tensor(at))
    }

    /// Waits at most `timeout` for the next tensor.
    #[inline]
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Tensor, RecvError> {
        self.take_timeout(Some(timeout)).map(|at| self.tensor(at))
    }

    #[inline]
    fn tensor(&self, at: Placed) -> Tensor {
        Tensor {
            core: self.core.clone(),
            at,
        }
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
        let core = &self.core;
        if let Some(r) = core.readiness.get() {
            return Ok(r);
        }
        let made = Readiness::new(
            core.inner.clone(),
            core.channel.index as usize,
            core.sub,
            core.id,
            core.policy == Policy::Block,
            core.end_of_stream,
        )?;
        // Another thread may have won the race; then `made` is dropped (its
        // thread stopped) and theirs is used.
        let _ = core.readiness.set(made);
        Ok(core.readiness.get().expect("set above"))
    }

    /// Shorthand for `readiness()?.fd()`: the eventfd to watch (see
    /// [`Readiness`] for the arm / watch / clear protocol).
    pub fn readiness_fd(&self) -> std::io::Result<BorrowedFd<'_>> {
        self.readiness().map(Readiness::fd)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Tensors received from this consumer are alive (they hold the
        // core): stop deliveries now, close when the last one goes. A
        // failure (no broker, forked child) leaves the close to the core.
        if Arc::strong_count(&self.core) > 1 {
            let _ = self.core.detach();
        }
    }
}

impl ConsumerCore {
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
            id: self.id,
            lossless: self.policy == Policy::Block,
        }
    }

    pub(crate) fn detach(&self) -> Result<(), RequestError> {
        // Relaxed: the flag orders nothing; receivers only need to see it
        // eventually (the broker's Detach does the real work).
        if self.detached.swap(true, Ordering::Relaxed) {
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

    fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Relaxed)
    }

    /// Takes the next tensor, reporting end of stream when the rings are
    /// empty and the stream ended (see [`ConsumerCore::try_take_checking`]).
    #[inline]
    pub(crate) fn try_take(&self) -> Result<Placed, TryRecvError> {
        self.try_take_checking(true)
    }

    /// Takes the next tensor. `check_end`: when the rings are empty, look
    /// whether the stream ended (one more load of the channel record, then a
    /// second look at the rings); a waiting receive checks only every 64th
    /// empty poll, so spinning stays one load of the rings per poll.
    #[inline]
    pub(crate) fn try_take_checking(&self, check_end: bool) -> Result<Placed, TryRecvError> {
        // An inherited consumer takes nothing from the parent's queue.
        self.inner.origin.check()?;
        if self.is_detached() {
            return Err(TryRecvError::Empty);
        }
        // Acquire pairs with the previous taker's Release in `Taking::drop`:
        // its pops (ring tail stores) and cursor happen before ours.
        if self.taking.swap(true, Ordering::Acquire) {
            return Err(TryRecvError::Empty);
        }
        let _unlock = Taking(&self.taking);
        let path = self.path();
        let mut cursor = self.cursor.load(Ordering::Relaxed);
        let mut desc = path.pop(&mut cursor, &FutexParker);
        if desc.is_none() && check_end && self.end_of_stream && path.ended() {
            // `ended` was read with Acquire after the last producer closed:
            // every push it made is visible now, so one more look decides
            // between a last tensor and the end of the stream.
            desc = path.pop(&mut cursor, &FutexParker);
            if desc.is_none() {
                self.cursor.store(cursor, Ordering::Relaxed);
                return Err(TryRecvError::EndOfStream);
            }
        }
        self.cursor.store(cursor, Ordering::Relaxed);
        let desc: Descriptor = desc.ok_or(TryRecvError::Empty)?;
        let pools = &self.pools;
        // The pool index comes from shared memory: look it up, never index.
        let r = pools.get(usize::from(desc.pool)).copied().flatten();
        let mut at = Placed {
            id: SlotId {
                pool: desc.pool,
                index: desc.index,
                generation: 0,
            },
            ptr: SlotPtr(std::ptr::null_mut()),
            meta: TensorMeta::EMPTY,
        };
        at.id.generation = path.validate_into(
            desc,
            |p| pools.get(p).copied().flatten().map(|r| r.slot_size),
            &mut at.meta,
        )?;
        // Validation succeeded, so `capacity(pool)` was `Some`: `r` is too.
        let Some(r) = r else {
            return Err(TryRecvError::Corrupted(
                tensorbus_core::receive::Corruption::ForeignPool { pool: desc.pool },
            ));
        };
        path.count_delivered(
            at.meta.timestamp_ns,
            self.sample_mask,
            tensorbus_shm::monotonic_ns,
        );
        // SAFETY: validate checked index < slots, and the mapping spans
        // slots * stride bytes.
        at.ptr = SlotPtr(unsafe { r.base.add(desc.index as usize * r.stride as usize) });
        Ok(at)
    }

    #[inline]
    pub(crate) fn take_timeout(
        &self,
        wait: WaitStrategy,
        timeout: Option<Duration>,
    ) -> Result<Placed, RecvError> {
        let start = std::time::Instant::now();
        let expired = || timeout.is_some_and(|t| start.elapsed() >= t);
        let spin = match wait {
            WaitStrategy::BusyPoll => None,
            WaitStrategy::SpinThenPark { spin } => Some(spin),
            WaitStrategy::Park => Some(Duration::ZERO), // handled before spinning
        };
        let mut spins = 0u32;
        loop {
            // End of stream is looked for at once, then every 64th empty
            // poll (with the clock) and after every park (spins stays 0).
            match self.try_take_checking(spins % 64 == 0) {
                Ok(r) => return Ok(r),
                Err(TryRecvError::Corrupted(c)) => return Err(RecvError::Corrupted(c)),
                Err(TryRecvError::Empty) if self.is_detached() => return Err(RecvError::Detached),
                Err(TryRecvError::EndOfStream) => return Err(RecvError::EndOfStream),
                Err(TryRecvError::ForkedChild(f)) => return Err(RecvError::ForkedChild(f)),
                // Only stages report it, and not from `try_take`.
                Err(TryRecvError::NotExclusive(d)) => return Err(RecvError::NotExclusive(d)),
                Err(TryRecvError::Empty) => {}
            }
            if wait == WaitStrategy::Park {
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
        let Some(sub) = self.record() else {
            std::thread::sleep(Duration::from_millis(1));
            return;
        };
        let slice = remaining.map_or(PARK_SLICE, |r| r.min(PARK_SLICE));
        // Producers push, then notify this event; `has_entry` is the re-check.
        sub.config
            .data
            .wait_unless(&FutexParker, || self.has_entry_or_ended(), slice);
    }

    /// The re-check before parking: something to take, or the stream
    /// ended (the broker notifies the subscriber's event when it ends).
    pub(crate) fn has_entry_or_ended(&self) -> bool {
        let path = self.path();
        path.has_entry() || (self.end_of_stream && path.ended())
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
            slot.release(self.id);
        }
    }
}

impl Drop for ConsumerCore {
    fn drop(&mut self) {
        // Stop the waiter thread before the subscriber record goes back to
        // the broker (it parks on that record's event count). In a forked
        // child both are no-ops (see `Readiness`'s drop, `Inner::request`).
        drop(self.readiness.take());
        self.inner.close_handle(self.handle);
    }
}

/// A received tensor: a read-only view of the slot the producer wrote
/// (read it through [`TensorView`] and `Deref<Target = [u8]>`). Dropping it
/// releases the slot (the last release frees it). It owns what it needs:
/// it may move to another thread and outlive its [`Consumer`].
pub struct Tensor {
    core: Arc<ConsumerCore>,
    at: Placed,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("slot", &self.at.id)
            .field("meta", &self.at.meta)
            .finish()
    }
}

impl TensorView for Tensor {
    fn meta(&self) -> &TensorMeta {
        &self.at.meta
    }
    fn slot_id(&self) -> SlotId {
        self.at.id
    }
}

impl Tensor {
    /// The channel it was received from.
    pub fn channel(&self) -> &str {
        &self.core.channel.name
    }
    /// `Err(ForkedChild)` in a process forked after this tensor's consumer
    /// was opened: the hold is the parent's; dropping it releases nothing.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.core.inner.origin.check()
    }
}

impl std::ops::Deref for Tensor {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: validation checked nbytes <= slot_size, so the range lies
        // inside our slot of a mapping `core.inner` keeps alive; we hold
        // the slot (our holder bit) until drop, so no producer may loan and
        // rewrite it meanwhile.
        unsafe { self.at.bytes() }
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        self.core.release(self.at.id);
    }
}
