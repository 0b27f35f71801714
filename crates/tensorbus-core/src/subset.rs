//! Sets of subscriber indices of one channel (up to [`MAX_SUBSCRIBERS`]),
//! as the channel record stores them: [`SUB_WORDS`] 64-bit words, where
//! word `w` bit `b` is subscriber `64w + b`. Channels configured for at
//! most 64 subscribers use word 0 only, so their publishes load one word as
//! before.

use crate::bits::set_bits;
use crate::sync::{AtomicU64, Ordering};

/// Words of a subscriber set.
pub const SUB_WORDS: usize = 4;
/// Most subscribers per channel.
pub const MAX_SUBSCRIBERS: usize = SUB_WORDS * 64;

/// A set of subscriber indices (a copy; the shared ones are arrays of
/// atomics read with [`SubSet::load`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubSet(pub [u64; SUB_WORDS]);

/// Words needed for `n` subscribers (at least 1, at most [`SUB_WORDS`]).
#[inline]
pub const fn words_for(n: usize) -> usize {
    let w = n.div_ceil(64);
    if w == 0 {
        1
    } else if w > SUB_WORDS {
        SUB_WORDS
    } else {
        w
    }
}

impl SubSet {
    /// The empty set.
    pub const EMPTY: SubSet = SubSet([0; SUB_WORDS]);

    /// Subscribers `0..n`.
    pub fn below(n: usize) -> SubSet {
        SubSet(core::array::from_fn(|w| {
            crate::bits::low_mask(n.saturating_sub(w * 64))
        }))
    }

    /// The set with only `s` (empty if out of range).
    pub fn one(s: usize) -> SubSet {
        let mut x = SubSet::EMPTY;
        x.insert(s);
        x
    }

    /// Loads the first `words` words of `shared` (the rest read as empty).
    #[inline]
    pub fn load(shared: &[AtomicU64; SUB_WORDS], words: usize, order: Ordering) -> SubSet {
        let mut x = SubSet::EMPTY;
        for (w, v) in x.0.iter_mut().enumerate().take(words.min(SUB_WORDS)) {
            *v = shared[w].load(order);
        }
        x
    }

    /// Stores the first `words` words into `shared`.
    #[inline]
    pub fn store(self, shared: &[AtomicU64; SUB_WORDS], words: usize, order: Ordering) {
        for (w, v) in self.0.iter().enumerate().take(words.min(SUB_WORDS)) {
            shared[w].store(*v, order);
        }
    }

    /// Whether `s` is in the set.
    #[inline]
    pub fn contains(&self, s: usize) -> bool {
        s < MAX_SUBSCRIBERS && self.0[s / 64] & (1 << (s % 64)) != 0
    }

    /// Adds `s` (ignored if out of range).
    #[inline]
    pub fn insert(&mut self, s: usize) {
        if s < MAX_SUBSCRIBERS {
            self.0[s / 64] |= 1 << (s % 64);
        }
    }

    /// Whether the set is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Elements in both.
    #[inline]
    pub fn and(self, other: SubSet) -> SubSet {
        SubSet(core::array::from_fn(|w| self.0[w] & other.0[w]))
    }

    /// Elements of `self` not in `other`.
    #[inline]
    pub fn and_not(self, other: SubSet) -> SubSet {
        SubSet(core::array::from_fn(|w| self.0[w] & !other.0[w]))
    }

    /// The elements, lowest first.
    #[inline]
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..SUB_WORDS).flat_map(move |w| set_bits(self.0[w]).map(move |b| w * 64 + b))
    }

    /// The elements round-robin from `start`: those at or above it, then
    /// those below it.
    pub fn rotated(self, start: usize) -> impl Iterator<Item = usize> {
        let above = self.iter().filter(move |&s| s >= start);
        let below = self.iter().filter(move |&s| s < start);
        above.chain(below)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// Adds subscriber `s` to a shared set (one RMW on its word). `order` as
/// for `fetch_or`.
#[inline]
pub fn shared_insert(shared: &[AtomicU64; SUB_WORDS], s: usize, order: Ordering) {
    if s < MAX_SUBSCRIBERS {
        shared[s / 64].fetch_or(1 << (s % 64), order);
    }
}

/// Removes subscriber `s` from a shared set (one RMW on its word).
#[inline]
pub fn shared_remove(shared: &[AtomicU64; SUB_WORDS], s: usize, order: Ordering) {
    if s < MAX_SUBSCRIBERS {
        shared[s / 64].fetch_and(!(1 << (s % 64)), order);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn sets_iterate_rotate_and_bound() {
        let mut x = SubSet::EMPTY;
        for s in [0, 63, 64, 200, 255, 256, 9999] {
            x.insert(s);
        }
        assert_eq!(x.iter().collect::<Vec<_>>(), [0, 63, 64, 200, 255]);
        assert_eq!(x.rotated(64).collect::<Vec<_>>(), [64, 200, 255, 0, 63]);
        assert_eq!(x.len(), 5);
        assert!(x.contains(200) && !x.contains(201) && !x.contains(9999));
        assert_eq!(SubSet::below(70).len(), 70);
        assert_eq!(SubSet::below(0).len(), 0);
        assert_eq!(SubSet::below(1000).len(), MAX_SUBSCRIBERS);
        assert_eq!(x.and(SubSet::below(64)).iter().collect::<Vec<_>>(), [0, 63]);
        assert_eq!(x.and_not(SubSet::below(64)).len(), 3);
        assert_eq!(
            (words_for(0), words_for(64), words_for(65), words_for(9999)),
            (1, 1, 2, 4)
        );
        let shared: [AtomicU64; SUB_WORDS] = Default::default();
        shared_insert(&shared, 130, Ordering::Relaxed);
        shared_insert(&shared, 1, Ordering::Relaxed);
        assert_eq!(
            SubSet::load(&shared, 4, Ordering::Relaxed)
                .iter()
                .collect::<Vec<_>>(),
            [1, 130]
        );
        assert_eq!(
            SubSet::load(&shared, 1, Ordering::Relaxed)
                .iter()
                .collect::<Vec<_>>(),
            [1]
        );
        shared_remove(&shared, 130, Ordering::Relaxed);
        assert_eq!(SubSet::load(&shared, 4, Ordering::Relaxed).len(), 1);
    }
}
