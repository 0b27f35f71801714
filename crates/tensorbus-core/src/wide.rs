//! The holder word for more than 64 holders (issue 16): a two-level scheme
//! with one word that decides "free" and sixteen extension words.
//!
//! Word 0 is `version:32 | summary:16 | direct:16`; sixteen extension words
//! of 64 bits follow (in the slot header's last two cache lines). A holder
//! id below 16 is a direct bit of word 0; id `16 + 64k + b` is bit `b` of
//! extension word `k`, and while word `k` has a bit set, summary bit `k` of
//! word 0 is set. "Free" is decided on word 0 alone: whoever turns its
//! summary and direct bits to zero frees. docs/design.md "Ownership: holder sets"
//! gives the crash proof; the rules, each argued where it is implemented:
//!
//! 1. A releaser in extension word `k` clears its bit there; if that
//!    emptied the word it clears summary bit `k` with a CAS that bumps the
//!    version, from a word-0 value it read *before* re-reading word `k` and
//!    finding it still empty ([`Holders::clear_summary_if_empty`]). Clearing
//!    a summary bit is idempotent, so the broker may do the second step for
//!    a releaser that died between the two: exactly one CAS clears the bit,
//!    and only its author may free.
//! 2. Extension bits are only *set* while the slot cannot be freed: by its
//!    sole holder (a loan, a publish, a stage's forward, the broker's
//!    redispatch under custody) or under a pin (the broker's custody bit,
//!    set with [`Holders::pin_if_held`] while the slot is held). A setter
//!    sets the bit in word `k` first, then CASes word 0 to set summary `k`
//!    and bump the version. A concurrent rule-1 clear then either sees the
//!    new bit or fails its CAS (its word-0 value is stale) and retries; if
//!    it clears the summary first, the setter's CAS sets it again, and the
//!    pin keeps the slot from being freed in between.
//! 3. An extension-bit loan takes ownership with its CAS on word 0 (summary
//!    `k` set) *before* its bit in word `k`: a live transient that looks like
//!    a stale summary bit. The loaner names the slot in its `loan_intent`
//!    first and clears it after setting its bit; the broker's repair reads
//!    word 0, then every live loaner's intent, then word `k`, and skips slots
//!    named there. (No releaser or setter can meet a loan transient: the
//!    slot was free when the loan began, and pins need a held slot; a pin
//!    that lands on a loan transient only delays a stage's exclusivity.)
//! 4. The version is 32 bits and never restarts (frees keep it), so a free
//!    and a new loan between a reader's load and its CAS cannot look
//!    unchanged unless 2^32 summary changes of this one slot happen in
//!    between.

use crate::slot::Released;
use crate::sync::{AtomicU64, Ordering};

/// Direct holder bits in word 0.
pub const DIRECT_BITS: u16 = 16;
/// Extension words.
pub const EXT_WORDS: usize = 16;
/// Holder ids there are: 16 direct, 1,024 in extension words.
pub const MAX_HOLDER_IDS: usize = DIRECT_BITS as usize + EXT_WORDS * 64;

const DIRECT_MASK: u64 = 0xFFFF;
const SUMMARY_SHIFT: u32 = 16;
const SUMMARY_MASK: u64 = 0xFFFF << SUMMARY_SHIFT;
/// The bits of word 0 that say who holds the slot (all but the version).
pub const HOLDERS_MASK: u64 = DIRECT_MASK | SUMMARY_MASK;
const VERSION_ONE: u64 = 1 << 32;

/// One holder's identity: a direct bit of word 0 or a bit of an extension
/// word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HolderId(u16);

