//! Fuzz harnesses for everything a consumer (and the broker) reads from
//! shared memory: ring cells and the descriptors in them, slot headers and
//! the tensor metadata copied out of them, and the broker's repairs run over
//! whatever is left.
//!
//! Two drivers share these functions:
//!
//! * `fuzz/fuzz_targets/*.rs`: cargo-fuzz (libFuzzer, coverage guided,
//!   ASan), run by hand with `scripts/fuzz.sh`;
//! * `tests/fuzz_seeded.rs`: the same functions fed by a seeded PRNG on
//!   stable Rust, part of `cargo test` and therefore of CI.
//!
//! Every function accepts any byte string (reads past its end yield 0) and
//! panics only when a promise of the receive path is broken:
//!
//! * nothing panics, overflows or indexes out of bounds on garbage;
//! * a message is accepted only if its descriptor names a real slot of a
//!   pool the subscriber may read, in the generation the slot is in, with
//!   the subscriber's holder bit set, and its metadata describes a strided
//!   view whose every byte lies inside `nbytes`, and `nbytes` inside the
//!   slot (checked against an independent 128-bit computation, and by
//!   reading the payload the way `Tensor::deref` does, from a buffer exactly
//!   as large as the slot, so that ASan sees a read past it);
//! * a rejected message's hold is released when the slot was ours and in
//!   the descriptor's generation, and left alone otherwise;
//! * well-formed metadata round-trips through a slot header and validates
//!   (no false rejections);
//! * a ring starting from a consistent state behaves as a FIFO queue with
//!   the depth limit, whatever its positions (wrap-around of the 64-bit
//!   positions and of the 16-bit stamps included).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use tensorbus_core::control::Control;
use tensorbus_core::layout::{Layout, LayoutParams};
use tensorbus_core::park::YieldParker;
use tensorbus_core::publish::{loan, ProducerPath};
use tensorbus_core::receive::{Corruption, SubscriberPath};
use tensorbus_core::records::{Mode, Policy, STATE_ACTIVE};
use tensorbus_core::ring::{Ring, RingHeader};
use tensorbus_core::slot::{Released, SlotHeader};
use tensorbus_core::wide::{HolderId, HolderSnapshot};
use tensorbus_core::{reclaim, DType, Descriptor, TensorMeta, DESC_MASK, MAX_DIMS};
use tensorbus_core::{ShapeError, USER_HEADER_LEN};

/// The input as a stream of little-endian integers; past its end every
/// read yields 0, so every byte string is a valid input.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    /// Reads from the start of `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, pos: 0 }
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.data.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
        }
        out
    }
    /// Whether the input is used up.
    pub fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    /// Next byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    /// Next 16 bits.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    /// Next 32 bits.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    /// Next 64 bits.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    /// A value to overwrite `old` with, biased towards the values that
    /// matter: small numbers, all ones, a flipped bit, `old` plus a little
    /// (a generation or position one step ahead).
    pub fn garbage(&mut self, old: u64) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => u64::from(self.u8()),
            2 => old ^ (1u64 << (self.u8() % 64)),
            3 => u64::MAX,
            4 => 0,
            5 => old.wrapping_add(u64::from(self.u8())),
            6 => old & self.u64(),
            _ => old | self.u64(),
        }
    }
}

/// Words of a slot header.
pub const SLOT_WORDS: usize = tensorbus_core::slot::SLOT_HEADER_SIZE / 8;

