//! The wire format of a bridged tensor: the Zenoh sample's payload is the
//! tensor's bytes exactly as they lie in the slot (`nbytes` of them, the
//! strides describe how to read them), and its attachment is the header
//! below. Everything is little-endian; docs/bridge.md documents it byte by
//! byte for decoders that do not use this crate (the Python interop test
//! decodes it with `struct` and numpy alone).
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `TBZT` (0x54 0x42 0x5A 0x54) |
//! | 4 | 1 | version, 1 |
//! | 5 | 1 | encoding: bits 0-3 transform (0 none, 1 int8, 2 f16), bits 4-7 compression (0 none, 1 lz4) |
//! | 6 | 1 | dtype code (tensorbus's codes, 1 = bool ... 13 = f64) |
//! | 7 | 1 | ndim, 0..=8 |
//! | 8 | 8 | nbytes: u64, the payload's length |
//! | 16 | 8 | seq: u64, the origin producer's sequence number |
//! | 24 | 8 | timestamp_ns: u64, the origin's CLOCK_MONOTONIC at publish |
//! | 32 | 4 | producer: u32, the origin's client id |
//! | 36 | 1 | user_len, 0..=64 |
//! | 37 | 3 | reserved, zero |
//! | 40 | 8 | sent_ns: u64, CLOCK_REALTIME at the exporting bridge's put |
//! | 48 | 4 × ndim | shape, u32 each |
//! | 48 + 4 × ndim | 8 × ndim | strides in bytes, i64 each |
//! | 48 + 12 × ndim | user_len | user header |
//! | 48 + 12 × ndim + user_len | 8 if int8 | f32 scale, i32 zero point |
//!
//! The attachment is exactly `48 + 12 × ndim + user_len` bytes long, plus 8
//! for the int8 transform. See [`crate::encoding`] for the encodings.

use crate::encoding;
use std::fmt;
use tensorbus::{DType, TensorMeta, MAX_DIMS, USER_HEADER_LEN};

/// The attachment's first four bytes.
pub const MAGIC: [u8; 4] = *b"TBZT";
/// The version this crate writes and reads.
pub const VERSION: u8 = 1;
/// The length of the attachment's fixed part (before shape, strides and
/// user header).
pub const FIXED_LEN: usize = 48;
/// The longest attachment there is (8 dimensions, a full user header).
pub const MAX_LEN: usize = FIXED_LEN + 12 * MAX_DIMS + USER_HEADER_LEN + 8;

/// Payload encoding 0: the tensor's bytes as they are.
pub const ENCODING_RAW: u8 = 0;

/// What the attachment says about one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The tensor's metadata as the origin published it (dtype, shape,
    /// strides, nbytes, seq, timestamp, producer, user header).
    pub meta: TensorMeta,
    /// CLOCK_REALTIME nanoseconds when the exporting bridge sent it.
    pub sent_ns: u64,
    /// The payload's encoding byte (0: the tensor's bytes as they are).
    pub encoding: u8,
    /// Transform parameters (int8: f32 scale, i32 zero point; else zero).
    pub params: [u8; 8],
}

/// Why an attachment (or a payload against it) was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// No attachment came with the sample.
    Missing,
    /// Fewer bytes than the header needs, or more than it describes.
    Length {
        /// Bytes the header describes (or at least needs).
        expected: usize,
        /// Bytes there were.
        got: usize,
    },
    /// The first four bytes are not `TBZT`.
    Magic([u8; 4]),
    /// A version this bridge does not read.
    Version(u8),
    /// A payload encoding this bridge does not read.
    Encoding(u8),
    /// Not a tensorbus dtype code.
    DType(u8),
    /// More than 8 dimensions.
    Ndim(u8),
    /// A user header longer than 64 bytes.
    UserLen(u8),
    /// Reserved bytes that are not zero.
    Reserved,
    /// Shape and strides that do not fit in `nbytes` (or overflow).
    Shape(String),
    /// The payload's length is not the header's `nbytes`.
    Payload {
        /// `nbytes` of the header.
        expected: u64,
        /// The payload's length.
        got: u64,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Missing => write!(f, "no attachment (not a tensorbus sample)"),
            WireError::Length { expected, got } => {
                write!(f, "attachment is {got} bytes, the header needs {expected}")
            }
            WireError::Magic(m) => write!(f, "bad magic {m:02x?} (want \"TBZT\")"),
            WireError::Version(v) => write!(f, "unknown version {v} (this bridge reads {VERSION})"),
            WireError::Encoding(e) => write!(f, "unknown payload encoding {e}"),
            WireError::DType(c) => write!(f, "unknown dtype code {c}"),
            WireError::Ndim(n) => write!(f, "{n} dimensions (at most {MAX_DIMS})"),
            WireError::UserLen(n) => {
                write!(f, "user header of {n} bytes (at most {USER_HEADER_LEN})")
            }
            WireError::Reserved => write!(f, "reserved bytes are not zero"),
            WireError::Shape(e) => write!(f, "shape does not fit: {e}"),
            WireError::Payload { expected, got } => {
                write!(f, "payload is {got} bytes, the header says {expected}")
            }
        }
    }
}

