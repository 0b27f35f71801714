//! A plain `eclipse-zenoh` Python subscriber, with no tensorbus installed,
//! decodes bridged tensors into numpy from the documented format
//! (crates/tensorbus-bridge/python/tbz_decode.py) and sees the same dtype,
//! shape, strides, user header and elements.
//!
//! Needs the interpreter of `.venv-bridge` (scripts/bridge-python-env.sh,
//! run by scripts/setup.sh) or `$TENSORBUS_BRIDGE_PYTHON`; skips with a
//! message without one, and fails instead when `TENSORBUS_REQUIRE_ZENOH_PY`
//! is set (as .ci/run does).

mod common;

use common::{free_port, head, random_meta, read_back_strides, Host, Rng, WAIT};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use tensorbus::{TensorMeta, TensorView};
use tensorbus_bridge::config::{Compression, Quantize};
use tensorbus_bridge::{encoding, Bridge, Config};

const N: u64 = 60;
/// Tensors on the int8 route (decoded back to float32 by numpy).
const M: u64 = 10;

fn python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let py = std::env::var_os("TENSORBUS_BRIDGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv-bridge/bin/python"));
    let ok = Command::new(&py)
        .args(["-c", "import zenoh, numpy"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    let why = format!(
        "{} cannot import zenoh and numpy (run scripts/bridge-python-env.sh)",
        py.display()
    );
    if std::env::var_os("TENSORBUS_REQUIRE_ZENOH_PY").is_some() {
        panic!("TENSORBUS_REQUIRE_ZENOH_PY is set but {why}");
    }
    eprintln!("SKIPPED python_interop: {why}");
    None
}

/// The tensor's elements in C order, read through its strides (what
/// `np.ascontiguousarray` makes of the strided view).
fn c_order_bytes(meta: &TensorMeta, bytes: &[u8]) -> Vec<u8> {
    let item = meta.dtype.itemsize();
    let shape = meta.shape();
    let strides = meta.strides();
    let mut out = Vec::new();
    if shape.contains(&0) {
        return out;
    }
    let mut idx = vec![0u32; shape.len()];
    loop {
        let at: i64 = idx
            .iter()
            .zip(strides)
            .map(|(&i, &s)| i64::from(i) * s)
            .sum();
        out.extend_from_slice(&bytes[at as usize..at as usize + item]);
        // Odometer over the shape, last axis fastest.
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

/// `sum(byte[i] * (i % 65521 + 1))` mod 2^64, as `tbz_decode.weighted_sum`.
fn weighted_sum(bytes: &[u8]) -> u64 {
    bytes.iter().enumerate().fold(0u64, |acc, (i, &b)| {
        acc.wrapping_add(u64::from(b).wrapping_mul(i as u64 % 65521 + 1))
    })
}

#[test]
fn plain_zenoh_python_subscriber_decodes_bridged_tensors_into_numpy() {
    let Some(py) = python() else { return };
    let a = Host::start("python", "a", &["py/out", "py/q8"]);
    let port = free_port();
    let config = Config::from_toml(&format!(
        "{}[[export]]\nchannel = \"py/out\"\npolicy = \"block\"\n\
         [[export]]\nchannel = \"py/q8\"\nquantize = \"int8\"\n",
        head("bridge-py", &a, Some(port), None)
    ))
    .unwrap();
    let bridge = Bridge::start(&config).expect("bridge starts");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/tbz_decode.py");
    let mut child = Command::new(&py)
        .arg(&script)
        .args(["--connect", &format!("tcp/127.0.0.1:{port}")])
        .args(["--key", "tensorbus/py/*", "--count", &(N + M).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // The export route sends only once the Python subscriber is matched, and
    // `block` holds the producer meanwhile: nothing is lost to an early put.
    let producer = a.client.producer("py/out").unwrap();
    let mut rng = Rng(0xfeed_0042);
    let mut sent = Vec::new();
    for i in 0..N {
        // Every 97th layout of random_meta is large; here a 6th is.
        let meta = random_meta(&mut rng, if i % 6 == 5 { 13 } else { i });
        let mut t = loop {
            match producer.loan_meta(meta) {
                Ok(t) => break t,
                Err(tensorbus::error::LoanError::PoolExhausted { .. }) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("loan {i}: {e}"),
            }
        };
        rng.fill(t.as_mut_bytes());
        let m = *t.meta();
        let elems = c_order_bytes(&m, &t);
        let p = t.publish().unwrap();
        sent.push((m, weighted_sum(&elems), p.seq));
    }
    // The int8 route: what numpy must make of it is what this crate's own
    // decoder makes of the same encoding.
    let q8 = a.client.producer("py/q8").unwrap();
    let mut want_q8 = Vec::new();
    for i in 0..M {
        let shape = [8 + i as u32, 33];
        let mut t = q8.loan(&shape, tensorbus::DType::F32).unwrap();
        for (k, x) in t.as_mut_slice_of::<f32>().unwrap().iter_mut().enumerate() {
            *x = ((k as f32) * 0.3 + i as f32).sin() * 5.0 - 1.0;
        }
        let enc = encoding::encode(t.meta(), &t, Quantize::Int8, Compression::None);
        let mut back = vec![0u8; enc.meta.nbytes as usize];
        let payload = enc.payload.as_deref().unwrap();
        encoding::decode_into(enc.encoding, &enc.params, &enc.meta, payload, &mut back).unwrap();
        want_q8.push((shape, weighted_sum(&back)));
        t.publish().unwrap();
    }
    let mut lines = Vec::new();
    let mut lines_q8 = Vec::new();
    while lines.len() < N as usize || lines_q8.len() < M as usize {
        let line = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!(
                "python stopped after {} + {} lines",
                lines.len(),
                lines_q8.len()
            )
        });
        let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON line");
        if v["key"] == "tensorbus/py/q8" {
            lines_q8.push(v);
        } else {
            lines.push((v, line));
        }
    }
    for (i, ((shape, sum), v)) in want_q8.iter().zip(&lines_q8).enumerate() {
        assert_eq!(v["dtype"], "f32", "q8 {i}: {v}");
        assert_eq!(v["numpy_dtype"], "float32", "q8 {i}: {v}");
        assert_eq!(v["numpy_shape"], serde_json::json!(shape), "q8 {i}");
        assert_eq!(
            v["c_order_wsum"], *sum,
            "q8 {i}: numpy's dequantized values differ"
        );
    }
    for (i, ((m, sum, seq), (v, line))) in sent.iter().zip(lines).enumerate() {
        assert_eq!(v["dtype"], m.dtype.name(), "{i}: {line}");
        let shape: Vec<u64> = m.shape().iter().map(|&e| u64::from(e)).collect();
        assert_eq!(v["shape"], serde_json::json!(shape), "{i}: {line}");
        assert_eq!(v["numpy_shape"], serde_json::json!(shape), "{i}: {line}");
        assert_eq!(
            v["strides"],
            serde_json::json!(read_back_strides(m)),
            "{i}: {line}"
        );
        assert_eq!(v["nbytes"], m.nbytes, "{i}");
        assert_eq!(v["seq"], *seq, "{i}");
        assert_eq!(v["producer"], a.client.id(), "{i}");
        let user: String = m.user_header().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(v["user"], user, "{i}");
        assert_eq!(v["c_order_wsum"], *sum, "{i}: elements differ in numpy");
    }
    assert!(child.wait().expect("python exits").success());
    assert_eq!(bridge.stats()[0].samples, N);
    assert_eq!(bridge.stats()[1].samples, M);
}
