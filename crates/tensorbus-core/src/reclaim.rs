//! The broker's repairs after a client died, from shared memory alone.
//!
//! Every function here is idempotent: running it twice, or after a partial
//! earlier run, gives the same result. See DESIGN.md "The hard part".

use crate::control::Control;
use crate::desc::Descriptor;
use crate::park::Parker;
use crate::records::{INTENT_VALID, STATE_ACTIVE, STATE_DEAD, STATE_FREE};
use crate::slot::{Released, SlotHeader};
use crate::subset::SubSet;
use crate::sync::{fence, Ordering};
use crate::wide::{HolderId, HolderSnapshot};

/// Clears holder `id` in every slot of every pool, and repairs the stale
/// summary bits a holder that died mid-release leaves (rule 1 of
/// [`crate::wide`]). Returns how many slots this freed.
pub fn clear_holder_everywhere(ctl: &Control, id: HolderId) -> usize {
    let mut freed = 0;
    for pool in 0..ctl.pools() {
        for index in 0..ctl.slots(pool) {
            if let Some(slot) = ctl.slot(pool, index) {
                if slot.held_by(id) && slot.release(id) == Released::Freed {
                    freed += 1;
                }
                freed += usize::from(repair_stale_summaries(ctl, pool, index, slot));
            }
        }
    }
    freed
}

/// Repairs the stale summary bits of one slot (set, with an empty
/// extension word: a releaser or an extension-id loaner died between its
/// two steps), skipping a loan a live producer has in flight. Returns
/// whether that freed the slot.
fn repair_stale_summaries(ctl: &Control, pool: usize, index: usize, slot: &SlotHeader) -> bool {
    let set = slot.holder_set();
    let mut freed = false;
    for k in crate::bits::set_bits(u64::from(set.stale_summaries())) {
        freed |= set.repair_stale(k, || ctl.loan_in_flight(pool, index)) == Some(Released::Freed);
    }
    freed
}

/// Clears stray holder bits in slots `range` of `pool` (clamped to the
/// pool) and repairs stale summary bits there. `keep(index)` gives the ids
/// that may hold that slot (every open handle's): bits of any other id only
/// a corrupted holder set (a hostile or broken peer) can carry, and without
/// this sweep the slot would never be free again, since nobody will ever
/// release them. The broker passes the ids it has handed out (and its own
/// custody id only on slots in its custody); it hands ids out on the same
/// thread, so none of the others can become legitimate during a sweep.
/// Returns how many slots this freed.
pub fn clear_stray_bits(
    ctl: &Control,
    pool: usize,
    range: core::ops::Range<usize>,
    keep: impl Fn(usize) -> HolderSnapshot,
) -> usize {
    let end = range.end.min(ctl.slots(pool));
    let mut freed = 0;
    for index in range.start.min(end)..end {
        let Some(slot) = ctl.slot(pool, index) else {
            break;
        };
        // Plain loads first (clear_stray's): almost every slot carries no
        // stray bit, and loads keep its lines shared with the clients.
        let keep = keep(index);
        freed += usize::from(
            slot.holder_set()
                .clear_stray(&keep, || ctl.loan_in_flight(pool, index)),
        );
    }
    freed
}

/// Counts slots `held(snapshot)` says yes to (each slot's holder set read
/// once, see [`crate::wide::Holders::snapshot`]).
pub fn count_held_by(ctl: &Control, held: impl Fn(&HolderSnapshot) -> bool) -> usize {
    (0..ctl.pools())
        .flat_map(|p| (0..ctl.slots(p)).map(move |i| (p, i)))
        .filter(|&(p, i)| {
            ctl.slot(p, i)
                .is_some_and(|s| held(&s.holder_set().snapshot()))
        })
        .count()
}

/// Counts slots that anyone holds.
pub fn count_held(ctl: &Control) -> usize {
    count_held_by(ctl, HolderSnapshot::is_held)
}

