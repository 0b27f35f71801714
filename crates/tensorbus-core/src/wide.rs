//! A holder word for more than 64 holders (issue 16, a prototype: the data
//! path does not use it yet; docs/design.md "Toward 1,024 handles" explains
//! the scheme and what is left before it can be wired in).
//!
//! Word 0 is `version:16 | summary:16 | direct:32`; sixteen extension words
//! of 64 bits follow. A holder id below 32 is a direct bit of word 0; id
//! `32 + 64k + b` is bit `b` of extension word `k`, and while word `k` has any
//! bit set, summary bit `k` of word 0 is set. "Free" is decided on word 0
//! alone: whoever turns its summary and direct bits to zero frees.
//!
//! Rules (each argued where it is implemented):
//! 1. A releaser in extension word `k` clears its bit there; if that emptied
//!    the word it clears summary bit `k` with a CAS that bumps the version.
//!    Clearing a summary bit is idempotent, so a repairer may do the second
//!    step for a releaser that died between the two: exactly one CAS clears
//!    the bit, and only its author may free.
//! 2. Bits are only *set* by the slot's sole holder (a loan, a publish, a
//!    forward), extension bits before their summary bit, and every summary
//!    change bumps the version. A repair of a stale summary bit (`summary k`
//!    set, word `k` zero) CASes word 0 from the value it read before it read
//!    word `k`, so a publish that set bits in word `k` meanwhile makes it fail.
//! 3. An extension-bit loan names the slot in the loaner's `loan_intent`
//!    before its CAS on word 0 and clears it after setting its bit; a repair
//!    skips slots that a live loaner names.
//! 4. The version never restarts (frees keep it), so a free and a new loan
//!    between a repair's read and its CAS cannot look unchanged.

use crate::slot::Released;
use crate::sync::{AtomicU64, Ordering};

/// Direct holder bits in word 0.
pub const DIRECT_BITS: u16 = 32;
/// Extension words.
pub const EXT_WORDS: usize = 16;
/// Holder ids there are: 32 direct, 1,024 in extension words.
pub const MAX_HOLDER_IDS: usize = DIRECT_BITS as usize + EXT_WORDS * 64;

const DIRECT_MASK: u64 = (1 << 32) - 1;
const SUMMARY_SHIFT: u32 = 32;
const SUMMARY_MASK: u64 = 0xFFFF << SUMMARY_SHIFT;
const HOLDERS_MASK: u64 = DIRECT_MASK | SUMMARY_MASK;
const VERSION_ONE: u64 = 1 << 48;

/// One holder's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HolderId(u16);

impl HolderId {
    /// The holder id `n`, if below [`MAX_HOLDER_IDS`].
    pub fn new(n: u16) -> Option<HolderId> {
        (usize::from(n) < MAX_HOLDER_IDS).then_some(HolderId(n))
    }
    /// `Some(k)` for a bit of extension word `k`, `None` for a direct bit.
    pub fn word(self) -> Option<usize> {
        self.0.checked_sub(DIRECT_BITS).map(|x| usize::from(x) / 64)
    }
    /// The bit within its word.
    pub fn bit(self) -> u64 {
        match self.0.checked_sub(DIRECT_BITS) {
            None => 1 << self.0,
            Some(x) => 1 << (x % 64),
        }
    }
}

fn summary_bit(k: usize) -> u64 {
    1 << (SUMMARY_SHIFT + (k as u32 & 15))
}

/// Word 0 and the extension words of one slot.
#[derive(Debug, Default)]
pub struct WideHolders {
    word0: AtomicU64,
    ext: [AtomicU64; EXT_WORDS],
}

impl WideHolders {
    /// Whether nobody holds the slot.
    pub fn is_free(&self) -> bool {
        self.word0.load(Ordering::Acquire) & HOLDERS_MASK == 0
    }

    /// Whether `id` holds the slot.
    pub fn holds(&self, id: HolderId) -> bool {
        match id.word() {
            None => self.word0.load(Ordering::Acquire) & id.bit() != 0,
            Some(k) => self.ext[k].load(Ordering::Acquire) & id.bit() != 0,
        }
    }

    /// Whether `id` is the only holder (a stage's exclusivity check). Two
    /// loads are enough: while `id` holds, nobody else may add holders
    /// (rule 2), so holders only leave between them.
    pub fn only(&self, id: HolderId) -> bool {
        let w = self.word0.load(Ordering::Acquire) & HOLDERS_MASK;
        match id.word() {
            None => w == id.bit(),
            Some(k) => w == summary_bit(k) && self.ext[k].load(Ordering::Acquire) == id.bit(),
        }
    }

