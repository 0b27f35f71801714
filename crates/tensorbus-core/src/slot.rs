//! Slot headers and the holder word: ownership that survives a kill -9.
//!
//! Each slot header carries a holder set, one bit per holder handle
//! (producer, subscriber, stage half or the broker's custody; the broker
//! hands out the [`HolderId`]s): word 0 (`holders`, on the header's first
//! line) and sixteen extension words (`ext_holders`, on its last two lines),
//! the two-level scheme of [`crate::wide`]. The bits are the truth about who
//! holds a slot:
//!
//! * a **loan** is one CAS on word 0 from "free": taking the slot and
//!   writing down who took it are one atomic step, so no crash can separate
//!   them (an extension-id loan names the slot in its loan intent first);
//! * **publish** sets the receivers' bits before pushing descriptors and
//!   clears the producer's own bit in the same step;
//! * a **release** clears one bit; the slot is free again when word 0 shows
//!   no holder;
//! * clearing a bit twice is harmless, so the broker's reclaim of a dead
//!   client (clear its bits everywhere, repair stale summary bits) is
//!   idempotent.
//!
//! Handles with direct ids (the first sixteen) touch word 0 only: the same
//! one atomic step per operation, on the same line, as a single 64-bit word.
//!
//! The generation counter is bumped by the loaner right after its CAS won,
//! while it holds the slot exclusively, so a descriptor of an earlier use can
//! never validate against the new one.

use crate::meta::{TensorMeta, MAX_DIMS, USER_HEADER_LEN};
use crate::sync::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use crate::wide::{HolderId, Holders, EXT_WORDS};
use crate::DType;

/// Size of one slot header in the control segment.
pub const SLOT_HEADER_SIZE: usize = 384;

/// What a release did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The caller cleared the last bit: the slot is free.
    Freed,
    /// Others still hold the slot.
    StillHeld,
    /// The caller's bit was not set (double release, or reclaimed already).
    NotHeld,
}

/// Flag in [`SlotHeader::dtype_ndim`] (bits 24..32): the strides are the
/// C-contiguous ones, so a consumer computes them instead of reading line 2.
pub const FLAG_CONTIGUOUS: u32 = 1;

/// One slot's header: holder word, generation and tensor metadata.
///
/// Laid out so that the common message touches one cache line: line 0 holds
/// the holder word, generation, dtype/ndim/flags, nbytes, seq, timestamp,
/// producer and the first four extents. Line 1 holds extents 4..8 (read only
/// for tensors of more than four dimensions), line 2 the byte strides (read
/// only when the tensor is not C-contiguous), line 3 the user header (read
/// only when one was set), lines 4 and 5 the holder set's extension words
/// (touched only by handles with extension ids). Every field is an atomic: the header lives in
/// shared memory that other processes may write at any time, and any bit
/// pattern is a valid value (validation happens on the copied-out
/// [`TensorMeta`]).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct SlotHeader {
    /// Word 0 of the holder set: `version:32 | summary:16 | direct:16`
    /// (see [`crate::wide`]); free when the low 32 bits are 0.
    pub holders: AtomicU64,
    /// Bumped on every loan.
    pub generation: AtomicU32,
    /// dtype code | ndim << 8 | user_len << 16 | flags << 24.
    pub dtype_ndim: AtomicU32,
    /// Payload bytes in use.
    pub nbytes: AtomicU64,
    /// Sequence number.
    pub seq: AtomicU64,
    /// CLOCK_MONOTONIC ns at publish.
    pub timestamp_ns: AtomicU64,
    /// Publishing client id.
    pub producer: AtomicU32,
    /// Extents of axes 0..4.
    pub shape_lo: [AtomicU32; 4],
    /// Reserved (keeps line 0 whole).
    pub reserved0: AtomicU32,
    /// Extents of axes 4..8.
    pub shape_hi: [AtomicU32; 4],
    /// Reserved (keeps line 1 whole).
    pub reserved1: [AtomicU64; 6],
    /// Byte strides (valid unless [`FLAG_CONTIGUOUS`] is set).
    pub strides: [AtomicI64; MAX_DIMS],
    /// User header bytes, little-endian packed.
    pub user: [AtomicU64; USER_HEADER_LEN / 8],
    /// The holder set's extension words (ids 16 and up).
    pub ext_holders: [AtomicU64; EXT_WORDS],
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<SlotHeader>() == SLOT_HEADER_SIZE);

impl Default for SlotHeader {
    fn default() -> Self {
        SlotHeader::new()
    }
}