/// Finishes the in-flight publish of a dead producer: receivers whose ring
/// never got the descriptor lose their (never delivered) holder bit. Then
/// marks the record dead. Returns the number of bits cleared.
pub fn recover_producer(ctl: &Control, channel: usize, row: usize) -> usize {
    let Some(me) = ctl.producer(channel, row) else {
        return 0;
    };
    me.state.store(STATE_DEAD, Ordering::Release);
    let intent = me.intent.load(Ordering::Acquire);
    if intent & INTENT_VALID == 0 {
        return 0;
    }
    let layout = ctl.layout();
    let receivers = SubSet::load(&me.intent_receivers, Ordering::Acquire).and(layout.valid_subs());
    let desc = Descriptor::unpack(intent);
    let mut cleared = 0;
    if let Some(slot) = ctl.slot(usize::from(desc.pool), desc.index as usize) {
        for s in receivers.iter() {
            let pushed = ctl
                .ring(channel, row, s)
                .is_some_and(|r| r.recover_last_push(desc.pack()));
            let id = ctl.subscriber_id(channel, s);
            if !pushed && id.is_some_and(|id| slot.release(id) != Released::NotHeld) {
                cleared += 1;
            }
        }
    }
    me.intent.store(0, Ordering::Release);
    cleared
}

/// Whether every ring of producer `row` in `channel` is empty (then the row
/// can leave the channel's row mask).
pub fn row_drained(ctl: &Control, channel: usize, row: usize) -> bool {
    let subs = ctl.layout().params.max_subscribers as usize;
    (0..subs).all(|s| ctl.ring(channel, row, s).is_none_or(|r| r.is_empty()))
}

/// Removes a drained row from the channel and frees its record.
pub fn free_row(ctl: &Control, channel: usize, row: usize) {
    if let Some(ch) = ctl.channel(channel) {
        ch.producer_rows.fetch_and(!(1u64 << row), Ordering::AcqRel);
    }
    if let Some(p) = ctl.producer(channel, row) {
        p.state.store(STATE_FREE, Ordering::Release);
    }
}

/// First step of removing a subscriber: producers stop choosing it.
/// Wakes producers blocked on its rings so they notice.
pub fn retire_subscriber(ctl: &Control, channel: usize, sub: usize, parker: &impl Parker) {
    if let Some(ch) = ctl.channel(channel) {
        crate::subset::shared_remove(&ch.subscribers, sub, Ordering::SeqCst);
    }
    if let Some(s) = ctl.subscriber(channel, sub) {
        s.config.state.store(STATE_DEAD, Ordering::SeqCst);
    }
    fence(Ordering::SeqCst);
    for row in 0..ctl.layout().rows() {
        if let Some(r) = ctl.ring(channel, row, sub) {
            let space = &r.header().consumer.space;
            if space.bump() {
                parker.wake_all(&space.seq);
            }
        }
    }
}

/// Snapshot of every producer's intent in a channel, taken right after
/// [`retire_subscriber`]; see [`publishes_settled`].
pub fn intents(ctl: &Control, channel: usize, out: &mut Vec<u64>) {
    out.clear();
    for row in 0..ctl.layout().rows() {
        out.push(
            ctl.producer(channel, row)
                .map_or(0, |p| p.intent.load(Ordering::SeqCst)),
        );
    }
}

/// Whether every publish that could have seen the retired subscriber has
/// finished: each live producer's intent is idle or differs from the snapshot.
pub fn publishes_settled(ctl: &Control, channel: usize, snapshot: &[u64]) -> bool {
    snapshot.iter().enumerate().all(|(row, &seen)| {
        seen & INTENT_VALID == 0
            || ctl.producer(channel, row).is_none_or(|p| {
                p.state.load(Ordering::Acquire) != STATE_ACTIVE
                    || p.intent.load(Ordering::SeqCst) != seen
            })
    })
}

/// Takes every queued descriptor out of subscriber `sub`'s rings (the
/// subscriber is dead, so the broker acts as its consumer).
pub fn drain_subscriber(
    ctl: &Control,
    channel: usize,
    sub: usize,
    mut f: impl FnMut(usize, Descriptor),
) {
    for row in 0..ctl.layout().rows() {
        if let Some(r) = ctl.ring(channel, row, sub) {
            while let Some(bits) = r.pop() {
                f(row, Descriptor::unpack(bits));
            }
        }
    }
}

