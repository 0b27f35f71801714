//! Producers: loan a slot, write the tensor in place, publish.

use crate::client::{Client, Inner, PoolRef};
use crate::element::{typed_mut, Element};
use crate::error::{ForkedChild, LoanError, PublishError, TypeError};
use crate::turn::TurnLock;
use crate::view::{Placed, SlotId, SlotPtr, TensorView};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus_core::control::Control;
use tensorbus_core::proto::ChannelInfo;
use tensorbus_core::publish::{loan, ProducerPath};
use tensorbus_core::slot::SlotHeader;
use tensorbus_core::wide::HolderId;
use tensorbus_core::{DType, Descriptor, ShapeError, TensorMeta};
use tensorbus_shm::futex::FutexParker;

/// What a publish (or forward) did: how many subscribers received the
/// tensor, how many dropped something, and the sequence number and
/// timestamp stamped on it (what receivers read as `seq` and
/// `timestamp_ns`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// Subscribers the tensor was delivered to (a work queue: 0 or 1).
    pub delivered: u32,
    /// Subscribers for which something was dropped (this tensor under
    /// `drop_newest`, an older one under `drop_oldest`/`latest`).
    pub dropped: u32,
    /// The producer's sequence number given to this tensor.
    pub seq: u64,
    /// CLOCK_MONOTONIC nanoseconds stamped at publish.
    pub timestamp_ns: u64,
}

/// The writing end of a channel: a handle over shared state. Loans
/// ([`TensorMut`]) own what they need, so a loan may outlive the `Producer`
/// value, move to another thread, or sit next to other loans of the same
/// producer (each holds one slot until it is published or dropped).
/// `Producer` is `Send + Sync`: threads may loan and publish through one
/// `&Producer`; publishes of one producer are serialised by a short lock
/// that is never contended unless two threads publish at the same instant.
///
/// ```no_run
/// use tensorbus::TensorView;
/// # let client = tensorbus::Client::connect()?;
/// let producer = client.producer("imu")?;
/// let mut t = producer.loan(&[64, 1024], tensorbus::DType::F32)?;
/// t.as_mut_slice_of::<f32>()?.fill(1.0);
/// t.set_user_header(b"sweep=1")?;
/// let published = t.publish()?;
/// println!("seq {} delivered to {} subscribers", published.seq, published.delivered);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Producer {
    pub(crate) core: Arc<ProducerCore>,
}

/// What a producer's handle and its loans share.
pub(crate) struct ProducerCore {
    pub(crate) inner: Arc<Inner>,
    pub(crate) handle: u32,
    pub(crate) id: HolderId,
    pub(crate) row: usize,
    pub(crate) channel: ChannelInfo,
    /// Indexed by pool index; `Some` for the channel's pools.
    pub(crate) pools: Vec<Option<PoolRef>>,
    /// The channel's pools, smallest slot first.
    order: Vec<u8>,
    /// Where each pool's next loan starts looking. A hint only: the holder
    /// word's CAS decides who gets a slot, so concurrent loans that race on
    /// a cursor (Relaxed load and store) at worst look at a slot twice.
    cursors: Box<[AtomicUsize]>,
    /// The publishing side's private state. The lock also makes this
    /// producer's row of rings single-producer, as the ring protocol
    /// requires (two threads publishing through one producer take turns;
    /// see `turn.rs`).
    publish: TurnLock<PublishState>,
}

/// What publishing mutates: the sequence counter, cached ring heads and
/// the work-queue round-robin position.
struct PublishState {
    cached_heads: Vec<u64>,
    rr: usize,
    seq: u64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("channel", &self.core.channel.name)
            .field("handle", &self.core.handle)
            .finish()
    }
}

