//! Producers: loan a slot, write the tensor in place, publish.

use crate::client::{Client, Inner, PoolRef};
use crate::element::{typed_mut, Element};
use crate::error::{ForkedChild, LoanError, PublishError, TypeError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus_core::control::Control;
use tensorbus_core::proto::ChannelInfo;
use tensorbus_core::publish::{loan, ProducerPath, PublishOutcome};
use tensorbus_core::slot::SlotHeader;
use tensorbus_core::{DType, Descriptor, ShapeError, TensorMeta};
use tensorbus_shm::futex::FutexParker;

/// Where a slot is: pool index, slot index, generation. Two views with equal
/// `SlotId`s are the very same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotId {
    /// Pool index.
    pub pool: u8,
    /// Slot index in the pool.
    pub index: u32,
    /// Generation (bumped on every loan).
    pub generation: u32,
}

/// What a publish (or forward) did, with the sequence number and timestamp
/// it stamped on the tensor: [`TensorMut::publish_stamped`],
/// [`crate::StagedTensor::forward_stamped`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// How many subscribers received it / dropped something.
    pub outcome: PublishOutcome,
    /// The producer's sequence number given to this tensor (what receivers
    /// read as `seq`).
    pub seq: u64,
    /// CLOCK_MONOTONIC nanoseconds stamped at publish (receivers'
    /// `timestamp_ns`).
    pub timestamp_ns: u64,
}

