//! Deterministic payloads: every byte of the tensor with sequence `seq` of
//! producer incarnation `inc` (and its length) follows from `(inc, seq)`,
//! so any receiver can check every byte without being told what was sent.

/// splitmix64: a tiny, good-enough PRNG (also the orchestrator's RNG).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn stream(inc: u32, seq: u64) -> Rng {
    let mut r = Rng::new((u64::from(inc) << 40) ^ seq ^ 0x005e_ed0f_7e45_0b05);
    r.next_u64();
    r
}

/// Payload length of `(inc, seq)`: half the tensors fit the small pool
/// (at most 1 KiB), the rest go up to 8 KiB.
pub fn len(inc: u32, seq: u64) -> usize {
    let mut r = stream(inc, seq);
    let x = r.next_u64();
    if x & 1 == 0 {
        16 + (x >> 1) as usize % (1024 - 16 + 1)
    } else {
        1025 + (x >> 1) as usize % (8192 - 1025 + 1)
    }
}

/// Fills `out` (of [`len`] bytes) with the payload of `(inc, seq)`.
pub fn fill(inc: u32, seq: u64, out: &mut [u8]) {
    let mut r = stream(inc, seq);
    r.next_u64(); // the length draw
    for chunk in out.chunks_mut(8) {
        let z = r.next_u64().to_le_bytes();
        chunk.copy_from_slice(&z[..chunk.len()]);
    }
}

/// FNV-1a 64 of `bytes`, each byte minus `delta` first.
pub fn checksum(bytes: &[u8], delta: u8) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b.wrapping_sub(delta))).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The user header of a tensor: checksum of the original payload, `seq`, `inc`.
pub fn header(sum: u64, seq: u64, inc: u32) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(&sum.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..].copy_from_slice(&u64::from(inc).to_le_bytes());
    h
}

/// Parses a user header into `(checksum, seq, inc)`; `None` if malformed.
pub fn parse_header(h: &[u8]) -> Option<(u64, u64, u32)> {
    let word = |r: std::ops::Range<usize>| -> Option<u64> {
        Some(u64::from_le_bytes(h.get(r)?.try_into().ok()?))
    };
    if h.len() != 24 {
        return None;
    }
    let inc = u32::try_from(word(16..24)?).ok()?;
    Some((word(0..8)?, word(8..16)?, inc))
}

/// Checks a received tensor: header well formed, length and every byte as
/// `(inc, seq)` dictates (each byte plus `delta`, the stages' change), and
/// the header checksum matches. Returns `(ok, seq, inc)` (`seq`/`inc` are 0
/// when the header is unreadable).
pub fn verify(user_header: &[u8], payload: &[u8], delta: u8) -> (bool, u64, u32) {
    let Some((sum, seq, inc)) = parse_header(user_header) else {
        return (false, 0, 0);
    };
    if payload.len() != len(inc, seq) {
        return (false, seq, inc);
    }
    let mut r = stream(inc, seq);
    r.next_u64();
    let bytes_ok = payload.chunks(8).all(|chunk| {
        let z = r.next_u64().to_le_bytes();
        chunk
            .iter()
            .zip(z)
            .all(|(&got, want)| got == want.wrapping_add(delta))
    });
    (bytes_ok && checksum(payload, delta) == sum, seq, inc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_verify() {
        for seq in 0..50 {
            let n = len(3, seq);
            assert!((16..=8192).contains(&n));
            let mut buf = vec![0u8; n];
            fill(3, seq, &mut buf);
            let h = header(checksum(&buf, 0), seq, 3);
            assert_eq!(verify(&h, &buf, 0), (true, seq, 3));
            let plus1: Vec<u8> = buf.iter().map(|b| b.wrapping_add(1)).collect();
            assert_eq!(verify(&h, &plus1, 1), (true, seq, 3));
            assert!(!verify(&h, &plus1, 0).0);
            buf[n / 2] ^= 1;
            assert!(!verify(&h, &buf, 0).0);
        }
        assert_eq!(verify(b"short", &[], 0), (false, 0, 0));
    }
}
