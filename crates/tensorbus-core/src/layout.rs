//! Where everything lives in the control segment.
//!
//! The control segment is one memfd created by the broker and mapped
//! read-write by every client. Its layout is a pure function of
//! [`LayoutParams`], which the broker sends to each client at admission, so
//! every process computes the same offsets; nothing in it is a pointer.
//!
//! ```text
//! 0                        ControlHeader (magic, version, size)
//! slots_offset[p]          SlotHeader × slots of pool p, for each pool
//! pool_counters_offset     PoolCounters × pools (loans refused / spilled)
//! channels_offset          ChannelBlock × max_channels, each:
//!                            ChannelRecord
//!                            ProducerRecord × rows   (row 0 = the broker's)
//!                            SubscriberRecord × max_subscribers
//!                            LatencyHistogram × max_subscribers
//!                            (RingHeader + cells[ring_capacity]) × rows × max_subscribers
//! registry_offset          the broker's registry (crate::registry):
//!                            pool entry × pools, channel entry × max_channels,
//!                            handle entry × MAX_HOLDERS
//! ```
//!
//! The first page also holds the registry header (bus id, next ids, the
//! layout parameters), so a broker handed the segment can lay it out.

use crate::records::{ChannelRecord, ProducerRecord, SubscriberRecord};
use crate::ring::{MAX_RING_CAPACITY, RING_HEADER_SIZE};
use crate::slot::SLOT_HEADER_SIZE;
use crate::subset::MAX_SUBSCRIBERS;
use crate::{MAX_POOLS, MAX_SLOTS_PER_POOL};
use serde::{Deserialize, Serialize};
use std::fmt;

/// First word of the control segment.
pub const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"TNSRBUS1");
/// Layout version; bumped on every incompatible change.
pub const LAYOUT_VERSION: u32 = 5;
/// Most holder ids (producers, subscribers, stage halves, the broker's
/// custody and history records) per broker: the two-level holder set of
/// [`crate::wide`].
pub const MAX_HOLDERS: usize = crate::wide::MAX_HOLDER_IDS;

/// Everything the layout depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutParams {
    /// Slots in each pool, in pool-table order.
    pub pool_slots: Vec<u32>,
    /// Channel records.
    pub max_channels: u32,
    /// Producer handles per channel (a row each; the broker has one more).
    pub max_producers: u32,
    /// Subscribers per channel (at most [`crate::subset::MAX_SUBSCRIBERS`]).
    pub max_subscribers: u32,
    /// Cells per ring (power of two), the largest depth a subscriber may ask.
    pub ring_capacity: u32,
}

impl LayoutParams {
    /// A compact encoding (little-endian u32s: pools, max_channels,
    /// max_producers, max_subscribers, ring_capacity, then each pool's
    /// slots), as the registry header records it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let head = [
            self.pool_slots.len() as u32,
            self.max_channels,
            self.max_producers,
            self.max_subscribers,
            self.ring_capacity,
        ];
        head.iter()
            .chain(&self.pool_slots)
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// Decodes [`LayoutParams::to_bytes`]; `None` for bytes of another
    /// shape (the values are checked by [`Layout::compute`]).
    pub fn from_bytes(bytes: &[u8]) -> Option<LayoutParams> {
        if bytes.len() % 4 != 0 || bytes.len() < 20 {
            return None;
        }
        let v: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if v[0] as usize != v.len() - 5 {
            return None;
        }
        Some(LayoutParams {
            pool_slots: v[5..].to_vec(),
            max_channels: v[1],
            max_producers: v[2],
            max_subscribers: v[3],
            ring_capacity: v[4],
        })
    }
}

/// Why a set of parameters cannot be laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LayoutError {}

/// Computed offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The parameters this was computed from.
    pub params: LayoutParams,
    /// Offset of each pool's slot header array.
    pub slots_offset: Vec<usize>,
    /// Offset of the pools' loan counters
    /// ([`crate::pool_counters::POOL_COUNTERS_STRIDE`] bytes each).
    pub pool_counters_offset: usize,
    /// Offset of channel block 0.
    pub channels_offset: usize,
    /// Bytes per channel block.
    pub channel_stride: usize,
    /// Offset of the producer records inside a block.
    pub producers_in_block: usize,
    /// Offset of the subscriber records inside a block.
    pub subscribers_in_block: usize,
    /// Offset of the subscribers' latency histograms inside a block
    /// ([`LATENCY_STRIDE`] bytes each).
    pub latency_in_block: usize,
    /// Offset of the rings inside a block.
    pub rings_in_block: usize,
    /// Bytes per ring (header and cells).
    pub ring_stride: usize,
    /// Offset of the registry's pool entries (then channel, then handle
    /// entries; see [`crate::registry`]).
    pub registry_offset: usize,
    /// Total bytes.
    pub total: usize,
    /// Subscriber indices a channel can have (`0..max_subscribers`).
    valid_subs: crate::subset::SubSet,
}