impl HolderId {
    /// The holder id `n`, if below [`MAX_HOLDER_IDS`].
    pub const fn new(n: u16) -> Option<HolderId> {
        if (n as usize) < MAX_HOLDER_IDS {
            Some(HolderId(n))
        } else {
            None
        }
    }
    /// The id read from shared memory, clamped into range (a garbage value
    /// names some valid id, never an out-of-range index).
    #[inline]
    pub const fn clamped(n: u32) -> HolderId {
        // The modulo only for garbage: ids read from shared memory are in
        // range unless a peer corrupted them.
        if n < MAX_HOLDER_IDS as u32 {
            HolderId(n as u16)
        } else {
            HolderId((n % MAX_HOLDER_IDS as u32) as u16)
        }
    }
    /// The number.
    pub const fn index(self) -> u16 {
        self.0
    }
    /// Whether this is a direct bit of word 0.
    #[inline]
    pub const fn is_direct(self) -> bool {
        self.0 < DIRECT_BITS
    }
    /// `Some(k)` for a bit of extension word `k`, `None` for a direct bit.
    #[inline]
    pub const fn word(self) -> Option<usize> {
        if self.0 < DIRECT_BITS {
            None
        } else {
            Some((self.0 - DIRECT_BITS) as usize / 64)
        }
    }
    /// The bit within its word (word 0 for a direct id).
    #[inline]
    pub const fn bit(self) -> u64 {
        if self.0 < DIRECT_BITS {
            1 << self.0
        } else {
            1 << ((self.0 - DIRECT_BITS) % 64)
        }
    }
}

impl core::fmt::Display for HolderId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[inline]
const fn summary_bit(k: usize) -> u64 {
    1 << (SUMMARY_SHIFT + (k as u32 & 15))
}

/// What a holder set looked like at one moment (word 0 read first, then
/// the extension words whose summary bit was set). Not atomic as a whole:
/// for statistics, sweeps and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HolderSnapshot {
    /// Word 0.
    pub word0: u64,
    /// The extension words (0 where the summary bit was clear and the word
    /// was not read).
    pub ext: [u64; EXT_WORDS],
}

impl HolderSnapshot {
    /// Whether `id` is in the snapshot.
    pub fn holds(&self, id: HolderId) -> bool {
        match id.word() {
            None => self.word0 & id.bit() != 0,
            Some(k) => self.ext[k] & id.bit() != 0,
        }
    }
    /// Adds `id` (building a set of ids to compare against).
    pub fn insert(&mut self, id: HolderId) {
        match id.word() {
            None => self.word0 |= id.bit(),
            Some(k) => self.ext[k] |= id.bit(),
        }
    }
    /// Whether the two sets share an id.
    pub fn intersects(&self, other: &HolderSnapshot) -> bool {
        self.word0 & other.word0 & DIRECT_MASK != 0
            || self.ext.iter().zip(&other.ext).any(|(a, b)| a & b != 0)
    }
    /// Whether the snapshot shows any holder.
    pub fn is_held(&self) -> bool {
        self.word0 & HOLDERS_MASK != 0
    }
    /// The ids in the snapshot, lowest first.
    pub fn ids(&self) -> impl Iterator<Item = HolderId> + '_ {
        let direct = crate::bits::set_bits(self.word0 & DIRECT_MASK).map(|b| HolderId(b as u16));
        let ext = (0..EXT_WORDS).flat_map(move |k| {
            crate::bits::set_bits(self.ext[k])
                .map(move |b| HolderId(DIRECT_BITS + (k * 64 + b) as u16))
        });
        direct.chain(ext)
    }
}

/// A borrowed view of one slot's word 0 and extension words: every
/// operation on the holder set.
#[derive(Clone, Copy, Debug)]
pub struct Holders<'a> {
    word0: &'a AtomicU64,
    ext: &'a [AtomicU64; EXT_WORDS],
}

