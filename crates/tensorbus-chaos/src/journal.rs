//! Per-process journals: a file the orchestrator creates and every client
//! role maps shared (`MAP_SHARED`) and writes with plain atomic stores.
//!
//! A store to a shared file mapping is in the page cache the moment it
//! retires, so everything a client journaled before a `kill -9` is still
//! there for the orchestrator to read afterwards; no pipe buffering, no
//! lost last line. One writer per journal (the client), one reader (the
//! orchestrator), which also writes the `stop` word.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Header size in bytes (64 words).
const HEADER: usize = 512;
/// Bytes per entry (four words).
const ENTRY: usize = 32;
/// `MAGIC` word value.
const MAGIC: u64 = 0x7462_6368_616f_7331; // "tbchaos1"

// Header word indices.
const W_MAGIC: usize = 0;
const W_STATE: usize = 1;
const W_STOP: usize = 2;
const W_IN_POP: usize = 3;
const W_PUBLISHED: usize = 4;
const W_PUBLISHING: usize = 5;
const W_COUNT: usize = 6;
const W_CORRUPT: usize = 7;
const W_NOT_EXCLUSIVE: usize = 8;
const W_OVERFLOW: usize = 9;
const W_CLIENT: usize = 10;
const W_STAT: usize = 11;
const W_DELIVERED: usize = 12;
const W_DROPPED: usize = 13;
const W_DUPLICATED: usize = 14;
const W_CROWD_RECEIVED: usize = 15;
const W_CROWD_MAX_HELD: usize = 16;

/// Client state (0 until then: still connecting / subscribing): subscribed (or producer opened); from here on it counts.
pub const STATE_READY: u64 = 1;
/// Client state: finished cleanly after being told to stop.
pub const STATE_DONE: u64 = 2;

/// Entry kind: a consumer or worker received `(inc, seq)`.
pub const KIND_RECV: u8 = 1;
/// Entry kind: a stage took `(inc, seq)` exclusively.
pub const KIND_TOOK: u8 = 2;
/// Entry kind: a stage's forward of `(inc, seq)` returned.
pub const KIND_FWD: u8 = 3;

/// One journal entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `KIND_*`.
    pub kind: u8,
    /// Whether the payload verified (length, bytes, checksum).
    pub ok: bool,
    /// Producer incarnation from the user header.
    pub inc: u32,
    /// Producer sequence from the user header.
    pub seq: u64,
    /// `TensorMeta::producer` (client id of the publishing handle).
    pub meta_producer: u32,
    /// `TensorMeta::seq` (the publishing handle's own counter).
    pub meta_seq: u64,
}

/// A mapped journal file.
pub struct Journal {
    ptr: *mut u8,
    len: usize,
    capacity: usize,
    _file: File,
}

// SAFETY: the mapping is only accessed through atomics, so sharing the
// pointer between threads is as safe as sharing `&[AtomicU64]`.
unsafe impl Send for Journal {}
// SAFETY: as above; every access is an atomic load or store.
unsafe impl Sync for Journal {}

