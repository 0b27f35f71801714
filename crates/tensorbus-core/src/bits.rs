//! Iterating over the set bits of a 64-bit mask (subscriber sets, producer
//! rows) without a division or a test per possible bit.

/// The indices of the set bits of `mask`, lowest first.
///
/// ```
/// let v: Vec<usize> = tensorbus_core::bits::set_bits(0b1010_0001).collect();
/// assert_eq!(v, [0, 5, 7]);
/// ```
#[inline]
pub fn set_bits(mask: u64) -> SetBits {
    SetBits(mask)
}

/// The set bits of `mask` round-robin from `start`: those at or above it,
/// then those below it (for fair turn-taking across calls).
///
/// ```
/// let v: Vec<usize> = tensorbus_core::bits::rotated_bits(0b1010_0001, 5).collect();
/// assert_eq!(v, [5, 7, 0]);
/// ```
#[inline]
pub fn rotated_bits(mask: u64, start: usize) -> impl Iterator<Item = usize> {
    let above = u32::try_from(start)
        .ok()
        .and_then(|s| u64::MAX.checked_shl(s))
        .unwrap_or(0);
    set_bits(mask & above).chain(set_bits(mask & !above))
}

/// A mask of the `n` lowest bits (all 64 for `n >= 64`).
#[inline]
pub const fn low_mask(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// Iterator of [`set_bits`].
#[derive(Clone, Copy, Debug)]
pub struct SetBits(u64);

impl Iterator for SetBits {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_covers_every_bit_once() {
        let mask = 0xF0F0_0000_0000_0013u64;
        for start in [0, 1, 4, 63, 64, 1000] {
            let mut v: Vec<usize> = rotated_bits(mask, start).collect();
            assert!(v.iter().take_while(|&&b| b >= start.min(64)).count() <= v.len());
            v.sort_unstable();
            assert_eq!(v, set_bits(mask).collect::<Vec<_>>());
        }
        assert_eq!(set_bits(0).count(), 0);
        assert_eq!(set_bits(u64::MAX).count(), 64);
    }
}