/// Frees a subscriber record after its bits are cleared and rings drained.
pub fn free_subscriber(ctl: &Control, channel: usize, sub: usize) {
    if let Some(s) = ctl.subscriber(channel, sub) {
        s.config.state.store(STATE_FREE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    //! "Prove it by cutting": the publish protocol written out step by step
    //! (every atomic step of the two-level holder set included), a
    //! simulated death after every step, then the broker's repair, then the
    //! invariants: the slot is free exactly once, a receiver gets the
    //! descriptor at most once and holds a bit exactly when it got it. Run
    //! for direct ids, extension ids in one word, and a mix across words.

    use super::*;
    use crate::control::HeapControl;
    use crate::layout::{Layout, LayoutParams};
    use crate::meta::TensorMeta;
    use crate::park::YieldParker;
    use crate::receive::SubscriberPath;
    use crate::records::{loan_tag, STATE_ACTIVE};
    use crate::wide::{HolderId, HOLDERS_MASK};
    use crate::DType;

    const ROW: usize = 1;

    /// (producer, [subscriber 0, subscriber 1]) holder ids.
    type Ids = (HolderId, [HolderId; 2]);

    fn id(n: u16) -> HolderId {
        HolderId::new(n).unwrap()
    }

    /// Direct ids; extension ids sharing one word; a direct producer with
    /// receivers in word 0 and word 10; an extension producer whose word
    /// one receiver shares.
    const ID_SETS: [(u16, [u16; 2]); 4] = [
        (5, [7, 9]),
        (100, [101, 102]),
        (3, [20, 700]),
        (80, [81, 2]),
    ];

    fn ids(set: (u16, [u16; 2])) -> Ids {
        (id(set.0), [id(set.1[0]), id(set.1[1])])
    }

    fn setup(ids: Ids) -> HeapControl {
        let layout = Layout::compute(&LayoutParams {
            pool_slots: vec![4],
            max_channels: 1,
            max_producers: 2,
            max_subscribers: 2,
            ring_capacity: 4,
        })
        .unwrap();
        let heap = HeapControl::new(layout);
        let ctl = heap.control();
        let ch = ctl.channel(0).unwrap();
        ch.state.store(STATE_ACTIVE, Ordering::Relaxed);
        ch.producer_rows.store(1 << ROW, Ordering::Relaxed);
        ch.subscribers[0].store(0b11, Ordering::Relaxed);
        for (s, sid) in ids.1.iter().enumerate() {
            let sub = ctl.subscriber(0, s).unwrap();
            sub.config
                .holder_id
                .store(u32::from(sid.index()), Ordering::Relaxed);
            sub.config.depth.store(4, Ordering::Relaxed);
            sub.config.state.store(STATE_ACTIVE, Ordering::Relaxed);
        }
        let p = ctl.producer(0, ROW).unwrap();
        p.holder_id
            .store(u32::from(ids.0.index()), Ordering::Relaxed);
        p.state.store(STATE_ACTIVE, Ordering::Relaxed);
        heap
    }

    /// Counts steps; `step()` is false once the budget is spent (the
    /// process "dies" there).
    struct Cut(usize);

    impl Cut {
        fn step(&mut self) -> bool {
            if self.0 == 0 {
                return false;
            }
            self.0 -= 1;
            true
        }
    }

    const V: u64 = 1 << 32;

    fn summary(k: usize) -> u64 {
        1 << (16 + k)
    }

    /// CAS loop on word 0: `f(current)` gives the next value.
    fn update0(slot: &SlotHeader, f: impl Fn(u64) -> u64) {
        let mut w = slot.holders.load(Ordering::Relaxed);
        while let Err(a) =
            slot.holders
                .compare_exchange(w, f(w), Ordering::AcqRel, Ordering::Relaxed)
        {
            w = a;
        }
    }

    /// Runs the first `steps` atomic steps of a broadcast publish to both
    /// subscribers, each holder-set step written out (see `publish.rs` and
    /// `wide.rs`): the loan (direct: one CAS; extension: intent, CAS,
    /// extension bit, intent cleared), meta, intent_receivers, intent, the
    /// hand-over (each receiver's extension bit, the CAS on word 0, an
    /// extension producer's own two release steps), the push to sub 0, the
    /// push to sub 1 with a death between its cell and its tail store, the
    /// tail store, intent = 0. Returns the descriptor once it exists, and
    /// the number of steps the whole publish has.
    fn publish_prefix(ctl: &Control, ids: Ids, steps: usize) -> (Option<Descriptor>, usize) {
        let mut cut = Cut(steps);
        let total = |cut: &Cut| steps - cut.0;
        let (p, subs) = ids;
        let slot = ctl.slot(0, 0).unwrap();
        let me = ctl.producer(0, ROW).unwrap();
        match p.word() {
            None => {
                if !cut.step() {
                    return (None, total(&cut));
                }
                update0(slot, |w| w | p.bit());
            }
            Some(k) => {
                if !cut.step() {
                    return (None, total(&cut));
                }
                me.loan_intent.store(loan_tag(0, 0), Ordering::SeqCst);
                if !cut.step() {
                    return (None, total(&cut));
                }
                update0(slot, |w| (w | summary(k)).wrapping_add(V));
                if !cut.step() {
                    return (None, total(&cut));
                }
                slot.ext_holders[k].fetch_or(p.bit(), Ordering::Release);
                if !cut.step() {
                    return (None, total(&cut));
                }
                me.loan_intent.store(0, Ordering::Release);
            }
        }
        let generation = slot.generation.load(Ordering::Relaxed).wrapping_add(1);
        slot.generation.store(generation, Ordering::Relaxed);
        let desc = Descriptor::new(0, 0, generation);
        let done = |cut: &Cut| (Some(desc), total(cut));
        if !cut.step() {
            return done(&cut);
        }
        slot.write_meta(&TensorMeta::contiguous(DType::U8, &[8]).unwrap());
        if !cut.step() {
            return done(&cut);
        }
        me.intent_receivers[0].store(0b11, Ordering::SeqCst);
        if !cut.step() {
            return done(&cut);
        }
        me.intent
            .store(INTENT_VALID | desc.pack(), Ordering::SeqCst);
        // The hand-over: extension bits, then word 0.
        let (mut direct, mut sum) = (0u64, 0u64);
        for r in subs {
            match r.word() {
                None => direct |= r.bit(),
                Some(k) => {
                    if !cut.step() {
                        return done(&cut);
                    }
                    slot.ext_holders[k].fetch_or(r.bit(), Ordering::Release);
                    sum |= summary(k);
                }
            }
        }
        if !cut.step() {
            return done(&cut);
        }
        let own_direct = if p.is_direct() { p.bit() } else { 0 };
        let bump = if sum != 0 { V } else { 0 };
        update0(slot, |w| {
            ((w | direct | sum) & !own_direct).wrapping_add(bump)
        });
        if let Some(k) = p.word() {
            if !cut.step() {
                return done(&cut);
            }
            let before = slot.ext_holders[k].fetch_and(!p.bit(), Ordering::AcqRel);
            if before == p.bit() {
                if !cut.step() {
                    return done(&cut);
                }
                slot.holder_set().clear_summary_if_empty(k);
            }
        }
        let mut head = 0;
        if !cut.step() {
            return done(&cut);
        }
        ctl.ring(0, ROW, 0)
            .unwrap()
            .push(4, desc.pack(), &mut head)
            .unwrap();
        if !cut.step() {
            return done(&cut);
        }
        // Sub 1: the cell is written but the producer dies before the
        // tail store (the push's two stores, separated by hand).
        let ring = ctl.ring(0, ROW, 1).unwrap();
        ring.push(4, desc.pack(), &mut head).unwrap();
        let tail = &ring.header().producer.tail;
        tail.store(tail.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        if !cut.step() {
            return done(&cut);
        }
        tail.fetch_add(1, Ordering::Relaxed);
        if !cut.step() {
            return done(&cut);
        }
        me.intent.store(0, Ordering::Release);
        done(&cut)
    }

    /// Whether the slot's holder set is entirely clear (no holder, no
    /// extension bit left behind).
    fn all_clear(ctl: &Control) -> bool {
        (0..4).all(|i| {
            let s = ctl.slot(0, i).unwrap().holder_set().raw_snapshot();
            s.word0 & HOLDERS_MASK == 0 && s.ext == [0; crate::wide::EXT_WORDS]
        })
    }

    #[test]
    fn death_after_every_step_is_repaired() {
        for set in ID_SETS {
            let ids = ids(set);
            let (_, total) = publish_prefix(setup(ids).control(), ids, usize::MAX);
            for steps in 0..=total {
                let heap = setup(ids);
                let ctl = heap.control();
                let (desc, _) = publish_prefix(ctl, ids, steps);
                // The broker's repair of the dead producer.
                recover_producer(ctl, 0, ROW);
                clear_holder_everywhere(ctl, ids.0);
                // Each (live) subscriber drains what it got and releases it.
                let mut got = [0; 2];
                for (s, sid) in ids.1.iter().enumerate() {
                    let path = SubscriberPath {
                        ctl,
                        channel: 0,
                        sub: s,
                        id: *sid,
                        lossless: false,
                    };
                    let mut cursor = 0;
                    while let Some(d) = path.pop(&mut cursor, &YieldParker) {
                        assert_eq!(Some(d), desc, "{set:?} steps={steps}");
                        let slot = ctl.slot(0, d.index as usize).unwrap();
                        assert!(
                            slot.held_by(*sid),
                            "delivered without a hold, {set:?} steps={steps}"
                        );
                        slot.release(*sid);
                        got[s] += 1;
                    }
                    assert!(got[s] <= 1, "delivered twice, {set:?} steps={steps}");
                }
                // Pushed exactly in the last four steps (sub 0) / three (sub 1).
                assert_eq!(
                    got[0] == 1,
                    steps + 4 > total,
                    "sub 0, {set:?} steps={steps}"
                );
                assert_eq!(
                    got[1] == 1,
                    steps + 3 > total,
                    "sub 1, {set:?} steps={steps}"
                );
                assert_eq!(count_held(ctl), 0, "a slot leaked, {set:?} steps={steps}");
                assert!(all_clear(ctl), "bits left behind, {set:?} steps={steps}");
            }
        }
    }

    /// A subscriber dies after each step of its release (an extension id
    /// clears its bit, then the summary bit); the broker's clear of the
    /// dead id repairs the rest; the other subscriber's release and the
    /// repair free the slot exactly once, in either order.
    #[test]
    fn death_mid_release_is_repaired() {
        for set in ID_SETS {
            let ids = ids(set);
            for steps in 0..=2 {
                for other_first in [false, true] {
                    let heap = setup(ids);
                    let ctl = heap.control();
                    publish_prefix(ctl, ids, usize::MAX);
                    let slot = ctl.slot(0, 0).unwrap();
                    let (dead, other) = (ids.1[0], ids.1[1]);
                    let mut freed = 0;
                    if other_first {
                        freed += usize::from(slot.release(other) == Released::Freed);
                    }
                    let mut cut = Cut(steps);
                    match dead.word() {
                        None if cut.step() => {
                            freed += usize::from(slot.release(dead) == Released::Freed);
                        }
                        Some(k) if cut.step() => {
                            let before =
                                slot.ext_holders[k].fetch_and(!dead.bit(), Ordering::AcqRel);
                            if before == dead.bit() && cut.step() {
                                freed += usize::from(
                                    slot.holder_set().clear_summary_if_empty(k)
                                        == Some(Released::Freed),
                                );
                            }
                        }
                        _ => {}
                    }
                    // The broker: retire the dead subscriber and clear its id.
                    freed += clear_holder_everywhere(ctl, dead);
                    if !other_first {
                        freed += usize::from(slot.release(other) == Released::Freed);
                    }
                    assert_eq!(freed, 1, "{set:?} steps={steps} other_first={other_first}");
                    assert!(
                        all_clear(ctl),
                        "{set:?} steps={steps} other_first={other_first}"
                    );
                }
            }
        }
    }

    #[test]
    fn stray_bits_are_swept_and_open_ones_kept() {
        let ids = ids(ID_SETS[2]);
        let heap = setup(ids);
        let ctl = heap.control();
        let (p, [s0, s1]) = ids;
        let mut keep = HolderSnapshot::default();
        for i in [p, s0, s1] {
            match i.word() {
                None => keep.word0 |= i.bit(),
                Some(k) => keep.ext[k] |= i.bit(),
            }
        }
        let [a, b, c, d] = [0, 1, 2, 3].map(|i| ctl.slot(0, i).unwrap());
        let intent = crate::sync::AtomicU64::new(0);
        // Only stray ids: a direct one and an extension one.
        a.try_loan(id(1), &intent, 1).unwrap();
        a.add_holders([id(900)]);
        // Ours + stray.
        b.try_loan(p, &intent, 1).unwrap();
        b.hand_over(p, [s1, id(901), id(4)]);
        // A real loan.
        c.try_loan(p, &intent, 1).unwrap();
        // A stale summary (a dead releaser).
        d.try_loan(s1, &intent, 1).unwrap();
        d.ext_holders[s1.word().unwrap()].store(0, Ordering::Relaxed);
        let freed = clear_stray_bits(ctl, 0, 0..usize::MAX, |_| keep);
        assert_eq!(freed, 2);
        assert!(!a.is_held(), "a slot held only by stray ids is free again");
        assert!(!d.is_held(), "a stale summary bit is repaired");
        let ids_b: Vec<HolderId> = b.holder_set().snapshot().ids().collect();
        assert_eq!(ids_b, [s1], "open holders keep their bit");
        assert!(c.holder_set().only(p));
        // Ranges are clamped; pools that do not exist are no-ops.
        assert_eq!(clear_stray_bits(ctl, 0, 3..1000, |_| keep), 0);
        assert_eq!(clear_stray_bits(ctl, 7, 0..4, |_| keep), 0);
        assert_eq!(count_held_by(ctl, |s| s.ids().any(|i| !keep.holds(i))), 0);
    }

    #[test]
    fn validation_rejects_garbage_without_panicking() {
        let ids = ids(ID_SETS[2]);
        let sub0 = ids.1[0];
        let heap = setup(ids);
        let ctl = heap.control();
        let path = SubscriberPath {
            ctl,
            channel: 0,
            sub: 0,
            id: sub0,
            lossless: false,
        };
        let cap = |_| Some(4096u64);
        // Out of range.
        let bad = Descriptor {
            pool: 3,
            index: 1,
            generation: 0,
        };
        assert!(matches!(
            path.validate(bad, cap),
            Err(crate::receive::Corruption::BadIndex { .. })
        ));
        // Stale generation.
        let slot = ctl.slot(0, 0).unwrap();
        let intent = crate::sync::AtomicU64::new(0);
        let g = slot.try_loan(sub0, &intent, 1).unwrap();
        let stale = Descriptor::new(0, 0, g.wrapping_sub(1));
        assert!(matches!(
            path.validate(stale, cap),
            Err(crate::receive::Corruption::StaleGeneration { .. })
        ));
        // Bad metadata: released.
        slot.dtype_ndim.store(0xEE, Ordering::Relaxed);
        let d = Descriptor::new(0, 0, g);
        assert!(matches!(
            path.validate(d, cap),
            Err(crate::receive::Corruption::BadMeta(_))
        ));
        assert!(!slot.is_held(), "the bad message's hold is released");
        // Not our hold.
        assert!(matches!(
            path.validate(d, cap),
            Err(crate::receive::Corruption::NotHolder)
        ));
        // Random descriptors and header bytes: never a panic, never Ok with
        // metadata outside the slot.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rng = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..if cfg!(miri) { 300 } else { 10_000 } {
            let slot = ctl.slot(0, (rng() % 4) as usize).unwrap();
            slot.holders.store(rng() | sub0.bit(), Ordering::Relaxed);
            for e in &slot.ext_holders {
                e.store(rng(), Ordering::Relaxed);
            }
            slot.dtype_ndim
                .store(rng() as u32 & 0x7F_0F1F, Ordering::Relaxed);
            slot.nbytes.store(rng() % 8192, Ordering::Relaxed);
            for i in 0..4 {
                slot.shape_lo[i].store((rng() % 64) as u32, Ordering::Relaxed);
                slot.shape_hi[i].store((rng() % 64) as u32, Ordering::Relaxed);
            }
            for i in 0..8 {
                slot.strides[i].store((rng() % 512) as i64 - 16, Ordering::Relaxed);
            }
            let d = Descriptor::unpack(rng());
            let d = if rng() % 2 == 0 {
                Descriptor::new(
                    0,
                    d.index % 4,
                    ctl.slot(0, (d.index % 4) as usize)
                        .unwrap()
                        .generation
                        .load(Ordering::Relaxed),
                )
            } else {
                d
            };
            if let Ok(m) = path.validate(d, cap) {
                assert!(m.nbytes <= 4096 && m.span().unwrap() <= m.nbytes);
            }
        }
    }
}
