//! A typed, bounds-checked view of a mapped control segment.

use crate::layout::{
    ControlHeader, Layout, LayoutError, CONTROL_MAGIC, LAYOUT_VERSION, MAX_HOLDERS, REG_CHANNEL,
    REG_HANDLE, REG_POOL,
};
use crate::records::{ChannelRecord, ProducerRecord, SubscriberRecord};
use crate::registry::{
    Entry, RegistryHeader, CHANNEL_WORDS, HANDLE_WORDS, POOL_WORDS, REGISTRY_HEADER_OFFSET,
};
use crate::ring::{Ring, RingHeader, RING_HEADER_SIZE};
use crate::slot::{SlotHeader, SLOT_HEADER_SIZE};
use crate::sync::{AtomicU64, Ordering};
use crate::wide::HolderId;

/// The control segment as typed records. Every accessor checks its indices
/// against the layout and returns `None` when they are out of range, so
/// indices read from shared memory can be passed in unchecked.
#[derive(Debug)]
pub struct Control {
    base: *mut u8,
    len: usize,
    layout: Layout,
}

// SAFETY: `Control` only hands out shared references to structs made solely
// of atomics (plus `&[AtomicU64]`), which are `Sync`; the raw pointer is just
// the base of a mapping that outlives the `Control` (constructor contract).
unsafe impl Send for Control {}
// SAFETY: see `Send`: every access through `&Control` is an atomic operation.
unsafe impl Sync for Control {}

impl Control {
    /// Wraps a mapping of at least `layout.total` bytes.
    ///
    /// # Safety
    ///
    /// `base..base + len` must be a readable and writable mapping that stays
    /// mapped for as long as the returned `Control` (and every reference it
    /// hands out) is alive. The memory may be shared with other processes:
    /// only atomic operations are ever performed on it.
    pub unsafe fn from_raw(
        base: *mut u8,
        len: usize,
        layout: Layout,
    ) -> Result<Control, LayoutError> {
        if (base as usize) % 4096 != 0 {
            return Err(LayoutError("control segment is not page aligned".into()));
        }
        if len < layout.total {
            return Err(LayoutError(format!(
                "control segment is {len} bytes but the layout needs {}",
                layout.total
            )));
        }
        Ok(Control { base, len, layout })
    }

    /// The layout in use.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Mapped length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a valid control segment).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// # Safety
    /// `offset + size_of::<T>() <= self.len`, `offset` aligned for `T`, and
    /// `T` made only of atomics (any bit pattern valid, shared access sound).
    #[inline]
    unsafe fn at<T>(&self, offset: usize) -> &T {
        debug_assert!(offset + core::mem::size_of::<T>() <= self.len);
        debug_assert!(offset % core::mem::align_of::<T>() == 0);
        // SAFETY: guaranteed by the caller (in bounds, aligned, atomics only)
        // and by `from_raw`'s contract (mapping alive while `self` is).
        unsafe { &*(self.base.add(offset) as *const T) }
    }

    /// The header page.
    pub fn header(&self) -> &ControlHeader {
        // SAFETY: offset 0 is page aligned and the header is far smaller than
        // the 4096 bytes reserved for it; it is made of atomics.
        unsafe { self.at(0) }
    }

    /// Writes the header (broker, on a fresh segment).
    pub fn init_header(&self, broker_pid: u32) {
        let h = self.header();
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.broker_pid.store(broker_pid, Ordering::Relaxed);
        h.total.store(self.layout.total as u64, Ordering::Relaxed);
        h.magic.store(CONTROL_MAGIC, Ordering::Release);
    }

    /// Writes the registry header of a fresh segment: the bus id and the
    /// layout parameters (broker; see [`crate::registry`]).
    pub fn init_registry(&self, bus_id: u64) {
        let r = self.registry_header();
        r.bus_id.store(bus_id, Ordering::Relaxed);
        r.next_client.store(1, Ordering::Relaxed);
        r.next_handle.store(1, Ordering::Relaxed);
        // Fits: PARAMS_WORDS covers MAX_POOLS pools (a layout test checks).
        let _ = r.params.write(&self.layout.params.to_bytes());
        r.magic
            .store(crate::registry::REGISTRY_MAGIC, Ordering::Release);
    }

