//! Slot headers and the holder word: ownership that survives a kill -9.
//!
//! Each slot header carries `holders`, one bit per holder handle (producer,
//! subscriber or stage; the broker hands out the bit numbers). The bits are
//! the truth about who holds a slot:
//!
//! * a **loan** is `CAS(holders, 0 -> my_bit)`: taking the slot and writing
//!   down who took it are one atomic step, so no crash can separate them;
//! * **publish** sets the receivers' bits before pushing descriptors and
//!   clears the producer's own bit after;
//! * a **release** clears one bit; the slot is free again when the word is 0;
//! * clearing a bit twice is harmless, so the broker's reclaim of a dead
//!   client (clear its bits everywhere) is idempotent.
//!
//! The generation counter is bumped by the loaner right after its CAS won,
//! while it holds the slot exclusively, so a descriptor of an earlier use can
//! never validate against the new one.

use crate::meta::{TensorMeta, MAX_DIMS, USER_HEADER_LEN};
use crate::sync::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use crate::DType;

/// Size of one slot header in the control segment.
pub const SLOT_HEADER_SIZE: usize = 256;

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
/// only when one was set). Every field is an atomic: the header lives in
/// shared memory that other processes may write at any time, and any bit
/// pattern is a valid value (validation happens on the copied-out
/// [`TensorMeta`]).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct SlotHeader {
    /// One bit per holder handle; 0 = free.
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
        }
    }

    /// Tries to loan the slot for `bit`: one CAS from 0. On success returns
    /// the new generation (the caller now holds the slot exclusively).
    #[inline]
    pub fn try_loan(&self, bit: u64) -> Option<u32> {
        // Acquire on success: everything the previous holders did with the
        // payload (their Release in `release`) happens-before our writes.
        self.holders
            .compare_exchange(0, bit, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // We are the only holder, so nobody else writes the generation now.
        let generation = self.generation.load(Ordering::Relaxed).wrapping_add(1);
        self.generation.store(generation, Ordering::Relaxed);
        Some(generation)
    }

    /// Adds holder bits (publish sets the receivers before pushing).
    #[inline]
    pub fn add_holders(&self, mask: u64) {
        // Relaxed suffices for the bits themselves: receivers learn about the
        // slot through the ring entry (Release/Acquire), which is ordered after.
        self.holders.fetch_or(mask, Ordering::Relaxed);
    }

    /// Hands the slot from `own` to the holders in `mask` in one atomic step:
    /// sets `mask`, clears `own`. Used by a broadcast publish before its
    /// pushes, while the line is still in the producer's cache (clearing
    /// `own` after the pushes would pull the line back from a consumer that
    /// is already reading it). Returns the previous holder word.
    #[inline]
    pub fn hand_over(&self, own: u64, mask: u64) -> u64 {
        let mut cur = self.holders.load(Ordering::Relaxed);
        loop {
            let next = (cur | mask) & !own;
            // Release: our payload and metadata writes happen-before any
            // later release of the slot (the last releaser's Acquire chain).
            match self
                .holders
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(prev) => return prev,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Adds `mine` if `held_by` is set and `mine` is not, in one CAS: a late
    /// subscriber joins a tensor the channel's history keeps (`held_by` is
    /// the history's bit). Returns whether it joined. While `held_by` is
    /// set the slot cannot be freed, so a join never revives a free slot;
    /// the caller still compares the generation afterwards, since the slot
    /// may have been freed, loaned and kept again between its read of the
    /// descriptor and this CAS (then it releases `mine`).
    #[inline]
    pub fn join_if_held(&self, held_by: u64, mine: u64) -> bool {
        // Acquire on the load and on failure: the holder word we test was
        // written by the publish that set `held_by` (or a later RMW).
        let mut cur = self.holders.load(Ordering::Acquire);
        loop {
            if cur & held_by == 0 || cur & mine != 0 {
                return false;
            }
            // AcqRel on success: like a publish's hand-over, it continues
            // the holder word's release sequence, so the last releaser's
            // Acquire sees everything done before.
            match self.holders.compare_exchange_weak(
                cur,
                cur | mine,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Clears `bit`. Release: our reads and writes of the payload
    /// happen-before the next loaner's Acquire CAS.
    #[inline]
    pub fn release(&self, bit: u64) -> Released {
        let before = self.holders.fetch_and(!bit, Ordering::AcqRel);
        if before & bit == 0 {
            Released::NotHeld
        } else if before == bit {
            Released::Freed
        } else {
            Released::StillHeld
        }
    }

    /// Current holder bits.
    #[inline]
    pub fn holders(&self) -> u64 {
        self.holders.load(Ordering::Acquire)
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

    #[test]
    fn loan_publish_release_cycle() {
        let h = SlotHeader::new();
        let g1 = h.try_loan(0b001).unwrap();
        assert_eq!(h.try_loan(0b100), None, "loan is exclusive");
        h.add_holders(0b110);
        assert_eq!(h.release(0b001), Released::StillHeld);
        assert_eq!(
            h.release(0b001),
            Released::NotHeld,
            "double release is harmless"
        );
        assert_eq!(h.release(0b010), Released::StillHeld);
        assert_eq!(h.release(0b100), Released::Freed);
        let g2 = h.try_loan(0b001).unwrap();
        assert_eq!(g2, g1.wrapping_add(1));
    }

    #[test]
    fn hand_over_moves_ownership_in_one_step() {
        let h = SlotHeader::new();
        h.try_loan(0b0001).unwrap();
        assert_eq!(h.hand_over(0b0001, 0b0110), 0b0001);
        assert_eq!(h.holders(), 0b0110);
        assert_eq!(h.release(0b0010), Released::StillHeld);
        assert_eq!(h.release(0b0100), Released::Freed);
        h.try_loan(0b0001).unwrap();
        h.hand_over(0b0001, 0);
        assert_eq!(h.holders(), 0, "no receivers: the slot is free again");
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

    /// Issue 14: a late subscriber joins a tensor the history keeps while
    /// the history lets it go (a newer publish evicts it, the slot is freed,
    /// loaned again and kept again). The joiner keeps its bit only on the
    /// tensor it read: then the eviction did not free it; otherwise it
    /// gives the bit back and the slot's state is the other side's.
    #[test]
    fn history_join_versus_eviction() {
        const H: u64 = 0b001; // history
        const P: u64 = 0b010; // a producer that loans the freed slot again
        const M: u64 = 0b100; // the late subscriber
        loom::model(|| {
            let h = Arc::new(SlotHeader::new());
            let g0 = h.try_loan(P).unwrap();
            h.hand_over(P, H); // published: kept by the history only
            let h2 = h.clone();
            let evict = loom::thread::spawn(move || {
                let freed = h2.release(H) == Released::Freed;
                if freed {
                    h2.try_loan(P).unwrap();
                    h2.hand_over(P, H); // the next tensor, kept again
                }
                freed
            });
            // The joiner, as deliver_history does it.
            let g = h.generation.load(Ordering::Acquire);
            let kept = if g == g0 && h.join_if_held(H, M) {
                if h.generation.load(Ordering::Acquire) == g {
                    true
                } else {
                    h.release(M);
                    false
                }
            } else {
                false
            };
            let freed = evict.join().unwrap();
            if kept {
                assert!(!freed, "the joined tensor was freed under the joiner");
                assert_eq!(h.holders(), M);
                assert_eq!(h.generation.load(Ordering::Relaxed), g0);
            } else {
                assert_eq!(h.holders() & M, 0);
            }
        });
    }

    /// Two producers race for one free slot: exactly one wins.
    #[test]
    fn loan_is_exclusive() {
        loom::model(|| {
            let h = Arc::new(SlotHeader::new());
            let h2 = h.clone();
            let t = loom::thread::spawn(move || h2.try_loan(0b01).is_some());
            let a = h.try_loan(0b10).is_some();
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
            h.try_loan(0b001).unwrap();
            h.add_holders(0b110);
            let mut threads = Vec::new();
            for bit in [0b010u64, 0b100] {
                let h = h.clone();
                threads.push(loom::thread::spawn(move || {
                    h.release(bit) == Released::Freed
                }));
            }
            let mut freed = usize::from(h.release(0b001) == Released::Freed);
            for t in threads {
                freed += usize::from(t.join().unwrap());
            }
            assert_eq!(freed, 1);
            assert_eq!(h.holders(), 0);
        });
    }
}
