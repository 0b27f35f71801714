//! Thin-link routes: int8 (+ lz4) and f16 quantization of f32 tensors, and
//! lossless lz4 for any dtype; bytes on the wire against the tensors' own
//! bytes, and the accuracy change, as the routes report them.

mod common;

use common::{checksum, free_port, head, random_meta, read_back_strides, Host, Rng, WAIT};
use std::time::Duration;
use tensorbus::{ConsumerOptions, DType, Policy, TensorMeta, TensorView};
use tensorbus_bridge::bridge::wait_until;
use tensorbus_bridge::{Bridge, Config};

const N: usize = 40;

/// A smooth f32 signal, like an image or a feature map: [64, 256], every
/// other tensor stored transposed.
fn signal(i: usize) -> (TensorMeta, Vec<f32>) {
    let (r, c) = (64u32, 256u32);
    let v: Vec<f32> = (0..r * c)
        .map(|k| {
            let (y, x) = ((k / c) as f32, (k % c) as f32);
            ((x * 0.05 + i as f32).sin() + (y * 0.11).cos()) * 40.0 + 3.0
        })
        .collect();
    let mut m = TensorMeta::contiguous(DType::F32, &[r, c]).unwrap();
    if i % 2 == 1 {
        // The same logical values stored column-major.
        m.strides = [4, 4 * i64::from(r), 0, 0, 0, 0, 0, 0];
    }
    (m, v)
}

/// The bytes of `v` (logical C order) laid out as `m` says.
fn layout(m: &TensorMeta, v: &[f32]) -> Vec<u8> {
    let (r, c) = (m.shape[0] as usize, m.shape[1] as usize);
    let mut out = vec![0u8; m.nbytes as usize];
    for y in 0..r {
        for x in 0..c {
            let at = y * m.strides[0] as usize + x * m.strides[1] as usize;
            out[at..at + 4].copy_from_slice(&v[y * c + x].to_le_bytes());
        }
    }
    out
}

fn f32s(t: &impl TensorView) -> Vec<f32> {
    t.as_slice_of::<f32>().unwrap().to_vec()
}