    /// Whether the header carries the expected magic, version and size.
    pub fn header_ok(&self) -> bool {
        let h = self.header();
        h.magic.load(Ordering::Acquire) == CONTROL_MAGIC
            && h.version.load(Ordering::Relaxed) == LAYOUT_VERSION
            && h.total.load(Ordering::Relaxed) == self.layout.total as u64
    }

    /// The registry header in the first page (see [`crate::registry`]).
    pub fn registry_header(&self) -> &RegistryHeader {
        // SAFETY: REGISTRY_HEADER_OFFSET is 64-aligned and the header ends
        // inside the first page (checked at compile time in `registry`);
        // it is made of atomics.
        unsafe { self.at(REGISTRY_HEADER_OFFSET) }
    }

    /// Registry entry of pool `pool`.
    pub fn pool_entry(&self, pool: usize) -> Option<&Entry<POOL_WORDS>> {
        (pool < self.pools()).then(|| {
            // SAFETY: pool < pools, so the entry lies in the registry's pool
            // array (layout invariant); entries are multiples of 16 bytes
            // from a page-aligned start (8-aligned); atomics only.
            unsafe { self.at(self.layout.registry_offset + pool * REG_POOL) }
        })
    }

    /// Registry entry of channel record `channel`.
    pub fn channel_entry(&self, channel: usize) -> Option<&Entry<CHANNEL_WORDS>> {
        let channels = self.layout.params.max_channels as usize;
        (channel < channels).then(|| {
            let off = self.layout.registry_offset + self.pools() * REG_POOL + channel * REG_CHANNEL;
            // SAFETY: channel < max_channels: inside the channel entries;
            // 8-aligned as above; atomics only.
            unsafe { self.at(off) }
        })
    }

    /// Registry entry of holder id `id` (the handle that holds it).
    pub fn handle_entry(&self, id: HolderId) -> Option<&Entry<HANDLE_WORDS>> {
        let i = usize::from(id.index());
        (i < MAX_HOLDERS).then(|| {
            let off = self.layout.registry_offset
                + self.pools() * REG_POOL
                + self.layout.params.max_channels as usize * REG_CHANNEL
                + i * REG_HANDLE;
            // SAFETY: i < MAX_HOLDERS: inside the handle entries; 8-aligned
            // as above; atomics only.
            unsafe { self.at(off) }
        })
    }

    /// Number of pools.
    pub fn pools(&self) -> usize {
        self.layout.params.pool_slots.len()
    }

    /// Slots in `pool` (0 if no such pool).
    pub fn slots(&self, pool: usize) -> usize {
        self.layout
            .params
            .pool_slots
            .get(pool)
            .map_or(0, |&s| s as usize)
    }

    /// The loan counters of `pool` (`None` if no such pool).
    pub fn pool_counters(&self, pool: usize) -> Option<&crate::pool_counters::PoolCounters> {
        if pool >= self.pools() {
            return None;
        }
        let off =
            self.layout.pool_counters_offset + pool * crate::pool_counters::POOL_COUNTERS_STRIDE;
        // SAFETY: pool < pools, so the counters lie in the layout's
        // pool-counter array (64-aligned: the array starts on a page and
        // each entry is 64 bytes); atomics only.
        Some(unsafe { self.at(off) })
    }

    /// The header of slot `index` in `pool`.
    #[inline]
    pub fn slot(&self, pool: usize, index: usize) -> Option<&SlotHeader> {
        if index >= self.slots(pool) {
            return None;
        }
        let off = self.layout.slots_offset[pool] + index * SLOT_HEADER_SIZE;
        // SAFETY: pool and index are in range, so the header lies inside the
        // pool's array (layout invariant), which is 64-aligned (page-aligned
        // start, 384-byte entries); SlotHeader is made of atomics.
        Some(unsafe { self.at(off) })
    }