impl<'a> Holders<'a> {
    /// The view of `word0` and `ext`.
    #[inline]
    pub fn new(word0: &'a AtomicU64, ext: &'a [AtomicU64; EXT_WORDS]) -> Holders<'a> {
        Holders { word0, ext }
    }

    /// Word 0 (Acquire).
    #[inline]
    pub fn word0(&self) -> u64 {
        self.word0.load(Ordering::Acquire)
    }

    /// Whether nobody holds the slot.
    #[inline]
    pub fn is_free(&self) -> bool {
        self.word0() & HOLDERS_MASK == 0
    }

    /// Whether `id` holds the slot.
    #[inline]
    pub fn holds(&self, id: HolderId) -> bool {
        match id.word() {
            None => self.word0() & id.bit() != 0,
            Some(k) => self.ext[k].load(Ordering::Acquire) & id.bit() != 0,
        }
    }

    /// Whether `id` is the only holder (a stage's exclusivity check). Two
    /// loads are enough: while `id` holds, holders are only added by `id`
    /// itself or under a pin, which shows in word 0 (rule 2).
    #[inline]
    pub fn only(&self, id: HolderId) -> bool {
        let w = self.word0() & HOLDERS_MASK;
        match id.word() {
            None => w == id.bit(),
            Some(k) => w == summary_bit(k) && self.ext[k].load(Ordering::Acquire) == id.bit(),
        }
    }

    /// Word 0 and the extension words its summary names.
    pub fn snapshot(&self) -> HolderSnapshot {
        let word0 = self.word0();
        let mut ext = [0u64; EXT_WORDS];
        for (k, e) in ext.iter_mut().enumerate() {
            if word0 & summary_bit(k) != 0 {
                *e = self.ext[k].load(Ordering::Acquire);
            }
        }
        HolderSnapshot { word0, ext }
    }

    /// Every extension word, whatever the summary says (sweeps look for
    /// bits a corrupted word carries without its summary bit).
    pub fn raw_snapshot(&self) -> HolderSnapshot {
        let word0 = self.word0();
        HolderSnapshot {
            word0,
            ext: core::array::from_fn(|k| self.ext[k].load(Ordering::Acquire)),
        }
    }

    /// Loans the slot for `id` if it is free; returns whether it did. An
    /// extension-bit loan stores `tag` (non-zero: which slot) in
    /// `loan_intent` first and 0 after (rule 3); a direct-bit loan does not
    /// touch it and costs one CAS, as with a single holder word.
    #[inline]
    pub fn try_loan(&self, id: HolderId, loan_intent: &AtomicU64, tag: u64) -> bool {
        match id.word() {
            None => {
                // Guess "free at version 0" (true until the slot ever had
                // an extension holder): one CAS, one line transfer.
                let mut w = 0;
                loop {
                    // Acquire on success: the previous holders' payload
                    // work happens-before ours (their releases are Release
                    // RMWs on word 0, or on an extension word followed by
                    // the Release CAS that cleared its summary bit).
                    match self.word0.compare_exchange(
                        w,
                        w | id.bit(),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return true,
                        Err(a) if a & HOLDERS_MASK == 0 => w = a,
                        Err(_) => return false,
                    }
                }
            }
            Some(k) => self.loan_extension(k, id, loan_intent, tag),
        }
    }

    #[cold]
    fn loan_extension(&self, k: usize, id: HolderId, loan_intent: &AtomicU64, tag: u64) -> bool {
        // SeqCst: a repairer that reads our CAS's result also reads this
        // intent (rule 3), whatever it reads in between.
        loan_intent.store(tag, Ordering::SeqCst);
        let mut w = self.word0.load(Ordering::Relaxed);
        let won = loop {
            if w & HOLDERS_MASK != 0 {
                break false;
            }
            let next = (w | summary_bit(k)).wrapping_add(VERSION_ONE);
            match self
                .word0
                .compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break true,
                Err(a) => w = a,
            }
        };
        if won {
            self.ext[k].fetch_or(id.bit(), Ordering::Release);
        }
        // Release: a repairer that reads 0 here sees our bit in word k.
        loan_intent.store(0, Ordering::Release);
        won
    }

    /// Adds `receivers` as holders. Precondition (rule 2): the caller is
    /// the slot's sole holder, or holds a pin, so the slot cannot be freed
    /// meanwhile (a work-queue publish keeps its own hold while it chooses).
    #[inline]
    pub fn add(&self, receivers: impl IntoIterator<Item = HolderId>) {
        self.set_holders(receivers, 0);
    }

    /// Adds `receivers` as holders and lets go of `own` (a broadcast
    /// publish or a stage's forward by the sole holder `own`; precondition:
    /// `own` is not among `receivers`). Returns what `own`'s release did
    /// ([`Released::Freed`] only when `receivers` is empty).
    #[inline(always)]
    pub fn hand_over(
        &self,
        own: HolderId,
        receivers: impl IntoIterator<Item = HolderId>,
    ) -> Released {
        match own.word() {
            None => self.set_holders(receivers, own.bit()),
            Some(_) => {
                self.set_holders(receivers, 0);
                self.release(own)
            }
        }
    }

    /// Extension bits first, then one CAS on word 0 that sets the direct
    /// and summary bits (bumping the version when a summary bit is
    /// involved) and clears the direct bits `clear`. Returns what clearing
    /// `clear` did. Always inlined: the receivers' iterator then stays in
    /// registers (passed by reference to an out-of-line copy it cost a
    /// store-forwarding stall per publish), and a direct-id publish is the
    /// loop and one CAS.
    #[inline(always)]
    fn set_holders(&self, receivers: impl IntoIterator<Item = HolderId>, clear: u64) -> Released {
        let mut direct = 0u64;
        let mut any_ext = false;
        // Extension bits gathered per word first: one RMW per word, not per
        // receiver (a broadcast to 250 subscribers touches 4 words).
        let mut ext = [0u64; EXT_WORDS];
        for r in receivers {
            match r.word() {
                None => direct |= r.bit(),
                Some(k) => {
                    ext[k] |= r.bit();
                    any_ext = true;
                }
            }
        }
        let summary = if any_ext { self.set_extension(&ext) } else { 0 };
        let bump = if summary != 0 { VERSION_ONE } else { 0 };
        let mut w = self.word0.load(Ordering::Relaxed);
        loop {
            let next = ((w | direct | summary) & !clear).wrapping_add(bump);
            // AcqRel: Release hands our payload and metadata writes to the
            // last releaser's chain; Acquire continues the chain of the
            // previous holders' releases.
            match self
                .word0
                .compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return if clear == 0 || w & clear == 0 {
                        Released::NotHeld
                    } else if next & HOLDERS_MASK == 0 {
                        Released::Freed
                    } else {
                        Released::StillHeld
                    }
                }
                Err(a) => w = a,
            }
        }
    }

    /// Sets the extension bits `ext` (before their summary bits, rule 2)
    /// and returns those summary bits. Out of line: direct-id publishes
    /// never come here, and the direct path stays small.
    #[inline(never)]
    fn set_extension(&self, ext: &[u64; EXT_WORDS]) -> u64 {
        let mut summary = 0;
        for (k, bits) in ext.iter().enumerate() {
            if *bits != 0 {
                // Release: part of handing over what we wrote.
                self.ext[k].fetch_or(*bits, Ordering::Release);
                summary |= summary_bit(k);
            }
        }
        summary
    }

    /// Sets the direct bit `pin` if the slot is held by anyone and `pin` is
    /// not set: from then on the slot cannot be freed until `pin` is
    /// released, so holders may be added under it (rule 2). Returns whether
    /// it pinned. `false` for an extension id (pins are direct bits).
    pub fn pin_if_held(&self, pin: HolderId) -> bool {
        if !pin.is_direct() {
            return false;
        }
        let mut w = self.word0.load(Ordering::Acquire);
        loop {
            if w & HOLDERS_MASK == 0 || w & pin.bit() != 0 {
                return false;
            }
            // AcqRel: continues word 0's release sequence like a publish
            // (the last releaser's Acquire sees everything before).
            match self.word0.compare_exchange_weak(
                w,
                w | pin.bit(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(a) => w = a,
            }
        }
    }

    /// Clears `id`'s hold. The last holder to leave gets [`Released::Freed`].
    #[inline]
    pub fn release(&self, id: HolderId) -> Released {
        match id.word() {
            None => {
                // AcqRel: our payload accesses happen-before the next loan.
                let before = self.word0.fetch_and(!id.bit(), Ordering::AcqRel);
                if before & id.bit() == 0 {
                    Released::NotHeld
                } else if before & HOLDERS_MASK == id.bit() {
                    Released::Freed
                } else {
                    Released::StillHeld
                }
            }
            Some(k) => self.release_extension(k, id),
        }
    }

    /// [`Holders::release`] of an extension id (out of line: the direct
    /// path stays small enough to inline into every release).
    #[inline(never)]
    fn release_extension(&self, k: usize, id: HolderId) -> Released {
        // AcqRel: the releaser that empties the word acquires our release
        // before its Release CAS on word 0.
        let before = self.ext[k].fetch_and(!id.bit(), Ordering::AcqRel);
        if before & id.bit() == 0 {
            Released::NotHeld
        } else if before != id.bit() {
            Released::StillHeld
        } else {
            // We emptied word k: clear its summary bit (rule 1).
            self.clear_summary_if_empty(k)
                .unwrap_or(Released::StillHeld)
        }
    }

    /// Clears summary bit `k` (bumping the version) while word `k` is empty
    /// (rule 1). `None` if the bit was clear already (another party cleared
    /// it and decided about freeing) or word `k` has holders again (a setter
    /// added one; its summary bit stays).
    pub fn clear_summary_if_empty(&self, k: usize) -> Option<Released> {
        let k = k % EXT_WORDS;
        let mut w = self.word0.load(Ordering::Acquire);
        loop {
            if w & summary_bit(k) == 0 {
                return None;
            }
            // After the load of `w`: a setter whose CAS we read synchronises
            // with us, so we see its bit here and stop; one whose CAS comes
            // later makes ours fail.
            if self.ext[k].load(Ordering::Acquire) != 0 {
                return None;
            }
            let next = (w & !summary_bit(k)).wrapping_add(VERSION_ONE);
            // Acquire on failure: the value we retry from carries a
            // setter's Release, so the re-read of word k sees its bit.
            match self
                .word0
                .compare_exchange_weak(w, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(if next & HOLDERS_MASK == 0 {
                        Released::Freed
                    } else {
                        Released::StillHeld
                    })
                }
                Err(a) => w = a,
            }
        }
    }

    /// The broker's repair of a stale summary bit `k` (a releaser or loaner
    /// that died between its two steps): clears it if word `k` is empty and
    /// `loan_in_flight()` (whether a live loaner names this slot) is false.
    /// `Some(Freed)` when the repair freed the slot.
    pub fn repair_stale(
        &self,
        k: usize,
        loan_in_flight: impl FnOnce() -> bool,
    ) -> Option<Released> {
        let k = k % EXT_WORDS;
        let w = self.word0.load(Ordering::SeqCst);
        if w & summary_bit(k) == 0 {
            return None;
        }
        // The intents before word k: a loan whose CAS we saw stored its
        // intent before that CAS, so we see the intent or its clearing, and
        // the clearing comes after the loan's bit in word k, which we then
        // see below. (Reading word k first would let a loan set its bit and
        // clear its intent between the two reads: loom's
        // `repair_skips_a_loan_in_flight` fails with the reads swapped.)
        if loan_in_flight() || self.ext[k].load(Ordering::SeqCst) != 0 {
            return None;
        }
        let next = (w & !summary_bit(k)).wrapping_add(VERSION_ONE);
        // From the value read before word k: a setter that added bits in
        // word k since bumped the version, and this fails.
        self.word0
            .compare_exchange(w, next, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| {
                if next & HOLDERS_MASK == 0 {
                    Released::Freed
                } else {
                    Released::StillHeld
                }
            })
    }

    /// The summary bits that look stale now (set, with an empty word):
    /// candidates for [`Holders::repair_stale`].
    pub fn stale_summaries(&self) -> u16 {
        let w = self.word0();
        let mut out = 0u16;
        for k in crate::bits::set_bits((w & SUMMARY_MASK) >> SUMMARY_SHIFT) {
            if self.ext[k].load(Ordering::Acquire) == 0 {
                out |= 1 << k;
            }
        }
        out
    }

    /// Clears the holder bits `keep` does not contain (bits of ids nobody
    /// was given: only a corrupted holder set carries them), then repairs
    /// stale summary bits (see [`Holders::repair_stale`]; `loan_in_flight`
    /// is asked at most once per word). Returns whether this freed the slot.
    pub fn clear_stray(
        &self,
        keep: &HolderSnapshot,
        mut loan_in_flight: impl FnMut() -> bool,
    ) -> bool {
        let mut freed = false;
        let stray = self.word0() & DIRECT_MASK & !keep.word0;
        if stray != 0 {
            // AcqRel, like a release: if this frees the slot, the next
            // loaner's Acquire CAS synchronises with it.
            let before = self.word0.fetch_and(!stray, Ordering::AcqRel);
            freed |= before & stray != 0 && before & HOLDERS_MASK & !stray == 0;
        }
        for k in 0..EXT_WORDS {
            let stray = self.ext[k].load(Ordering::Acquire) & !keep.ext[k];
            if stray == 0 {
                continue;
            }
            // AcqRel, as an extension release (rule 1 follows).
            let before = self.ext[k].fetch_and(!stray, Ordering::AcqRel);
            if before & stray != 0 && before & !stray == 0 {
                freed |= self.clear_summary_if_empty(k) == Some(Released::Freed);
            }
        }
        for k in crate::bits::set_bits(u64::from(self.stale_summaries())) {
            freed |= self.repair_stale(k, &mut loan_in_flight) == Some(Released::Freed);
        }
        freed
    }
}