    /// Loans the slot for `id` if it is free. An extension-bit loan stores
    /// `tag` (non-zero: which slot) in `loan_intent` first and 0 after
    /// (rule 3); a direct-bit loan does not touch it.
    pub fn try_loan(&self, id: HolderId, loan_intent: &AtomicU64, tag: u64) -> bool {
        match id.word() {
            None => {
                let mut w = self.word0.load(Ordering::Relaxed);
                loop {
                    if w & HOLDERS_MASK != 0 {
                        return false;
                    }
                    // Acquire on success: the previous holders' payload work
                    // happens-before ours (their releases are Release RMWs).
                    match self.word0.compare_exchange_weak(
                        w,
                        w | id.bit(),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return true,
                        Err(a) => w = a,
                    }
                }
            }
            Some(k) => {
                // SeqCst: a repairer that reads our CAS's result also reads
                // this intent (rule 3), whatever it reads in between.
                loan_intent.store(tag, Ordering::SeqCst);
                let mut w = self.word0.load(Ordering::Relaxed);
                let won = loop {
                    if w & HOLDERS_MASK != 0 {
                        break false;
                    }
                    let next = (w | summary_bit(k)).wrapping_add(VERSION_ONE);
                    match self.word0.compare_exchange_weak(
                        w,
                        next,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break true,
                        Err(a) => w = a,
                    }
                };
                if won {
                    self.ext[k].fetch_or(id.bit(), Ordering::Release);
                }
                loan_intent.store(0, Ordering::Release);
                won
            }
        }
    }

    /// Adds `receivers` as holders (by the sole holder, who keeps its own
    /// hold: a work-queue publish until its worker is chosen).
    pub fn add_holders(&self, receivers: &[HolderId]) {
        self.set_holders(receivers, 0);
    }

    /// Adds `receivers` as holders and lets go of `own` (a broadcast publish
    /// by the sole holder `own`; precondition: `own` is not among
    /// `receivers`). Returns what `own`'s release did ([`Released::Freed`]
    /// only when `receivers` is empty).
    pub fn hand_over(&self, own: HolderId, receivers: &[HolderId]) -> Released {
        match own.word() {
            None => self.set_holders(receivers, own.bit()),
            Some(_) => {
                self.set_holders(receivers, 0);
                self.release(own)
            }
        }
    }

    /// Extension bits first, then one CAS on word 0 that sets the direct and
    /// summary bits (bumping the version when a summary bit is involved) and
    /// clears the direct bits `clear`. Returns what clearing `clear` did.
    fn set_holders(&self, receivers: &[HolderId], clear: u64) -> Released {
        let mut direct = 0u64;
        let mut summary = 0u64;
        for r in receivers {
            match r.word() {
                None => direct |= r.bit(),
                Some(k) => {
                    // Release: part of handing over the payload we wrote.
                    self.ext[k].fetch_or(r.bit(), Ordering::Release);
                    summary |= summary_bit(k);
                }
            }
        }
        let mut w = self.word0.load(Ordering::Relaxed);
        loop {
            let mut next = (w | direct | summary) & !clear;
            if summary != 0 {
                next = next.wrapping_add(VERSION_ONE);
            }
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

    /// Clears `id`'s hold. The last holder to leave gets [`Released::Freed`].
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
            Some(k) => {
                let before = self.ext[k].fetch_and(!id.bit(), Ordering::AcqRel);
                if before & id.bit() == 0 {
                    Released::NotHeld
                } else if before != id.bit() {
                    Released::StillHeld
                } else {
                    // We emptied word k: clear its summary bit (rule 1).
                    self.clear_summary(k).unwrap_or(Released::StillHeld)
                }
            }
        }
    }

