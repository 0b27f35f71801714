//! The broker's repairs after a client died, from shared memory alone.
//!
//! Every function here is idempotent: running it twice, or after a partial
//! earlier run, gives the same result. See DESIGN.md "The hard part".

use crate::control::Control;
use crate::desc::Descriptor;
use crate::park::Parker;
use crate::records::{INTENT_VALID, STATE_ACTIVE, STATE_DEAD, STATE_FREE};
use crate::slot::Released;
use crate::sync::{fence, Ordering};

/// Clears holder `bit` (a mask) in every slot of every pool. Returns how
/// many slots this freed.
pub fn clear_holder_everywhere(ctl: &Control, bit: u64) -> usize {
    let mut freed = 0;
    for pool in 0..ctl.pools() {
        for index in 0..ctl.slots(pool) {
            if let Some(slot) = ctl.slot(pool, index) {
                if slot.holders() & bit != 0 && slot.release(bit) == Released::Freed {
                    freed += 1;
                }
            }
        }
    }
    freed
}

/// Clears stray holder bits in slots `range` of `pool` (clamped to the
/// pool). `stray(index, holders)` returns the bits of that slot's holder
/// word that belong to no open handle: only a corrupted holder word (a
/// hostile or broken peer) can carry them, and without this sweep the slot
/// would never be free again, since nobody will ever release them. The
/// broker passes the bits it has not handed out (plus its own custody bit
/// on slots not in its custody); it hands bits out on the same thread, so
/// none of them can become legitimate during a sweep. Returns how many
/// slots this freed.
pub fn clear_stray_bits(
    ctl: &Control,
    pool: usize,
    range: core::ops::Range<usize>,
    stray: impl Fn(usize, u64) -> u64,
) -> usize {
    let end = range.end.min(ctl.slots(pool));
    let mut freed = 0;
    for index in range.start.min(end)..end {
        let Some(slot) = ctl.slot(pool, index) else {
            break;
        };
        // A plain load first: almost every slot carries no stray bit, and a
        // load keeps its line shared with the clients using it.
        let bits = stray(index, slot.holders());
        if bits == 0 {
            continue;
        }
        let before = slot.holders.fetch_and(!bits, Ordering::AcqRel);
        if before & bits != 0 && before & !bits == 0 {
            freed += 1;
        }
    }
    freed
}

