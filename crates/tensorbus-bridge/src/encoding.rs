//! Thin-link payload encodings: quantizing (f32 to int8 with a per-tensor
//! scale and zero point, or f32 to f16) and lz4 compression. The wire
//! header's encoding byte says which apply (docs/bridge.md, "Encodings"):
//! bits 0 to 3 the transform, bits 4 to 7 the compression.

use serde::Deserialize;
use tensorbus::{DType, TensorMeta};

/// How an export route changes f32 tensors before sending them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    /// Send the bytes as they are.
    #[default]
    None,
    /// f32 to int8: `q = clamp(round(x / scale) + zero_point, -128, 127)`,
    /// scale and zero point per tensor from its finite min and max.
    Int8,
    /// f32 to IEEE half precision (round to nearest even).
    F16,
}

/// How an export route compresses payloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// LZ4 block format (lz4_flex), without a size prefix: the header says
    /// how long the decompressed payload is.
    Lz4,
}

/// Transform code 0: none.
pub const TRANSFORM_NONE: u8 = 0;
/// Transform code 1: int8 affine (8 bytes of parameters: f32 scale, i32 zero point).
pub const TRANSFORM_INT8: u8 = 1;
/// Transform code 2: f16.
pub const TRANSFORM_F16: u8 = 2;
/// Compression code 1 (in bits 4 to 7): lz4 block.
pub const COMPRESSION_LZ4: u8 = 1;

/// The transform part of an encoding byte.
pub fn transform(encoding: u8) -> u8 {
    encoding & 0x0f
}

/// The compression part of an encoding byte.
pub fn compression(encoding: u8) -> u8 {
    encoding >> 4
}

/// Bytes of transform parameters after the user header.
pub fn params_len(encoding: u8) -> usize {
    if transform(encoding) == TRANSFORM_INT8 {
        8
    } else {
        0
    }
}

/// Whether this bridge reads the encoding byte.
pub fn known(encoding: u8) -> bool {
    transform(encoding) <= TRANSFORM_F16 && compression(encoding) <= COMPRESSION_LZ4
}

/// The payload's length before decompression: what the transform makes of
/// a tensor with metadata `meta` (the header's, which describes the tensor
/// the receiver gets: for a transform, an f32 C-contiguous one).
pub fn transformed_len(encoding: u8, meta: &TensorMeta) -> u64 {
    match transform(encoding) {
        TRANSFORM_INT8 => meta.numel(),
        TRANSFORM_F16 => meta.numel().saturating_mul(2),
        _ => meta.nbytes,
    }
}

/// What the sender made of one tensor.
pub struct Encoded {
    /// The encoding byte.
    pub encoding: u8,
    /// The metadata the receiver gets (a transform makes it C-contiguous).
    pub meta: TensorMeta,
    /// Transform parameters (after the user header).
    pub params: Vec<u8>,
    /// The payload; `None`: send the slot's bytes as they are.
    pub payload: Option<Vec<u8>>,
    /// Quantization error: the largest absolute difference and the sum of
    /// squared differences over `count` elements (zero without a transform).
    pub max_abs_err: f64,
    /// See `max_abs_err`.
    pub sum_sq_err: f64,
    /// Elements quantized.
    pub count: u64,
}

/// The f32 elements of a tensor in C order, read through its strides.
fn f32_elements(meta: &TensorMeta, bytes: &[u8]) -> Vec<f32> {
    let shape = meta.shape();
    let strides = meta.strides();
    let mut out = Vec::with_capacity(meta.numel() as usize);
    if shape.contains(&0) {
        return out;
    }
    if meta.is_contiguous() {
        for c in bytes[..meta.numel() as usize * 4].chunks_exact(4) {
            out.push(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
        return out;
    }
    let mut idx = vec![0u32; shape.len()];
    loop {
        let at: i64 = idx
            .iter()
            .zip(strides)
            .map(|(&i, &s)| i64::from(i) * s)
            .sum();
        let at = at as usize;
        out.push(f32::from_le_bytes([
            bytes[at],
            bytes[at + 1],
            bytes[at + 2],
            bytes[at + 3],
        ]));
        let mut axis = shape.len();
        loop {
            if axis == 0 {
                return out;
            }
            axis -= 1;
            idx[axis] += 1;
            if idx[axis] < shape[axis] {
                break;
            }
            idx[axis] = 0;
        }
    }
}

/// Scale and zero point for int8 from the finite min and max.
fn int8_params(x: &[f32]) -> (f32, i32) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x.iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (1.0, 0);
    }
    // The range always holds 0, so that zeros stay exact.
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let zp = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i32;
    (scale, zp)
}