/// Writes 64-bit word `word` (0..SLOT_WORDS) of a slot header, as a peer writing
/// the header's bytes would (the u32 fields pair up little-endian).
pub fn store_slot_word(h: &SlotHeader, word: usize, v: u64) {
    let (lo, hi) = (v as u32, (v >> 32) as u32);
    match word % SLOT_WORDS {
        0 => h.holders.store(v, Relaxed),
        1 => {
            h.generation.store(lo, Relaxed);
            h.dtype_ndim.store(hi, Relaxed);
        }
        2 => h.nbytes.store(v, Relaxed),
        3 => h.seq.store(v, Relaxed),
        4 => h.timestamp_ns.store(v, Relaxed),
        5 => {
            h.producer.store(lo, Relaxed);
            h.shape_lo[0].store(hi, Relaxed);
        }
        6 => {
            h.shape_lo[1].store(lo, Relaxed);
            h.shape_lo[2].store(hi, Relaxed);
        }
        7 => {
            h.shape_lo[3].store(lo, Relaxed);
            h.reserved0.store(hi, Relaxed);
        }
        8 => {
            h.shape_hi[0].store(lo, Relaxed);
            h.shape_hi[1].store(hi, Relaxed);
        }
        9 => {
            h.shape_hi[2].store(lo, Relaxed);
            h.shape_hi[3].store(hi, Relaxed);
        }
        w @ 10..=15 => h.reserved1[w - 10].store(v, Relaxed),
        w @ 16..=23 => h.strides[w - 16].store(v as i64, Relaxed),
        w @ 24..=31 => h.user[w - 24].store(v, Relaxed),
        w => h.ext_holders[w - 32].store(v, Relaxed),
    }
}

/// Reads word `word` of a slot header (see [`store_slot_word`]).
pub fn load_slot_word(h: &SlotHeader, word: usize) -> u64 {
    let pair = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    match word % SLOT_WORDS {
        0 => h.holders.load(Relaxed),
        1 => pair(h.generation.load(Relaxed), h.dtype_ndim.load(Relaxed)),
        2 => h.nbytes.load(Relaxed),
        3 => h.seq.load(Relaxed),
        4 => h.timestamp_ns.load(Relaxed),
        5 => pair(h.producer.load(Relaxed), h.shape_lo[0].load(Relaxed)),
        6 => pair(h.shape_lo[1].load(Relaxed), h.shape_lo[2].load(Relaxed)),
        7 => pair(h.shape_lo[3].load(Relaxed), h.reserved0.load(Relaxed)),
        8 => pair(h.shape_hi[0].load(Relaxed), h.shape_hi[1].load(Relaxed)),
        9 => pair(h.shape_hi[2].load(Relaxed), h.shape_hi[3].load(Relaxed)),
        w @ 10..=15 => h.reserved1[w - 10].load(Relaxed),
        w @ 16..=23 => h.strides[w - 16].load(Relaxed) as u64,
        w @ 24..=31 => h.user[w - 24].load(Relaxed),
        w => h.ext_holders[w - 32].load(Relaxed),
    }
}

/// Largest slot whose payload is emulated with a real buffer.
pub const MAX_EMULATED_SLOT: u64 = 1 << 16;

/// Reads the payload of an accepted message the way the consumer's
/// `Tensor::deref` does (`from_raw_parts(ptr, nbytes)` over the slot), and
/// every corner element of its strided view the way a strided reader
/// (numpy, DLPack) addresses it. `slot` is exactly as long as the slot, so
/// under ASan a read past it is reported even where the bounds check of
/// the caller was wrong.
fn read_like_a_consumer(m: &TensorMeta, slot: &[u8]) -> u64 {
    assert!(m.nbytes <= slot.len() as u64, "nbytes beyond the slot");
    // SAFETY: the line above; this mirrors the unsafe code of the client
    // crate, so that ASan checks the bound it relies on.
    let bytes = unsafe { std::slice::from_raw_parts(slot.as_ptr(), m.nbytes as usize) };
    let mut sum = bytes.iter().map(|&b| u64::from(b)).sum::<u64>();
    let ext = m.shape();
    if ext.contains(&0) {
        return sum;
    }
    let item = m.dtype.itemsize();
    for corner in 0u32..(1 << ext.len()) {
        let mut off: u64 = 0;
        for (axis, (&e, &s)) in ext.iter().zip(m.strides()).enumerate() {
            if corner & (1 << axis) != 0 {
                off += u64::from(e - 1) * s as u64;
            }
        }
        let off = off as usize;
        let elem = bytes
            .get(off..off + item)
            .unwrap_or_else(|| panic!("element at byte {off} outside {} bytes: {m:?}", m.nbytes));
        sum += elem.iter().map(|&b| u64::from(b)).sum::<u64>();
    }
    sum
}

