//! Stages: take a slot exclusively, change it in place, forward the same
//! slot downstream. No byte is copied.

use crate::consumer::{Consumer, Received};
use crate::element::{typed_mut, Element};
use crate::error::{ForkedChild, PublishError, RecvError, TryRecvError, TypeError};
use crate::producer::{Producer, Published, SlotId};
use std::time::{Duration, Instant};
use tensorbus_core::publish::PublishOutcome;
use tensorbus_core::{DType, ShapeError, TensorMeta};

/// How long `recv_mut` waits for the upstream producer to let go of a slot.
const EXCLUSIVE_WAIT: Duration = Duration::from_secs(2);

/// A work-queue subscriber on `input` plus a producer on `output`.
///
/// ```no_run
/// # let client = tensorbus::Client::connect()?;
/// let mut stage = client.stage("frames/raw", "frames/denoised")?;
/// loop {
///     let mut t = stage.recv_mut()?;
///     for b in t.iter_mut() { *b = b.saturating_sub(3); }   // in place
///     t.forward()?;                                         // same slot, downstream
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Stage {
    pub(crate) input: Consumer,
    pub(crate) output: Producer,
    /// A tensor taken from the input that was not yet exclusive when the
    /// last receive gave up waiting: held (never released unseen) and tried
    /// again first by the next receive.
    pub(crate) held_back: Option<HeldBack>,
}

/// A received tensor the stage keeps for its next receive (see
/// [`Stage::held_back`]); the address is kept as an integer so that the
/// stage stays `Send` without an unsafe impl.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeldBack {
    id: SlotId,
    meta: TensorMeta,
    addr: usize,
}

impl HeldBack {
    fn of(r: &Received) -> HeldBack {
        HeldBack {
            id: r.id,
            meta: r.meta,
            addr: r.ptr as usize,
        }
    }
    fn received(self) -> Received {
        Received {
            id: self.id,
            meta: self.meta,
            ptr: self.addr as *mut u8,
        }
    }
}

impl Stage {
    /// The input subscription.
    pub fn input(&self) -> &Consumer {
        &self.input
    }
    /// `Err(ForkedChild)` in a process forked after this stage's client
    /// connected: the stage is inert here (see [`crate::Client`]'s fork
    /// semantics).
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.input.fork_check()
    }
    /// The output producer (it can also loan fresh slots).
    pub fn output(&mut self) -> &mut Producer {
        &mut self.output
    }

    /// Waits up to `wait` until the stage is the slot's only holder (the
    /// upstream producer clears its own bit right after pushing: normally
    /// nanoseconds). On timeout the tensor is kept in `held_back`, never
    /// released unseen (issue 13.3).
    fn exclusive(&mut self, r: Received, wait: Duration) -> Result<StagedTensor<'_>, Duration> {
        let ctl = &self.input.inner.control;
        if let Some(slot) = ctl.slot(usize::from(r.id.pool), r.id.index as usize) {
            let start = Instant::now();
            let mut n = 0u32;
            while slot.holders() != self.input.bit {
                n += 1;
                if n % 128 == 0 {
                    if start.elapsed() > wait {
                        self.held_back = Some(HeldBack::of(&r));
                        return Err(wait);
                    }
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
        }
        Ok(StagedTensor {
            stage: self,
            r,
            done: false,
        })
    }

    /// The next tensor to try: one held back by an earlier receive first.
    fn next_held_back(&mut self) -> Option<Received> {
        self.held_back.take().map(HeldBack::received)
    }

    /// Takes the next tensor exclusively, if one is queued. A tensor that
    /// upstream still shares after a short wait is not lost: it is
    /// [`TryRecvError::NotExclusive`], and the stage keeps it for its next
    /// receive.
    pub fn try_recv_mut(&mut self) -> Result<StagedTensor<'_>, TryRecvError> {
        let r = match self.next_held_back() {
            Some(r) => r,
            None => self.input.try_take()?,
        };
        self.exclusive(r, EXCLUSIVE_WAIT)
            .map_err(TryRecvError::NotExclusive)
    }

    /// Waits for the next tensor and takes it exclusively
    /// ([`RecvError::NotExclusive`]: see [`Stage::try_recv_mut`]).
    pub fn recv_mut(&mut self) -> Result<StagedTensor<'_>, RecvError> {
        let r = match self.next_held_back() {
            Some(r) => r,
            None => self.input.take_timeout(None)?,
        };
        self.exclusive(r, EXCLUSIVE_WAIT)
            .map_err(RecvError::NotExclusive)
    }

    /// Like [`Stage::recv_mut`], waiting at most `timeout`.
    pub fn recv_mut_timeout(&mut self, timeout: Duration) -> Result<StagedTensor<'_>, RecvError> {
        let r = match self.next_held_back() {
            Some(r) => r,
            None => self.input.take_timeout(Some(timeout))?,
        };
        self.exclusive(r, EXCLUSIVE_WAIT)
            .map_err(RecvError::NotExclusive)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // A held-back tensor goes back with the stage (in a forked child,
        // `release` does nothing).
        if let Some(h) = self.held_back.take() {
            self.input.release(h.id);
        }
    }
}