    fn block(&self, channel: usize) -> Option<usize> {
        (channel < self.layout.params.max_channels as usize)
            .then(|| self.layout.channels_offset + channel * self.layout.channel_stride)
    }

    /// Channel record `channel`.
    #[inline]
    pub fn channel(&self, channel: usize) -> Option<&ChannelRecord> {
        let off = self.block(channel)?;
        // SAFETY: block start is page aligned and inside the segment; the
        // record occupies the block's first line; atomics only.
        Some(unsafe { self.at(off) })
    }

    /// Producer record `row` of `channel` (row 0 is the broker's).
    #[inline]
    pub fn producer(&self, channel: usize, row: usize) -> Option<&ProducerRecord> {
        if row >= self.layout.rows() {
            return None;
        }
        let stride = core::mem::size_of::<ProducerRecord>().div_ceil(64) * 64;
        let off = self.block(channel)? + self.layout.producers_in_block + row * stride;
        // SAFETY: row < rows, so the record lies in the block's producer
        // array (layout invariant), 64-aligned; atomics only.
        Some(unsafe { self.at(off) })
    }

    /// Subscriber record `sub` of `channel`.
    #[inline]
    pub fn subscriber(&self, channel: usize, sub: usize) -> Option<&SubscriberRecord> {
        if sub >= self.layout.params.max_subscribers as usize {
            return None;
        }
        let stride = core::mem::size_of::<SubscriberRecord>();
        let off = self.block(channel)? + self.layout.subscribers_in_block + sub * stride;
        // SAFETY: sub < max_subscribers, so the record lies in the block's
        // subscriber array; SubscriberRecord is a multiple of 64 bytes and
        // 64-aligned; atomics only.
        Some(unsafe { self.at(off) })
    }

    /// The latency histogram of subscriber `sub` of `channel`.
    #[inline]
    pub fn latency(&self, channel: usize, sub: usize) -> Option<&crate::latency::LatencyHistogram> {
        if sub >= self.layout.params.max_subscribers as usize {
            return None;
        }
        let off = self.block(channel)?
            + self.layout.latency_in_block
            + sub * crate::layout::LATENCY_STRIDE;
        // SAFETY: sub < max_subscribers, so the histogram lies in the
        // block's histogram array (layout invariant), 64-aligned; atomics only.
        Some(unsafe { self.at(off) })
    }

    /// The ring from producer `row` to subscriber `sub` of `channel`.
    #[inline]
    pub fn ring(&self, channel: usize, row: usize, sub: usize) -> Option<Ring<'_>> {
        let subs = self.layout.params.max_subscribers as usize;
        if row >= self.layout.rows() || sub >= subs {
            return None;
        }
        let off = self.block(channel)?
            + self.layout.rings_in_block
            + (row * subs + sub) * self.layout.ring_stride;
        let cap = self.layout.params.ring_capacity as usize;
        // SAFETY: (row, sub) in range, so header and `cap` cells lie inside
        // the block's ring array; the ring stride is a multiple of 64 so the
        // header is 64-aligned and the cells 8-aligned; atomics only.
        let header: &RingHeader = unsafe { self.at(off) };
        // SAFETY: as above; the cells follow the 128-byte header.
        let cells = unsafe {
            core::slice::from_raw_parts(
                self.base.add(off + RING_HEADER_SIZE) as *const AtomicU64,
                cap,
            )
        };
        Ring::new(header, cells)
    }

    /// Holder id of subscriber `sub` of `channel` (a garbage value in
    /// shared memory is clamped to some valid id).
    #[inline]
    pub fn subscriber_id(&self, channel: usize, sub: usize) -> Option<HolderId> {
        self.subscriber(channel, sub)
            .map(|s| HolderId::clamped(s.config.holder_id.load(Ordering::Relaxed)))
    }

    /// Whether a live producer of any channel is in the middle of an
    /// extension-id loan of slot `index` of `pool` (see
    /// [`crate::records::ProducerRecord::loan_intent`]).
    pub fn loan_in_flight(&self, pool: usize, index: usize) -> bool {
        let tag = crate::records::loan_tag(pool, index);
        (0..self.layout.params.max_channels as usize).any(|c| {
            (0..self.layout.rows()).any(|row| {
                self.producer(c, row).is_some_and(|p| {
                    p.state.load(Ordering::SeqCst) == crate::records::STATE_ACTIVE
                        && p.loan_intent.load(Ordering::SeqCst) == tag
                })
            })
        })
    }
}

