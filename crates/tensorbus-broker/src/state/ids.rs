//! Holder ids: who may hold a slot. The broker hands them out (one per
//! producer, subscriber, stage half and history record) on its one thread
//! and keeps one direct id for its own custody of slots; see
//! `tensorbus_core::wide` for what an id is in a slot's holder set.

use super::BitsExhausted;
use tensorbus_core::wide::{HolderId, HolderSnapshot, DIRECT_BITS, MAX_HOLDER_IDS};

/// Words of the free-id bitmap.
const WORDS: usize = MAX_HOLDER_IDS.div_ceil(64);

/// The ids handed out and the ones free.
#[derive(Debug)]
pub(crate) struct HolderIds {
    /// Bit `n` set: id `n` is free.
    free: [u64; WORDS],
    /// The broker's own direct id (custody of re-dispatched work items and
    /// the pin under which it adds late joiners to kept tensors).
    custody: HolderId,
    /// Most ids handed out at once (`[limits] max_handles`).
    limit: usize,
    /// Ids handed out now.
    used: usize,
}

/// The custody id: the highest direct id, so that the first handles get
/// the lower direct ids (one atomic step per operation on word 0).
pub(crate) const CUSTODY: HolderId = match HolderId::new(DIRECT_BITS - 1) {
    Some(id) => id,
    None => panic!("DIRECT_BITS is at least 1"),
};

/// The most holder handles a broker can admit (`[limits] max_handles`):
/// every holder id but the broker's custody id.
pub const MAX_HANDLES: usize = MAX_HOLDER_IDS - 1;

impl HolderIds {
    /// Every id free but the custody id; at most `limit` handed out at once
    /// (clamped to [`MAX_HANDLES`]).
    pub(crate) fn new(limit: usize) -> HolderIds {
        let mut free = [u64::MAX; WORDS];
        let tail = WORDS * 64 - MAX_HOLDER_IDS;
        free[WORDS - 1] >>= tail;
        let mut ids = HolderIds {
            free,
            custody: CUSTODY,
            limit: limit.min(MAX_HANDLES),
            used: 0,
        };
        ids.take(CUSTODY);
        ids
    }

    fn take(&mut self, id: HolderId) {
        let n = usize::from(id.index());
        self.free[n / 64] &= !(1 << (n % 64));
    }

    /// The broker's custody id.
    pub(crate) fn custody(&self) -> HolderId {
        self.custody
    }

    /// The most ids handed out at once.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Ids handed out now.
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// Takes the lowest free id.
    pub(crate) fn alloc(&mut self) -> Result<HolderId, BitsExhausted> {
        if self.used >= self.limit {
            return Err(BitsExhausted { limit: self.limit });
        }
        let (w, word) = self
            .free
            .iter()
            .enumerate()
            .find(|(_, w)| **w != 0)
            .ok_or(BitsExhausted { limit: self.limit })?;
        let n = w * 64 + word.trailing_zeros() as usize;
        let id = HolderId::new(n as u16).ok_or(BitsExhausted { limit: self.limit })?;
        self.take(id);
        self.used += 1;
        Ok(id)
    }

    /// Takes `id` as a dead broker had handed it out (adoption); false if
    /// it is taken already or over the limit.
    pub(crate) fn take_adopted(&mut self, id: HolderId) -> bool {
        if self.is_taken(id) || self.used >= self.limit {
            return false;
        }
        self.take(id);
        self.used += 1;
        true
    }

    /// Gives `id` back (a no-op for the custody id or one not handed out).
    pub(crate) fn free(&mut self, id: HolderId) {
        let n = usize::from(id.index());
        let bit = 1u64 << (n % 64);
        if id == self.custody || self.free[n / 64] & bit != 0 {
            return;
        }
        self.free[n / 64] |= bit;
        self.used -= 1;
    }

    /// Whether `id` is handed out (the custody id counts).
    pub(crate) fn is_taken(&self, id: HolderId) -> bool {
        let n = usize::from(id.index());
        self.free[n / 64] & (1 << (n % 64)) == 0
    }

    /// The ids handed out, as a holder set (the custody id only with
    /// `custody`): what the stray sweep keeps.
    pub(crate) fn taken(&self, custody: bool) -> HolderSnapshot {
        let mut s = HolderSnapshot::default();
        for n in 0..MAX_HOLDER_IDS {
            let Some(id) = HolderId::new(n as u16) else {
                break;
            };
            if self.is_taken(id) && (id != self.custody || custody) {
                s.insert(id);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_up_to_the_limit_and_reusable() {
        let mut ids = HolderIds::new(usize::MAX);
        assert_eq!(ids.limit(), MAX_HANDLES);
        let mut got = std::collections::HashSet::new();
        while let Ok(id) = ids.alloc() {
            assert_ne!(id, CUSTODY);
            assert!(got.insert(id), "{id} handed out twice");
        }
        assert_eq!(got.len(), MAX_HANDLES);
        assert_eq!(ids.used(), MAX_HANDLES);
        let some = HolderId::new(500).unwrap();
        ids.free(some);
        ids.free(some);
        ids.free(CUSTODY);
        assert_eq!(ids.used(), MAX_HANDLES - 1);
        assert_eq!(ids.alloc().unwrap(), some);
        let mut small = HolderIds::new(3);
        for _ in 0..3 {
            small.alloc().unwrap();
        }
        let e = small.alloc().unwrap_err();
        assert!(e.to_string().contains("max_handles = 3"), "{e}");
    }

    #[test]
    fn the_first_handles_get_direct_ids_and_the_sweep_keeps_taken_ones() {
        let mut ids = HolderIds::new(1024);
        let first: Vec<_> = (0..15).map(|_| ids.alloc().unwrap()).collect();
        assert!(first.iter().all(|id| id.is_direct()));
        let next = ids.alloc().unwrap();
        assert_eq!(next.word(), Some(0));
        let keep = ids.taken(false);
        assert!(keep.holds(first[3]) && keep.holds(next) && !keep.holds(CUSTODY));
        assert!(ids.taken(true).holds(CUSTODY));
    }
}