/// The properties of metadata that passed `validate(cap)`, checked with
/// 128-bit arithmetic independent of `TensorMeta::span`.
pub fn check_accepted(m: &TensorMeta, cap: u64) {
    assert!(usize::from(m.ndim) <= MAX_DIMS, "{m:?}");
    assert!(usize::from(m.user_len) <= USER_HEADER_LEN, "{m:?}");
    assert!(m.nbytes <= cap, "nbytes {} > slot {cap}", m.nbytes);
    let ext = m.shape();
    let numel = if ext.contains(&0) {
        Some(0)
    } else {
        ext.iter()
            .try_fold(1u128, |n, &e| n.checked_mul(u128::from(e)))
    };
    assert!(
        numel.is_some_and(|n| n <= u128::from(u64::MAX)),
        "accepted a tensor of more than 2^64 elements: {m:?}"
    );
    assert_eq!(u128::from(m.numel()), numel.unwrap_or(0), "{m:?}");
    if !ext.contains(&0) {
        let mut last: i128 = 0;
        for (&e, &s) in ext.iter().zip(m.strides()) {
            assert!(s >= 0, "accepted a negative stride: {m:?}");
            last += (i128::from(e) - 1) * i128::from(s);
        }
        let end = last + m.dtype.itemsize() as i128;
        assert!(
            end <= i128::from(m.nbytes),
            "view reaches byte {end} of {}: {m:?}",
            m.nbytes
        );
    }
    if cap <= MAX_EMULATED_SLOT {
        let slot = vec![0x5Au8; cap as usize];
        std::hint::black_box(read_like_a_consumer(m, &slot));
    }
}

/// Target `slot_header`: 256 bytes of slot header (any of them, holder
/// word included) and a slot size, through `read_meta` and `validate`; then
/// a well-formed tensor through `write_meta`/`read_meta`.
pub fn slot_header(data: &[u8]) {
    let mut inp = Input::new(data);
    let cap = if inp.u8() & 0x80 == 0 {
        u64::from(inp.u32()) % (MAX_EMULATED_SLOT + 1)
    } else {
        inp.u64()
    };
    let h = SlotHeader::new();
    for w in 0..SLOT_WORDS {
        store_slot_word(&h, w, inp.u64());
    }
    match h.read_meta() {
        Err(code) => assert!(DType::from_code(code).is_none(), "dtype {code} refused"),
        Ok(m) => {
            // Accessors of unvalidated metadata never panic either.
            let _ = std::hint::black_box((
                m.shape().len(),
                m.strides().len(),
                m.user_header().len(),
                m.is_contiguous(),
                m.span(),
                m.numel(),
            ));
            if m.validate(cap).is_ok() {
                check_accepted(&m, cap);
            }
        }
    }

    // Producer side: well-formed metadata round-trips and validates.
    let dtype = DType::ALL[usize::from(inp.u8()) % DType::ALL.len()];
    let ndim = usize::from(inp.u8()) % (MAX_DIMS + 2);
    let shape: Vec<u32> = (0..ndim)
        .map(|_| match inp.u8() % 4 {
            0 => u32::from(inp.u8() % 2),
            1 => u32::from(inp.u8()),
            2 => u32::from(inp.u16()),
            _ => inp.u64() as u32,
        })
        .collect();
    let user_len = usize::from(inp.u8()) % (USER_HEADER_LEN + 2);
    match TensorMeta::contiguous(dtype, &shape) {
        Err(ShapeError::TooManyDims { .. }) => assert!(ndim > MAX_DIMS),
        Err(_) => {
            // Refused: a stride does not fit i64, or the byte size does not
            // fit u64 (128-bit arithmetic).
            let mut representable = true;
            let mut stride = Some(dtype.itemsize() as u128);
            for &e in shape.iter().rev() {
                representable &= stride.is_some_and(|s| s <= i64::MAX as u128);
                stride = stride.and_then(|s| s.checked_mul(e as u128));
            }
            representable &= stride.is_some_and(|s| s <= u128::from(u64::MAX));
            assert!(!representable, "refused a valid shape {shape:?} of {dtype}");
        }
        Ok(mut m) => {
            m.seq = inp.u64();
            m.timestamp_ns = inp.u64();
            m.producer = inp.u32();
            let user: Vec<u8> = (0..user_len).map(|_| inp.u8()).collect();
            if m.set_user_header(&user).is_err() {
                assert!(user_len > USER_HEADER_LEN);
            }
            let h = SlotHeader::new();
            h.write_meta(&m);
            assert_eq!(h.read_meta(), Ok(m), "metadata round trip");
            m.validate(m.nbytes)
                .unwrap_or_else(|e| panic!("valid {m:?} refused: {e}"));
            if m.nbytes > 0 && m.span() == Ok(m.nbytes) {
                assert!(m.validate(m.nbytes - 1).is_err(), "a slot too small passes");
            }
            check_accepted(&m, m.nbytes);
        }
    }
}

