//! The producer side of the data path: loan and publish.
//!
//! Publish, as a sequence of atomic steps (each one a possible crash point;
//! the broker's [`crate::reclaim`] repairs any prefix):
//!
//! 1. `intent_receivers = R` then `intent = VALID | desc` (SeqCst) and a
//!    SeqCst fence, then re-read the channel's subscriber mask and narrow R.
//!    (The broker retires a subscriber by clearing its bit in the mask and
//!    then waiting until every producer's intent is idle or changed: the
//!    fences guarantee that either we see the retirement or the broker sees
//!    our intent.)
//! 2. The receivers' ids join the holder set and ours leaves (broadcast: one
//!    CAS on word 0 that hands the slot over while its line is still in our
//!    cache, after any extension bits; see [`crate::wide`]); a work queue
//!    adds the chosen worker's id only and keeps its own.
//! 3. For each receiver: push the descriptor into its ring (one Release
//!    store of the cell), applying its policy when the ring is full.
//! 4. Work queue only: our own id leaves.
//! 5. `intent = 0`.
//!
//! A death after 2 leaves receivers' bits set for rings that never got the
//! descriptor; the broker finds them with [`crate::ring::Ring::recover_last_push`]
//! (the last entry of each of this producer's rings) and clears exactly
//! those bits.

use crate::control::Control;
use crate::desc::Descriptor;
use crate::park::Parker;
use crate::records::{loan_tag, Mode, Policy, INTENT_VALID, STATE_ACTIVE};
use crate::slot::{Released, SlotHeader};
use crate::subset::{SubSet, Subs, SUB_WORDS};
use crate::sync::{fence, AtomicU64, Ordering};
use crate::wide::{HolderId, HOLDERS_MASK};
use std::time::Duration;

/// How long a producer blocked on a full `block` ring sleeps before it
/// re-checks that the subscriber is still alive.
pub const BLOCK_RECHECK: Duration = Duration::from_millis(20);
/// Spins on a full `block` ring before parking.
const BLOCK_SPINS: u32 = 200;

/// Loans a free slot of `pool` for holder `id`, scanning from `*cursor`.
/// `loan_intent` is the loaner's [`crate::records::ProducerRecord::loan_intent`]
/// (used by extension ids only). Returns `(index, generation)`; `None` when
/// every slot is held.
#[inline]
pub fn loan(
    ctl: &Control,
    pool: usize,
    id: HolderId,
    loan_intent: &AtomicU64,
    cursor: &mut usize,
) -> Option<(usize, u32)> {
    let n = ctl.slots(pool);
    if n == 0 {
        return None;
    }
    let start = *cursor % n;
    for k in 0..n {
        let index = (start + k) % n;
        let slot = ctl.slot(pool, index)?;
        // The cursor's slot is most likely free: CAS it at once (one
        // cache-line transfer). Further candidates get a plain load first,
        // which keeps held slots' lines shared instead of bouncing them
        // with failed CAS attempts.
        if k > 0 && slot.holders.load(Ordering::Relaxed) & HOLDERS_MASK != 0 {
            continue;
        }
        if let Some(generation) = slot.try_loan(id, loan_intent, loan_tag(pool, index)) {
            // Start the next scan here: the slot a consumer releases next is
            // most often this one, and reusing it keeps its header, payload
            // and page-table entries warm (a cold 64 MiB slot costs TLB
            // misses on every touch). The cursor is only a hint; the CAS decides.
            *cursor = index;
            return Some((index, generation));
        }
    }
    None
}

/// Releases `desc`'s slot for holder `id` (validating the descriptor).
#[inline]
pub fn release_desc(ctl: &Control, desc: Descriptor, id: HolderId) -> Released {
    match ctl.slot(usize::from(desc.pool), desc.index as usize) {
        Some(slot) => slot.release(id),
        None => Released::NotHeld,
    }
}