impl SlotHeader {
    /// A free header (for tests and loom; shared memory starts zeroed).
    pub fn new() -> SlotHeader {
        SlotHeader {
            holders: AtomicU64::new(0),
            generation: AtomicU32::new(0),
            dtype_ndim: AtomicU32::new(0),
            nbytes: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            timestamp_ns: AtomicU64::new(0),
            producer: AtomicU32::new(0),
            shape_lo: core::array::from_fn(|_| AtomicU32::new(0)),
            reserved0: AtomicU32::new(0),
            shape_hi: core::array::from_fn(|_| AtomicU32::new(0)),
            reserved1: core::array::from_fn(|_| AtomicU64::new(0)),
            strides: core::array::from_fn(|_| AtomicI64::new(0)),
            user: core::array::from_fn(|_| AtomicU64::new(0)),
            ext_holders: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The holder set: every ownership operation.
    #[inline]
    pub fn holder_set(&self) -> Holders<'_> {
        Holders::new(&self.holders, &self.ext_holders)
    }

    /// Tries to loan the slot for `id`: one CAS on word 0 from "free"
    /// (`loan_intent` and `tag` as in [`Holders::try_loan`]; a direct id
    /// does not touch them). On success returns the new generation (the
    /// caller now holds the slot exclusively).
    #[inline]
    pub fn try_loan(&self, id: HolderId, loan_intent: &AtomicU64, tag: u64) -> Option<u32> {
        if !self.holder_set().try_loan(id, loan_intent, tag) {
            return None;
        }
        // We are the only holder, so nobody else writes the generation now.
        let generation = self.generation.load(Ordering::Relaxed).wrapping_add(1);
        self.generation.store(generation, Ordering::Relaxed);
        Some(generation)
    }

    /// Adds holders (by the sole holder, or under a pin: see
    /// [`Holders::add`]).
    #[inline]
    pub fn add_holders(&self, ids: impl IntoIterator<Item = HolderId>) {
        self.holder_set().add(ids)
    }

    /// Hands the slot from `own` to `ids`: sets them and clears `own` in one
    /// step on word 0 when `own` is a direct id (an extension `own` is
    /// released right after, in its own two steps). Used by a broadcast publish before its pushes, while
    /// the line is still in the producer's cache (clearing `own` after the
    /// pushes would pull the line back from a consumer that is already
    /// reading it). Returns what `own`'s release did.
    #[inline]
    pub fn hand_over(&self, own: HolderId, ids: impl IntoIterator<Item = HolderId>) -> Released {
        self.holder_set().hand_over(own, ids)
    }

    /// Clears `id`'s hold. Release: our reads and writes of the payload
    /// happen-before the next loaner's Acquire CAS.
    #[inline]
    pub fn release(&self, id: HolderId) -> Released {
        self.holder_set().release(id)
    }

    /// Whether `id` holds the slot.
    #[inline]
    pub fn held_by(&self, id: HolderId) -> bool {
        self.holder_set().holds(id)
    }

    /// Whether anyone holds the slot.
    #[inline]
    pub fn is_held(&self) -> bool {
        !self.holder_set().is_free()
    }

    /// Writes metadata (by the exclusive holder, before publishing; the ring
    /// push's Release store makes it visible to receivers). Lines 1 to 3 are
    /// written only when the tensor needs them (see the type's docs).
    #[inline]
    pub fn write_meta(&self, m: &TensorMeta) {
        let contiguous = m.is_contiguous();
        let flags = if contiguous { FLAG_CONTIGUOUS } else { 0 };
        let packed = u32::from(m.dtype.code())
            | (u32::from(m.ndim) << 8)
            | (u32::from(m.user_len) << 16)
            | (flags << 24);
        self.dtype_ndim.store(packed, Ordering::Relaxed);
        self.nbytes.store(m.nbytes, Ordering::Relaxed);
        self.seq.store(m.seq, Ordering::Relaxed);
        self.timestamp_ns.store(m.timestamp_ns, Ordering::Relaxed);
        self.producer.store(m.producer, Ordering::Relaxed);
        for i in 0..4 {
            self.shape_lo[i].store(m.shape[i], Ordering::Relaxed);
        }
        if m.ndim > 4 {
            for i in 0..4 {
                self.shape_hi[i].store(m.shape[4 + i], Ordering::Relaxed);
            }
        }
        if !contiguous {
            for i in 0..MAX_DIMS {
                self.strides[i].store(m.strides[i], Ordering::Relaxed);
            }
        }
        if m.user_len > 0 {
            for (i, chunk) in m.user.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(chunk);
                self.user[i].store(u64::from_le_bytes(w), Ordering::Relaxed);
            }
        }
    }