/// Bytes per subscriber latency histogram ([`crate::latency`]).
pub const LATENCY_STRIDE: usize =
    round_up(core::mem::size_of::<crate::latency::LatencyHistogram>(), 64);

/// Bytes of one registry pool, channel and handle entry.
pub const REG_POOL: usize = crate::registry::entry_size(crate::registry::POOL_WORDS);
/// See [`REG_POOL`].
pub const REG_CHANNEL: usize = crate::registry::entry_size(crate::registry::CHANNEL_WORDS);
/// See [`REG_POOL`].
pub const REG_HANDLE: usize = crate::registry::entry_size(crate::registry::HANDLE_WORDS);

const fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

fn checked(terms: &[(usize, usize)]) -> Option<usize> {
    terms
        .iter()
        .try_fold(0usize, |acc, &(a, b)| acc.checked_add(a.checked_mul(b)?))
}

impl Layout {
    /// Computes the layout, refusing parameters out of range.
    pub fn compute(params: &LayoutParams) -> Result<Layout, LayoutError> {
        let err = |m: String| Err(LayoutError(m));
        if params.pool_slots.is_empty() || params.pool_slots.len() > MAX_POOLS {
            return err(format!(
                "{} pools configured; between 1 and {MAX_POOLS} are supported",
                params.pool_slots.len()
            ));
        }
        for (i, &s) in params.pool_slots.iter().enumerate() {
            if s == 0 || s as usize > MAX_SLOTS_PER_POOL {
                return err(format!(
                    "pool #{i} has {s} slots; between 1 and {MAX_SLOTS_PER_POOL} are supported"
                ));
            }
        }
        if params.max_channels == 0 || params.max_channels > 4096 {
            return err("max_channels must be between 1 and 4096".into());
        }
        if params.max_producers == 0 || params.max_producers > 63 {
            return err("max_producers_per_channel must be between 1 and 63".into());
        }
        if params.max_subscribers == 0 || params.max_subscribers as usize > MAX_SUBSCRIBERS {
            return err(format!(
                "max_subscribers_per_channel must be between 1 and {MAX_SUBSCRIBERS}"
            ));
        }
        let cap = params.ring_capacity as usize;
        if cap == 0 || cap > MAX_RING_CAPACITY || !cap.is_power_of_two() {
            return err(format!(
                "ring_capacity must be a power of two between 1 and {MAX_RING_CAPACITY}"
            ));
        }
        let page = 4096;
        let mut off = page; // control header page
        let mut slots_offset = Vec::with_capacity(params.pool_slots.len());
        for &s in &params.pool_slots {
            slots_offset.push(off);
            off = round_up(off + s as usize * SLOT_HEADER_SIZE, page);
        }
        let pool_counters_offset = off;
        off = round_up(
            off + params.pool_slots.len() * crate::pool_counters::POOL_COUNTERS_STRIDE,
            page,
        );
        let rows = params.max_producers as usize + 1;
        let subs = params.max_subscribers as usize;
        let rec = core::mem::size_of::<ChannelRecord>().max(64);
        let producers_in_block = round_up(rec, 64);
        let prod = round_up(core::mem::size_of::<ProducerRecord>(), 64);
        let subscribers_in_block = producers_in_block + rows * prod;
        let sub = round_up(core::mem::size_of::<SubscriberRecord>(), 64);
        let latency_in_block = round_up(subscribers_in_block + subs * sub, 64);
        let rings_in_block = latency_in_block + subs * LATENCY_STRIDE;
        let ring_stride = round_up(RING_HEADER_SIZE + cap * 8, 64);
        let channel_stride = checked(&[(rings_in_block, 1), (ring_stride, rows * subs)])
            .map(|x| round_up(x, page))
            .ok_or_else(|| LayoutError("layout overflows".into()))?;
        let registry_offset = checked(&[(off, 1), (channel_stride, params.max_channels as usize)])
            .ok_or_else(|| LayoutError("layout overflows".into()))?;
        let total = checked(&[
            (registry_offset, 1),
            (REG_POOL, params.pool_slots.len()),
            (REG_CHANNEL, params.max_channels as usize),
            (REG_HANDLE, MAX_HOLDERS),
        ])
        .map(|x| round_up(x, page))
        .ok_or_else(|| LayoutError("layout overflows".into()))?;
        if total > 1 << 34 {
            return err(format!(
                "control segment would be {total} bytes; lower max_channels, max_subscribers_per_channel or ring_capacity"
            ));
        }
        Ok(Layout {
            params: params.clone(),
            slots_offset,
            pool_counters_offset,
            channels_offset: off,
            channel_stride,
            producers_in_block,
            subscribers_in_block,
            latency_in_block,
            rings_in_block,
            ring_stride,
            registry_offset,
            total,
            valid_subs: crate::subset::SubSet::below(params.max_subscribers as usize),
        })
    }