/// A slot held exclusively by a stage: writable, then forwarded or dropped.
pub struct StagedTensor<'s> {
    stage: &'s mut Stage,
    r: Received,
    done: bool,
}

impl std::fmt::Debug for StagedTensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedTensor")
            .field("slot", &self.r.id)
            .field("meta", &self.r.meta)
            .finish()
    }
}

impl StagedTensor<'_> {
    /// Where the slot is (unchanged by forwarding).
    pub fn slot_id(&self) -> SlotId {
        self.r.id
    }
    /// Metadata as received (edit with [`StagedTensor::meta_mut`]).
    pub fn meta(&self) -> &TensorMeta {
        &self.r.meta
    }
    /// Sequence number from upstream.
    pub fn seq(&self) -> u64 {
        self.r.meta.seq
    }
    /// Extents.
    pub fn shape(&self) -> &[u32] {
        self.r.meta.shape()
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.r.meta.dtype
    }
    /// Address of the first payload byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.r.ptr
    }
    /// `Err(ForkedChild)` in a process forked after this tensor's stage was
    /// opened: the slot is the parent's; forwarding fails, dropping it
    /// releases nothing.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.stage.fork_check()
    }
    /// Changes the metadata in place (e.g. a new shape or dtype for the same
    /// bytes); validated against the slot at [`StagedTensor::forward`].
    pub fn meta_mut(&mut self) -> &mut TensorMeta {
        &mut self.r.meta
    }
    /// Sets the user header.
    pub fn set_user_header(&mut self, bytes: &[u8]) -> Result<(), ShapeError> {
        self.r.meta.set_user_header(bytes)
    }
    /// The tensor as a typed mutable slice.
    pub fn as_mut_slice_of<T: Element>(&mut self) -> Result<&mut [T], TypeError> {
        // SAFETY: exclusive hold (holders == our bit, checked in recv_mut),
        // range validated inside the slot of a read-write mapping, and
        // `&mut self` makes this the only view.
        unsafe { typed_mut(&self.r.meta, self.r.ptr) }
    }

    /// Publishes this very slot on the stage's output channel.
    pub fn forward(self) -> Result<PublishOutcome, PublishError> {
        self.forward_stamped().map(|p| p.outcome)
    }

    /// Like [`StagedTensor::forward`], and also returns the output
    /// producer's sequence number and timestamp stamped on the tensor.
    pub fn forward_stamped(mut self) -> Result<Published, PublishError> {
        self.done = true;
        let stage = &mut *self.stage;
        forward_slot(&stage.input, &mut stage.output, &self.r)
    }

    /// Publishes this very slot on another producer's channel (opened from
    /// the same [`crate::Client`] as the stage; the channel must use the
    /// slot's pool).
    ///
    /// ```no_run
    /// # let client = tensorbus::Client::connect()?;
    /// let mut stage = client.stage("frames/raw", "frames/denoised")?;
    /// let mut rejects = client.producer("frames/rejected")?;
    /// let t = stage.recv_mut()?;
    /// if t.iter().all(|&b| b == 0) { t.forward_to(&mut rejects)?; } else { t.forward()?; }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_to(self, producer: &mut Producer) -> Result<PublishOutcome, PublishError> {
        self.forward_to_stamped(producer).map(|p| p.outcome)
    }

    /// Waits up to `timeout` until [`StagedTensor::forward`] would not wait
    /// for room downstream (see [`crate::TensorMut::wait_for_room`]);
    /// returns whether it would not. Nothing is forwarded. (For a forward
    /// to another producer: [`Producer::wait_for_room`].)
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        self.stage.output.wait_for_room(timeout)
    }

    /// Whether [`StagedTensor::forward`] would succeed, without consuming
    /// the tensor (a failed forward releases the slot): the output channel
    /// uses the slot's pool and the metadata fits the slot.
    pub fn check_forward(&self) -> Result<(), PublishError> {
        check_forward(&self.stage.input, &self.stage.output, &self.r)
    }

    /// Whether [`StagedTensor::forward_to`] `producer` would succeed,
    /// without consuming the tensor: same client, a channel that uses the
    /// slot's pool, metadata that fits the slot.
    pub fn check_forward_to(&self, producer: &Producer) -> Result<(), PublishError> {
        check_forward(&self.stage.input, producer, &self.r)
    }

    /// Like [`StagedTensor::forward_to`], and also returns the sequence
    /// number and timestamp `producer` stamped on the tensor.
    pub fn forward_to_stamped(
        mut self,
        producer: &mut Producer,
    ) -> Result<Published, PublishError> {
        self.done = true;
        let stage = &mut *self.stage;
        forward_slot(&stage.input, producer, &self.r)
    }
}

