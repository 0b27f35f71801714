//! The single-producer single-consumer descriptor ring.
//!
//! One ring connects one producer handle to one subscriber. Cells hold
//! 64-bit entries: a 16-bit *stamp* and a 48-bit descriptor
//! ([`crate::desc`]). The stamp of the entry written at position `p` is
//! `(p + 1) mod 2^16`, so a consumer can tell "the entry for position `p` is
//! there" from the cell alone, without reading the producer's tail (that
//! saves a cache-line transfer per message, see DESIGN.md). A cell that holds
//! the entry of position `p - capacity` (the previous lap) or is still zeroed
//! has a different stamp, because the capacity is a power of two below 2^16.
//!
//! ```text
//! header line 0 (consumer side): head, space event count (producer parks here)
//! header line 1 (producer side): tail
//! cells[capacity]                stamp:16 | descriptor:48
//! ```
//!
//! * **push** (producer only): if `tail - head >= depth` the ring is full
//!   (the producer caches `head` and re-reads it only when its cached value
//!   says full). Otherwise store `stamp(tail) | desc` into
//!   `cells[tail % cap]` with Release (publishing the slot metadata written
//!   before) and then `tail += 1`.
//! * **pop** (consumer): read `head`, read `cells[head % cap]` with Acquire;
//!   a stamp other than `stamp(head)` means empty. Otherwise
//!   `CAS(head, h -> h + 1)`; whoever wins the CAS owns the entry.
//! * **steal_oldest** (producer, for `drop_oldest`/`latest`): the very same
//!   steps as pop. Because producer and consumer both take entries only by
//!   the CAS on `head`, each entry goes to exactly one of them, and the
//!   producer can only overwrite a cell after `head` moved past it, which the
//!   loser's CAS then notices.
//!
//! Orderings: the cell store is Release and the cell load Acquire, so a
//! consumer that sees the entry also sees the slot header written before the
//! push. The head CAS is AcqRel and the producer reads `head` with Acquire:
//! the consumer's read of the cell happens-before the producer overwrites it
//! on the next lap.
//!
//! Everything here is read from shared memory that peers may corrupt:
//! indices are reduced modulo the capacity and never trusted for bounds.

use crate::event::EventCount;
use crate::sync::{spin_hint, AtomicU64, Ordering};
use crate::{CacheLine, DESC_MASK};

/// Largest ring capacity (must stay below the 2^16 stamp period).
pub const MAX_RING_CAPACITY: usize = 1 << 15;

/// Consumer-side line of a ring header.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ConsumerSide {
    /// Next position to take. Advanced only by CAS (consumer pops, producer steals).
    pub head: AtomicU64,
    /// The producer parks here when the ring is full under the `block` policy.
    pub space: EventCount,
}

/// Producer-side line of a ring header.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ProducerSide {
    /// Next position to write. Written only by the producer (and by the broker
    /// when it repairs the ring of a dead producer).
    pub tail: AtomicU64,
}

/// The two cache lines in front of a ring's cells.
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingHeader {
    /// Head and space event count.
    pub consumer: CacheLine<ConsumerSide>,
    /// Tail.
    pub producer: CacheLine<ProducerSide>,
}

/// Size of a [`RingHeader`] in shared memory.
pub const RING_HEADER_SIZE: usize = 128;

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<RingHeader>() == RING_HEADER_SIZE);

/// The ring was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingFull;

/// A ring: a header and its cells (borrowed from shared memory, or from the
/// heap in tests).
#[derive(Clone, Copy, Debug)]
pub struct Ring<'a> {
    header: &'a RingHeader,
    cells: &'a [AtomicU64],
    mask: u64,
}

#[inline]
fn stamp(pos: u64) -> u64 {
    (pos.wrapping_add(1) & 0xFFFF) << 48
}