/// Slots per pool, payload bytes per slot of each pool in the control
/// segment the `descriptor` target builds.
const POOL_SLOTS: [u32; 2] = [4, 4];
const SLOT_SIZE: [u64; 2] = [64, 4096];
/// Holder ids: subscribers 0 and 1, producers of rows 0 to 2 (row 0 is
/// the broker's), direct and extension ids mixed.
const SUB_IDS: [HolderId; 2] = [hid(7), hid(300)];
const ROW_IDS: [HolderId; 3] = [hid(15), hid(5), hid(600)];

const fn hid(n: u16) -> HolderId {
    match HolderId::new(n) {
        Some(id) => id,
        None => panic!("holder id out of range"),
    }
}
const RING_CAPACITY: usize = 4;

fn bus(policies: [Policy; 2], depths: [u32; 2]) -> Segment {
    let layout = Layout::compute(&LayoutParams {
        pool_slots: POOL_SLOTS.to_vec(),
        max_channels: 1,
        max_producers: 2,
        max_subscribers: 2,
        ring_capacity: RING_CAPACITY as u32,
    })
    .expect("valid layout");
    let seg = Segment::new(layout);
    let ctl = &seg.ctl;
    let ch = ctl.channel(0).expect("channel 0");
    ch.state.store(STATE_ACTIVE, Relaxed);
    ch.mode.store(Mode::Broadcast.code(), Relaxed);
    ch.producer_rows.store(0b110, Relaxed);
    ch.subscribers[0].store(0b11, Relaxed);
    for s in 0..2 {
        let sub = ctl.subscriber(0, s).expect("subscriber");
        sub.config
            .holder_id
            .store(u32::from(SUB_IDS[s].index()), Relaxed);
        sub.config.policy.store(policies[s].code(), Relaxed);
        sub.config.depth.store(depths[s], Relaxed);
        sub.config.state.store(STATE_ACTIVE, Relaxed);
    }
    for (row, id) in ROW_IDS.iter().enumerate() {
        let p = ctl.producer(0, row).expect("producer row");
        p.holder_id.store(u32::from(id.index()), Relaxed);
        p.state.store(STATE_ACTIVE, Relaxed);
    }
    seg
}