    /// Clears summary bit `k` (bumping the version). `None` if it was clear
    /// already (another party did it: that party decides about freeing).
    fn clear_summary(&self, k: usize) -> Option<Released> {
        let mut w = self.word0.load(Ordering::Acquire);
        loop {
            if w & summary_bit(k) == 0 {
                return None;
            }
            let next = (w & !summary_bit(k)).wrapping_add(VERSION_ONE);
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
        if loan_in_flight() || self.ext[k & 15].load(Ordering::SeqCst) != 0 {
            return None;
        }
        let next = (w & !summary_bit(k)).wrapping_add(VERSION_ONE);
        // From the value read before word k (rule 2): a publish that set
        // bits in word k since bumped the version, and this fails.
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
        assert_eq!((id(31).word(), id(31).bit()), (None, 1 << 31));
        assert_eq!((id(32).word(), id(32).bit()), (Some(0), 1));
        assert_eq!(
            (id(32 + 64 * 15 + 63).word(), id(32 + 64 * 15 + 63).bit()),
            (Some(15), 1 << 63)
        );
        assert!(HolderId::new(MAX_HOLDER_IDS as u16).is_none());
    }

    /// 1,000 holders over every word: the slot is free after the last
    /// release and not before, and exactly one release frees it.
    #[test]
    fn a_thousand_holders_leave_and_exactly_one_frees() {
        let h = WideHolders::default();
        let intent = AtomicU64::new(0);
        let producer = id(40);
        assert!(h.try_loan(producer, &intent, 7));
        assert!(!h.try_loan(id(3), &intent, 7), "loaned twice");
        let receivers: Vec<HolderId> = (0..1000u16).filter(|&n| n != 40).map(id).collect();
        assert_eq!(h.hand_over(producer, &receivers), Released::StillHeld);
        assert!(!h.holds(producer));
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
    }

    /// Death after every step of an extension release, then the broker's
    /// repair: the slot ends free exactly once, with the other holder's
    /// release.
    #[test]
    fn death_mid_release_is_repaired() {
        for die_after_first_step in [false, true] {
            let h = WideHolders::default();
            let intent = AtomicU64::new(0);
            let (a, b) = (id(100), id(5));
            assert!(h.try_loan(b, &intent, 1));
            h.add_holders(&[a]);
            // `a` dies: after its first step, or before any.
            let k = a.word().unwrap();
            if die_after_first_step {
                h.ext[k].fetch_and(!a.bit(), Ordering::AcqRel);
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
        let h = WideHolders::default();
        let k = id(500).word().unwrap();
        // The CAS of an extension loan, without its bit (the loaner died).
        h.word0.fetch_or(summary_bit(k), Ordering::AcqRel);
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
            assert!(h.try_loan(id(1), &intent, 1));
            h.add_holders(&[id(40), id(200)]);
            let ts: Vec<_> = [id(40), id(200)]
                .into_iter()
                .map(|r| {
                    let h = h.clone();
                    loom::thread::spawn(move || h.release(r) == Released::Freed)
                })
                .collect();
            let mut freed = usize::from(h.release(id(1)) == Released::Freed);
            for t in ts {
                freed += usize::from(t.join().unwrap());
            }
            assert_eq!(freed, 1);
            assert!(h.is_free());
        });
    }

    /// The broker repairs summary bit k while a live releaser of word k is
    /// between its two steps and a direct holder releases: one frees.
    #[test]
    fn repair_races_a_live_releaser() {
        loom::model(|| {
            let h = Arc::new(WideHolders::default());
            let intent = AtomicU64::new(0);
            assert!(h.try_loan(id(2), &intent, 1));
            h.add_holders(&[id(40)]);
            let k = id(40).word().unwrap();
            let h1 = h.clone();
            let releaser = loom::thread::spawn(move || h1.release(id(40)) == Released::Freed);
            let h2 = h.clone();
            let broker =
                loom::thread::spawn(move || h2.repair_stale(k, || false) == Some(Released::Freed));
            let mut freed = usize::from(h.release(id(2)) == Released::Freed);
            freed += usize::from(releaser.join().unwrap());
            freed += usize::from(broker.join().unwrap());
            assert_eq!(freed, 1);
            assert!(h.is_free());
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
            assert!(h.try_loan(p, &intent, 1));
            h.add_holders(&[dead]);
            let k = dead.word().unwrap();
            // `dead` died after its first step: word k empty, summary stale.
            h.ext[k].fetch_and(!dead.bit(), Ordering::AcqRel);
            let h2 = h.clone();
            let broker = loom::thread::spawn(move || h2.repair_stale(k, || false));
            let h3 = h.clone();
            let publisher = loom::thread::spawn(move || h3.hand_over(p, &[r]) == Released::Freed);
            let freed_by_publish = publisher.join().unwrap();
            let repaired = broker.join().unwrap();
            assert!(!freed_by_publish);
            assert_ne!(repaired, Some(Released::Freed), "freed under the receiver");
            assert!(h.holds(r) && !h.is_free());
            assert_eq!(h.release(r), Released::Freed);
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
            let t = loom::thread::spawn(move || h1.try_loan(loaner, &i1, 5));
            let (h2, i2) = (h.clone(), intent.clone());
            // Both sides on spawned threads: with the repair on the model's
            // main thread, loom explored a single interleaving here and
            // missed the read-order bug below.
            let b =
                loom::thread::spawn(move || h2.repair_stale(k, || i2.load(Ordering::SeqCst) != 0));
            let loaned = t.join().unwrap();
            let repaired = b.join().unwrap();
            assert!(loaned);
            assert_eq!(repaired, None, "a live loan was repaired away");
            assert!(h.only(loaner));
        });
    }
}