impl Producer {
    pub(crate) fn new(
        client: &Client,
        handle: u32,
        bit: u32,
        row: u32,
        channel: ChannelInfo,
        pools: Vec<Option<PoolRef>>,
    ) -> Producer {
        let mut order = channel.pools.clone();
        order.sort_by_key(|&p| pools[usize::from(p)].map_or(u64::MAX, |r| r.slot_size));
        let subs = client.inner.control.layout().params.max_subscribers as usize;
        Producer {
            core: Arc::new(ProducerCore {
                inner: client.inner.clone(),
                handle,
                id: HolderId::clamped(bit),
                row: row as usize,
                pools,
                order,
                cursors: (0..client.inner.pools.len())
                    .map(|_| AtomicUsize::new(0))
                    .collect(),
                publish: TurnLock::new(PublishState {
                    cached_heads: vec![0; subs],
                    rr: 0,
                    seq: 0,
                }),
                channel,
            }),
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

    /// `Err(ForkedChild)` in a process forked after this producer's client
    /// connected: the producer is inert here (see [`Client`]'s fork
    /// semantics). One relaxed load.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.core.inner.origin.check()
    }

    /// Loans a slot for a C-contiguous tensor of `shape` and `dtype` from
    /// the smallest pool that fits (larger ones if it is exhausted). Fails
    /// at once with [`LoanError::PoolExhausted`] when every slot is held.
    #[inline]
    pub fn loan(&self, shape: &[u32], dtype: DType) -> Result<TensorMut, LoanError> {
        let meta = TensorMeta::contiguous(dtype, shape)?;
        self.loan_meta(meta)
    }

    /// Loans a one-dimensional `u8` tensor of `len` bytes (at most
    /// `u32::MAX`: one extent).
    pub fn loan_bytes(&self, len: usize) -> Result<TensorMut, LoanError> {
        let extent = u32::try_from(len).map_err(|_| ShapeError::DimTooLarge {
            axis: 0,
            extent: len,
        })?;
        self.loan(&[extent], DType::U8)
    }

    /// Like [`Producer::loan`], but waits up to `timeout` for a slot to be freed.
    pub fn loan_timeout(
        &self,
        shape: &[u32],
        dtype: DType,
        timeout: Duration,
    ) -> Result<TensorMut, LoanError> {
        let meta = TensorMeta::contiguous(dtype, shape)?;
        let deadline = Instant::now() + timeout;
        let mut backoff = 0u32;
        loop {
            match self.core.try_slot(&meta)? {
                Some(found) => return Ok(self.make_loan(found, meta)),
                None if Instant::now() >= deadline => {
                    self.core.count_refused(&meta);
                    return Err(LoanError::Timeout {
                        channel: self.core.channel.name.clone(),
                        timeout,
                    });
                }
                None => {
                    backoff = (backoff + 1).min(10);
                    if backoff < 4 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(20 << (backoff - 4)));
                    }
                }
            }
        }
    }

    /// Loans a slot for a tensor described by `meta` (custom strides allowed).
    #[inline]
    pub fn loan_meta(&self, meta: TensorMeta) -> Result<TensorMut, LoanError> {
        match self.core.try_slot(&meta)? {
            Some(found) => Ok(self.make_loan(found, meta)),
            None => {
                self.core.count_refused(&meta);
                Err(self.core.exhausted(&meta))
            }
        }
    }

    #[inline]
    fn make_loan(
        &self,
        (pool, index, generation): (u8, usize, u32),
        meta: TensorMeta,
    ) -> TensorMut {
        let r = self.core.pools[usize::from(pool)].expect("loaned from a mapped pool");
        // SAFETY: index < slots of the pool (loan checked it) and the pool
        // mapping is slots * stride bytes, so the offset is in bounds.
        let ptr = unsafe { r.base.add(index * r.stride as usize) };
        TensorMut {
            core: self.core.clone(),
            at: Placed {
                id: SlotId {
                    pool,
                    index: index as u32,
                    generation,
                },
                ptr: SlotPtr(ptr),
                meta,
            },
            capacity: r.slot_size,
            done: false,
        }
    }

    /// Waits up to `timeout` until a publish on this producer would not
    /// wait for a `block` subscriber's full queue (see
    /// [`TensorMut::wait_for_room`]); returns whether it would not.
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        self.core.wait_for_room(timeout)
    }
}