impl<'a> Ring<'a> {
    /// Wraps a header and its cells. `cells.len()` must be a power of two in
    /// `1..=MAX_RING_CAPACITY`; returns `None` otherwise.
    pub fn new(header: &'a RingHeader, cells: &'a [AtomicU64]) -> Option<Ring<'a>> {
        let cap = cells.len();
        if cap == 0 || cap > MAX_RING_CAPACITY || !cap.is_power_of_two() {
            return None;
        }
        Some(Ring {
            header,
            cells,
            mask: cap as u64 - 1,
        })
    }

    /// Number of cells.
    pub fn capacity(&self) -> u64 {
        self.mask + 1
    }

    /// The header (event counts live there).
    pub fn header(&self) -> &'a RingHeader {
        self.header
    }

    #[inline]
    fn cell(&self, pos: u64) -> &'a AtomicU64 {
        // In bounds: the mask is capacity - 1 and capacity == cells.len().
        &self.cells[(pos & self.mask) as usize]
    }

    /// Pushes `desc` if fewer than `depth` entries are queued. `cached_head`
    /// is the producer's private copy of `head` (start it at 0; it is only
    /// ever an underestimate, which at worst forces a re-read).
    #[inline]
    pub fn push(&self, depth: u64, desc: u64, cached_head: &mut u64) -> Result<(), RingFull> {
        let depth = depth.clamp(1, self.capacity());
        // Only we write the tail (Relaxed: our own earlier store).
        let tail = self.header.producer.tail.load(Ordering::Relaxed);
        if tail.wrapping_sub(*cached_head) >= depth {
            // Acquire: the consumer's read of the cell we are about to reuse
            // happened before its head CAS (see module docs).
            *cached_head = self.header.consumer.head.load(Ordering::Acquire);
            if tail.wrapping_sub(*cached_head) >= depth {
                return Err(RingFull);
            }
        }
        // Release: publishes the slot header written before this push.
        self.cell(tail)
            .store(stamp(tail) | (desc & DESC_MASK), Ordering::Release);
        self.header
            .producer
            .tail
            .store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Takes the oldest entry (consumer side). `None` when empty.
    #[inline]
    pub fn pop(&self) -> Option<u64> {
        loop {
            let head = self.header.consumer.head.load(Ordering::Acquire);
            // Acquire: pairs with the Release store in `push`.
            let entry = self.cell(head).load(Ordering::Acquire);
            if entry & !DESC_MASK != stamp(head) {
                return None;
            }
            match self.header.consumer.head.compare_exchange(
                head,
                head.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(entry & DESC_MASK),
                // The producer stole this entry (drop_oldest): try the next.
                Err(_) => spin_hint(),
            }
        }
    }

    /// Takes the oldest entry back (producer side, `drop_oldest`). Same
    /// protocol as [`Ring::pop`], so each entry goes to exactly one side.
    #[inline]
    pub fn steal_oldest(&self) -> Option<u64> {
        self.pop()
    }

    /// Whether an entry is waiting (does not take it).
    #[inline]
    pub fn has_entry(&self) -> bool {
        let head = self.header.consumer.head.load(Ordering::Acquire);
        self.cell(head).load(Ordering::Acquire) & !DESC_MASK == stamp(head)
    }

    /// Entries queued, as far as can be told (clamped to the capacity).
    pub fn len(&self) -> u64 {
        let tail = self.header.producer.tail.load(Ordering::Acquire);
        let head = self.header.consumer.head.load(Ordering::Acquire);
        tail.saturating_sub(head).min(self.capacity())
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the entries queued right now into `out`, oldest first,
    /// without taking them (the broker reads a channel's history this way
    /// while its producers keep pushing and stealing). An entry may be
    /// taken or overwritten while it is read: each copied value is one that
    /// was queued at its position at some moment of the call, and nothing
    /// else (the stamp check), so callers validate what they use against
    /// the slot it names.
    pub fn peek_all(&self, out: &mut Vec<u64>) {
        let head = self.header.consumer.head.load(Ordering::Acquire);
        let tail = self.header.producer.tail.load(Ordering::Acquire);
        let n = tail.wrapping_sub(head).min(self.capacity());
        for pos in head..head.wrapping_add(n) {
            let entry = self.cell(pos).load(Ordering::Acquire);
            if entry & !DESC_MASK == stamp(pos) {
                out.push(entry & DESC_MASK);
            }
        }
    }

    /// Recovery, for a producer that died: was `desc` its last push into this
    /// ring? True if the cell before `tail` holds it, or if the cell at `tail`
    /// holds it (the producer died between the cell store and the tail store;
    /// the tail is then repaired). The stamps make an entry of an earlier lap
    /// impossible to mistake for this one.
    pub fn recover_last_push(&self, desc: u64) -> bool {
        let desc = desc & DESC_MASK;
        let tail = self.header.producer.tail.load(Ordering::Acquire);
        let prev = tail.wrapping_sub(1);
        if tail != 0 && self.cell(prev).load(Ordering::Acquire) == stamp(prev) | desc {
            return true;
        }
        if self.cell(tail).load(Ordering::Acquire) == stamp(tail) | desc {
            self.header
                .producer
                .tail
                .store(tail.wrapping_add(1), Ordering::Release);
            return true;
        }
        false
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ring_parts(cap: usize) -> (RingHeader, Vec<AtomicU64>) {
        (
            RingHeader::default(),
            (0..cap).map(|_| AtomicU64::new(0)).collect(),
        )
    }

    #[test]
    fn fifo_with_depth() {
        let (h, c) = ring_parts(4);
        let r = Ring::new(&h, &c).unwrap();
        let mut ch = 0;
        for round in 0..100u64 {
            r.push(3, round * 10 + 1, &mut ch).unwrap();
            r.push(3, round * 10 + 2, &mut ch).unwrap();
            r.push(3, round * 10 + 3, &mut ch).unwrap();
            assert_eq!(r.push(3, 99, &mut ch), Err(RingFull));
            assert_eq!(r.len(), 3);
            assert_eq!(r.pop(), Some(round * 10 + 1));
            assert_eq!(r.pop(), Some(round * 10 + 2));
            assert_eq!(r.pop(), Some(round * 10 + 3));
            assert_eq!(r.pop(), None);
        }
    }

    #[test]
    fn steal_takes_oldest() {
        let (h, c) = ring_parts(2);
        let r = Ring::new(&h, &c).unwrap();
        let mut ch = 0;
        r.push(2, 1, &mut ch).unwrap();
        r.push(2, 2, &mut ch).unwrap();
        assert_eq!(r.push(2, 3, &mut ch), Err(RingFull));
        assert_eq!(r.steal_oldest(), Some(1));
        r.push(2, 3, &mut ch).unwrap();
        assert_eq!(r.pop(), Some(2));
        assert_eq!(r.pop(), Some(3));
        assert_eq!(r.pop(), None);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "4 minutes under Miri; the ring fuzz harness covers the stamp wrap there"
    )]
    fn stamps_survive_many_laps() {
        let (h, c) = ring_parts(8);
        let r = Ring::new(&h, &c).unwrap();
        let mut ch = 0;
        for i in 0..200_000u64 {
            r.push(8, i & DESC_MASK, &mut ch).unwrap();
            assert_eq!(r.pop(), Some(i & DESC_MASK));
            assert_eq!(r.pop(), None);
        }
    }

    #[test]
    fn recovery_detects_last_push() {
        let (h, c) = ring_parts(4);
        let r = Ring::new(&h, &c).unwrap();
        let mut ch = 0;
        assert!(!r.recover_last_push(5));
        r.push(4, 5, &mut ch).unwrap();
        assert!(r.recover_last_push(5));
        assert_eq!(r.pop(), Some(5));
        assert!(
            r.recover_last_push(5),
            "consumed entries still count as pushed"
        );
        assert!(!r.recover_last_push(6));
        // Died between the cell store and the tail store:
        let t = h.producer.tail.load(Ordering::Relaxed);
        c[(t & 3) as usize].store(stamp(t) | 6, Ordering::Relaxed);
        assert!(r.recover_last_push(6));
        assert_eq!(h.producer.tail.load(Ordering::Relaxed), t + 1);
        assert_eq!(r.pop(), Some(6));
    }

    #[test]
    fn garbage_never_panics() {
        let (h, c) = ring_parts(4);
        let r = Ring::new(&h, &c).unwrap();
        h.consumer.head.store(u64::MAX, Ordering::Relaxed);
        h.producer.tail.store(3, Ordering::Relaxed);
        for cell in &c {
            cell.store(u64::MAX, Ordering::Relaxed);
        }
        let _ = r.pop();
        let _ = r.len();
        let mut ch = 0;
        let _ = r.push(4, 1, &mut ch);
        assert!(Ring::new(&h, &c[..3]).is_none());
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    struct Parts {
        header: RingHeader,
        cells: Vec<AtomicU64>,
    }

    fn parts(cap: usize) -> Arc<Parts> {
        Arc::new(Parts {
            header: RingHeader::default(),
            cells: (0..cap).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Producer pushes 1..=3 through a ring of depth 2 while the consumer pops:
    /// everything arrives once, in order.
    #[test]
    fn spsc_fifo() {
        loom::model(|| {
            let p = parts(2);
            let p2 = p.clone();
            let producer = loom::thread::spawn(move || {
                let r = Ring::new(&p2.header, &p2.cells).unwrap();
                let mut ch = 0;
                for v in 1..=3u64 {
                    while r.push(2, v, &mut ch).is_err() {
                        loom::thread::yield_now();
                    }
                }
            });
            let r = Ring::new(&p.header, &p.cells).unwrap();
            let mut got = Vec::new();
            while got.len() < 3 {
                match r.pop() {
                    Some(v) => got.push(v),
                    None => loom::thread::yield_now(),
                }
            }
            producer.join().unwrap();
            assert_eq!(got, vec![1, 2, 3]);
        });
    }

    /// Issue 14, end of stream: the producer pushes and then closes (its
    /// close request reaches the broker after the push: modelled by a
    /// Release/Acquire flag); the broker then stores `ended` (Release). A
    /// consumer that finds the ring empty, then reads `ended` with Acquire,
    /// then looks once more, gets the last entry: end of stream is never
    /// reported with a tensor still queued.
    #[test]
    fn end_of_stream_never_hides_the_last_push() {
        use crate::sync::AtomicU32;
        loom::model(|| {
            let p = parts(2);
            let close = Arc::new(AtomicU32::new(0));
            let ended = Arc::new(AtomicU32::new(0));
            let (p2, c2) = (p.clone(), close.clone());
            let producer = loom::thread::spawn(move || {
                let r = Ring::new(&p2.header, &p2.cells).unwrap();
                r.push(2, 7, &mut 0).unwrap();
                c2.store(1, Ordering::Release); // the close request
            });
            let (c3, e3) = (close.clone(), ended.clone());
            let broker = loom::thread::spawn(move || {
                while c3.load(Ordering::Acquire) == 0 {
                    loom::thread::yield_now();
                }
                e3.store(1, Ordering::Release);
            });
            let r = Ring::new(&p.header, &p.cells).unwrap();
            let mut got = None;
            loop {
                if let Some(v) = r.pop() {
                    got = Some(v);
                    continue;
                }
                if ended.load(Ordering::Acquire) == 1 {
                    // The consumer's second look (consumer.rs try_take).
                    if let Some(v) = r.pop() {
                        got = Some(v);
                        continue;
                    }
                    break; // end of stream
                }
                loom::thread::yield_now();
            }
            assert_eq!(got, Some(7), "end of stream before the last tensor");
            producer.join().unwrap();
            broker.join().unwrap();
        });
    }

    /// drop_oldest: the producer steals and pushes while the consumer pops.
    /// Every entry is taken by exactly one side; nothing is lost or doubled.
    #[test]
    fn steal_versus_pop() {
        loom::model(|| {
            let p = parts(2);
            {
                let r = Ring::new(&p.header, &p.cells).unwrap();
                let mut ch = 0;
                r.push(2, 1, &mut ch).unwrap();
                r.push(2, 2, &mut ch).unwrap();
            }
            let p2 = p.clone();
            let producer = loom::thread::spawn(move || {
                let r = Ring::new(&p2.header, &p2.cells).unwrap();
                let mut ch = 0;
                let mut stolen = Vec::new();
                loop {
                    match r.push(2, 3, &mut ch) {
                        Ok(()) => break,
                        Err(RingFull) => {
                            if let Some(v) = r.steal_oldest() {
                                stolen.push(v);
                            }
                        }
                    }
                }
                stolen
            });
            let r = Ring::new(&p.header, &p.cells).unwrap();
            let mut popped = Vec::new();
            if let Some(v) = r.pop() {
                popped.push(v);
            }
            let stolen = producer.join().unwrap();
            while let Some(v) = r.pop() {
                popped.push(v);
            }
            let mut all: Vec<u64> = stolen.iter().chain(popped.iter()).copied().collect();
            all.sort_unstable();
            assert_eq!(all, vec![1, 2, 3]);
            assert!(
                popped.windows(2).all(|w| w[0] < w[1]),
                "consumer order kept"
            );
        });
    }
}