/// An owned holder set (word 0 and the extension words side by side), for
/// tests and loom models; shared memory uses [`Holders`] over a slot
/// header's fields.
#[derive(Debug, Default)]
pub struct WideHolders {
    word0: AtomicU64,
    ext: [AtomicU64; EXT_WORDS],
}

impl WideHolders {
    /// The operations on it.
    pub fn view(&self) -> Holders<'_> {
        Holders::new(&self.word0, &self.ext)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn id(n: u16) -> HolderId {
        HolderId::new(n).unwrap()
    }

    #[test]
    fn ids_map_to_words_and_bits() {
        assert_eq!((id(0).word(), id(0).bit()), (None, 1));
        assert_eq!((id(15).word(), id(15).bit()), (None, 1 << 15));
        assert_eq!((id(16).word(), id(16).bit()), (Some(0), 1));
        let last = id(MAX_HOLDER_IDS as u16 - 1);
        assert_eq!((last.word(), last.bit()), (Some(15), 1 << 63));
        assert!(HolderId::new(MAX_HOLDER_IDS as u16).is_none());
        assert_eq!(
            HolderId::clamped(u32::MAX).index() as usize,
            u32::MAX as usize % MAX_HOLDER_IDS
        );
    }

    /// 1,000 holders over every word: the slot is free after the last
    /// release and not before, and exactly one release frees it.
    #[test]
    fn a_thousand_holders_leave_and_exactly_one_frees() {
        let w = WideHolders::default();
        let h = w.view();
        let intent = AtomicU64::new(0);
        let producer = id(40);
        assert!(h.try_loan(producer, &intent, 7));
        assert!(!h.try_loan(id(3), &intent, 7), "loaned twice");
        let receivers: Vec<HolderId> = (0..1000u16).filter(|&n| n != 40).map(id).collect();
        assert_eq!(
            h.hand_over(producer, receivers.iter().copied()),
            Released::StillHeld
        );
        assert!(!h.holds(producer));
        assert_eq!(h.snapshot().ids().count(), 999);
        let mut freed = 0;
        for (i, r) in receivers.iter().enumerate() {
            assert!(
                !h.is_free(),
                "free with {} holders left",
                receivers.len() - i
            );
            freed += usize::from(h.release(*r) == Released::Freed);
            assert_eq!(h.release(*r), Released::NotHeld);
        }
        assert_eq!(freed, 1);
        assert!(h.is_free());
        // A direct loan after extension traffic (version no longer 0).
        assert!(h.try_loan(id(2), &intent, 7));
        assert!(h.only(id(2)));
    }

