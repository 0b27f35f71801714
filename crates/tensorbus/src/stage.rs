//! Stages: take a slot exclusively, change it in place, forward the same
//! slot downstream. No byte is copied.

use crate::consumer::{Consumer, ConsumerCore};
use crate::element::{typed_mut, Element};
use crate::error::{ForkedChild, PublishError, RecvError, TryRecvError, TypeError};
use crate::producer::{Producer, ProducerCore, Published};
use crate::view::{Placed, SlotId, TensorView};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tensorbus_core::{ShapeError, TensorMeta};

/// How long `recv_mut` waits for the upstream producer to let go of a slot.
const EXCLUSIVE_WAIT: Duration = Duration::from_secs(2);

/// A work-queue subscriber on `input` plus a producer on `output`: a handle
/// over shared state. Staged tensors ([`StagedTensor`]) own what they need;
/// they may move to other threads and outlive the `Stage` value. Dropping
/// the stage while staged tensors are alive ends its input subscription's
/// deliveries at once; forwarding them still works.
///
/// ```no_run
/// # let client = tensorbus::Client::connect()?;
/// let stage = client.stage("frames/raw", "frames/denoised")?;
/// loop {
///     let mut t = stage.recv_mut()?;
///     for b in t.iter_mut() { *b = b.saturating_sub(3); }   // in place
///     t.forward()?;                                         // same slot, downstream
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Stage {
    pub(crate) core: Arc<StageCore>,
}

/// What a stage's handle and its staged tensors share.
#[derive(Debug)]
pub(crate) struct StageCore {
    pub(crate) input: Consumer,
    pub(crate) output: Producer,
    /// A tensor taken from the input that was not yet exclusive when the
    /// last receive gave up waiting: held (never released unseen) and tried
    /// again first by the next receive.
    held_back: Mutex<Option<Placed>>,
}

impl StageCore {
    fn input(&self) -> &ConsumerCore {
        &self.input.core
    }
    fn held_back(&self) -> MutexGuard<'_, Option<Placed>> {
        self.held_back.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Gives a held-back tensor back (the stage is going).
    fn release_held_back(&self) {
        if let Some(h) = self.held_back().take() {
            self.input().release(h.id);
        }
    }
}

impl Drop for StageCore {
    fn drop(&mut self) {
        // A held-back tensor goes back with the stage (in a forked child,
        // `release` does nothing).
        self.release_held_back();
    }
}