    /// Words of a channel's subscriber sets in use (one for up to 64
    /// subscribers per channel).
    #[inline]
    pub fn sub_words(&self) -> usize {
        crate::subset::words_for(self.params.max_subscribers as usize)
    }

    /// Subscriber indices a channel can have.
    #[inline]
    pub fn valid_subs(&self) -> crate::subset::SubSet {
        self.valid_subs
    }

    /// Rows of rings per channel (producers plus the broker's row 0).
    pub fn rows(&self) -> usize {
        self.params.max_producers as usize + 1
    }
}

/// The first page of the control segment.
#[repr(C)]
#[derive(Debug)]
pub struct ControlHeader {
    /// [`CONTROL_MAGIC`].
    pub magic: crate::sync::AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: crate::sync::AtomicU32,
    /// Broker process id.
    pub broker_pid: crate::sync::AtomicU32,
    /// Total size of the segment.
    pub total: crate::sync::AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> LayoutParams {
        LayoutParams {
            pool_slots: vec![8, 16],
            max_channels: 4,
            max_producers: 3,
            max_subscribers: 5,
            ring_capacity: 16,
        }
    }

    #[test]
    fn regions_do_not_overlap() {
        let l = Layout::compute(&params()).unwrap();
        assert!(l.slots_offset[0] >= 4096);
        assert!(l.slots_offset[1] >= l.slots_offset[0] + 8 * SLOT_HEADER_SIZE);
        assert!(l.pool_counters_offset >= l.slots_offset[1] + 16 * SLOT_HEADER_SIZE);
        assert!(
            l.channels_offset
                >= l.pool_counters_offset + 2 * crate::pool_counters::POOL_COUNTERS_STRIDE
        );
        assert!(l.rings_in_block >= l.subscribers_in_block + 5 * 192);
        assert!(l.channel_stride >= l.rings_in_block + 4 * 5 * l.ring_stride);
        assert_eq!(l.registry_offset, l.channels_offset + 4 * l.channel_stride);
        assert!(
            l.total
                >= l.registry_offset + 2 * REG_POOL + 4 * REG_CHANNEL + MAX_HOLDERS * REG_HANDLE
        );
    }

    #[test]
    fn params_round_trip_through_bytes() {
        let p = params();
        assert_eq!(LayoutParams::from_bytes(&p.to_bytes()), Some(p.clone()));
        let mut big = p.clone();
        big.pool_slots = vec![u32::MAX; MAX_POOLS];
        assert!(big.to_bytes().len() <= crate::registry::PARAMS_WORDS * 8);
        assert_eq!(LayoutParams::from_bytes(&p.to_bytes()[..8]), None);
        assert_eq!(LayoutParams::from_bytes(&[0; 21]), None);
    }

    #[test]
    fn rejects_bad_params() {
        let mut p = params();
        p.ring_capacity = 12;
        assert!(Layout::compute(&p).is_err());
        let mut p = params();
        p.max_subscribers = 257;
        assert!(Layout::compute(&p).is_err());
        let mut p = params();
        p.pool_slots = vec![];
        assert!(Layout::compute(&p).is_err());
        let mut p = params();
        p.pool_slots = vec![0];
        assert!(Layout::compute(&p).is_err());
    }
}