    /// Death after every step of an extension release, then the broker's
    /// repair: the slot ends free exactly once, with the other holder's
    /// release.
    #[test]
    fn death_mid_release_is_repaired() {
        for die_after_first_step in [false, true] {
            let w = WideHolders::default();
            let h = w.view();
            let intent = AtomicU64::new(0);
            let (a, b) = (id(100), id(5));
            assert!(h.try_loan(b, &intent, 1));
            h.add([a]);
            let k = a.word().unwrap();
            if die_after_first_step {
                w.ext[k].fetch_and(!a.bit(), Ordering::AcqRel);
                assert_eq!(h.stale_summaries(), 1 << k);
            } else {
                // The broker clears a dead holder's bit like a release.
                assert_eq!(h.release(a), Released::StillHeld);
            }
            let repaired = h.repair_stale(k, || false);
            assert_eq!(repaired.is_some(), die_after_first_step);
            assert!(!h.is_free());
            assert_eq!(h.release(b), Released::Freed);
            assert!(h.is_free());
        }
    }

    /// A loaner that died between its CAS and its bit leaves a stale
    /// summary bit: the repair frees the slot once its intent is dead.
    #[test]
    fn death_mid_loan_is_repaired_and_a_live_loan_is_not_touched() {
        let w = WideHolders::default();
        let h = w.view();
        let k = id(500).word().unwrap();
        // The CAS of an extension loan, without its bit (the loaner died).
        w.word0.fetch_or(summary_bit(k), Ordering::AcqRel);
        assert_eq!(
            h.repair_stale(k, || true),
            None,
            "a live intent must be respected"
        );
        assert_eq!(h.repair_stale(k, || false), Some(Released::Freed));
        assert!(h.is_free());
        let intent = AtomicU64::new(0);
        assert!(h.try_loan(id(500), &intent, 9));
        assert_eq!(intent.load(Ordering::Relaxed), 0);
        assert_eq!(
            h.repair_stale(k, || false),
            None,
            "a held word is not stale"
        );
        assert!(h.only(id(500)));
    }

