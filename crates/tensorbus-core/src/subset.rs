//! Sets of subscriber indices of one channel (up to [`MAX_SUBSCRIBERS`]),
//! as the channel record stores them: [`SUB_WORDS`] 64-bit words, where
//! word `w` bit `b` is subscriber `64w + b`. Channels configured for at
//! most 64 subscribers use word 0 only, so their publishes load one word as
//! before.

use crate::sync::{AtomicU64, Ordering};

/// Words of a subscriber set.
pub const SUB_WORDS: usize = 4;
/// Most subscribers per channel.
pub const MAX_SUBSCRIBERS: usize = SUB_WORDS * 64;

/// A set of subscriber indices in `N` words (a copy; the shared ones are
/// arrays of [`SUB_WORDS`] atomics read with [`Subs::load`]). The publish
/// path is compiled for `N = 1` (channels of up to 64 subscribers: the
/// single-word code of before) and `N = SUB_WORDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subs<const N: usize>(pub [u64; N]);

/// A set of any of a channel's subscribers.
pub type SubSet = Subs<SUB_WORDS>;

impl<const N: usize> Default for Subs<N> {
    fn default() -> Self {
        Subs([0; N])
    }
}

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

impl<const N: usize> Subs<N> {
    /// The empty set.
    pub const EMPTY: Subs<N> = Subs([0; N]);

    /// Subscribers `0..n` (those that fit in `N` words).
    #[inline]
    pub fn below(n: usize) -> Subs<N> {
        Subs(core::array::from_fn(|w| {
            crate::bits::low_mask(n.saturating_sub(w * 64))
        }))
    }

    /// The first `N` words of `set`.
    #[inline]
    pub fn from_set(set: SubSet) -> Subs<N> {
        Subs(core::array::from_fn(|w| set.0.get(w).copied().unwrap_or(0)))
    }

    /// The set with only `s` (empty if out of range).
    pub fn one(s: usize) -> Subs<N> {
        let mut x = Subs::EMPTY;
        x.insert(s);
        x
    }

    /// Loads the first `N` words of `shared`.
    #[inline]
    pub fn load(shared: &[AtomicU64; SUB_WORDS], order: Ordering) -> Subs<N> {
        Subs(core::array::from_fn(|w| {
            shared.get(w).map_or(0, |a| a.load(order))
        }))
    }

    /// Stores the `N` words into `shared` (the first `N` of its words).
    #[inline]
    pub fn store(self, shared: &[AtomicU64; SUB_WORDS], order: Ordering) {
        for (a, v) in shared.iter().zip(self.0) {
            a.store(v, order);
        }
    }

    /// Whether `s` is in the set.
    #[inline]
    pub fn contains(&self, s: usize) -> bool {
        s < N * 64 && self.0[s / 64] & (1 << (s % 64)) != 0
    }

    /// Adds `s` (ignored if out of range).
    #[inline]
    pub fn insert(&mut self, s: usize) {
        if s < N * 64 {
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
    pub fn and(self, other: Subs<N>) -> Subs<N> {
        Subs(core::array::from_fn(|w| self.0[w] & other.0[w]))
    }

    /// Elements of `self` not in `other`.
    #[inline]
    pub fn and_not(self, other: Subs<N>) -> Subs<N> {
        Subs(core::array::from_fn(|w| self.0[w] & !other.0[w]))
    }

    /// The elements, lowest first.
    #[inline]
    pub fn iter(self) -> SubIter<N> {
        SubIter { set: self.0, w: 0 }
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

/// Iterator of [`Subs::iter`]: a word index and what is left of the set
/// (no adapters: it sits on the publish path).
#[derive(Clone, Copy, Debug)]
pub struct SubIter<const N: usize> {
    set: [u64; N],
    w: usize,
}

impl<const N: usize> Iterator for SubIter<N> {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.w < N {
            let bits = self.set[self.w];
            if bits != 0 {
                self.set[self.w] = bits & (bits - 1);
                return Some(self.w * 64 + bits.trailing_zeros() as usize);
            }
            self.w += 1;
        }
        None
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
            SubSet::load(&shared, Ordering::Relaxed)
                .iter()
                .collect::<Vec<_>>(),
            [1, 130]
        );
        assert_eq!(
            Subs::<1>::load(&shared, Ordering::Relaxed)
                .iter()
                .collect::<Vec<_>>(),
            [1]
        );
        shared_remove(&shared, 130, Ordering::Relaxed);
        assert_eq!(SubSet::load(&shared, Ordering::Relaxed).len(), 1);
    }
}