/// What the header page of a mapped segment records: the layout
/// parameters ([`crate::layout::LayoutParams::to_bytes`]) and the total size, for a broker that is handed
/// a segment it did not create. `Err` names what does not match.
///
/// # Safety
///
/// `base..base + len` must be a readable mapping, page aligned, that stays
/// mapped during the call; other processes may write it concurrently (only
/// atomic loads are made).
pub unsafe fn recorded_params(base: *const u8, len: usize) -> Result<(Vec<u8>, u64), LayoutError> {
    if len < 4096 || (base as usize) % 4096 != 0 {
        return Err(LayoutError(format!(
            "control segment of {len} bytes is too small or not page aligned"
        )));
    }
    // SAFETY: offset 0 and REGISTRY_HEADER_OFFSET lie in the first page,
    // which is mapped (len >= 4096, caller's contract); both structs are
    // made of atomics, 8-aligned from a page-aligned base.
    let (h, r) = unsafe {
        (
            &*(base as *const ControlHeader),
            &*(base.add(REGISTRY_HEADER_OFFSET) as *const RegistryHeader),
        )
    };
    if h.magic.load(Ordering::Acquire) != CONTROL_MAGIC {
        return Err(LayoutError(
            "not a tensorbus control segment (bad magic)".into(),
        ));
    }
    let version = h.version.load(Ordering::Relaxed);
    if version != LAYOUT_VERSION {
        return Err(LayoutError(format!(
            "control segment of layout version {version}; this broker speaks {LAYOUT_VERSION}"
        )));
    }
    if r.magic.load(Ordering::Acquire) != crate::registry::REGISTRY_MAGIC {
        return Err(LayoutError("the control segment has no registry".into()));
    }
    let mut bytes = Vec::new();
    if !r.params.read(&mut bytes) {
        return Err(LayoutError("the registry records no layout".into()));
    }
    Ok((bytes, h.total.load(Ordering::Relaxed)))
}

/// A zeroed, page-aligned heap buffer laid out as a control segment, for
/// tests and single-process simulations (the broker uses a memfd instead).
pub struct HeapControl {
    ptr: *mut u8,
    alloc: std::alloc::Layout,
    control: Control,
}

// SAFETY: the buffer is owned by this value and only accessed atomically
// through `control`.
unsafe impl Send for HeapControl {}
// SAFETY: as for `Send`.
unsafe impl Sync for HeapControl {}

impl HeapControl {
    /// Allocates and initialises a segment for `layout`.
    pub fn new(layout: Layout) -> HeapControl {
        let alloc = std::alloc::Layout::from_size_align(layout.total.max(4096), 4096)
            .expect("layout size is bounded by Layout::compute");
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(alloc) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(alloc);
        }
        // SAFETY: `ptr` is a fresh page-aligned zeroed allocation of at least
        // `layout.total` bytes that lives until `Drop`, after `control`.
        let control = unsafe { Control::from_raw(ptr, alloc.size(), layout) }
            .expect("fresh allocation satisfies the layout");
        control.init_header(std::process::id());
        HeapControl {
            ptr,
            alloc,
            control,
        }
    }

    /// The control view.
    pub fn control(&self) -> &Control {
        &self.control
    }
}

impl Drop for HeapControl {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.alloc) }
    }
}