/// The writing end of a channel.
///
/// ```no_run
/// # let client = tensorbus::Client::connect()?;
/// let mut producer = client.producer("imu")?;
/// let mut t = producer.loan(&[64, 1024], tensorbus::DType::F32)?;
/// t.as_mut_slice_of::<f32>()?.fill(1.0);
/// t.set_user_header(b"sweep=1")?;
/// let outcome = t.publish()?;
/// println!("delivered to {} subscribers", outcome.delivered);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Producer {
    pub(crate) inner: Arc<Inner>,
    pub(crate) handle: u32,
    pub(crate) bit: u64,
    pub(crate) row: usize,
    pub(crate) channel: ChannelInfo,
    /// Indexed by pool index; `Some` for the channel's pools.
    pub(crate) pools: Vec<Option<PoolRef>>,
    /// The channel's pools, smallest slot first.
    pub(crate) order: Vec<u8>,
    pub(crate) cursors: Vec<usize>,
    pub(crate) cached_heads: Vec<u64>,
    pub(crate) rr: usize,
    pub(crate) seq: u64,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("channel", &self.channel.name)
            .field("handle", &self.handle)
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
            inner: client.inner.clone(),
            handle,
            bit: 1u64 << (bit & 63),
            row: row as usize,
            pools,
            order,
            cursors: vec![0; client.inner.pools.len()],
            cached_heads: vec![0; subs],
            rr: 0,
            seq: 0,
            channel,
        }
    }

    /// The channel's name.
    pub fn channel(&self) -> &str {
        &self.channel.name
    }

    /// Broker handle id.
    pub fn handle(&self) -> u32 {
        self.handle
    }

    /// `Err(ForkedChild)` in a process forked after this producer's client
    /// connected: the producer is inert here (see [`Client`]'s fork
    /// semantics). One relaxed load.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.inner.origin.check()
    }

    fn ctl(&self) -> &Control {
        &self.inner.control
    }

    /// Loans a slot for a C-contiguous tensor of `shape` and `dtype` from
    /// the smallest pool that fits (larger ones if it is exhausted). Fails
    /// at once with [`LoanError::PoolExhausted`] when every slot is held.
    #[inline]
    pub fn loan(&mut self, shape: &[usize], dtype: DType) -> Result<TensorMut<'_>, LoanError> {
        let meta = TensorMeta::contiguous(dtype, shape)?;
        self.loan_meta(meta)
    }

    /// Loans a one-dimensional `u8` tensor of `len` bytes.
    pub fn loan_bytes(&mut self, len: usize) -> Result<TensorMut<'_>, LoanError> {
        self.loan(&[len], DType::U8)
    }

    /// Like [`Producer::loan`], but waits up to `timeout` for a slot to be freed.
    pub fn loan_timeout(
        &mut self,
        shape: &[usize],
        dtype: DType,
        timeout: Duration,
    ) -> Result<TensorMut<'_>, LoanError> {
        let meta = TensorMeta::contiguous(dtype, shape)?;
        let deadline = Instant::now() + timeout;
        let mut backoff = 0u32;
        loop {
            match self.try_slot(&meta)? {
                Some(found) => return Ok(self.make_loan(found, meta)),
                None if Instant::now() >= deadline => {
                    return Err(LoanError::Timeout {
                        channel: self.channel.name.clone(),
                        timeout,
                    })
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
    pub fn loan_meta(&mut self, meta: TensorMeta) -> Result<TensorMut<'_>, LoanError> {
        match self.try_slot(&meta)? {
            Some(found) => Ok(self.make_loan(found, meta)),
            None => Err(self.exhausted(&meta)),
        }
    }

    /// Finds a free slot; `Ok(None)` when every fitting slot is held.
    #[inline]
    fn try_slot(&mut self, meta: &TensorMeta) -> Result<Option<(u8, usize, u32)>, LoanError> {
        // An inherited producer takes no slot (one relaxed load).
        self.inner.origin.check()?;
        let span = meta.span()?.max(meta.nbytes);
        let mut fits = false;
        for &p in &self.order {
            let Some(pool) = self.pools[usize::from(p)] else {
                continue;
            };
            if pool.slot_size < span {
                continue;
            }
            fits = true;
            let cursor = &mut self.cursors[usize::from(p)];
            if let Some((index, generation)) =
                loan(&self.inner.control, usize::from(p), self.bit, cursor)
            {
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

    #[inline]
    fn make_loan(
        &mut self,
        (pool, index, generation): (u8, usize, u32),
        meta: TensorMeta,
    ) -> TensorMut<'_> {
        let r = self.pools[usize::from(pool)].expect("loaned from a mapped pool");
        // SAFETY: index < slots of the pool (loan checked it) and the pool
        // mapping is slots * stride bytes, so the offset is in bounds.
        let ptr = unsafe { r.base.add(index * r.stride as usize) };
        TensorMut {
            producer: self,
            id: SlotId {
                pool,
                index: index as u32,
                generation,
            },
            ptr,
            capacity: r.slot_size,
            meta,
            done: false,
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
        let mut per_bit = [0u32; 64];
        for i in 0..slots {
            if let Some(s) = ctl.slot(usize::from(p), i) {
                let h = s.holders();
                for (b, count) in per_bit.iter_mut().enumerate() {
                    if h & (1 << b) != 0 {
                        *count += 1;
                    }
                }
            }
        }
        let mine = per_bit[self.bit.trailing_zeros() as usize];
        let others: Vec<String> = per_bit
            .iter()
            .enumerate()
            .filter(|&(b, &c)| c > 0 && (1u64 << b) != self.bit)
            .map(|(b, c)| format!("holder #{b}: {c}"))
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

    /// Waits up to `timeout` until a publish on this producer would not
    /// wait for a `block` subscriber's full queue (see
    /// [`TensorMut::wait_for_room`]); returns whether it would not.
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        let path = ProducerPath {
            ctl: &self.inner.control,
            channel: self.channel.index as usize,
            row: self.row,
            mode: self.channel.mode,
        };
        path.wait_for_room(timeout, &FutexParker)
    }

    /// Publishes a slot this handle (or, for stages, `own_bit`) holds.
    #[inline]
    pub(crate) fn publish_slot(
        &mut self,
        id: SlotId,
        mut meta: TensorMeta,
        own_bit: u64,
    ) -> Published {
        let ctl = &self.inner.control;
        let Some(slot) = ctl.slot(usize::from(id.pool), id.index as usize) else {
            return Published::default();
        };
        meta.seq = self.seq;
        self.seq += 1;
        meta.timestamp_ns = tensorbus_shm::monotonic_ns();
        meta.producer = self.inner.client_id;
        slot.write_meta(&meta);
        let path = ProducerPath {
            ctl,
            channel: self.channel.index as usize,
            row: self.row,
            mode: self.channel.mode,
        };
        let desc = Descriptor::new(id.pool, id.index, id.generation);
        let outcome = path.publish(
            desc,
            slot,
            own_bit,
            &mut self.cached_heads,
            &mut self.rr,
            &FutexParker,
        );
        Published {
            outcome,
            seq: meta.seq,
            timestamp_ns: meta.timestamp_ns,
        }
    }

    pub(crate) fn slot(&self, id: SlotId) -> Option<&SlotHeader> {
        self.ctl().slot(usize::from(id.pool), id.index as usize)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // Sends nothing in a forked child (`Inner::request` refuses).
        self.inner.close_handle(self.handle);
    }
}

/// A loaned slot: write the tensor in place, then [`TensorMut::publish`].
/// Dropping it unpublished gives the slot back.
pub struct TensorMut<'p> {
    producer: &'p mut Producer,
    id: SlotId,
    ptr: *mut u8,
    capacity: u64,
    meta: TensorMeta,
    done: bool,
}

impl std::fmt::Debug for TensorMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorMut")
            .field("slot", &self.id)
            .field("meta", &self.meta)
            .finish()
    }
}

impl TensorMut<'_> {
    /// Where the slot is.
    pub fn slot_id(&self) -> SlotId {
        self.id
    }
    /// The metadata that will be published.
    pub fn meta(&self) -> &TensorMeta {
        &self.meta
    }
    /// Extents.
    pub fn shape(&self) -> &[u32] {
        self.meta.shape()
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.meta.dtype
    }
    /// Address of the first payload byte (the same address every mapping of
    /// this process sees; useful to prove zero-copy).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Payload bytes the slot can hold.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// `Err(ForkedChild)` in a process forked after this loan's producer was
    /// opened: the slot is the parent's loan; publishing it fails and
    /// dropping it leaves it to the parent.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.producer.fork_check()
    }

    /// The tensor's bytes, writable.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: we hold the slot exclusively (loan CAS), `ptr..ptr+nbytes`
        // lies inside the slot (nbytes <= span <= slot_size checked at loan)
        // of a read-write mapping kept alive by the producer's client.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.meta.nbytes as usize) }
    }

    /// The tensor as a typed mutable slice (dtype must match, contiguous).
    pub fn as_mut_slice_of<T: Element>(&mut self) -> Result<&mut [T], TypeError> {
        // SAFETY: we hold the slot exclusively (loan CAS), the range lies in
        // the slot of a read-write mapping, and `&mut self` is the only view.
        unsafe { typed_mut(&self.meta, self.ptr) }
    }

    /// Sets the user header (at most 64 bytes: frame id, camera id, ...).
    pub fn set_user_header(&mut self, bytes: &[u8]) -> Result<(), ShapeError> {
        self.meta.set_user_header(bytes)
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
    /// let mut producer = client.producer("frames")?;
    /// let frame = producer.loan(&[1024], tensorbus::DType::U8)?;
    /// while !frame.wait_for_room(Duration::from_millis(50)) {
    ///     if STOP.load(Ordering::Relaxed) { return Ok(()); } // the loan is given back
    /// }
    /// frame.publish()?;                                       // no wait now
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        self.producer.wait_for_room(timeout)
    }

    /// Publishes to every subscriber (broadcast) or one worker (work queue).
    /// The producer's hold ends here; receivers' holds begin.
    #[inline]
    pub fn publish(self) -> Result<PublishOutcome, PublishError> {
        self.publish_stamped().map(|p| p.outcome)
    }

    /// Like [`TensorMut::publish`], and also returns the sequence number
    /// and timestamp the tensor was published with (the producer keeps
    /// them in registers anyway: this costs nothing extra).
    ///
    /// ```no_run
    /// # let client = tensorbus::Client::connect()?;
    /// let mut producer = client.producer("imu")?;
    /// let p = producer.loan(&[16], tensorbus::DType::F32)?.publish_stamped()?;
    /// println!("seq {} at {} ns to {} subscribers", p.seq, p.timestamp_ns, p.outcome.delivered);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn publish_stamped(mut self) -> Result<Published, PublishError> {
        // In a forked child: nothing published, and `drop` leaves the slot
        // to the parent's loan.
        self.producer.inner.origin.check()?;
        self.done = true;
        let bit = self.producer.bit;
        Ok(self.producer.publish_slot(self.id, self.meta, bit))
    }
}

impl std::ops::Deref for TensorMut<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: see `as_mut_bytes`; shared borrow of our exclusive slot.
        unsafe { std::slice::from_raw_parts(self.ptr, self.meta.nbytes as usize) }
    }
}

impl std::ops::DerefMut for TensorMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_bytes()
    }
}

impl Drop for TensorMut<'_> {
    fn drop(&mut self) {
        // A forked child's copy of a loan gives nothing back: the slot is
        // the parent's.
        if !self.done && !self.producer.inner.origin.is_forked() {
            if let Some(slot) = self.producer.slot(self.id) {
                slot.release(self.producer.bit);
            }
        }
    }
}
