//! What the demo's processes agree on: the camera's test pattern, the resize
//! tables, the normalisation and the user-header layout. The consumer uses
//! the same definitions to recompute what it must have received.

/// Camera frame height.
pub const H: usize = 1080;
/// Camera frame width.
pub const W: usize = 1920;
/// Colour channels.
pub const C: usize = 3;
/// Model input side (square).
pub const S: usize = 640;
/// Elements of one model-input plane.
pub const PLANE: usize = S * S;

/// ImageNet per-channel mean (RGB).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation (RGB).
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The camera's pixel value at row `y`, column `x`, channel `c` of frame `i`:
/// diagonal colour stripes that move 7 pixels per frame.
pub fn pixel(y: usize, x: usize, i: u64, c: usize) -> u8 {
    ((x as u64 + 2 * y as u64 + 7 * i + 85 * c as u64) & 0xFF) as u8
}

/// One long interleaved RGB row, `(W + 256) * C` bytes: `row[x*C + c] =
/// pixel(0, x, 0, c)`. Row `y` of frame `i` is the `W * C` bytes starting
/// at pixel `(2y + 7i) mod 256`, so the camera draws a frame with one
/// `memcpy` per row.
pub fn stripe_row() -> Vec<u8> {
    let mut row = vec![0u8; (W + 256) * C];
    for (x, px) in row.chunks_exact_mut(C).enumerate() {
        for (c, v) in px.iter_mut().enumerate() {
            *v = pixel(0, x, 0, c);
        }
    }
    row
}

/// Where row `y` of frame `i` starts in [`stripe_row`] (in pixels).
pub fn row_shift(y: usize, i: u64) -> usize {
    ((2 * y as u64 + 7 * i) & 0xFF) as usize
}

/// Nearest-neighbour resize tables: the source row of each output row and
/// the source column of each output column (pixel centres aligned).
pub struct Resize {
    /// Source row per output row.
    pub ys: Vec<usize>,
    /// Source column per output column.
    pub xs: Vec<usize>,
}

impl Resize {
    /// Tables for `W x H -> S x S`.
    pub fn new() -> Resize {
        let map = |o: usize, from: usize| ((2 * o + 1) * from / (2 * S)).min(from - 1);
        Resize {
            ys: (0..S).map(|o| map(o, H)).collect(),
            xs: (0..S).map(|o| map(o, W)).collect(),
        }
    }
}

impl Default for Resize {
    fn default() -> Resize {
        Resize::new()
    }
}

/// `lut[c][v]` = `(v / 255 - MEAN[c]) / STD[c]`: the normalised value of
/// byte `v` in channel `c` (a table, so producer and checker agree bit for bit).
pub fn norm_lut() -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            *out = (v as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    lut
}

/// How often each `(xs[ox] + 2 * ys[oy]) mod 256` occurs over the output
/// grid: with it, the exact expected mean of a channel of any frame is a
/// 256-term sum (see [`expected_mean`]).
pub fn phase_histogram(r: &Resize) -> [u64; 256] {
    let mut h = [0u64; 256];
    for &y in &r.ys {
        for &x in &r.xs {
            h[(x + 2 * y) & 0xFF] += 1;
        }
    }
    h
}

/// The mean the model input's channel `c` must have for frame `i`.
pub fn expected_mean(hist: &[u64; 256], lut: &[[f32; 256]; 3], i: u64, c: usize) -> f64 {
    let shift = (7 * i + 85 * c as u64) as usize;
    let sum: f64 = hist
        .iter()
        .enumerate()
        .map(|(v, &n)| n as f64 * f64::from(lut[c][(v + shift) & 0xFF]))
        .sum();
    sum / PLANE as f64
}

/// Model-input user header: frame index and the camera's publish time.
pub fn encode_header(frame: u64, camera_ts_ns: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&frame.to_le_bytes());
    h[8..].copy_from_slice(&camera_ts_ns.to_le_bytes());
    h
}

/// Reads a little-endian u64 at `at` of a user header.
pub fn header_u64(header: &[u8], at: usize) -> Option<u64> {
    let bytes = header.get(at..at + 8)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_row_matches_pixel() {
        let row = stripe_row();
        for (y, i) in [(0, 0), (5, 3), (1079, 299)] {
            let s = row_shift(y, i);
            for x in [0, 1, 777, W - 1] {
                for c in 0..C {
                    assert_eq!(row[(s + x) * C + c], pixel(y, x, i, c));
                }
            }
        }
    }

    #[test]
    fn expected_mean_matches_brute_force() {
        let r = Resize::new();
        assert_eq!(r.xs[0], 1);
        assert_eq!(*r.ys.last().unwrap(), H - 1);
        let (hist, lut) = (phase_histogram(&r), norm_lut());
        for i in [0, 1, 41] {
            for c in 0..C {
                let mut sum = 0f64;
                for &y in &r.ys {
                    for &x in &r.xs {
                        sum += f64::from(lut[c][usize::from(pixel(y, x, i, c))]);
                    }
                }
                let brute = sum / PLANE as f64;
                assert!((brute - expected_mean(&hist, &lut, i, c)).abs() < 1e-9);
            }
        }
    }
}