/// Counts slots in which any bit of `mask` is set.
pub fn count_held(ctl: &Control, mask: u64) -> usize {
    (0..ctl.pools())
        .flat_map(|p| (0..ctl.slots(p)).map(move |i| (p, i)))
        .filter(|&(p, i)| ctl.slot(p, i).is_some_and(|s| s.holders() & mask != 0))
        .count()
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
    let receivers = me.intent_receivers.load(Ordering::Acquire);
    let desc = Descriptor::unpack(intent);
    let mut cleared = 0;
    let subs = ctl.layout().params.max_subscribers as usize;
    if let Some(slot) = ctl.slot(usize::from(desc.pool), desc.index as usize) {
        for s in crate::bits::set_bits(receivers & crate::bits::low_mask(subs)) {
            let pushed = ctl
                .ring(channel, row, s)
                .is_some_and(|r| r.recover_last_push(desc.pack()));
            if !pushed && slot.release(ctl.subscriber_mask(channel, s)) != Released::NotHeld {
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
        ch.subscribers.fetch_and(!(1u64 << sub), Ordering::SeqCst);
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
    //! "Prove it by cutting": the publish protocol written out step by step,
    //! a simulated death after every step, then the broker's repair, then
    //! the invariants: the slot is free exactly once, a receiver gets the
    //! descriptor at most once and holds a bit exactly when it got it.

    use super::*;
    use crate::control::HeapControl;
    use crate::layout::{Layout, LayoutParams};
    use crate::meta::TensorMeta;
    use crate::park::YieldParker;
    use crate::publish::loan;
    use crate::receive::SubscriberPath;
    use crate::records::STATE_ACTIVE;
    use crate::DType;

    const PRODUCER_BIT: u64 = 1 << 5;
    const SUB_BITS: [u64; 2] = [1 << 7, 1 << 9];
    const ROW: usize = 1;

    fn setup() -> HeapControl {
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
        ch.subscribers.store(0b11, Ordering::Relaxed);
        for (s, bit) in SUB_BITS.iter().enumerate() {
            let sub = ctl.subscriber(0, s).unwrap();
            sub.config
                .holder_bit
                .store(bit.trailing_zeros(), Ordering::Relaxed);
            sub.config.depth.store(4, Ordering::Relaxed);
            sub.config.state.store(STATE_ACTIVE, Ordering::Relaxed);
        }
        let p = ctl.producer(0, ROW).unwrap();
        p.holder_bit
            .store(PRODUCER_BIT.trailing_zeros(), Ordering::Relaxed);
        p.state.store(STATE_ACTIVE, Ordering::Relaxed);
        heap
    }

    /// Runs the first `steps` atomic steps of a broadcast publish to both
    /// subscribers. Step list (see `publish.rs`): 1 loan, 2 meta,
    /// 3 intent_receivers, 4 intent, 5 hand over (receivers set, own bit
    /// cleared), 6 push to sub 0, 7 push to sub 1 with the producer dying
    /// between the cell store and the tail store, 8 its tail store,
    /// 9 intent = 0.
    fn publish_prefix(ctl: &Control, steps: usize) -> Option<Descriptor> {
        let mut cursor = 0;
        let mut step = 0;
        let next = |step: &mut usize| {
            *step += 1;
            *step <= steps
        };
        if !next(&mut step) {
            return None;
        }
        let (index, generation) = loan(ctl, 0, PRODUCER_BIT, &mut cursor).unwrap();
        let slot = ctl.slot(0, index).unwrap();
        let desc = Descriptor::new(0, index as u32, generation);
        let me = ctl.producer(0, ROW).unwrap();
        if next(&mut step) {
            slot.write_meta(&TensorMeta::contiguous(DType::U8, &[8]).unwrap());
        }
        if next(&mut step) {
            me.intent_receivers.store(0b11, Ordering::SeqCst);
        }
        if next(&mut step) {
            me.intent
                .store(INTENT_VALID | desc.pack(), Ordering::SeqCst);
        }
        if next(&mut step) {
            slot.hand_over(PRODUCER_BIT, SUB_BITS[0] | SUB_BITS[1]);
        }
        let mut head = 0;
        if next(&mut step) {
            ctl.ring(0, ROW, 0)
                .unwrap()
                .push(4, desc.pack(), &mut head)
                .unwrap();
        }
        if next(&mut step) {
            // Sub 1: the cell is written but the producer dies before the
            // tail store (the push's two stores, separated by hand).
            let ring = ctl.ring(0, ROW, 1).unwrap();
            ring.push(4, desc.pack(), &mut head).unwrap();
            let tail = &ring.header().producer.tail;
            tail.store(tail.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        }
        if next(&mut step) {
            // ... and now the tail store too.
            let tail = &ctl.ring(0, ROW, 1).unwrap().header().producer.tail;
            tail.fetch_add(1, Ordering::Relaxed);
        }
        if next(&mut step) {
            me.intent.store(0, Ordering::Release);
        }
        Some(desc)
    }

    #[test]
    fn death_after_every_step_is_repaired() {
        for steps in 0..=9 {
            let heap = setup();
            let ctl = heap.control();
            let desc = publish_prefix(ctl, steps);
            // The broker's repair of the dead producer.
            recover_producer(ctl, 0, ROW);
            clear_holder_everywhere(ctl, PRODUCER_BIT);
            // Each (live) subscriber drains what it got and releases it.
            for (s, bit) in SUB_BITS.iter().enumerate() {
                let path = SubscriberPath {
                    ctl,
                    channel: 0,
                    sub: s,
                    bit: *bit,
                    lossless: false,
                };
                let mut cursor = 0;
                let mut got = 0;
                while let Some(d) = path.pop(&mut cursor, &YieldParker) {
                    assert_eq!(Some(d), desc, "steps={steps}");
                    let slot = ctl.slot(0, d.index as usize).unwrap();
                    assert!(
                        slot.holders() & bit != 0,
                        "delivered without a hold, steps={steps}"
                    );
                    slot.release(*bit);
                    got += 1;
                }
                assert!(got <= 1, "delivered twice, steps={steps}");
                // Pushed (cell written) exactly from step 6 (sub 0) / 7 (sub 1) on.
                let pushed = steps >= 6 + s;
                assert_eq!(got == 1, pushed, "sub {s} delivery, steps={steps}");
            }
            assert_eq!(count_held(ctl, u64::MAX), 0, "a slot leaked, steps={steps}");
        }
    }

    #[test]
    fn stray_bits_are_swept_and_open_ones_kept() {
        let heap = setup();
        let ctl = heap.control();
        let open = SUB_BITS[0] | PRODUCER_BIT;
        let s0 = ctl.slot(0, 0).unwrap();
        let s1 = ctl.slot(0, 1).unwrap();
        let s2 = ctl.slot(0, 2).unwrap();
        s0.holders.store(1 << 40 | 1 << 3, Ordering::Relaxed); // only stray bits
        s1.holders.store(SUB_BITS[0] | 1 << 40, Ordering::Relaxed); // ours + stray
        s2.holders.store(PRODUCER_BIT, Ordering::Relaxed); // a real loan
        let freed = clear_stray_bits(ctl, 0, 0..usize::MAX, |_, h| h & !open);
        assert_eq!(freed, 1);
        assert_eq!(
            s0.holders(),
            0,
            "a slot held only by stray bits is free again"
        );
        assert_eq!(s1.holders(), SUB_BITS[0], "open holders keep their bit");
        assert_eq!(s2.holders(), PRODUCER_BIT);
        // Ranges are clamped; pools that do not exist are no-ops.
        assert_eq!(clear_stray_bits(ctl, 0, 3..1000, |_, h| h), 0);
        assert_eq!(clear_stray_bits(ctl, 7, 0..4, |_, h| h), 0);
        assert_eq!(count_held(ctl, !open), 0);
    }

    #[test]
    fn validation_rejects_garbage_without_panicking() {
        let heap = setup();
        let ctl = heap.control();
        let path = SubscriberPath {
            ctl,
            channel: 0,
            sub: 0,
            bit: SUB_BITS[0],
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
        let g = slot.try_loan(SUB_BITS[0]).unwrap();
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
        assert_eq!(slot.holders(), 0, "the bad message's hold is released");
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
            slot.holders.store(rng() | SUB_BITS[0], Ordering::Relaxed);
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