/// Overwrites one word of the control segment chosen by the input: a slot
/// header word (holder word and generation included), a ring's head,
/// event count, tail or cell, or a field of the channel, subscriber or
/// producer records.
fn corrupt_one(seg: &Segment, inp: &mut Input<'_>) {
    let ctl = &seg.ctl;
    match inp.u8() % 8 {
        0..=3 => {
            let pool = usize::from(inp.u8() % 2);
            let index = usize::from(inp.u8()) % POOL_SLOTS[pool] as usize;
            let word = usize::from(inp.u8()) % SLOT_WORDS;
            let slot = ctl.slot(pool, index).expect("slot in range");
            let v = inp.garbage(load_slot_word(slot, word));
            store_slot_word(slot, word, v);
        }
        4 | 5 => {
            let row = usize::from(inp.u8() % 3);
            let sub = usize::from(inp.u8() % 2);
            let ring = ctl.ring(0, row, sub).expect("ring in range");
            let h = ring.header();
            match usize::from(inp.u8()) % (3 + RING_CAPACITY) {
                0 => h
                    .consumer
                    .head
                    .store(inp.garbage(h.consumer.head.load(Relaxed)), Relaxed),
                1 => {
                    h.consumer.space.seq.store(inp.u32(), Relaxed);
                    h.consumer.space.waiters.store(inp.u32(), Relaxed);
                }
                2 => h
                    .producer
                    .tail
                    .store(inp.garbage(h.producer.tail.load(Relaxed)), Relaxed),
                c => {
                    let cell = &seg.ring_cells(row, sub)[c - 3];
                    cell.store(inp.garbage(cell.load(Relaxed)), Relaxed);
                }
            }
        }
        6 => {
            let ch = ctl.channel(0).expect("channel 0");
            match inp.u8() % 4 {
                0 => ch
                    .producer_rows
                    .store(inp.garbage(ch.producer_rows.load(Relaxed)), Relaxed),
                1 => {
                    let w = &ch.subscribers[usize::from(inp.u8() % 4)];
                    w.store(inp.garbage(w.load(Relaxed)), Relaxed)
                }
                2 => ch.state.store(inp.u32(), Relaxed),
                _ => ch.mode.store(inp.u32(), Relaxed),
            }
            let sub = ctl.subscriber(0, usize::from(inp.u8() % 2)).expect("sub");
            match inp.u8() % 6 {
                0 => sub.config.state.store(inp.u32(), Relaxed),
                1 => sub.config.holder_id.store(inp.u32(), Relaxed),
                2 => sub.config.policy.store(inp.u32(), Relaxed),
                3 => sub.config.depth.store(inp.u32(), Relaxed),
                4 => sub.config.data.waiters.store(inp.u32(), Relaxed),
                _ => sub.dropped.store(inp.u64(), Relaxed),
            }
        }
        _ => {
            let p = ctl.producer(0, usize::from(inp.u8() % 3)).expect("row");
            match inp.u8() % 5 {
                0 => p.state.store(inp.u32(), Relaxed),
                1 => p.holder_id.store(inp.u32(), Relaxed),
                2 => p.intent.store(inp.garbage(p.intent.load(Relaxed)), Relaxed),
                3 => p
                    .loan_intent
                    .store(inp.garbage(p.loan_intent.load(Relaxed)), Relaxed),
                _ => {
                    let w = &p.intent_receivers[usize::from(inp.u8() % 4)];
                    w.store(inp.garbage(w.load(Relaxed)), Relaxed)
                }
            }
        }
    }
}

/// A zeroed control segment on the heap whose base address the harness
/// keeps (like `HeapControl`, but the harness also needs to address ring
/// cells directly, with the allocation's provenance).
pub struct Segment {
    base: *mut u8,
    alloc: std::alloc::Layout,
    ctl: Control,
}

impl Segment {
    fn new(layout: Layout) -> Segment {
        let alloc = std::alloc::Layout::from_size_align(layout.total, 4096).expect("layout");
        // SAFETY: non-zero size (a layout has at least the header page).
        let base = unsafe { std::alloc::alloc_zeroed(alloc) };
        assert!(!base.is_null(), "out of memory");
        // SAFETY: a fresh zeroed page-aligned allocation of `layout.total`
        // bytes, freed in `Drop` only after `ctl` is gone.
        let ctl = unsafe { Control::from_raw(base, layout.total, layout) }.expect("fits");
        ctl.init_header(1);
        Segment { base, alloc, ctl }
    }

    /// The cells of ring (row, sub) of channel 0, where `Control::ring`
    /// finds them (right after the ring's 128-byte header).
    fn ring_cells(&self, row: usize, sub: usize) -> &[AtomicU64] {
        let l = self.ctl.layout();
        let subs = l.params.max_subscribers as usize;
        assert!(row < l.rows() && sub < subs);
        let off = l.channels_offset
            + l.rings_in_block
            + (row * subs + sub) * l.ring_stride
            + tensorbus_core::ring::RING_HEADER_SIZE;
        // SAFETY: (row, sub) in range, so the cells lie inside the segment,
        // 8-aligned (layout invariant); atomics, valid for any bit pattern.
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(off).cast::<AtomicU64>(),
                l.params.ring_capacity as usize,
            )
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { std::alloc::dealloc(self.base, self.alloc) }
    }
}