impl Journal {
    /// Creates (truncates) a journal file for `capacity` entries; sparse.
    pub fn create(path: &Path, capacity: usize) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len((HEADER + capacity * ENTRY) as u64)?;
        let j = Journal::map(file)?;
        j.word(W_MAGIC).store(MAGIC, Ordering::SeqCst);
        Ok(j)
    }

    /// Opens an existing journal file.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let j = Journal::map(file)?;
        if j.word(W_MAGIC).load(Ordering::SeqCst) != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a chaos journal", path.display()),
            ));
        }
        Ok(j)
    }

    fn map(file: File) -> io::Result<Journal> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "journal too large"))?;
        if len < HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "journal file too short",
            ));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of a file we keep
        // open for the life of the mapping; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Journal {
            ptr: ptr.cast(),
            len,
            capacity: (len - HEADER) / ENTRY,
            _file: file,
        })
    }

    /// Word `i` of the file (header words and entry words alike).
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i * 8 + 8 <= self.len, "journal word {i} out of bounds");
        // SAFETY: in bounds (checked above), 8-byte aligned (the mapping is
        // page aligned), and the memory lives as long as `self`. Every
        // access to the file goes through atomics.
        unsafe { &*self.ptr.add(i * 8).cast::<AtomicU64>() }
    }

    /// Client state (`STATE_*`).
    pub fn state(&self) -> u64 {
        self.word(W_STATE).load(Ordering::SeqCst)
    }
    /// Sets the client state.
    pub fn set_state(&self, s: u64) {
        self.word(W_STATE).store(s, Ordering::SeqCst);
    }
    /// Whether the orchestrator asked the client to stop (drain, then exit).
    pub fn stop_requested(&self) -> bool {
        self.word(W_STOP).load(Ordering::SeqCst) != 0
    }
    /// Asks the client to stop.
    pub fn request_stop(&self) {
        self.word(W_STOP).store(1, Ordering::SeqCst);
    }
    /// Records the broker's client id of this process.
    pub fn set_client(&self, id: u32) {
        self.word(W_CLIENT).store(u64::from(id), Ordering::SeqCst);
    }
    /// The broker's client id of this process (0 before it connected).
    pub fn client(&self) -> u32 {
        self.word(W_CLIENT).load(Ordering::SeqCst) as u32
    }
    /// Subscriber: its own `delivered` and `dropped` counters from the
    /// broker's `stat`, read after its last receive.
    pub fn set_stat(&self, delivered: u64, dropped: u64) {
        self.word(W_DELIVERED).store(delivered, Ordering::SeqCst);
        self.word(W_DROPPED).store(dropped, Ordering::SeqCst);
        self.word(W_STAT).store(1, Ordering::SeqCst);
    }
    /// `(delivered, dropped)` if [`Journal::set_stat`] was called.
    pub fn stat(&self) -> Option<(u64, u64)> {
        (self.word(W_STAT).load(Ordering::SeqCst) != 0).then(|| {
            (
                self.word(W_DELIVERED).load(Ordering::SeqCst),
                self.word(W_DROPPED).load(Ordering::SeqCst),
            )
        })
    }

    /// Marks the start of a receive attempt (worker, stage): if the process
    /// dies before [`Journal::end_pop`], it may have taken one entry that it
    /// never journaled.
    pub fn begin_pop(&self) {
        let n = self.word(W_COUNT).load(Ordering::Relaxed);
        self.word(W_IN_POP).store(n + 1, Ordering::SeqCst);
    }
    /// Ends a receive attempt (after the entry, if any, was journaled).
    pub fn end_pop(&self) {
        self.word(W_IN_POP).store(0, Ordering::SeqCst);
    }
    /// True if the process died inside a receive attempt before it
    /// journaled what that attempt took: one entry may be unaccounted for.
    pub fn died_in_pop(&self) -> bool {
        let p = self.word(W_IN_POP).load(Ordering::SeqCst);
        p != 0 && self.word(W_COUNT).load(Ordering::SeqCst) == p - 1
    }

    /// Producer: about to publish `seq`.
    pub fn begin_publish(&self, seq: u64) {
        self.word(W_PUBLISHING).store(seq + 1, Ordering::SeqCst);
    }
    /// Producer: the publish of `seq` returned.
    pub fn end_publish(&self, seq: u64) {
        self.word(W_PUBLISHED).store(seq + 1, Ordering::SeqCst);
        self.word(W_PUBLISHING).store(0, Ordering::SeqCst);
    }
    /// Producer: sequences `0..published()` were published (the call returned).
    pub fn published(&self) -> u64 {
        self.word(W_PUBLISHED).load(Ordering::SeqCst)
    }
    /// Producer: the sequence whose publish was in progress, if any.
    pub fn publishing(&self) -> Option<u64> {
        match self.word(W_PUBLISHING).load(Ordering::SeqCst) {
            0 => None,
            s => Some(s - 1),
        }
    }

    /// Counts a `RecvError::Corrupted`.
    pub fn count_corrupt(&self) {
        self.word(W_CORRUPT).fetch_add(1, Ordering::SeqCst);
    }
    /// `RecvError::Corrupted` count.
    pub fn corrupt(&self) -> u64 {
        self.word(W_CORRUPT).load(Ordering::SeqCst)
    }
    /// Counts a delivery that a crowd process found out of order or
    /// repeated in one of its subscriptions (it checks in process, without
    /// journaling entries).
    pub fn count_duplicated(&self) {
        self.word(W_DUPLICATED).fetch_add(1, Ordering::SeqCst);
    }
    /// Deliveries counted by [`Journal::count_duplicated`].
    pub fn duplicated(&self) -> u64 {
        self.word(W_DUPLICATED).load(Ordering::SeqCst)
    }
    /// Crowd: after a sweep, `received` tensors so far in all, `held` of
    /// them held at once by that sweep (the most is kept).
    pub fn crowd_sweep(&self, received: u64, held: u64) {
        self.word(W_CROWD_RECEIVED)
            .store(received, Ordering::Relaxed);
        self.word(W_CROWD_MAX_HELD)
            .fetch_max(held, Ordering::Relaxed);
    }
    /// Crowd: `(received, most held at once)` of [`Journal::crowd_sweep`].
    pub fn crowd(&self) -> (u64, u64) {
        (
            self.word(W_CROWD_RECEIVED).load(Ordering::SeqCst),
            self.word(W_CROWD_MAX_HELD).load(Ordering::SeqCst),
        )
    }
    /// Counts a `RecvError::NotExclusive` (the library released the slot).
    pub fn count_not_exclusive(&self) {
        self.word(W_NOT_EXCLUSIVE).fetch_add(1, Ordering::SeqCst);
    }
    /// `RecvError::NotExclusive` count.
    pub fn not_exclusive(&self) -> u64 {
        self.word(W_NOT_EXCLUSIVE).load(Ordering::SeqCst)
    }
    /// Whether entries were dropped because the journal was full.
    pub fn overflowed(&self) -> bool {
        self.word(W_OVERFLOW).load(Ordering::SeqCst) != 0
    }

    /// Appends an entry (single writer).
    pub fn push(&self, e: Entry) {
        let n = self.word(W_COUNT).load(Ordering::Relaxed) as usize;
        if n >= self.capacity {
            self.word(W_OVERFLOW).store(1, Ordering::SeqCst);
            return;
        }
        let base = (HEADER + n * ENTRY) / 8;
        let w0 = u64::from(e.kind) | (u64::from(e.ok) << 8) | (u64::from(e.inc) << 32);
        self.word(base).store(w0, Ordering::Relaxed);
        self.word(base + 1).store(e.seq, Ordering::Relaxed);
        self.word(base + 2)
            .store(u64::from(e.meta_producer), Ordering::Relaxed);
        self.word(base + 3).store(e.meta_seq, Ordering::Relaxed);
        self.word(W_COUNT).store(n as u64 + 1, Ordering::Release);
    }

    /// Number of entries written so far.
    pub fn count(&self) -> u64 {
        self.word(W_COUNT).load(Ordering::Acquire)
    }

    /// Every entry written so far.
    pub fn entries(&self) -> Vec<Entry> {
        let n = (self.word(W_COUNT).load(Ordering::Acquire) as usize).min(self.capacity);
        (0..n)
            .map(|i| {
                let base = (HEADER + i * ENTRY) / 8;
                let w0 = self.word(base).load(Ordering::Relaxed);
                Entry {
                    kind: w0 as u8,
                    ok: (w0 >> 8) & 1 == 1,
                    inc: (w0 >> 32) as u32,
                    seq: self.word(base + 1).load(Ordering::Relaxed),
                    meta_producer: self.word(base + 2).load(Ordering::Relaxed) as u32,
                    meta_seq: self.word(base + 3).load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` created; no reference
        // into it outlives `self` (all borrows are tied to `&self`).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_pop_window() {
        let dir = std::env::temp_dir().join(format!("tb-chaos-j-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j");
        let w = Journal::create(&path, 4).unwrap();
        let r = Journal::open(&path).unwrap();
        w.begin_pop();
        assert!(r.died_in_pop());
        let e = Entry {
            kind: KIND_RECV,
            ok: true,
            inc: 7,
            seq: 42,
            meta_producer: 3,
            meta_seq: 41,
        };
        w.push(e);
        assert!(!r.died_in_pop(), "journaled before the death");
        w.end_pop();
        for _ in 0..4 {
            w.push(e);
        }
        assert!(r.overflowed());
        assert_eq!(r.entries(), vec![e; 4]);
        assert_eq!(r.stat(), None);
        w.set_stat(9, 4);
        w.set_client(17);
        assert_eq!((r.stat(), r.client()), (Some((9, 4)), 17));
        w.begin_publish(5);
        assert_eq!(r.publishing(), Some(5));
        w.end_publish(5);
        assert_eq!((r.published(), r.publishing()), (6, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