    /// Pins: only on a held slot, only direct, and holders added under a
    /// pin outlive it.
    #[test]
    fn pins_hold_a_held_slot_only() {
        let w = WideHolders::default();
        let h = w.view();
        let intent = AtomicU64::new(0);
        let (custody, history, joiner) = (id(0), id(700), id(900));
        assert!(!h.pin_if_held(custody), "pinned a free slot");
        assert!(h.try_loan(id(3), &intent, 1));
        h.hand_over(id(3), [history]);
        assert!(!h.pin_if_held(id(800)), "pins are direct bits");
        assert!(h.pin_if_held(custody));
        assert!(!h.pin_if_held(custody), "pinned twice");
        h.add([joiner]);
        assert_eq!(h.release(history), Released::StillHeld);
        assert_eq!(h.release(custody), Released::StillHeld);
        assert!(h.holds(joiner));
        assert_eq!(h.release(joiner), Released::Freed);
    }

    /// Stray bits (ids nobody was given) are cleared, kept ones stay, a
    /// stale summary is repaired, and the slot frees exactly when only
    /// strays held it.
    #[test]
    fn strays_are_cleared_and_kept_ids_stay() {
        let keep = HolderSnapshot {
            word0: id(1).bit(),
            ext: core::array::from_fn(|k| if k == 2 { 1 } else { 0 }),
        };
        let w = WideHolders::default();
        let h = w.view();
        // Only strays: a direct bit, a bit in word 5 with its summary, a
        // bit in word 7 without one, and a stale summary 9.
        w.word0.store(
            id(4).bit() | summary_bit(5) | summary_bit(9),
            Ordering::Relaxed,
        );
        w.ext[5].store(1 << 3, Ordering::Relaxed);
        w.ext[7].store(1 << 1, Ordering::Relaxed);
        assert!(h.clear_stray(&keep, || false));
        assert!(h.is_free());
        assert_eq!(h.raw_snapshot().ext, [0; EXT_WORDS]);
        // A kept holder survives the sweep.
        w.word0.store(
            id(1).bit() | summary_bit(2) | summary_bit(5),
            Ordering::Relaxed,
        );
        w.ext[2].store(1 | 1 << 9, Ordering::Relaxed);
        w.ext[5].store(1 << 3, Ordering::Relaxed);
        assert!(!h.clear_stray(&keep, || false));
        let s = h.snapshot();
        assert_eq!(s.word0 & HOLDERS_MASK, id(1).bit() | summary_bit(2));
        assert_eq!(s.ext[2], 1);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    fn id(n: u16) -> HolderId {
        HolderId::new(n).unwrap()
    }

    /// Holders in two extension words and one direct bit release at once:
    /// exactly one frees.
    #[test]
    fn releasers_in_different_words_free_once() {
        loom::model(|| {
            let h = Arc::new(WideHolders::default());
            let intent = AtomicU64::new(0);
            assert!(h.view().try_loan(id(1), &intent, 1));
            h.view().add([id(40), id(200)]);
            let ts: Vec<_> = [id(40), id(200)]
                .into_iter()
                .map(|r| {
                    let h = h.clone();
                    loom::thread::spawn(move || h.view().release(r) == Released::Freed)
                })
                .collect();
            let mut freed = usize::from(h.view().release(id(1)) == Released::Freed);
            for t in ts {
                freed += usize::from(t.join().unwrap());
            }
            assert_eq!(freed, 1);
            assert!(h.view().is_free());
        });
    }

    /// The broker repairs summary bit k while a live releaser of word k is
    /// between its two steps and a direct holder releases: one frees.
    #[test]
    fn repair_races_a_live_releaser() {
        loom::model(|| {
            let h = Arc::new(WideHolders::default());
            let intent = AtomicU64::new(0);
            assert!(h.view().try_loan(id(2), &intent, 1));
            h.view().add([id(40)]);
            let k = id(40).word().unwrap();
            let h1 = h.clone();
            let releaser =
                loom::thread::spawn(move || h1.view().release(id(40)) == Released::Freed);
            let h2 = h.clone();
            let broker = loom::thread::spawn(move || {
                h2.view().repair_stale(k, || false) == Some(Released::Freed)
            });
            let mut freed = usize::from(h.view().release(id(2)) == Released::Freed);
            freed += usize::from(releaser.join().unwrap());
            freed += usize::from(broker.join().unwrap());
            assert_eq!(freed, 1);
            assert!(h.view().is_free());
        });
    }

    /// A stale summary bit k (a dead releaser) while the sole holder
    /// publishes to a receiver in word k and lets go: the repair never
    /// frees the slot under the receiver.
    #[test]
    fn repair_never_frees_under_a_publish() {
        loom::model(|| {
            let h = Arc::new(WideHolders::default());
            let intent = AtomicU64::new(0);
            let (p, dead, r) = (id(3), id(40), id(41));
            assert!(h.view().try_loan(p, &intent, 1));
            h.view().add([dead]);
            let k = dead.word().unwrap();
            // `dead` died after its first step: word k empty, summary stale.
            h.ext[k].fetch_and(!dead.bit(), Ordering::AcqRel);
            let h2 = h.clone();
            let broker = loom::thread::spawn(move || h2.view().repair_stale(k, || false));
            let h3 = h.clone();
            let publisher =
                loom::thread::spawn(move || h3.view().hand_over(p, [r]) == Released::Freed);
            let freed_by_publish = publisher.join().unwrap();
            let repaired = broker.join().unwrap();
            assert!(!freed_by_publish);
            assert_ne!(repaired, Some(Released::Freed), "freed under the receiver");
            assert!(h.view().holds(r) && !h.view().is_free());
            assert_eq!(h.view().release(r), Released::Freed);
        });
    }

    /// An extension-bit loan in flight is never mistaken for a stale bit.
    #[test]
    fn repair_skips_a_loan_in_flight() {
        loom::model(|| {
            let h = Arc::new(WideHolders::default());
            let intent = Arc::new(AtomicU64::new(0));
            let loaner = id(300);
            let k = loaner.word().unwrap();
            let (h1, i1) = (h.clone(), intent.clone());
            let t = loom::thread::spawn(move || h1.view().try_loan(loaner, &i1, 5));
            let (h2, i2) = (h.clone(), intent.clone());
            // Both sides on spawned threads: with the repair on the model's
            // main thread, loom explored a single interleaving here and
            // missed the read-order bug below.
            let b = loom::thread::spawn(move || {
                h2.view().repair_stale(k, || i2.load(Ordering::SeqCst) != 0)
            });
            let loaned = t.join().unwrap();
            let repaired = b.join().unwrap();
            assert!(loaned);
            assert_eq!(repaired, None, "a live loan was repaired away");
            assert!(h.view().only(loaner));
        });
    }

    /// Rule 2's pinned setter: the broker adds a late joiner in word k
    /// under its custody pin while the last other holder of word k
    /// releases (rule 1). The joiner's bit never ends without its summary
    /// bit, and after the pin and the joiner go, the slot is free once.
    #[test]
    fn a_pinned_setter_races_a_releaser_of_the_same_word() {
        loom::model(|| {
            let h = Arc::new(WideHolders::default());
            let intent = AtomicU64::new(0);
            let (custody, other, joiner) = (id(0), id(40), id(41));
            assert!(h.view().try_loan(id(3), &intent, 1));
            h.view().hand_over(id(3), [other]);
            assert!(h.view().pin_if_held(custody));
            let h1 = h.clone();
            let releaser = loom::thread::spawn(move || h1.view().release(other) == Released::Freed);
            let h2 = h.clone();
            let broker = loom::thread::spawn(move || {
                h2.view().add([joiner]);
                h2.view().release(custody) == Released::Freed
            });
            let mut freed = usize::from(releaser.join().unwrap());
            freed += usize::from(broker.join().unwrap());
            assert_eq!(freed, 0, "freed under the joiner");
            let s = h.view().snapshot();
            assert!(s.holds(joiner), "the joiner's bit lost its summary bit");
            assert_eq!(h.view().release(joiner), Released::Freed);
            assert!(h.view().is_free());
        });
    }
}