/// Releases `id`'s hold on `slot` if there is an id (`None`: no such
/// subscriber record, nothing was set).
#[inline]
fn release_opt(slot: &SlotHeader, id: Option<HolderId>) {
    if let Some(id) = id {
        slot.release(id);
    }
}

/// Counts a publish on the producer's own record. Only this producer writes
/// the counter, so a load and a store do (no locked instruction); the broker
/// folds it into the channel's total when the producer closes.
#[inline]
fn count_published(me: &crate::records::ProducerRecord) {
    let n = me.published.load(Ordering::Relaxed);
    me.published.store(n.wrapping_add(1), Ordering::Relaxed);
}

/// What one publish did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishOutcome {
    /// Subscribers the descriptor was pushed to.
    pub delivered: u32,
    /// Subscribers for which something was dropped (this tensor under
    /// drop_newest, an older one under drop_oldest/latest).
    pub dropped: u32,
}

/// What [`ProducerPath::deliver`] did for one subscriber.
enum Delivery {
    /// Pushed (`dropped`: an older entry was taken back to make room).
    Delivered { dropped: bool },
    /// Not pushed, counted as dropped (drop_newest); our bit is released.
    Dropped,
    /// The subscriber is no longer active; its bit is released.
    Gone,
    /// Still full after a park slice; its bit is released.
    Retry,
}

/// A producer's position in a channel, with its private caches.
#[derive(Debug)]
pub struct ProducerPath<'c> {
    /// The control segment.
    pub ctl: &'c Control,
    /// Channel index.
    pub channel: usize,
    /// This producer's ring row.
    pub row: usize,
    /// Broadcast or work queue.
    pub mode: Mode,
}