impl ProducerCore {
    fn ctl(&self) -> &Control {
        &self.inner.control
    }

    /// Finds a free slot; `Ok(None)` when every fitting slot is held.
    #[inline]
    fn try_slot(&self, meta: &TensorMeta) -> Result<Option<(u8, usize, u32)>, LoanError> {
        // An inherited producer takes no slot (one relaxed load).
        self.inner.origin.check()?;
        let span = meta.span()?.max(meta.nbytes);
        let mut fits = false;
        let mut first_fit = None;
        for &p in &self.order {
            let Some(pool) = self.pools[usize::from(p)] else {
                continue;
            };
            if pool.slot_size < span {
                continue;
            }
            fits = true;
            first_fit.get_or_insert(p);
            let hint = &self.cursors[usize::from(p)];
            let mut cursor = hint.load(Ordering::Relaxed);
            let got = loan(
                &self.inner.control,
                usize::from(p),
                self.id,
                self.loan_intent(),
                &mut cursor,
            );
            hint.store(cursor, Ordering::Relaxed);
            if let Some((index, generation)) = got {
                if first_fit != Some(p) {
                    // The tensor's own size class was full (off the hot path).
                    self.count_spilled(first_fit);
                }
                return Ok(Some((p, index, generation)));
            }
        }
        if !fits {
            let largest = self
                .pools
                .iter()
                .flatten()
                .map(|p| p.slot_size)
                .max()
                .unwrap_or(0);
            return Err(LoanError::TooLarge {
                nbytes: span,
                largest,
                channel: self.channel.name.clone(),
            });
        }
        Ok(None)
    }

    #[cold]
    fn count_spilled(&self, pool: Option<u8>) {
        if let Some(c) = pool.and_then(|p| self.ctl().pool_counters(usize::from(p))) {
            c.count_spilled();
        }
    }

    /// The smallest pool this producer may loan from whose slots fit `meta`.
    fn first_fit(&self, meta: &TensorMeta) -> Option<u8> {
        let span = meta.span().unwrap_or(meta.nbytes).max(meta.nbytes);
        self.order
            .iter()
            .copied()
            .find(|&p| self.pools[usize::from(p)].is_some_and(|r| r.slot_size >= span))
    }

    /// Counts a loan refused for exhaustion against the tensor's size class.
    #[cold]
    fn count_refused(&self, meta: &TensorMeta) {
        if let Some(c) = self
            .first_fit(meta)
            .and_then(|p| self.ctl().pool_counters(usize::from(p)))
        {
            c.count_refused();
        }
    }

    fn exhausted(&self, meta: &TensorMeta) -> LoanError {
        let span = meta.span().unwrap_or(meta.nbytes).max(meta.nbytes);
        let p = self
            .order
            .iter()
            .copied()
            .find(|&p| self.pools[usize::from(p)].is_some_and(|r| r.slot_size >= span))
            .unwrap_or(0);
        let ctl = self.ctl();
        let slots = ctl.slots(usize::from(p));
        // The error path: a map of holder id to slots held is fine here.
        let mut per_id = std::collections::BTreeMap::<HolderId, u32>::new();
        for i in 0..slots {
            if let Some(s) = ctl.slot(usize::from(p), i) {
                for id in s.holder_set().snapshot().ids() {
                    *per_id.entry(id).or_default() += 1;
                }
            }
        }
        let mine = per_id.get(&self.id).copied().unwrap_or(0);
        let others: Vec<String> = per_id
            .iter()
            .filter(|&(&id, _)| id != self.id)
            .map(|(id, c)| format!("holder #{id}: {c}"))
            .collect();
        LoanError::PoolExhausted {
            pool: self
                .inner
                .pools
                .get(usize::from(p))
                .map_or_else(String::new, |i| i.name.clone()),
            slots: slots as u32,
            holders: format!(
                "this producer holds {mine}; others: {}",
                if others.is_empty() {
                    "none".into()
                } else {
                    others.join(", ")
                }
            ),
        }
    }

