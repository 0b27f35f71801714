//! The fuzz harnesses of `fuzz/` (see `fuzz_harness/mod.rs`) driven by a
//! seeded PRNG on stable Rust, so that CI runs them on every change: the
//! coverage-guided libFuzzer runs (`scripts/fuzz.sh`) are manual.
//!
//! `TB_FUZZ_ITERS=N` changes the number of inputs per target (default
//! 20,000; 40 under Miri); `TB_FUZZ_SEED=S` the seed. Not built for the
//! loom models (`--cfg loom`), where the modules it drives are compiled out.
#![cfg(not(loom))]

mod fuzz_harness;

/// xorshift64*: deterministic and dependency-free.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A word biased towards edge values.
    fn word(&mut self) -> u64 {
        match self.below(6) {
            0 => self.next(),
            1 => self.below(16),
            2 => u64::MAX - self.below(4),
            3 => 1 << self.below(64),
            4 => self.below(1 << 16),
            _ => self.below(1 << 33),
        }
    }
    /// An extent: mostly small, sometimes anything that fits 32 bits.
    fn extent(&mut self) -> u64 {
        let max = if self.below(4) == 0 { 1 << 32 } else { 9 };
        self.below(max)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn iterations() -> u64 {
    std::env::var("TB_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(miri) { 40 } else { 20_000 })
}

fn seed() -> u64 {
    std::env::var("TB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7e45_0b05_5eed_0001)
        | 1
}

/// Runs `f` on `iterations()` inputs from `gen`; on a panic, prints the
/// input (hex) so that it can be replayed with the libFuzzer target.
fn drive(name: &str, mut gen: impl FnMut(&mut Gen) -> Vec<u8>, f: fn(&[u8])) {
    let mut g = Gen(seed() ^ name.len() as u64);
    for i in 0..iterations() {
        let input = gen(&mut g);
        let r = std::panic::catch_unwind(|| f(&input));
        if let Err(e) = r {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("{name}: input #{i} failed; replay: echo {hex} | xxd -r -p > crash && cargo fuzz run {name} crash");
            std::panic::resume_unwind(e);
        }
    }
}

/// A slot header that is plausible (a known dtype, a few dimensions, small
/// extents and strides, a size near the view's span) half of the time and
/// edge-value garbage otherwise; then a shape for the round trip.
fn header_input(g: &mut Gen) -> Vec<u8> {
    let mut out = Vec::with_capacity(300);
    let big_cap = g.below(8) == 0;
    out.push(if big_cap { 0x80 } else { 0 });
    let cap = if big_cap { g.word() } else { g.below(1 << 13) };
    if big_cap {
        out.extend_from_slice(&cap.to_le_bytes());
    } else {
        out.extend_from_slice(&(cap as u32).to_le_bytes());
    }
    let mut words = [0u64; 32];
    for w in &mut words {
        *w = g.word();
    }
    if g.below(2) == 0 {
        let dtype = 1 + g.below(13);
        let ndim = g.below(10);
        let user_len = g.below(70);
        let flags = g.below(2);
        words[1] =
            (words[1] & 0xFFFF_FFFF) | ((dtype | ndim << 8 | user_len << 16 | flags << 24) << 32);
        words[2] = match g.below(3) {
            0 => g.below(cap.saturating_add(1)),
            1 => cap,
            _ => g.word(),
        };
        for w in 5..10 {
            let lo = g.extent();
            let hi = g.extent();
            words[w] = if w == 5 {
                (words[5] & 0xFFFF_FFFF) | hi << 32
            } else {
                lo | hi << 32
            };
        }
        for stride in &mut words[16..24] {
            *stride = match g.below(4) {
                0 => 0,
                1 => g.below(64),
                2 => g.below(64).wrapping_neg(),
                _ => g.word(),
            };
        }
    }
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend(g.bytes(96));
    out
}

#[test]
fn slot_header_seeded() {
    drive("slot_header", header_input, fuzz_harness::slot_header);
}

#[test]
fn descriptor_seeded() {
    drive(
        "descriptor",
        |g| {
            let n = 16 + g.below(600) as usize;
            g.bytes(n)
        },
        fuzz_harness::descriptor,
    );
}

#[test]
fn ring_seeded() {
    drive(
        "ring",
        |g| {
            let n = 4 + g.below(400) as usize;
            let mut v = g.bytes(n);
            // Half of the runs on a consistent ring (the FIFO model check).
            if v.len() > 1 {
                v[1] |= (g.below(2) as u8) & 1;
            }
            v
        },
        fuzz_harness::ring,
    );
}

/// Inputs the libFuzzer runs found (`fuzz/regressions/<target>/`), replayed
/// on every `cargo test`.
#[test]
fn fuzz_regressions_replay() {
    if cfg!(miri) {
        return; // file access needs -Zmiri-disable-isolation; the seeded runs suffice there
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    type Target = (&'static str, fn(&[u8]));
    let targets: [Target; 3] = [
        ("slot_header", fuzz_harness::slot_header),
        ("descriptor", fuzz_harness::descriptor),
        ("ring", fuzz_harness::ring),
    ];
    for (name, f) in targets {
        let Ok(entries) = std::fs::read_dir(dir.join(name)) else {
            continue;
        };
        for e in entries.flatten() {
            let input = std::fs::read(e.path()).expect("read regression input");
            f(&input);
        }
    }
}
