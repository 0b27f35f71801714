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
        for s in 0..subs.min(64) {
            if receivers & (1 << s) == 0 {
                continue;
            }
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