/// Target `descriptor`: two producers publish real tensors to two
/// subscribers; then the input overwrites any words of the slot headers,
/// rings and records; then subscriber 0 pops and validates every
/// descriptor it finds (and reads the payload of those it accepts), and the
/// broker's repairs and the producer's loan run over what is left.
pub fn descriptor(data: &[u8]) {
    let mut inp = Input::new(data);
    let lossy = [Policy::DropOldest, Policy::DropNewest, Policy::Latest];
    let policies = [
        lossy[usize::from(inp.u8()) % 3],
        lossy[usize::from(inp.u8()) % 3],
    ];
    let depths = [
        1 + u32::from(inp.u8()) % RING_CAPACITY as u32,
        RING_CAPACITY as u32,
    ];
    let seg = bus(policies, depths);
    let ctl = &seg.ctl;
    // Payloads: one buffer per slot, exactly the slot's size.
    let mut payload: Vec<Vec<Vec<u8>>> = (0..2)
        .map(|p| {
            (0..POOL_SLOTS[p])
                .map(|_| vec![0u8; SLOT_SIZE[p] as usize])
                .collect()
        })
        .collect();

    // 1. Real traffic.
    let mut cursors = [0usize; 3];
    let mut heads = [[0u64; 2]; 3];
    let mut rr = 0usize;
    for seq in 0..u64::from(inp.u8() % 8) {
        let row = 1 + usize::from(inp.u8() & 1);
        let pool = usize::from(inp.u8() & 1);
        let intent = &ctl.producer(0, row).expect("producer row").loan_intent;
        let Some((index, generation)) = loan(ctl, pool, ROW_IDS[row], intent, &mut cursors[row])
        else {
            continue;
        };
        let slot = ctl.slot(pool, index).expect("loaned slot");
        let dtype = DType::ALL[usize::from(inp.u8()) % DType::ALL.len()];
        let max = SLOT_SIZE[pool] as usize / dtype.itemsize();
        let n = usize::from(inp.u16()) % (max + 1);
        let mut m = TensorMeta::contiguous(dtype, &[n as u32]).expect("fits");
        m.seq = seq;
        m.set_user_header(&seq.to_le_bytes()).expect("8 bytes");
        payload[pool][index].fill(seq as u8);
        slot.write_meta(&m);
        ProducerPath {
            ctl,
            channel: 0,
            row,
            mode: Mode::Broadcast,
        }
        .publish(
            Descriptor::new(pool as u8, index as u32, generation),
            slot,
            ROW_IDS[row],
            &mut heads[row],
            &mut rr,
            &YieldParker,
        );
    }

    // 2. The hostile peer.
    for _ in 0..inp.u8() % 48 {
        corrupt_one(&seg, &mut inp);
    }

    // 3. Subscriber 0 takes what it finds.
    let foreign = inp.u8();
    let capacity = |p: usize| {
        let allowed = p >= 2 || foreign & (1 << p) == 0;
        if allowed {
            SLOT_SIZE.get(p).copied()
        } else {
            None
        }
    };
    let id = SUB_IDS[0];
    let path = SubscriberPath {
        ctl,
        channel: 0,
        sub: 0,
        id,
        lossless: false,
    };
    let mut cursor = usize::from(inp.u8());
    let mut popped = 0;
    while let Some(d) = path.pop(&mut cursor, &YieldParker) {
        popped += 1;
        assert!(
            popped <= 3 * RING_CAPACITY,
            "more entries than the rings hold"
        );
        assert!(d.pack() <= DESC_MASK && Descriptor::unpack(d.pack()) == d);
        let pool = usize::from(d.pool);
        let before = ctl
            .slot(pool, d.index as usize)
            .map(|s| (s.holder_set().raw_snapshot(), s.generation.load(Relaxed)));
        match path.validate(d, capacity) {
            Ok(m) => {
                let slot = ctl
                    .slot(pool, d.index as usize)
                    .expect("accepted a descriptor naming no slot");
                assert!(d.matches_generation(slot.generation.load(Relaxed)));
                assert!(slot.held_by(id), "accepted without our hold");
                let cap = capacity(pool).expect("accepted from a foreign pool");
                check_accepted(&m, cap);
                std::hint::black_box(read_like_a_consumer(&m, &payload[pool][d.index as usize]));
                assert_ne!(slot.release(id), Released::NotHeld);
            }
            Err(Corruption::BadIndex { .. }) => assert!(before.is_none()),
            Err(Corruption::StaleGeneration { .. }) => {
                let (holders, generation) = before.expect("real slot");
                assert!(!d.matches_generation(generation));
                let slot = ctl.slot(pool, d.index as usize).expect("real slot");
                assert_eq!(
                    slot.holder_set().raw_snapshot(),
                    holders,
                    "a stale message released a hold"
                );
            }
            Err(Corruption::NotHolder) => {
                assert!(!before.expect("real slot").0.holds(id));
            }
            Err(Corruption::ForeignPool { .. } | Corruption::BadMeta(_)) => {
                let slot = ctl.slot(pool, d.index as usize).expect("real slot");
                assert!(!slot.held_by(id), "rejected message kept its hold");
            }
            Err(other) => panic!("a kind of corruption this harness does not know: {other}"),
        }
    }
    assert!(
        !path.has_entry(),
        "pop found nothing but an entry is waiting"
    );

    // 4. The broker's repairs over the wreckage: no panic, and each does
    //    what it says.
    for row in 0..4 {
        reclaim::recover_producer(ctl, 0, row);
    }
    for row_id in [ROW_IDS[1], ROW_IDS[2]] {
        reclaim::clear_holder_everywhere(ctl, row_id);
        assert_eq!(reclaim::count_held_by(ctl, |s| s.holds(row_id)), 0);
    }
    reclaim::retire_subscriber(ctl, 0, 1, &YieldParker);
    let mut snapshot = Vec::new();
    reclaim::intents(ctl, 0, &mut snapshot);
    std::hint::black_box(reclaim::publishes_settled(ctl, 0, &snapshot));
    let mut drained = 0;
    reclaim::drain_subscriber(ctl, 0, 1, |row, d| {
        assert!(row < 3 && d.pack() <= DESC_MASK);
        drained += 1;
    });
    assert!(drained <= 3 * RING_CAPACITY);
    reclaim::clear_holder_everywhere(ctl, SUB_IDS[1]);
    assert_eq!(reclaim::count_held_by(ctl, |s| s.holds(SUB_IDS[1])), 0);
    reclaim::free_subscriber(ctl, 0, 1);
    for row in 0..4 {
        if reclaim::row_drained(ctl, 0, row) {
            reclaim::free_row(ctl, 0, row);
        }
    }
    // Bits of no open handle: swept away wherever they are.
    // (Row 2's producer is still open; its earlier holds were reclaimed
    // above, as after a death.)
    let mut open = HolderSnapshot::default();
    open.insert(SUB_IDS[0]);
    open.insert(ROW_IDS[2]);
    for pool in 0..3 {
        reclaim::clear_stray_bits(ctl, pool, 0..usize::MAX, |_| open);
    }
    assert_eq!(
        reclaim::count_held_by(ctl, |s| s.ids().any(|i| !open.holds(i))),
        0,
        "stray bits survived"
    );
    // A loan after all that is exclusive and bumps the generation.
    for pool in 0..3 {
        let mut cursor = inp.u64() as usize;
        let intent = &ctl.producer(0, 2).expect("producer row").loan_intent;
        if let Some((index, generation)) = loan(ctl, pool, ROW_IDS[2], intent, &mut cursor) {
            let slot = ctl.slot(pool, index).expect("loaned slot exists");
            assert!(slot.holder_set().only(ROW_IDS[2]));
            assert_eq!(slot.generation.load(Relaxed), generation);
        }
    }
}