    fn path(&self) -> ProducerPath<'_> {
        ProducerPath {
            ctl: &self.inner.control,
            channel: self.channel.index as usize,
            row: self.row,
            mode: self.channel.mode,
        }
    }

    pub(crate) fn wait_for_room(&self, timeout: Duration) -> bool {
        self.path().wait_for_room(timeout, &FutexParker)
    }

    /// This producer's loan intent word in its shared record (see
    /// [`tensorbus_core::wide`] rule 3; only extension ids use it).
    #[inline]
    fn loan_intent(&self) -> &AtomicU64 {
        static UNUSED: AtomicU64 = AtomicU64::new(0);
        if self.id.is_direct() {
            // A direct-id loan never touches it: skip the record lookup.
            return &UNUSED;
        }
        self.ctl()
            .producer(self.channel.index as usize, self.row)
            .map_or(&UNUSED, |p| &p.loan_intent)
    }

    /// Publishes a slot this handle (or, for stages, `own`) holds.
    #[inline]
    pub(crate) fn publish_slot(
        &self,
        id: SlotId,
        mut meta: TensorMeta,
        own: HolderId,
    ) -> Published {
        let ctl = &self.inner.control;
        let Some(slot) = ctl.slot(usize::from(id.pool), id.index as usize) else {
            return Published::default();
        };
        let mut st = self.publish.lock();
        let st = &mut *st;
        meta.seq = st.seq;
        st.seq += 1;
        meta.timestamp_ns = tensorbus_shm::monotonic_ns();
        meta.producer = self.inner.client_id;
        slot.write_meta(&meta);
        let desc = Descriptor::new(id.pool, id.index, id.generation);
        let outcome = self.path().publish(
            desc,
            slot,
            own,
            &mut st.cached_heads,
            &mut st.rr,
            &FutexParker,
        );
        Published {
            delivered: outcome.delivered,
            dropped: outcome.dropped,
            seq: meta.seq,
            timestamp_ns: meta.timestamp_ns,
        }
    }

    pub(crate) fn slot(&self, id: SlotId) -> Option<&SlotHeader> {
        self.ctl().slot(usize::from(id.pool), id.index as usize)
    }
}

impl Drop for ProducerCore {
    fn drop(&mut self) {
        // The last of the handle and its loans is gone. Sends nothing in a
        // forked child (`Inner::request` refuses).
        self.inner.close_handle(self.handle);
    }
}

/// A loaned slot: write the tensor in place, then [`TensorMut::publish`].
/// Dropping it unpublished gives the slot back. It owns what it needs (no
/// borrow of its [`Producer`]): it may be moved to another thread or kept
/// after the producer value is dropped (the producer's broker handle stays
/// open until its last loan ends).
pub struct TensorMut {
    core: Arc<ProducerCore>,
    at: Placed,
    capacity: u64,
    done: bool,
}

impl std::fmt::Debug for TensorMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorMut")
            .field("slot", &self.at.id)
            .field("meta", &self.at.meta)
            .finish()
    }
}

impl TensorView for TensorMut {
    fn meta(&self) -> &TensorMeta {
        &self.at.meta
    }
    fn slot_id(&self) -> SlotId {
        self.at.id
    }
}

