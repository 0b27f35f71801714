//! Descriptors: the 48-bit records that travel through rings.
//!
//! A descriptor names one slot in one generation:
//!
//! ```text
//!  47      40 39                    16 15             0
//! +----------+------------------------+----------------+
//! |   pool   |       slot index       | generation lo  |
//! +----------+------------------------+----------------+
//! ```
//!
//! The ring adds a 16-bit position stamp in the top bits (see [`crate::ring`]).
//! The generation is the low 16 bits of the slot's 32-bit generation counter;
//! it only guards against stale or corrupted descriptors (a queued descriptor
//! always carries a holder bit, so its slot cannot be recycled under it).

/// Largest number of pools a control segment can describe.
pub const MAX_POOLS: usize = 256;
/// Largest number of slots in one pool (24-bit index).
pub const MAX_SLOTS_PER_POOL: usize = 1 << 24;
/// Mask of the 48 descriptor bits.
pub const DESC_MASK: u64 = (1 << 48) - 1;

/// A decoded descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// Pool index, in the order of the broker's pool table.
    pub pool: u8,
    /// Slot index within the pool.
    pub index: u32,
    /// Low 16 bits of the slot generation at publish time.
    pub generation: u16,
}

impl Descriptor {
    /// Builds a descriptor from a slot's full generation counter.
    pub fn new(pool: u8, index: u32, generation: u32) -> Descriptor {
        Descriptor {
            pool,
            index: index & 0x00FF_FFFF,
            generation: generation as u16,
        }
    }

    /// Packs into the low 48 bits of a `u64`.
    pub const fn pack(self) -> u64 {
        ((self.pool as u64) << 40)
            | (((self.index as u64) & 0xFF_FFFF) << 16)
            | self.generation as u64
    }

    /// Unpacks the low 48 bits of `bits` (higher bits are ignored).
    pub const fn unpack(bits: u64) -> Descriptor {
        Descriptor {
            pool: (bits >> 40) as u8,
            index: ((bits >> 16) & 0xFF_FFFF) as u32,
            generation: bits as u16,
        }
    }

    /// Whether `full_generation` (a slot's 32-bit counter) matches this descriptor.
    pub const fn matches_generation(self, full_generation: u32) -> bool {
        self.generation == full_generation as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips() {
        for (p, i, g) in [
            (0u8, 0u32, 0u32),
            (255, 0xFF_FFFF, u32::MAX),
            (3, 12345, 0x1_0007),
        ] {
            let d = Descriptor::new(p, i, g);
            assert_eq!(Descriptor::unpack(d.pack()), d);
            assert!(d.pack() <= DESC_MASK);
            assert!(d.matches_generation(g));
            assert!(!d.matches_generation(g.wrapping_add(1)));
        }
    }
}