impl Stage {
    pub(crate) fn new(input: Consumer, output: Producer) -> Stage {
        Stage {
            core: Arc::new(StageCore {
                input,
                output,
                held_back: Mutex::new(None),
            }),
        }
    }
    /// The input subscription.
    pub fn input(&self) -> &Consumer {
        &self.core.input
    }
    /// `Err(ForkedChild)` in a process forked after this stage's client
    /// connected: the stage is inert here (see [`crate::Client`]'s fork
    /// semantics).
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.core.input.fork_check()
    }
    /// The output producer (it can also loan fresh slots).
    pub fn output(&self) -> &Producer {
        &self.core.output
    }

    /// Ends the input subscription's deliveries at once (see
    /// [`Consumer::detach`]); staged tensors stay valid and can still be
    /// forwarded. A held-back tensor is given back.
    pub fn detach(&self) -> Result<(), crate::error::RequestError> {
        self.core.release_held_back();
        self.core.input.detach()
    }

    /// Waits up to `wait` until the stage is the slot's only holder (the
    /// upstream producer clears its own bit right after pushing: normally
    /// nanoseconds). On timeout the tensor is kept in `held_back`, never
    /// released unseen (issue 13.3).
    fn exclusive(&self, r: Placed, wait: Duration) -> Result<StagedTensor, Duration> {
        let input = self.core.input();
        if let Some(slot) = input
            .inner
            .control
            .slot(usize::from(r.id.pool), r.id.index as usize)
        {
            let start = Instant::now();
            let mut n = 0u32;
            while !slot.holder_set().only(input.id) {
                n += 1;
                if n % 128 == 0 {
                    if start.elapsed() > wait {
                        *self.core.held_back() = Some(r);
                        return Err(wait);
                    }
                    std::thread::yield_now();
                }
                std::hint::spin_loop();
            }
        }
        Ok(StagedTensor {
            stage: self.core.clone(),
            at: r,
            done: false,
        })
    }

    /// The next tensor to try: one held back by an earlier receive first.
    fn next_held_back(&self) -> Option<Placed> {
        self.core.held_back().take()
    }

    /// Takes the next tensor exclusively, if one is queued. A tensor that
    /// upstream still shares after a short wait is not lost: it is
    /// [`TryRecvError::NotExclusive`], and the stage keeps it for its next
    /// receive.
    pub fn try_recv_mut(&self) -> Result<StagedTensor, TryRecvError> {
        let r = match self.next_held_back() {
            Some(r) => r,
            None => self.core.input().try_take()?,
        };
        self.exclusive(r, EXCLUSIVE_WAIT)
            .map_err(TryRecvError::NotExclusive)
    }

    /// Waits for the next tensor and takes it exclusively
    /// ([`RecvError::NotExclusive`]: see [`Stage::try_recv_mut`]).
    pub fn recv_mut(&self) -> Result<StagedTensor, RecvError> {
        let r = match self.next_held_back() {
            Some(r) => r,
            None => self.core.input.take_timeout(None)?,
        };
        self.exclusive(r, EXCLUSIVE_WAIT)
            .map_err(RecvError::NotExclusive)
    }

    /// Like [`Stage::recv_mut`], waiting at most `timeout`.
    pub fn recv_mut_timeout(&self, timeout: Duration) -> Result<StagedTensor, RecvError> {
        let r = match self.next_held_back() {
            Some(r) => r,
            None => self.core.input.take_timeout(Some(timeout))?,
        };
        self.exclusive(r, EXCLUSIVE_WAIT)
            .map_err(RecvError::NotExclusive)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // Staged tensors are alive (they hold the core): stop deliveries
        // and give a held-back tensor back now; the handles close when the
        // last staged tensor goes.
        if Arc::strong_count(&self.core) > 1 {
            let _ = self.detach();
        }
    }
}

/// A slot held exclusively by a stage: writable, then forwarded or dropped
/// (dropping releases it). It owns what it needs: it may move to another
/// thread and outlive its [`Stage`].
pub struct StagedTensor {
    stage: Arc<StageCore>,
    at: Placed,
    done: bool,
}

impl std::fmt::Debug for StagedTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedTensor")
            .field("slot", &self.at.id)
            .field("meta", &self.at.meta)
            .finish()
    }
}

impl TensorView for StagedTensor {
    fn meta(&self) -> &TensorMeta {
        &self.at.meta
    }
    fn slot_id(&self) -> SlotId {
        self.at.id
    }
}

impl StagedTensor {
    /// Address of the first payload byte, writable.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.at.ptr.0
    }
    /// `Err(ForkedChild)` in a process forked after this tensor's stage was
    /// opened: the slot is the parent's; forwarding fails, dropping it
    /// releases nothing.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.stage.input.fork_check()
    }
    /// Changes the metadata in place (e.g. a new shape or dtype for the same
    /// bytes); validated against the slot at [`StagedTensor::forward`].
    pub fn meta_mut(&mut self) -> &mut TensorMeta {
        &mut self.at.meta
    }
    /// Sets the user header.
    pub fn set_user_header(&mut self, bytes: &[u8]) -> Result<(), ShapeError> {
        self.at.meta.set_user_header(bytes)
    }
    /// The tensor's bytes, writable.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: exclusive hold (our id is the only holder, checked in recv_mut)
        // of a read-write mapping (stage inputs are mapped writable) that
        // `stage` keeps alive; validated range; `&mut self` makes this the
        // only view.
        unsafe { self.at.bytes_mut() }
    }
    /// The tensor as a typed mutable slice.
    pub fn as_mut_slice_of<T: Element>(&mut self) -> Result<&mut [T], TypeError> {
        // SAFETY: exclusive hold (our id is the only holder, checked in recv_mut),
        // range validated inside the slot of a read-write mapping, and
        // `&mut self` makes this the only view.
        unsafe { typed_mut(&self.at.meta, self.at.ptr.0) }
    }

    /// Publishes this very slot on the stage's output channel and returns
    /// what was published (the output producer's sequence number and
    /// timestamp).
    pub fn forward(mut self) -> Result<Published, PublishError> {
        self.done = true;
        forward_slot(self.stage.input(), &self.stage.output.core, &self.at)
    }

    /// Publishes this very slot on another producer's channel (opened from
    /// the same [`crate::Client`] as the stage; the channel must use the
    /// slot's pool).
    ///
    /// ```no_run
    /// # let client = tensorbus::Client::connect()?;
    /// let stage = client.stage("frames/raw", "frames/denoised")?;
    /// let rejects = client.producer("frames/rejected")?;
    /// let t = stage.recv_mut()?;
    /// if t.iter().all(|&b| b == 0) { t.forward_to(&rejects)?; } else { t.forward()?; }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_to(mut self, producer: &Producer) -> Result<Published, PublishError> {
        self.done = true;
        forward_slot(self.stage.input(), &producer.core, &self.at)
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
        check_forward(self.stage.input(), &self.stage.output.core, &self.at)
    }

    /// Whether [`StagedTensor::forward_to`] `producer` would succeed,
    /// without consuming the tensor: same client, a channel that uses the
    /// slot's pool, metadata that fits the slot.
    pub fn check_forward_to(&self, producer: &Producer) -> Result<(), PublishError> {
        check_forward(self.stage.input(), &producer.core, &self.at)
    }
}