    /// Copies the metadata out, touching lines 1 to 3 only when the flags
    /// say they are in use. The result is unvalidated (call
    /// [`TensorMeta::validate`]); `Err(code)` if the dtype code is garbage.
    #[inline]
    pub fn read_meta(&self) -> Result<TensorMeta, u8> {
        let mut m = TensorMeta::EMPTY;
        self.read_meta_into(&mut m).map(|()| m)
    }

    /// [`SlotHeader::read_meta`] into an existing value (no 200-byte move on
    /// the receive path). Fields `read_meta` would leave zero are zeroed.
    #[inline]
    pub fn read_meta_into(&self, m: &mut TensorMeta) -> Result<(), u8> {
        let packed = self.dtype_ndim.load(Ordering::Relaxed);
        let code = packed as u8;
        let dtype = DType::from_code(code).ok_or(code)?;
        let ndim = (packed >> 8) as u8;
        m.dtype = dtype;
        m.ndim = ndim;
        m.shape = [0; MAX_DIMS];
        m.strides = [0; MAX_DIMS];
        m.nbytes = self.nbytes.load(Ordering::Relaxed);
        m.seq = self.seq.load(Ordering::Relaxed);
        m.timestamp_ns = self.timestamp_ns.load(Ordering::Relaxed);
        m.producer = self.producer.load(Ordering::Relaxed);
        m.user_len = (packed >> 16) as u8;
        let dims = usize::from(ndim).min(MAX_DIMS);
        for i in 0..dims.min(4) {
            m.shape[i] = self.shape_lo[i].load(Ordering::Relaxed);
        }
        for i in 4..dims {
            m.shape[i] = self.shape_hi[i - 4].load(Ordering::Relaxed);
        }
        if (packed >> 24) & FLAG_CONTIGUOUS != 0 {
            // C-contiguous strides, saturating: garbage extents then fail
            // validation instead of wrapping.
            let mut stride = dtype.itemsize() as i64;
            for i in (0..dims).rev() {
                m.strides[i] = stride;
                stride = stride.saturating_mul(i64::from(m.shape[i]));
            }
        } else {
            for i in 0..dims {
                m.strides[i] = self.strides[i].load(Ordering::Relaxed);
            }
        }
        if m.user_len > 0 {
            for (i, chunk) in m.user.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&self.user[i].load(Ordering::Relaxed).to_le_bytes());
            }
        } else {
            m.user = [0; USER_HEADER_LEN];
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn id(n: u16) -> HolderId {
        HolderId::new(n).unwrap()
    }

    #[test]
    fn loan_publish_release_cycle() {
        let h = SlotHeader::new();
        let intent = AtomicU64::new(0);
        let g1 = h.try_loan(id(0), &intent, 1).unwrap();
        assert_eq!(h.try_loan(id(2), &intent, 1), None, "loan is exclusive");
        h.add_holders([id(1), id(2)]);
        assert_eq!(h.release(id(0)), Released::StillHeld);
        assert_eq!(
            h.release(id(0)),
            Released::NotHeld,
            "double release is harmless"
        );
        assert_eq!(h.release(id(1)), Released::StillHeld);
        assert_eq!(h.release(id(2)), Released::Freed);
        let g2 = h.try_loan(id(0), &intent, 1).unwrap();
        assert_eq!(g2, g1.wrapping_add(1));
    }

    #[test]
    fn hand_over_moves_ownership_in_one_step() {
        let h = SlotHeader::new();
        let intent = AtomicU64::new(0);
        h.try_loan(id(0), &intent, 1).unwrap();
        assert_eq!(
            h.hand_over(id(0), [id(1), id(2), id(600)]),
            Released::StillHeld
        );
        assert!(!h.held_by(id(0)) && h.held_by(id(1)) && h.held_by(id(600)));
        assert_eq!(h.release(id(1)), Released::StillHeld);
        assert_eq!(h.release(id(600)), Released::StillHeld);
        assert_eq!(h.release(id(2)), Released::Freed);
        h.try_loan(id(0), &intent, 1).unwrap();
        assert_eq!(h.hand_over(id(0), []), Released::Freed);
        assert!(!h.is_held(), "no receivers: the slot is free again");
        // An extension-id producer.
        h.try_loan(id(300), &intent, 1).unwrap();
        assert_eq!(h.hand_over(id(300), [id(301)]), Released::StillHeld);
        assert!(h.holder_set().only(id(301)));
        assert_eq!(h.release(id(301)), Released::Freed);
    }

    #[test]
    fn meta_round_trip_strided_and_many_dims() {
        let h = SlotHeader::new();
        let mut m = TensorMeta::contiguous(DType::F32, &[2, 3, 4, 5, 6, 7]).unwrap();
        h.write_meta(&m);
        assert_eq!(h.read_meta().unwrap(), m);
        m.strides.swap(0, 1); // not contiguous any more
        m.shape.swap(0, 1);
        h.write_meta(&m);
        assert_eq!(h.read_meta().unwrap(), m);
    }

    #[test]
    fn meta_round_trip() {
        let h = SlotHeader::new();
        let mut m = TensorMeta::contiguous(DType::BF16, &[3, 5, 7]).unwrap();
        m.seq = 42;
        m.timestamp_ns = 7;
        m.producer = 9;
        m.set_user_header(b"frame=17 cam=2").unwrap();
        h.write_meta(&m);
        assert_eq!(h.read_meta().unwrap(), m);
        h.dtype_ndim.store(0xFF, Ordering::Relaxed);
        assert_eq!(h.read_meta(), Err(0xFF));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Issue 14, with issue 16's holder ids: the broker joins a late
    /// subscriber (an extension id) to a tensor the channel's history keeps
    /// while the history lets it go (a newer publish evicts it, the slot is
    /// freed, loaned again and kept again). The broker pins the slot with
    /// its custody id first (only while someone holds it), checks the
    /// history's hold and then the generation, adds the joiner under the pin and
    /// drops the pin. The joiner keeps its bit only on the tensor it read:
    /// then the eviction did not free it; otherwise it never got a bit.
    #[test]
    fn history_join_versus_eviction() {
        let (hist, prod, custody) = (
            HolderId::new(1).unwrap(),
            HolderId::new(2).unwrap(),
            HolderId::new(0).unwrap(),
        );
        let joiner = HolderId::new(40).unwrap();
        loom::model(move || {
            let h = Arc::new(SlotHeader::new());
            let intent = Arc::new(AtomicU64::new(0));
            let g0 = h.try_loan(prod, &intent, 1).unwrap();
            h.hand_over(prod, [hist]); // published: kept by the history only
            let (h2, i2) = (h.clone(), intent.clone());
            let evict = loom::thread::spawn(move || {
                let freed = h2.release(hist) == Released::Freed;
                if freed {
                    h2.try_loan(prod, &i2, 1).unwrap();
                    h2.hand_over(prod, [hist]); // the next tensor, kept again
                }
                freed
            });
            // The joiner, as deliver_history does it.
            let mut kept = false;
            if h.holder_set().pin_if_held(custody) {
                // The history's hold first, then the generation: a hold
                // read from a publish after a re-loan synchronises with it,
                // so the generation read after it is the new one. (The
                // other order joins a re-loaned slot: loom finds it.)
                if h.held_by(hist) && h.generation.load(Ordering::Acquire) == g0 {
                    h.add_holders([joiner]);
                    kept = true;
                }
                h.release(custody);
            }
            let freed = evict.join().unwrap();
            if kept {
                assert!(!freed, "the joined tensor was freed under the joiner");
                assert!(h.held_by(joiner));
                assert_eq!(h.generation.load(Ordering::Relaxed), g0);
                assert_eq!(h.release(joiner), Released::Freed);
            } else {
                assert!(!h.held_by(joiner));
            }
        });
    }

    /// Two producers race for one free slot: exactly one wins.
    #[test]
    fn loan_is_exclusive() {
        loom::model(|| {
            let h = Arc::new(SlotHeader::new());
            let h2 = h.clone();
            let t = loom::thread::spawn(move || {
                let i = AtomicU64::new(0);
                h2.try_loan(HolderId::new(0).unwrap(), &i, 1).is_some()
            });
            let i = AtomicU64::new(0);
            let a = h.try_loan(HolderId::new(1).unwrap(), &i, 1).is_some();
            let b = t.join().unwrap();
            assert!(a ^ b);
        });
    }

    /// Producer clears its own bit while two receivers release: exactly one
    /// party observes `Freed`, and the slot ends free.
    #[test]
    fn exactly_one_frees() {
        loom::model(|| {
            let h = Arc::new(SlotHeader::new());
            let id = |n| HolderId::new(n).unwrap();
            let i = AtomicU64::new(0);
            h.try_loan(id(0), &i, 1).unwrap();
            h.add_holders([id(1), id(2)]);
            let mut threads = Vec::new();
            for r in [id(1), id(2)] {
                let h = h.clone();
                threads.push(loom::thread::spawn(move || h.release(r) == Released::Freed));
            }
            let mut freed = usize::from(h.release(id(0)) == Released::Freed);
            for t in threads {
                freed += usize::from(t.join().unwrap());
            }
            assert_eq!(freed, 1);
            assert!(!h.is_held());
        });
    }
}
