//! The broker's registry in the control segment: what a restarted broker
//! needs to adopt the running bus (issue 16.2).
//!
//! The data path keeps its state in shared memory already (slot headers,
//! rings, producer and subscriber records); the broker's own bookkeeping
//! (channel names and specs, which client owns which handle, the pool
//! table, the layout) lived only in its memory, so a broker that died took
//! it along. The broker now mirrors that bookkeeping here, and a new broker
//! that is handed the segment reads it back.
//!
//! **Entries.** Each entry is a small byte string (the broker writes JSON)
//! kept twice: [`Entry::write`] fills the copy that is not current and
//! then publishes it with one release store of `current`, so the entry a
//! reader finds is always one complete version, the old or the new, even
//! if the writer died in the middle (there is one writer, the broker, and
//! the reader reads only after that writer died, so the two copies never
//! race; the atomics keep shared access defined for every process that
//! maps the segment). `current = 0` means free.
//!
//! **Trust.** Clients map the segment read-write, so everything here is
//! untrusted input for the broker that adopts it: lengths are bounded,
//! bytes are parsed and validated by the reader, and what an entry claims
//! is checked against the records of the data path before it is believed.

// Plain std atomics even under loom: nothing here is model-checked (one
// writer, read after it died), and the sizes must match `entry_size`.
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Magic of the registry header (`TBREG001`).
pub const REGISTRY_MAGIC: u64 = u64::from_le_bytes(*b"TBREG001");

/// Payload words of the layout entry in the header page.
pub const PARAMS_WORDS: usize = 136;
/// Payload words of a pool entry.
pub const POOL_WORDS: usize = 48;
/// Payload words of a channel entry.
pub const CHANNEL_WORDS: usize = 96;
/// Payload words of a handle entry (one per holder id).
pub const HANDLE_WORDS: usize = 24;

/// One double-buffered entry of at most `W * 8` bytes.
#[repr(C)]
#[derive(Debug)]
pub struct Entry<const W: usize> {
    /// 0: free; 1 or 2: which copy holds the current version.
    current: AtomicU32,
    /// Bytes used in each copy.
    len: [AtomicU32; 2],
    _pad: AtomicU32,
    words: [[AtomicU64; W]; 2],
}

impl<const W: usize> Entry<W> {
    /// Capacity in bytes.
    pub const CAPACITY: usize = W * 8;

    /// Stores `bytes` as the new current version. `Err` (and nothing
    /// changed) if they do not fit.
    pub fn write(&self, bytes: &[u8]) -> Result<(), usize> {
        if bytes.len() > Self::CAPACITY {
            return Err(Self::CAPACITY);
        }
        // Relaxed: only this process (the broker) writes `current`.
        let next = if self.current.load(Ordering::Relaxed) == 1 {
            2
        } else {
            1
        };
        let copy = next - 1;
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.words[copy][i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.len[copy].store(bytes.len() as u32, Ordering::Relaxed);
        // Release: a reader that sees `next` sees the copy written above.
        self.current.store(next as u32, Ordering::Release);
        Ok(())
    }

    /// Marks the entry free.
    pub fn clear(&self) {
        self.current.store(0, Ordering::Release);
    }

    /// The current version's bytes, appended to `out`; false if free (or
    /// `current` is garbage).
    pub fn read(&self, out: &mut Vec<u8>) -> bool {
        let copy = match self.current.load(Ordering::Acquire) {
            1 => 0,
            2 => 1,
            _ => return false,
        };
        let len = (self.len[copy].load(Ordering::Relaxed) as usize).min(Self::CAPACITY);
        for i in 0..len.div_ceil(8) {
            let w = self.words[copy][i].load(Ordering::Relaxed).to_le_bytes();
            let n = (len - i * 8).min(8);
            out.extend_from_slice(&w[..n]);
        }
        true
    }

    /// Whether the entry holds a version.
    pub fn is_used(&self) -> bool {
        matches!(self.current.load(Ordering::Acquire), 1 | 2)
    }
}

/// Bytes of an entry of `W` payload words.
pub const fn entry_size(words: usize) -> usize {
    16 + 2 * words * 8
}

/// The registry's header, in the control segment's first page after the
/// [`crate::layout::ControlHeader`].
#[repr(C)]
#[derive(Debug)]
pub struct RegistryHeader {
    /// [`REGISTRY_MAGIC`] once the broker wrote the layout entry.
    pub magic: AtomicU64,
    /// A random id of this bus, chosen by the broker that created it and
    /// kept by every broker that adopts it.
    pub bus_id: AtomicU64,
    /// The next client id the broker hands out.
    pub next_client: AtomicU32,
    /// The next handle number the broker hands out.
    pub next_handle: AtomicU32,
    /// How many times this bus was adopted by a new broker.
    pub adoptions: AtomicU32,
    _pad: AtomicU32,
    /// The [`crate::layout::LayoutParams`] ([`crate::layout::LayoutParams::to_bytes`]), so that a broker that
    /// is handed the segment can compute its layout.
    pub params: Entry<PARAMS_WORDS>,
}

/// Offset of the [`RegistryHeader`] in the first page.
pub const REGISTRY_HEADER_OFFSET: usize = 64;

const _: () = assert!(
    REGISTRY_HEADER_OFFSET + core::mem::size_of::<RegistryHeader>() <= 4096,
    "the registry header fits in the header page"
);
const _: () = assert!(core::mem::size_of::<Entry<1>>() == entry_size(1));