fn quantize_int8(v: f32, scale: f32, zp: i32) -> i8 {
    if v.is_nan() {
        return zp as i8;
    }
    ((v / scale).round() + zp as f32).clamp(-128.0, 127.0) as i8
}

fn dequantize_int8(q: i8, scale: f32, zp: i32) -> f32 {
    (i32::from(q) - zp) as f32 * scale
}

/// Encodes one tensor for a route: a transform applies to f32 tensors only
/// (others travel as they are), then compression if asked.
pub fn encode(meta: &TensorMeta, bytes: &[u8], q: Quantize, c: Compression) -> Encoded {
    let mut enc = Encoded {
        encoding: 0,
        meta: *meta,
        params: Vec::new(),
        payload: None,
        max_abs_err: 0.0,
        sum_sq_err: 0.0,
        count: 0,
    };
    if q != Quantize::None && meta.dtype == DType::F32 {
        let x = f32_elements(meta, bytes);
        let mut m = TensorMeta::contiguous(DType::F32, meta.shape()).unwrap_or(*meta);
        m.user = meta.user;
        m.user_len = meta.user_len;
        m.seq = meta.seq;
        m.timestamp_ns = meta.timestamp_ns;
        m.producer = meta.producer;
        enc.meta = m;
        let mut err = |a: f32, b: f32| {
            if a.is_finite() && b.is_finite() {
                let d = f64::from(a) - f64::from(b);
                enc.max_abs_err = enc.max_abs_err.max(d.abs());
                enc.sum_sq_err += d * d;
                enc.count += 1;
            }
        };
        let out = match q {
            Quantize::Int8 => {
                let (scale, zp) = int8_params(&x);
                enc.encoding = TRANSFORM_INT8;
                enc.params.extend_from_slice(&scale.to_le_bytes());
                enc.params.extend_from_slice(&zp.to_le_bytes());
                x.iter()
                    .map(|&v| {
                        let qv = quantize_int8(v, scale, zp);
                        err(v, dequantize_int8(qv, scale, zp));
                        qv as u8
                    })
                    .collect::<Vec<u8>>()
            }
            _ => {
                enc.encoding = TRANSFORM_F16;
                let mut out = Vec::with_capacity(x.len() * 2);
                for &v in &x {
                    let h = half::f16::from_f32(v);
                    err(v, h.to_f32());
                    out.extend_from_slice(&h.to_le_bytes());
                }
                out
            }
        };
        enc.payload = Some(out);
    }
    if c == Compression::Lz4 {
        enc.encoding |= COMPRESSION_LZ4 << 4;
        let src: &[u8] = enc.payload.as_deref().unwrap_or(bytes);
        enc.payload = Some(lz4_flex::block::compress(src));
    }
    enc
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes the tensor that `payload` encodes into `dst` (the slot's
/// `meta.nbytes` bytes). `params` are the header's transform parameters.
pub fn decode_into(
    encoding: u8,
    params: &[u8],
    meta: &TensorMeta,
    payload: &[u8],
    dst: &mut [u8],
) -> Result<(), DecodeError> {
    let want = transformed_len(encoding, meta) as usize;
    let decompressed;
    let data: &[u8] = if compression(encoding) == COMPRESSION_LZ4 {
        if transform(encoding) == TRANSFORM_NONE {
            // Straight into the slot.
            let n = lz4_flex::block::decompress_into(payload, dst)
                .map_err(|e| DecodeError(format!("lz4: {e}")))?;
            if n != want {
                return Err(DecodeError(format!(
                    "lz4 payload decompresses to {n} bytes, the header says {want}"
                )));
            }
            return Ok(());
        }
        let mut buf = vec![0u8; want];
        let n = lz4_flex::block::decompress_into(payload, &mut buf)
            .map_err(|e| DecodeError(format!("lz4: {e}")))?;
        if n != want {
            return Err(DecodeError(format!(
                "lz4 payload decompresses to {n} bytes, the header says {want}"
            )));
        }
        decompressed = buf;
        &decompressed
    } else {
        if payload.len() != want {
            return Err(DecodeError(format!(
                "payload is {} bytes, the header says {want}",
                payload.len()
            )));
        }
        payload
    };
    match transform(encoding) {
        TRANSFORM_NONE => dst.copy_from_slice(data),
        TRANSFORM_INT8 => {
            if params.len() < 8 {
                return Err(DecodeError("int8 parameters missing".into()));
            }
            let scale = f32::from_le_bytes([params[0], params[1], params[2], params[3]]);
            let zp = i32::from_le_bytes([params[4], params[5], params[6], params[7]]);
            for (out, &q) in dst.chunks_exact_mut(4).zip(data) {
                out.copy_from_slice(&dequantize_int8(q as i8, scale, zp).to_le_bytes());
            }
        }
        _ => {
            for (out, h) in dst.chunks_exact_mut(4).zip(data.chunks_exact(2)) {
                let v = half::f16::from_le_bytes([h[0], h[1]]).to_f32();
                out.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_tensor(v: &[f32], shape: &[u32]) -> (TensorMeta, Vec<u8>) {
        let m = TensorMeta::contiguous(DType::F32, shape).unwrap();
        (m, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn decode_all(e: &Encoded, bytes: &[u8]) -> Vec<f32> {
        let payload = e.payload.as_deref().unwrap_or(bytes);
        let mut dst = vec![0u8; e.meta.nbytes as usize];
        decode_into(e.encoding, &e.params, &e.meta, payload, &mut dst).unwrap();
        dst.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    #[test]
    fn int8_error_is_within_half_a_step() {
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let (m, b) = f32_tensor(&v, &[10, 100]);
        for c in [Compression::None, Compression::Lz4] {
            let e = encode(&m, &b, Quantize::Int8, c);
            let scale = f32::from_le_bytes(e.params[..4].try_into().unwrap());
            let back = decode_all(&e, &b);
            for (x, y) in v.iter().zip(&back) {
                assert!((x - y).abs() <= scale * 0.5 + 1e-6, "{x} -> {y}");
            }
            assert!(e.max_abs_err <= f64::from(scale) * 0.5 + 1e-6);
            assert_eq!(e.count, 1000);
        }
        let e = encode(&m, &b, Quantize::Int8, Compression::None);
        assert_eq!(e.payload.as_ref().unwrap().len(), 1000);
    }

    #[test]
    fn f16_round_trips_representable_values_exactly() {
        let v = [0.0f32, 1.0, -2.5, 65504.0, 0.000061035156];
        let (m, b) = f32_tensor(&v, &[5]);
        let e = encode(&m, &b, Quantize::F16, Compression::None);
        assert_eq!(e.payload.as_ref().unwrap().len(), 10);
        assert_eq!(decode_all(&e, &b), v);
        assert_eq!(e.max_abs_err, 0.0);
    }

    #[test]
    fn strided_f32_is_gathered_in_c_order() {
        // A 2x3 tensor stored transposed (3x2 buffer), strides (4, 8).
        let buf = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0];
        let (mut m, b) = f32_tensor(&buf, &[2, 3]);
        m.strides[0] = 4;
        m.strides[1] = 8;
        let e = encode(&m, &b, Quantize::F16, Compression::Lz4);
        assert!(e.meta.is_contiguous());
        assert_eq!(decode_all(&e, &b), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn lz4_alone_is_lossless_for_any_dtype() {
        let m = TensorMeta::contiguous(DType::U16, &[512]).unwrap();
        let b: Vec<u8> = (0..1024).map(|i| (i / 7) as u8).collect();
        let e = encode(&m, &b, Quantize::Int8, Compression::Lz4); // not f32: no transform
        assert_eq!(transform(e.encoding), TRANSFORM_NONE);
        assert!(e.payload.as_ref().unwrap().len() < 1024);
        let mut dst = vec![0u8; 1024];
        decode_into(
            e.encoding,
            &e.params,
            &e.meta,
            e.payload.as_ref().unwrap(),
            &mut dst,
        )
        .unwrap();
        assert_eq!(dst, b);
    }

    #[test]
    fn corrupt_lz4_is_an_error_not_a_panic() {
        let m = TensorMeta::contiguous(DType::U8, &[4096]).unwrap();
        let mut dst = vec![0u8; 4096];
        let mut s: u64 = 99;
        for len in 0..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (s >> 33) as u8
                })
                .collect();
            for enc in [COMPRESSION_LZ4 << 4, (COMPRESSION_LZ4 << 4) | TRANSFORM_F16] {
                let mut mm = m;
                if transform(enc) == TRANSFORM_F16 {
                    mm = TensorMeta::contiguous(DType::F32, &[1024]).unwrap();
                }
                let _ = decode_into(enc, &[], &mm, &junk, &mut dst);
            }
        }
    }
}