#[test]
fn quantized_and_compressed_routes_shrink_the_wire_within_their_error() {
    let a = Host::start("thin", "a", &["q/int8", "q/f16", "q/lz4"]);
    let b = Host::start("thin", "b", &["r/int8", "r/f16", "r/lz4"]);
    let port = free_port();
    let ca = Config::from_toml(&format!(
        "{}[[export]]\nchannel = \"q/int8\"\nquantize = \"int8\"\ncompression = \"lz4\"\n\
         [[export]]\nchannel = \"q/f16\"\nquantize = \"f16\"\n\
         [[export]]\nchannel = \"q/lz4\"\ncompression = \"lz4\"\n",
        head("bridge-a", &a, Some(port), None)
    ))
    .unwrap();
    let cb = Config::from_toml(&format!(
        "{}[[import]]\nkey = \"tensorbus/q/int8\"\nchannel = \"r/int8\"\n\
         [[import]]\nkey = \"tensorbus/q/f16\"\nchannel = \"r/f16\"\n\
         [[import]]\nkey = \"tensorbus/q/lz4\"\nchannel = \"r/lz4\"\n",
        head("bridge-b", &b, None, Some(port))
    ))
    .unwrap();
    let opts = || ConsumerOptions::default().policy(Policy::Block).depth(64);
    let c_int8 = b.client.consumer_with("r/int8", opts()).unwrap();
    let c_f16 = b.client.consumer_with("r/f16", opts()).unwrap();
    let c_lz4 = b.client.consumer_with("r/lz4", opts()).unwrap();
    let bridge_a = Bridge::start(&ca).unwrap();
    let bridge_b = Bridge::start(&cb).unwrap();

    let p_int8 = a.client.producer("q/int8").unwrap();
    let p_f16 = a.client.producer("q/f16").unwrap();
    let p_lz4 = a.client.producer("q/lz4").unwrap();
    let mut rng = Rng(0x7417);
    let mut lossless = Vec::new();
    let (mut worst_int8, mut worst_f16) = (0f64, 0f64);
    for i in 0..N {
        let (m, v) = signal(i);
        let bytes = layout(&m, &v);
        for p in [&p_int8, &p_f16] {
            let mut t = p.loan_meta(m).unwrap();
            t.as_mut_bytes().copy_from_slice(&bytes);
            t.set_user_header(&(i as u32).to_le_bytes()).unwrap();
            t.publish().unwrap();
        }
        // Any dtype and layout, compressible contents, through lz4 alone.
        let lm = random_meta(&mut rng, i as u64);
        let mut t = loop {
            match p_lz4.loan_meta(lm) {
                Ok(t) => break t,
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let run = 1 + rng.below(16) as usize;
        for (k, x) in t.as_mut_bytes().iter_mut().enumerate() {
            *x = (k / run) as u8;
        }
        lossless.push((
            t.dtype(),
            t.shape().to_vec(),
            read_back_strides(t.meta()),
            t.user_header().to_vec(),
            checksum(&t),
        ));
        t.publish().unwrap();

        // int8: within half a quantization step of the truth.
        let lo = v.iter().cloned().fold(0f32, f32::min);
        let hi = v.iter().cloned().fold(0f32, f32::max);
        let step = (hi - lo) / 255.0;
        let t = c_int8.recv_timeout(WAIT).expect("int8 tensor");
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.shape(), &[64, 256]);
        assert!(t.meta().is_contiguous(), "a transform arrives C-contiguous");
        assert_eq!(t.user_header(), (i as u32).to_le_bytes());
        for (x, y) in v.iter().zip(f32s(&t)) {
            let d = f64::from((x - y).abs());
            assert!(d <= f64::from(step) * 0.5 + 1e-4, "int8 {x} -> {y}");
            worst_int8 = worst_int8.max(d);
        }
        // f16: within f16's relative precision.
        let t = c_f16.recv_timeout(WAIT).expect("f16 tensor");
        for (x, y) in v.iter().zip(f32s(&t)) {
            let d = f64::from((x - y).abs());
            assert!(d <= f64::from(x.abs()) / 2048.0 + 1e-6, "f16 {x} -> {y}");
            worst_f16 = worst_f16.max(d);
        }
    }
    for (i, want) in lossless.iter().enumerate() {
        let t = c_lz4.recv_timeout(WAIT).expect("lz4 tensor");
        let got = (
            t.dtype(),
            t.shape().to_vec(),
            read_back_strides(t.meta()),
            t.user_header().to_vec(),
            checksum(&t),
        );
        assert_eq!(&got, want, "lz4 tensor {i}");
    }
    assert!(wait_until(WAIT, || bridge_b
        .stats()
        .iter()
        .all(|s| s.samples == N as u64)));
    let ex = bridge_a.stats();
    let im = bridge_b.stats();
    for s in ex.iter().chain(&im) {
        eprintln!("{s}");
        assert_eq!((s.dropped, s.malformed, s.errors), (0, 0, 0), "{s}");
    }
    // Both ends count the same wire bytes and the same raw bytes.
    for (e, i) in ex.iter().zip(&im) {
        assert_eq!((e.bytes, e.raw_bytes), (i.bytes, i.raw_bytes), "{e} / {i}");
    }
    let (int8, f16, lz4) = (&ex[0], &ex[1], &ex[2]);
    // int8 is a quarter of f32 before lz4.
    assert!(int8.bytes * 4 < int8.raw_bytes, "{int8}");
    assert!(f16.bytes * 2 <= f16.raw_bytes + 200 * N as u64, "{f16}");
    assert!(f16.bytes * 10 > f16.raw_bytes * 4, "{f16}");
    assert!(lz4.bytes < lz4.raw_bytes, "{lz4}");
    // The reported error is the observed one.
    assert!(
        (int8.quant_max_abs_err - worst_int8).abs() < 1e-6,
        "{int8} vs {worst_int8}"
    );
    assert!(
        (f16.quant_max_abs_err - worst_f16).abs() < 1e-6,
        "{f16} vs {worst_f16}"
    );
    assert!(int8.quant_rmse > 0.0 && int8.quant_rmse <= int8.quant_max_abs_err);
    assert_eq!(lz4.quant_rmse, 0.0);
    eprintln!(
        "thin: int8+lz4 wire/raw = {:.3} (max_abs_err {:.4}, rmse {:.4}); f16 wire/raw = {:.3} (max_abs_err {:.5}, rmse {:.5}); lz4 wire/raw = {:.3} (lossless)",
        int8.bytes as f64 / int8.raw_bytes as f64,
        int8.quant_max_abs_err,
        int8.quant_rmse,
        f16.bytes as f64 / f16.raw_bytes as f64,
        f16.quant_max_abs_err,
        f16.quant_rmse,
        lz4.bytes as f64 / lz4.raw_bytes as f64
    );
}