impl std::error::Error for WireError {}

/// Encodes the attachment of a tensor with metadata `meta`, sent at
/// `sent_ns` (CLOCK_REALTIME nanoseconds), payload raw.
pub fn encode(meta: &TensorMeta, sent_ns: u64) -> Vec<u8> {
    encode_with(meta, sent_ns, ENCODING_RAW, &[])
}

/// [`encode`] with an encoding byte and its transform parameters (`meta`
/// describes the tensor the receiver gets).
pub fn encode_with(meta: &TensorMeta, sent_ns: u64, enc: u8, params: &[u8]) -> Vec<u8> {
    let ndim = usize::from(meta.ndim).min(MAX_DIMS);
    let user = meta.user_header();
    let mut out = Vec::with_capacity(FIXED_LEN + 12 * ndim + user.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(enc);
    out.push(meta.dtype.code());
    out.push(ndim as u8);
    out.extend_from_slice(&meta.nbytes.to_le_bytes());
    out.extend_from_slice(&meta.seq.to_le_bytes());
    out.extend_from_slice(&meta.timestamp_ns.to_le_bytes());
    out.extend_from_slice(&meta.producer.to_le_bytes());
    out.push(user.len() as u8);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&sent_ns.to_le_bytes());
    for &extent in &meta.shape[..ndim] {
        out.extend_from_slice(&extent.to_le_bytes());
    }
    for &stride in &meta.strides[..ndim] {
        out.extend_from_slice(&stride.to_le_bytes());
    }
    out.extend_from_slice(user);
    out.extend_from_slice(&params[..encoding::params_len(enc).min(params.len())]);
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Decodes and validates an attachment: every field in range, the length
/// exact, and shape and strides within `nbytes`. Never panics, whatever
/// the bytes.
pub fn decode(b: &[u8]) -> Result<Header, WireError> {
    if b.len() < FIXED_LEN {
        return Err(WireError::Length {
            expected: FIXED_LEN,
            got: b.len(),
        });
    }
    let magic = [b[0], b[1], b[2], b[3]];
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    if b[4] != VERSION {
        return Err(WireError::Version(b[4]));
    }
    let enc = b[5];
    if !encoding::known(enc) {
        return Err(WireError::Encoding(enc));
    }
    let dtype = DType::from_code(b[6]).ok_or(WireError::DType(b[6]))?;
    let ndim = b[7];
    if usize::from(ndim) > MAX_DIMS {
        return Err(WireError::Ndim(ndim));
    }
    let user_len = b[36];
    if usize::from(user_len) > USER_HEADER_LEN {
        return Err(WireError::UserLen(user_len));
    }
    if b[37..40] != [0, 0, 0] {
        return Err(WireError::Reserved);
    }
    let n = usize::from(ndim);
    let expected = FIXED_LEN + 12 * n + usize::from(user_len) + encoding::params_len(enc);
    if b.len() != expected {
        return Err(WireError::Length {
            expected,
            got: b.len(),
        });
    }
    let mut meta = TensorMeta::EMPTY;
    meta.dtype = dtype;
    meta.ndim = ndim;
    meta.nbytes = u64_at(b, 8);
    meta.seq = u64_at(b, 16);
    meta.timestamp_ns = u64_at(b, 24);
    meta.producer = u32_at(b, 32);
    let sent_ns = u64_at(b, 40);
    for axis in 0..n {
        meta.shape[axis] = u32_at(b, FIXED_LEN + 4 * axis);
        meta.strides[axis] = u64_at(b, FIXED_LEN + 4 * n + 8 * axis) as i64;
    }
    let user_at = FIXED_LEN + 12 * n;
    meta.set_user_header(&b[user_at..user_at + usize::from(user_len)])
        .map_err(|e| WireError::Shape(e.to_string()))?;
    meta.validate(meta.nbytes)
        .map_err(|e| WireError::Shape(e.to_string()))?;
    let transform = encoding::transform(enc);
    if transform != encoding::TRANSFORM_NONE
        && (dtype != DType::F32 || !meta.is_contiguous() || meta.nbytes != meta.numel() * 4)
    {
        return Err(WireError::Shape(
            "a quantized payload must describe a C-contiguous f32 tensor".into(),
        ));
    }
    let mut params = [0u8; 8];
    let p = user_at + usize::from(user_len);
    let plen = encoding::params_len(enc);
    params[..plen].copy_from_slice(&b[p..p + plen]);
    Ok(Header {
        meta,
        sent_ns,
        encoding: enc,
        params,
    })
}

/// Checks that a payload of `len` bytes is what `header` describes
/// (compressed payloads: only that they are not empty where the tensor is
/// not; decompression checks the rest).
pub fn check_payload(header: &Header, len: usize) -> Result<(), WireError> {
    let expected = encoding::transformed_len(header.encoding, &header.meta);
    let ok = if encoding::compression(header.encoding) != 0 {
        len > 0 || expected == 0
    } else {
        len as u64 == expected
    };
    if !ok {
        return Err(WireError::Payload {
            expected,
            got: len as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_meta() -> TensorMeta {
        let mut m = TensorMeta::contiguous(DType::F32, &[3, 4]).unwrap();
        // A transposed view: strides (4, 12) over the same 48 bytes.
        m.strides[0] = 4;
        m.strides[1] = 12;
        m.seq = 77;
        m.timestamp_ns = 123_456_789;
        m.producer = 5;
        m.set_user_header(b"frame=9").unwrap();
        m
    }

    #[test]
    fn round_trip() {
        let m = sample_meta();
        let b = encode(&m, 42);
        assert_eq!(b.len(), FIXED_LEN + 24 + 7);
        let h = decode(&b).unwrap();
        assert_eq!(h.meta, m);
        assert_eq!(h.sent_ns, 42);
        check_payload(&h, 48).unwrap();
        assert!(matches!(
            check_payload(&h, 47),
            Err(WireError::Payload { .. })
        ));
    }

    #[test]
    fn every_dtype_and_rank_round_trips() {
        for dtype in DType::ALL {
            for ndim in 0..=MAX_DIMS {
                let shape: Vec<u32> = (0..ndim as u32).map(|i| i % 3 + 1).collect();
                let mut m = TensorMeta::contiguous(dtype, &shape).unwrap();
                m.set_user_header(&[0xab; USER_HEADER_LEN]).unwrap();
                m.seq = u64::MAX;
                let h = decode(&encode(&m, u64::MAX)).unwrap();
                assert_eq!(h.meta, m, "{dtype} ndim {ndim}");
            }
        }
    }

    /// The layout is the documented one, byte for byte.
    #[test]
    fn layout_is_documented_one() {
        let b = encode(&sample_meta(), 0x0102_0304_0506_0708);
        assert_eq!(&b[0..4], b"TBZT");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 0);
        assert_eq!(b[6], DType::F32.code());
        assert_eq!(b[7], 2);
        assert_eq!(b[8..16], 48u64.to_le_bytes());
        assert_eq!(b[16..24], 77u64.to_le_bytes());
        assert_eq!(b[24..32], 123_456_789u64.to_le_bytes());
        assert_eq!(b[32..36], 5u32.to_le_bytes());
        assert_eq!(b[36], 7);
        assert_eq!(b[37..40], [0, 0, 0]);
        assert_eq!(b[40..48], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b[48..52], 3u32.to_le_bytes());
        assert_eq!(b[52..56], 4u32.to_le_bytes());
        assert_eq!(b[56..64], 4i64.to_le_bytes());
        assert_eq!(b[64..72], 12i64.to_le_bytes());
        assert_eq!(&b[72..], b"frame=9");
    }

    #[test]
    fn malformed_headers_are_errors() {
        let good = encode(&sample_meta(), 0);
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        cases.push((Vec::new(), "empty"));
        cases.push((good[..good.len() - 1].to_vec(), "short"));
        let mut long = good.clone();
        long.push(0);
        cases.push((long, "long"));
        let mut bad = good.clone();
        bad[0] = b'X';
        cases.push((bad, "magic"));
        let mut bad = good.clone();
        bad[4] = 2;
        cases.push((bad, "version"));
        let mut bad = good.clone();
        bad[5] = 9;
        cases.push((bad, "encoding"));
        let mut bad = good.clone();
        bad[5] = 0x20;
        cases.push((bad, "compression"));
        // int8 without its 8 parameter bytes.
        let mut bad = good.clone();
        bad[5] = 1;
        cases.push((bad, "int8 params"));
        // A transform on a strided tensor (sample_meta is transposed).
        let mut bad = good.clone();
        bad[5] = 2;
        cases.push((bad, "f16 of strided"));
        let mut bad = good.clone();
        bad[6] = 0;
        cases.push((bad, "dtype 0"));
        let mut bad = good.clone();
        bad[6] = 14;
        cases.push((bad, "dtype 14"));
        let mut bad = good.clone();
        bad[7] = 9;
        cases.push((bad, "ndim"));
        let mut bad = good.clone();
        bad[36] = 65;
        cases.push((bad, "user_len"));
        let mut bad = good.clone();
        bad[38] = 1;
        cases.push((bad, "reserved"));
        // nbytes smaller than the strided span.
        let mut bad = good.clone();
        bad[8..16].copy_from_slice(&47u64.to_le_bytes());
        cases.push((bad, "span"));
        // A negative stride.
        let mut bad = good.clone();
        bad[56..64].copy_from_slice(&(-4i64).to_le_bytes());
        cases.push((bad, "negative stride"));
        // Extents whose element count overflows 64 bits with zero strides.
        let mut m = TensorMeta::EMPTY;
        m.ndim = 8;
        m.shape = [u32::MAX; 8];
        m.strides = [0; 8];
        m.nbytes = 1;
        cases.push((encode(&m, 0), "overflow"));
        for (bytes, what) in cases {
            assert!(decode(&bytes).is_err(), "{what} was accepted");
        }
    }

    /// Random bytes, and random mutations of a good header, never panic.
    #[test]
    fn random_bytes_never_panic() {
        // xorshift64*: deterministic, no dependency.
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let good = encode(&sample_meta(), 7);
        let mut accepted = 0;
        for i in 0..200_000 {
            let bytes: Vec<u8> = if i % 2 == 0 {
                let len = (next() % (MAX_LEN as u64 + 16)) as usize;
                let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if len >= 8 && i % 4 == 0 {
                    // A plausible prefix gets the decoder past the first checks.
                    v[..4].copy_from_slice(&MAGIC);
                    v[4] = VERSION;
                    v[5] = 0;
                    v[6] = (next() % 15) as u8;
                    v[7] = (next() % 10) as u8;
                }
                v
            } else {
                let mut v = good.clone();
                for _ in 0..(next() % 4 + 1) {
                    let at = (next() as usize) % v.len();
                    v[at] = next() as u8;
                }
                if next() % 8 == 0 {
                    v.truncate((next() as usize) % (v.len() + 1));
                }
                v
            };
            if let Ok(h) = decode(&bytes) {
                // Whatever is accepted is self-consistent.
                h.meta.validate(h.meta.nbytes).unwrap();
                let params = &h.params[..encoding::params_len(h.encoding)];
                assert_eq!(
                    decode(&encode_with(&h.meta, h.sent_ns, h.encoding, params)).unwrap(),
                    h
                );
                accepted += 1;
            }
        }
        // Mutations of reserved-free fields (seq, timestamp, user bytes)
        // stay valid, so some inputs pass.
        assert!(accepted > 0);
    }
}