/// Target `ring`: a ring of 1 to 16 cells under a sequence of pushes,
/// pops, steals, peeks and recoveries. Mode 0 starts from garbage (head,
/// tail and cells): nothing may panic and what comes out is a descriptor.
/// Mode 1 starts from a consistent state at any position (the cells hold
/// the previous lap): the ring must behave as a FIFO queue with the depth
/// limit, checked against a `VecDeque`.
pub fn ring(data: &[u8]) {
    let mut inp = Input::new(data);
    let cap = 1usize << (inp.u8() % 5);
    let consistent = inp.u8() & 1 == 1;
    let header = RingHeader::default();
    let cells: Vec<AtomicU64> = (0..cap).map(|_| AtomicU64::new(0)).collect();
    let ring = Ring::new(&header, &cells).expect("power of two");
    let stamp = |pos: u64| (pos.wrapping_add(1) & 0xFFFF) << 48;
    let mut model: VecDeque<u64> = VecDeque::new();
    let mut last_push: Option<u64> = None;
    if consistent {
        // Anywhere, including just below the 2^64 and 2^16 wrap points.
        let start = match inp.u8() % 4 {
            0 => 0,
            1 => 0xFFFF - u64::from(inp.u8() % 32),
            2 => u64::MAX - u64::from(inp.u8() % 32),
            _ => inp.u64(),
        };
        header.consumer.head.store(start, Relaxed);
        header.producer.tail.store(start, Relaxed);
        if start != 0 {
            // Not a fresh ring: the cells hold the previous lap's entries
            // (all taken), and the last of them is the last push.
            for k in 1..=cap as u64 {
                let pos = start.wrapping_sub(k);
                let desc = inp.u64() & DESC_MASK;
                cells[(pos as usize) & (cap - 1)].store(stamp(pos) | desc, Relaxed);
                if k == 1 {
                    last_push = Some(desc);
                }
            }
        }
    } else {
        header.consumer.head.store(inp.u64(), Relaxed);
        header.producer.tail.store(inp.u64(), Relaxed);
        for c in &cells {
            c.store(inp.u64(), Relaxed);
        }
    }
    let mut cached_head = if consistent { 0 } else { inp.u64() };
    while !inp.done() {
        match inp.u8() % 6 {
            0 => {
                let depth = u64::from(inp.u8());
                let desc = inp.u64();
                let r = ring.push(depth, desc, &mut cached_head);
                if consistent {
                    let full = model.len() as u64 >= depth.clamp(1, cap as u64);
                    assert_eq!(r.is_err(), full, "push: full={full} len={}", model.len());
                    if r.is_ok() {
                        model.push_back(desc & DESC_MASK);
                        last_push = Some(desc & DESC_MASK);
                    }
                }
            }
            op @ (1 | 2) => {
                let got = if op == 1 {
                    ring.pop()
                } else {
                    ring.steal_oldest()
                };
                if let Some(v) = got {
                    assert!(v <= DESC_MASK);
                    let d = Descriptor::unpack(v);
                    assert_eq!(d.pack(), v);
                    assert_eq!(Descriptor::new(d.pool, d.index, u32::from(d.generation)), d);
                }
                if consistent {
                    assert_eq!(got, model.pop_front(), "FIFO order");
                }
            }
            3 => {
                let has = ring.has_entry();
                if consistent {
                    assert_eq!(has, !model.is_empty());
                }
            }
            4 => {
                let len = ring.len();
                assert!(len <= cap as u64);
                if consistent {
                    // `len` saturates (a garbage head above the tail reads
                    // as empty), so while head and tail straddle the 2^64
                    // wrap it reads 0: unreachable (2^64 pushes). Push, pop
                    // and has_entry use wrapping positions and stamps and are
                    // exact there too.
                    let head = header.consumer.head.load(Relaxed);
                    let tail = header.producer.tail.load(Relaxed);
                    let expected = if head > tail { 0 } else { model.len() as u64 };
                    assert_eq!(len, expected);
                    assert_eq!(ring.is_empty(), expected == 0);
                }
            }
            _ => {
                let desc = if inp.u8() & 1 == 0 {
                    last_push.unwrap_or(0)
                } else {
                    inp.u64() & DESC_MASK
                };
                let tail = header.producer.tail.load(Relaxed);
                let found = ring.recover_last_push(desc);
                if consistent {
                    // At tail 0 the ring cannot tell a fresh ring's zeroed
                    // cell from a push at position 2^64 - 1 (both stamp 0),
                    // and answers "not pushed": only a ring after exactly
                    // 2^64 pushes is affected (centuries at 1 ns a push).
                    let expected = last_push == Some(desc) && tail != 0;
                    assert_eq!(
                        found, expected,
                        "recover_last_push({desc:#x}), tail {tail:#x}"
                    );
                }
            }
        }
    }
}
