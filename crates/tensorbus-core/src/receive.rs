//! The consumer side of the data path: take a descriptor, validate it, and
//! release the slot when done.

use crate::bits::rotated_bits;
use crate::control::Control;
use crate::desc::Descriptor;
use crate::meta::{ShapeError, TensorMeta};
use crate::park::Parker;
use crate::sync::Ordering;
use crate::wide::HolderId;
use std::fmt;

/// A descriptor or header that failed validation. The hold it carried (if
/// the slot was real and ours) has been released.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// Pool or slot index out of range.
    BadIndex {
        /// Pool read from the descriptor.
        pool: u8,
        /// Index read from the descriptor.
        index: u32,
    },
    /// The slot has moved on to another generation.
    StaleGeneration {
        /// Generation in the descriptor (low 16 bits).
        expected: u16,
        /// Generation in the slot header.
        found: u32,
    },
    /// Our holder bit is not set on the slot.
    NotHolder,
    /// The metadata does not describe a tensor inside the slot.
    BadMeta(ShapeError),
    /// The slot's pool may not be read by this handle.
    ForeignPool {
        /// Pool index.
        pool: u8,
    },
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::BadIndex { pool, index } => {
                write!(
                    f,
                    "descriptor names pool {pool} slot {index}, which does not exist"
                )
            }
            Corruption::StaleGeneration { expected, found } => write!(
                f,
                "descriptor generation {expected} does not match slot generation {found}"
            ),
            Corruption::NotHolder => f.write_str("slot is not held by this subscriber"),
            Corruption::BadMeta(e) => write!(f, "slot metadata is invalid: {e}"),
            Corruption::ForeignPool { pool } => {
                write!(
                    f,
                    "descriptor names pool {pool}, which this channel does not use"
                )
            }
        }
    }
}

impl std::error::Error for Corruption {}

/// A subscriber's position in a channel, with its private cursor.
#[derive(Debug)]
pub struct SubscriberPath<'c> {
    /// The control segment.
    pub ctl: &'c Control,
    /// Channel index.
    pub channel: usize,
    /// Subscriber index.
    pub sub: usize,
    /// This subscriber's holder id.
    pub id: HolderId,
    /// Whether producers may block on us (then pops must wake them).
    pub lossless: bool,
}

impl SubscriberPath<'_> {
    /// Pops the next descriptor from any producer row, starting at `*cursor`
    /// (round-robin for fairness). Does not validate.
    #[inline]
    pub fn pop(&self, cursor: &mut usize, parker: &impl Parker) -> Option<Descriptor> {
        let ch = self.ctl.channel(self.channel)?;
        let rows_mask = ch.producer_rows.load(Ordering::Acquire);
        if rows_mask == 0 {
            return None;
        }
        // Round-robin from `*cursor` over the rows in the mask, by bit
        // iteration: a modulo per row (an integer division) was 18% of a
        // whole loan+publish+recv+release cycle.
        for row in rotated_bits(rows_mask, *cursor) {
            let Some(ring) = self.ctl.ring(self.channel, row, self.sub) else {
                continue;
            };
            if let Some(bits) = ring.pop() {
                // Row 0 is the broker's: a late joiner's history and
                // re-dispatched work items, all older than anything in the
                // producers' rows. Staying on it until it is empty delivers
                // them first.
                *cursor = if row == 0 { 0 } else { row + 1 };
                if self.lossless {
                    ring.header().consumer.space.notify(parker);
                }
                return Some(Descriptor::unpack(bits));
            }
        }
        None
    }

    /// Whether the channel's last producer closed cleanly (see
    /// [`crate::records::ChannelRecord::ended`]). A consumer that reads
    /// true and then finds its rings empty has drained the stream.
    #[inline]
    pub fn ended(&self) -> bool {
        self.ctl
            .channel(self.channel)
            .is_some_and(|ch| ch.ended.load(Ordering::Acquire) != 0)
    }

    /// Whether any ring has an entry waiting.
    pub fn has_entry(&self) -> bool {
        let Some(ch) = self.ctl.channel(self.channel) else {
            return false;
        };
        let rows_mask = ch.producer_rows.load(Ordering::Acquire);
        (0..self.ctl.layout().rows()).any(|row| {
            rows_mask & (1 << row) != 0
                && self
                    .ctl
                    .ring(self.channel, row, self.sub)
                    .is_some_and(|r| r.has_entry())
        })
    }

    /// Validates a popped descriptor against the slot it names and copies
    /// the metadata out. `capacity(pool)` gives the payload bytes of a slot
    /// of `pool`, or `None` if this handle may not read that pool. On error
    /// our hold (if any) is released.
    #[inline]
    pub fn validate(
        &self,
        desc: Descriptor,
        capacity: impl Fn(usize) -> Option<u64>,
    ) -> Result<TensorMeta, Corruption> {
        let mut meta = TensorMeta::EMPTY;
        self.validate_into(desc, capacity, &mut meta).map(|_| meta)
    }

    /// [`SubscriberPath::validate`] into an existing value (the receive path
    /// builds the view in place instead of moving 200 bytes of metadata).
    /// Returns the slot's full generation, read once for the check.
    #[inline]
    pub fn validate_into(
        &self,
        desc: Descriptor,
        capacity: impl Fn(usize) -> Option<u64>,
        meta: &mut TensorMeta,
    ) -> Result<u32, Corruption> {
        let pool = usize::from(desc.pool);
        let Some(slot) = self.ctl.slot(pool, desc.index as usize) else {
            return Err(Corruption::BadIndex {
                pool: desc.pool,
                index: desc.index,
            });
        };
        let fail = |c: Corruption| {
            slot.release(self.id);
            Err(c)
        };
        let generation = slot.generation.load(Ordering::Acquire);
        if !desc.matches_generation(generation) {
            // Not ours to release: the slot belongs to a later use.
            return Err(Corruption::StaleGeneration {
                expected: desc.generation,
                found: generation,
            });
        }
        if !slot.held_by(self.id) {
            return Err(Corruption::NotHolder);
        }
        let Some(cap) = capacity(pool) else {
            return fail(Corruption::ForeignPool { pool: desc.pool });
        };
        if let Err(code) = slot.read_meta_into(meta) {
            return fail(Corruption::BadMeta(ShapeError::BadDType { code }));
        }
        if let Err(e) = meta.validate(cap) {
            return fail(Corruption::BadMeta(e));
        }
        Ok(generation)
    }

    /// Counts a delivered tensor in the shared statistics and, when the
    /// count is a sampled one (`n & sample_mask == 0`, see
    /// [`crate::latency`]), records its publish-to-receive latency: `now()`
    /// (called only then) minus the producer's `timestamp_ns`.
    #[inline]
    pub fn count_delivered(&self, timestamp_ns: u64, sample_mask: u64, now: impl FnOnce() -> u64) {
        if let Some(s) = self.ctl.subscriber(self.channel, self.sub) {
            // Only this consumer writes the counter: a load+store avoids a
            // locked instruction.
            let d = &s.delivered;
            let n = d.load(Ordering::Relaxed).wrapping_add(1);
            d.store(n, Ordering::Relaxed);
            if n & sample_mask == 0 {
                self.record_latency(timestamp_ns, now());
            }
        }
    }

    #[cold]
    fn record_latency(&self, timestamp_ns: u64, now: u64) {
        if let Some(h) = self.ctl.latency(self.channel, self.sub) {
            h.record(now.saturating_sub(timestamp_ns));
        }
    }
}