impl ProducerPath<'_> {
    /// Chooses the work-queue receiver: among the active subscribers, one
    /// whose ring has room before any whose ring is full (up to its depth),
    /// then the one with the fewest queued entries, ties broken round-robin
    /// from `*rr`. Room comes first because workers may ask for different
    /// depths: a full depth-1 worker with one entry must not be chosen over
    /// a depth-4 worker with two (the publish would wait on the full one
    /// forever while the other has room, although `has_room` said yes).
    fn choose_worker<const N: usize>(&self, candidates: Subs<N>, rr: &mut usize) -> Option<usize> {
        let mut best: Option<((bool, u64), usize)> = None;
        for s in candidates.rotated(*rr) {
            let key = match (
                self.ctl.ring(self.channel, self.row, s),
                self.ctl.subscriber(self.channel, s),
            ) {
                (Some(r), Some(sub)) => {
                    let len = r.len();
                    let depth = match Policy::from_code(sub.config.policy.load(Ordering::Relaxed)) {
                        Policy::Latest => 1,
                        _ => u64::from(sub.config.depth.load(Ordering::Relaxed)),
                    };
                    (len >= depth.clamp(1, r.capacity()), len)
                }
                _ => (true, u64::MAX),
            };
            if best.is_none_or(|(k, _)| key < k) {
                best = Some((key, s));
            }
        }
        let (_, s) = best?;
        *rr = s + 1;
        Some(s)
    }

    /// Publishes slot `desc` (whose metadata is already written) held by
    /// `own`. `cached_heads` has one entry per subscriber index and `rr`
    /// is the work-queue cursor; both are the producer's private state.
    ///
    /// Precondition: `own` is not the holder id of a subscriber of this
    /// channel. Publish clears `own` once the receivers hold the slot; if it
    /// were also a receiver's id, the queued tensor would lose its hold.
    /// (A stage forwarding into its own input first moves its hold to its
    /// output producer's id with [`SlotHeader::hand_over`].)
    pub fn publish(
        &self,
        desc: Descriptor,
        slot: &SlotHeader,
        own: HolderId,
        cached_heads: &mut [u64],
        rr: &mut usize,
        parker: &impl Parker,
    ) -> PublishOutcome {
        // Compiled twice: one-word subscriber sets for channels of up to
        // 64 subscribers (the code of a single 64-bit mask), four words
        // beyond.
        if self.ctl.layout().sub_words() == 1 {
            self.publish_n::<1>(desc, slot, own, cached_heads, rr, parker)
        } else {
            self.publish_n::<SUB_WORDS>(desc, slot, own, cached_heads, rr, parker)
        }
    }

    #[inline(always)]
    fn publish_n<const N: usize>(
        &self,
        desc: Descriptor,
        slot: &SlotHeader,
        own: HolderId,
        cached_heads: &mut [u64],
        rr: &mut usize,
        parker: &impl Parker,
    ) -> PublishOutcome {
        let mut out = PublishOutcome::default();
        let (Some(ch), Some(me)) = (
            self.ctl.channel(self.channel),
            self.ctl.producer(self.channel, self.row),
        ) else {
            slot.release(own);
            return out;
        };
        let layout = self.ctl.layout();
        let valid = Subs::<N>::from_set(layout.valid_subs());
        let packed = desc.pack();

        // Step 1: announce the intent, then settle the receivers.
        let mut receivers = Subs::<N>::load(&ch.subscribers, Ordering::Acquire).and(valid);
        receivers.store(&me.intent_receivers, Ordering::Relaxed);
        // Release store then a SeqCst fence: the fence alone orders this
        // store before the subscriber-mask loads below (the Dekker pair with
        // the broker's retirement, which clears a bit in one word), without
        // a second locked instruction.
        me.intent.store(INTENT_VALID | packed, Ordering::Release);
        fence(Ordering::SeqCst);
        receivers = receivers.and(Subs::<N>::load(&ch.subscribers, Ordering::SeqCst));

        if self.mode == Mode::Workqueue {
            // One receiver. Workers that join while we wait count too; each
            // choice is added to the recorded intent before its holder bit is
            // set, so the broker's repair of a dead producer covers it.
            let mut candidates = receivers;
            let mut gone = Subs::<N>::EMPTY;
            let mut recorded = receivers;
            // No live worker ends the loop: the tensor is dropped below.
            while let Some(s) = self.choose_worker(candidates, rr) {
                if !recorded.contains(s) {
                    recorded.insert(s);
                    recorded.store(&me.intent_receivers, Ordering::SeqCst);
                }
                // Step 2: the receiver becomes a holder before it can see
                // it (we still hold the slot: rule 2 of `wide`).
                slot.add_holders(self.ctl.subscriber_id(self.channel, s));
                match self.deliver(s, packed, slot, cached_heads, parker, true) {
                    Delivery::Delivered { dropped } => {
                        out.delivered += 1;
                        out.dropped += u32::from(dropped);
                        break;
                    }
                    Delivery::Dropped => {
                        out.dropped += 1;
                        break;
                    }
                    // The worker died while we waited for it: choose another.
                    Delivery::Gone => gone.insert(s),
                    // Still full after a while: look again for the least loaded.
                    Delivery::Retry => {}
                }
                candidates = Subs::<N>::load(&ch.subscribers, Ordering::SeqCst)
                    .and(valid)
                    .and_not(gone);
            }
        } else {
            // Step 2: receivers become holders before any of them can see
            // it, and the producer lets go in the same atomic step (no
            // receiver can release before its push, so the slot cannot be
            // freed under the pushes below unless R is empty).
            let (ctl, channel) = (self.ctl, self.channel);
            slot.hand_over(
                own,
                receivers
                    .iter()
                    .filter_map(|s| ctl.subscriber_id(channel, s)),
            );
            if receivers.is_empty() {
                me.intent.store(0, Ordering::Release);
                count_published(me);
                return out;
            }
            // Step 3: deliver (to the subscribers; the channel's history
            // record, if any, keeps it). Relaxed: see `history_subs`.
            let history = Subs::<N>::load(&ch.history_subs, Ordering::Relaxed);
            for s in receivers.and(history).iter() {
                self.keep_in_history(s, packed, cached_heads);
            }
            for s in receivers.and_not(history).iter() {
                match self.deliver(s, packed, slot, cached_heads, parker, false) {
                    Delivery::Delivered { dropped } => {
                        out.delivered += 1;
                        out.dropped += u32::from(dropped);
                    }
                    Delivery::Dropped => out.dropped += 1,
                    Delivery::Gone | Delivery::Retry => {}
                }
            }
        }

        // Step 4 (work queue only: a broadcast handed over in step 2; a work
        // queue keeps its hold while it may still re-choose a worker).
        if self.mode == Mode::Workqueue {
            slot.release(own);
        }
        // Step 5.
        me.intent.store(0, Ordering::Release);
        count_published(me);
        out
    }

    /// Whether a publish now would find room without waiting: every active
    /// `block` subscriber's ring from this producer has room (broadcast), or
    /// some subscriber would take it at once (work queue). Lossy policies
    /// never wait, and no subscriber means nothing to wait for.
    ///
    /// Only this producer pushes into its own rings and consumers only take
    /// entries out, so room seen here is still there at the next publish
    /// (a subscriber that joins meanwhile has an empty ring).
    pub fn has_room(&self) -> bool {
        self.first_full_block_ring().is_none()
    }

    /// The subscriber index of a full `block` ring that would make a
    /// publish wait now (see [`ProducerPath::has_room`]), if any.
    fn first_full_block_ring(&self) -> Option<usize> {
        let ch = self.ctl.channel(self.channel)?;
        let layout = self.ctl.layout();
        // All four words: off the hot path (zero beyond the words in use).
        let receivers = SubSet::load(&ch.subscribers, Ordering::Acquire).and(layout.valid_subs());
        let mut full = None;
        for s in receivers.iter() {
            let (Some(sub), Some(ring)) = (
                self.ctl.subscriber(self.channel, s),
                self.ctl.ring(self.channel, self.row, s),
            ) else {
                continue;
            };
            let blocks = Policy::from_code(sub.config.policy.load(Ordering::Relaxed))
                == Policy::Block
                && sub.config.state.load(Ordering::Acquire) == STATE_ACTIVE;
            let depth = u64::from(sub.config.depth.load(Ordering::Relaxed));
            let is_full = blocks && ring.len() >= depth.clamp(1, ring.capacity());
            match (self.mode, is_full) {
                (Mode::Workqueue, false) => return None, // this worker takes it at once
                (_, true) => full = full.or(Some(s)),
                (Mode::Broadcast, false) => {}
            }
        }
        full
    }

    /// Waits up to `timeout` until [`ProducerPath::has_room`]; returns
    /// whether it did. Parks on the full ring's space event like a blocked
    /// publish (so consumers wake it), re-checking at least every
    /// [`BLOCK_RECHECK`]. Nothing is published or changed: a caller that
    /// gives up (a signal, a deadline) still has its loan.
    pub fn wait_for_room(&self, timeout: Duration, parker: &impl Parker) -> bool {
        let start = std::time::Instant::now();
        loop {
            let Some(s) = self.first_full_block_ring() else {
                return true;
            };
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return false;
            }
            let Some(ring) = self.ctl.ring(self.channel, self.row, s) else {
                continue;
            };
            // Consumers pop, then notify the ring's space event; the
            // re-check is that the same ring is still the one that is full.
            ring.header().consumer.space.wait_unless(
                parker,
                || self.first_full_block_ring() != Some(s),
                left.min(BLOCK_RECHECK),
            );
        }
    }

    /// Pushes into the channel's history record (`drop_oldest` with depth
    /// `history`): the oldest kept tensor is released to make room. Nobody
    /// reads the record, so nobody is notified; the broker copies its
    /// entries to subscribers that join later.
    #[cold]
    #[inline(never)]
    fn keep_in_history(&self, s: usize, packed: u64, cached_heads: &mut [u64]) {
        let (Some(sub), Some(ring), Some(id)) = (
            self.ctl.subscriber(self.channel, s),
            self.ctl.ring(self.channel, self.row, s),
            self.ctl.subscriber_id(self.channel, s),
        ) else {
            return; // out of range: no id was set
        };
        let depth = u64::from(sub.config.depth.load(Ordering::Relaxed));
        let mut dummy = 0;
        let cached = cached_heads.get_mut(s).unwrap_or(&mut dummy);
        // Each failed push steals one entry, so this ends within `depth`
        // rounds (a corrupted depth is clamped by the ring).
        for _ in 0..=ring.capacity() {
            if ring.push(depth, packed, cached).is_ok() {
                return;
            }
            if let Some(old) = ring.steal_oldest() {
                release_desc(self.ctl, Descriptor::unpack(old), id);
            }
        }
        // Only a corrupted ring gets here: the tensor is not kept.
        release_desc(self.ctl, Descriptor::unpack(packed), id);
    }

    /// Pushes to one subscriber under its policy. With `retry`, a `block`
    /// subscriber that stays full for one park slice gives its bit back and
    /// returns [`Delivery::Retry`] (work queues then look for another worker).
    fn deliver(
        &self,
        s: usize,
        packed: u64,
        slot: &SlotHeader,
        cached_heads: &mut [u64],
        parker: &impl Parker,
        retry: bool,
    ) -> Delivery {
        let (Some(sub), Some(ring), Some(id)) = (
            self.ctl.subscriber(self.channel, s),
            self.ctl.ring(self.channel, self.row, s),
            self.ctl.subscriber_id(self.channel, s),
        ) else {
            release_opt(slot, self.ctl.subscriber_id(self.channel, s));
            return Delivery::Gone;
        };
        let policy = Policy::from_code(sub.config.policy.load(Ordering::Relaxed));
        let depth = match policy {
            Policy::Latest => 1,
            _ => u64::from(sub.config.depth.load(Ordering::Relaxed)),
        };
        let mut dummy = 0;
        let cached = cached_heads.get_mut(s).unwrap_or(&mut dummy);
        let mut dropped = false;
        let mut spins = 0u32;
        loop {
            if ring.push(depth, packed, cached).is_ok() {
                sub.config.data.notify(parker);
                return Delivery::Delivered { dropped };
            }
            match policy {
                Policy::DropNewest => {
                    slot.release(id);
                    sub.dropped.fetch_add(1, Ordering::Relaxed);
                    return Delivery::Dropped;
                }
                Policy::DropOldest | Policy::Latest => {
                    if let Some(old) = ring.steal_oldest() {
                        release_desc(self.ctl, Descriptor::unpack(old), id);
                        sub.dropped.fetch_add(1, Ordering::Relaxed);
                        dropped = true;
                    }
                }
                Policy::Block => {
                    if sub.config.state.load(Ordering::Acquire) != STATE_ACTIVE {
                        // The subscriber is gone; the broker clears its bits.
                        slot.release(id);
                        return Delivery::Gone;
                    }
                    if spins < BLOCK_SPINS {
                        spins += 1;
                        crate::sync::spin_hint();
                        continue;
                    }
                    // Consumers pop and the broker retires, then each
                    // notifies (or bumps) the ring's space event; the re-check
                    // reads both.
                    ring.header().consumer.space.wait_unless(
                        parker,
                        || {
                            ring.len() < depth.clamp(1, ring.capacity())
                                || sub.config.state.load(Ordering::Acquire) != STATE_ACTIVE
                        },
                        BLOCK_RECHECK,
                    );
                    if retry && ring.len() >= depth.clamp(1, ring.capacity()) {
                        slot.release(id);
                        return Delivery::Retry;
                    }
                }
            }
        }
    }
}