/// Whether `producer` may publish the slot the stage holds: same client,
/// a channel that uses the slot's pool, metadata valid for the slot.
fn check_forward(input: &Consumer, producer: &Producer, r: &Received) -> Result<(), PublishError> {
    input.fork_check()?;
    let pool = usize::from(r.id.pool);
    let slot_size = input
        .pools
        .get(pool)
        .copied()
        .flatten()
        .map_or(0, |p| p.slot_size);
    if !std::sync::Arc::ptr_eq(&input.inner, &producer.inner) {
        Err(PublishError::ForeignClient)
    } else if producer.pools.get(pool).copied().flatten().is_none() {
        Err(PublishError::PoolNotAllowed {
            pool: input
                .inner
                .pools
                .get(pool)
                .map_or_else(String::new, |p| p.name.clone()),
            channel: producer.channel.name.clone(),
        })
    } else {
        r.meta.validate(slot_size).map_err(PublishError::Shape)
    }
}

/// Publishes a slot the stage holds (by its input bit) through `producer`,
/// or releases it with the reason it cannot go there.
fn forward_slot(
    input: &Consumer,
    producer: &mut Producer,
    r: &Received,
) -> Result<Published, PublishError> {
    // In a forked child: nothing forwarded, nothing released (the hold is
    // the parent's).
    input.fork_check()?;
    match check_forward(input, producer, r) {
        Ok(()) if producer.channel.index == input.channel.index => {
            // Forwarding into our own input (a retry loop): our input
            // subscription may be chosen as the receiver, and publish clears
            // the publisher's own bit after delivering; if that bit were the
            // receiver's too, the queued tensor would lose its only hold
            // (issue 11.1). So first move the hold to the output producer's
            // bit, in one atomic step: publishing then works exactly like a
            // fresh loan of that producer. Both bits belong to this client,
            // so a death between the steps is reclaimed like any other.
            if let Some(slot) = producer.slot(r.id) {
                slot.hand_over(input.bit, producer.bit);
            }
            Ok(producer.publish_slot(r.id, r.meta, producer.bit))
        }
        Ok(()) => Ok(producer.publish_slot(r.id, r.meta, input.bit)),
        Err(e) => {
            input.release(r.id);
            Err(e)
        }
    }
}

impl std::ops::Deref for StagedTensor<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: validated range inside our exclusively held slot.
        unsafe { std::slice::from_raw_parts(self.r.ptr, self.r.meta.nbytes as usize) }
    }
}

impl std::ops::DerefMut for StagedTensor<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: exclusive hold and a read-write mapping (stage inputs are
        // mapped writable); `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.r.ptr, self.r.meta.nbytes as usize) }
    }
}

impl Drop for StagedTensor<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.stage.input.release(self.r.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Client, DType, TryRecvError};
    use tensorbus_broker::{Config, EmbeddedBroker};

    /// Issue 13.3: a slot upstream still shares is an error the caller sees,
    /// and the tensor is not lost: the next receive gets it.
    #[test]
    fn a_tensor_not_yet_exclusive_is_kept_not_lost() {
        let config = Config::from_toml(
            r#"
            [[pools]]
            name = "p"
            slot_size = 4096
            slots = 4
            [[channels]]
            name = "wq"
            mode = "workqueue"
            [[channels]]
            name = "out"
            [[channels]]
            name = "other"
            "#,
        )
        .unwrap();
        let sock = std::env::temp_dir()
            .join(format!("tb-stage-unit-{}", std::process::id()))
            .join("b.sock");
        let _broker = EmbeddedBroker::start(&config, &sock).unwrap();
        let client = Client::connect_to(Some(&sock), "unit").unwrap();
        let mut stage = client.stage("wq", "out").unwrap();
        let out = client.consumer("out").unwrap();
        // A live handle's bit (so the broker's stray-bit sweep leaves it):
        // it stands for an upstream producer that has not let go yet.
        let other = client.consumer("other").unwrap();
        let mut src = client.producer("wq").unwrap();
        let mut t = src.loan(&[4], DType::U8).unwrap();
        t.fill(9);
        let id = t.slot_id();
        t.publish().unwrap();
        let slot = client
            .inner
            .control
            .slot(usize::from(id.pool), id.index as usize)
            .unwrap();
        slot.add_holders(other.bit);
        assert!(matches!(
            stage.try_recv_mut(),
            Err(TryRecvError::NotExclusive(_))
        ));
        // Not released: still held by the stage and the stand-in.
        assert_eq!(slot.holders(), other.bit | stage.input.bit);
        slot.release(other.bit);
        let s = stage.try_recv_mut().unwrap();
        assert_eq!(s.slot_id(), id);
        assert!(s.iter().all(|&b| b == 9));
        s.forward().unwrap();
        assert_eq!(out.try_recv().unwrap()[0], 9);
        // Held back when the stage goes: given back with it.
        let mut t = src.loan(&[4], DType::U8).unwrap();
        let id = t.slot_id();
        t.fill(1);
        t.publish().unwrap();
        let slot = client
            .inner
            .control
            .slot(usize::from(id.pool), id.index as usize)
            .unwrap();
        slot.add_holders(other.bit);
        assert!(stage.try_recv_mut().is_err());
        drop(stage);
        slot.release(other.bit);
        assert_eq!(
            slot.holders(),
            0,
            "the held-back tensor went back with the stage"
        );
    }
}