impl TensorMut {
    /// Address of the first payload byte, writable (the same address every
    /// mapping of this process sees; useful to prove zero-copy).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.at.ptr.0
    }
    /// Payload bytes the slot can hold.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    /// The channel this loan will be published on.
    pub fn channel(&self) -> &str {
        &self.core.channel.name
    }

    /// `Err(ForkedChild)` in a process forked after this loan's producer was
    /// opened: the slot is the parent's loan; publishing it fails and
    /// dropping it leaves it to the parent.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.core.inner.origin.check()
    }

    /// The tensor's bytes, writable.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: we hold the slot exclusively (loan CAS), `ptr..ptr+nbytes`
        // lies inside the slot (nbytes <= span <= slot_size checked at loan)
        // of a read-write mapping kept alive by `core.inner`; `&mut self`
        // makes this the only view.
        unsafe { self.at.bytes_mut() }
    }

    /// The tensor as a typed mutable slice (dtype must match, contiguous).
    pub fn as_mut_slice_of<T: Element>(&mut self) -> Result<&mut [T], TypeError> {
        // SAFETY: we hold the slot exclusively (loan CAS), the range lies in
        // the slot of a read-write mapping, and `&mut self` is the only view.
        unsafe { typed_mut(&self.at.meta, self.at.ptr.0) }
    }

    /// Sets the user header (at most 64 bytes: frame id, camera id, ...).
    pub fn set_user_header(&mut self, bytes: &[u8]) -> Result<(), ShapeError> {
        self.at.meta.set_user_header(bytes)
    }

    /// Waits up to `timeout` until [`TensorMut::publish`] would not wait
    /// for room: every `block` subscriber's queue from this producer has
    /// room (broadcast) or some worker can take the tensor at once (work
    /// queue). Returns whether it would not wait. Nothing is published: a
    /// caller that gives up keeps its loan. Publishing in a loop of short
    /// waits keeps a program responsive (signals, shutdown flags) while a
    /// consumer is slow:
    ///
    /// ```no_run
    /// # use std::sync::atomic::{AtomicBool, Ordering};
    /// # use std::time::Duration;
    /// # static STOP: AtomicBool = AtomicBool::new(false);
    /// # let client = tensorbus::Client::connect()?;
    /// let producer = client.producer("frames")?;
    /// let frame = producer.loan(&[1024], tensorbus::DType::U8)?;
    /// while !frame.wait_for_room(Duration::from_millis(50)) {
    ///     if STOP.load(Ordering::Relaxed) { return Ok(()); } // the loan is given back
    /// }
    /// frame.publish()?;                                       // no wait now
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        self.core.wait_for_room(timeout)
    }

    /// Publishes to every subscriber (broadcast) or one worker (work queue)
    /// and returns what was published (receivers, drops, the sequence
    /// number and timestamp stamped on the tensor). The producer's hold
    /// ends here; receivers' holds begin. Fails only in a forked child
    /// ([`PublishError::ForkedChild`]: nothing published, the slot left to
    /// the parent).
    ///
    /// ```no_run
    /// # let client = tensorbus::Client::connect()?;
    /// let producer = client.producer("imu")?;
    /// let p = producer.loan(&[16], tensorbus::DType::F32)?.publish()?;
    /// println!("seq {} at {} ns to {} subscribers", p.seq, p.timestamp_ns, p.delivered);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn publish(mut self) -> Result<Published, PublishError> {
        // In a forked child: nothing published, and `drop` leaves the slot
        // to the parent's loan.
        self.core.inner.origin.check()?;
        self.done = true;
        Ok(self
            .core
            .publish_slot(self.at.id, self.at.meta, self.core.id))
    }
}

impl std::ops::Deref for TensorMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: see `as_mut_bytes`; a shared borrow of our exclusive slot,
        // so nobody writes it while the borrow lives.
        unsafe { self.at.bytes() }
    }
}

impl std::ops::DerefMut for TensorMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_bytes()
    }
}

impl Drop for TensorMut {
    fn drop(&mut self) {
        // A forked child's copy of a loan gives nothing back: the slot is
        // the parent's.
        if !self.done && !self.core.inner.origin.is_forked() {
            if let Some(slot) = self.core.slot(self.at.id) {
                slot.release(self.core.id);
            }
        }
    }
}