/// Whether `producer` may publish the slot the stage holds: same client,
/// a channel that uses the slot's pool, metadata valid for the slot.
fn check_forward(
    input: &ConsumerCore,
    producer: &ProducerCore,
    r: &Placed,
) -> Result<(), PublishError> {
    input.inner.origin.check()?;
    let pool = usize::from(r.id.pool);
    let slot_size = input
        .pools
        .get(pool)
        .copied()
        .flatten()
        .map_or(0, |p| p.slot_size);
    if !Arc::ptr_eq(&input.inner, &producer.inner) {
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
    input: &ConsumerCore,
    producer: &ProducerCore,
    r: &Placed,
) -> Result<Published, PublishError> {
    // In a forked child: nothing forwarded, nothing released (the hold is
    // the parent's).
    input.inner.origin.check()?;
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
                slot.hand_over(input.id, [producer.id]);
            }
            Ok(producer.publish_slot(r.id, r.meta, producer.id))
        }
        Ok(()) => Ok(producer.publish_slot(r.id, r.meta, input.id)),
        Err(e) => {
            input.release(r.id);
            Err(e)
        }
    }
}

impl std::ops::Deref for StagedTensor {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: validated range inside our exclusively held slot of a
        // mapping `stage` keeps alive; nobody writes it during `&self`.
        unsafe { self.at.bytes() }
    }
}

impl std::ops::DerefMut for StagedTensor {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_bytes()
    }
}

impl Drop for StagedTensor {
    fn drop(&mut self) {
        if !self.done {
            self.stage.input().release(self.at.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::error::TryRecvError;
    use crate::{Client, DType, TensorView};
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
        let stage = client.stage("wq", "out").unwrap();
        let out = client.consumer("out").unwrap();
        // A live handle's bit (so the broker's stray-bit sweep leaves it):
        // it stands for an upstream producer that has not let go yet.
        let other = client.consumer("other").unwrap();
        let src = client.producer("wq").unwrap();
        let mut t = src.loan(&[4], DType::U8).unwrap();
        t.fill(9);
        let id = t.slot_id();
        t.publish().unwrap();
        let slot = client
            .inner
            .control
            .slot(usize::from(id.pool), id.index as usize)
            .unwrap();
        slot.add_holders([other.core.id]);
        assert!(matches!(
            stage.try_recv_mut(),
            Err(TryRecvError::NotExclusive(_))
        ));
        // Not released: still held by the stage and the stand-in.
        let held: Vec<_> = slot.holder_set().snapshot().ids().collect();
        let mut want = vec![other.core.id, stage.input().core.id];
        want.sort();
        assert_eq!(held, want);
        slot.release(other.core.id);
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
        slot.add_holders([other.core.id]);
        assert!(stage.try_recv_mut().is_err());
        drop(stage);
        slot.release(other.core.id);
        assert!(
            !slot.is_held(),
            "the held-back tensor went back with the stage"
        );
    }
}
