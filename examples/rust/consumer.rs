//! consumer: receives the example frames as read-only views of the
//! producer's shared memory, prints them and checks every value.
//!
//! It reads the frames of `examples/{rust,python,c}/producer.*` (4 x 8
//! float32, element `i` of frame `n` is `n * 100 + i`, user header: frame
//! counter `u64` LE + stage count `u32` LE), directly or after any number of
//! stages (each doubled every value and added one to the stage count). It
//! checks the shape, the dtype, every value, and that the frame counters
//! follow each other; it exits with status 1 on the first mismatch.
//!
//! ```sh
//! tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
//! cargo run --example consumer -- --socket /tmp/tb-ex.sock [--channel frames/doubled] [--count 10]
//! ```
//!
//! Start it before the producer (a channel keeps no history). Options:
//! `--channel NAME` (default `frames/doubled`, the stage's output; `frames/raw`
//! reads the producer directly), `--count N` frames to receive (default 10),
//! `--timeout S` to wait for each one (default 10).

use std::path::PathBuf;
use std::time::Duration;
use tensorbus::TensorView;
use tensorbus::{Client, ConsumerOptions, DType, Policy};

const ROWS: u32 = 4;
const COLS: u32 = 8;

fn main() {
    if let Err(e) = run() {
        eprintln!("consumer: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut socket: Option<PathBuf> = None;
    let mut channel = String::from("frames/doubled");
    let mut count: u64 = 10;
    let mut timeout = Duration::from_secs(10);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(value()?.into()),
            "--channel" => channel = value()?,
            "--count" => count = value()?.parse()?,
            "--timeout" => timeout = Duration::from_secs_f64(value()?.parse()?),
            _ => return Err(format!("unknown argument {flag:?}").into()),
        }
    }

    let client = Client::connect_to(socket.as_deref(), "consumer.rs")?;
    // Lossless: a producer waits for us rather than drop a frame.
    let consumer =
        client.consumer_with(&channel, ConsumerOptions::default().policy(Policy::Block))?;
    println!("consumer: subscribed to {channel}");

    let mut expected: Option<u64> = None;
    for _ in 0..count {
        let t = consumer.recv_timeout(timeout)?;
        let header = t.user_header();
        if header.len() < 12 {
            return Err(format!("user header has {} bytes, want 12", header.len()).into());
        }
        let frame = u64::from_le_bytes(header[..8].try_into()?);
        let stages = u32::from_le_bytes(header[8..12].try_into()?);
        if t.shape() != [ROWS, COLS] || t.dtype() != DType::F32 {
            return Err(format!(
                "frame {frame}: {:?} {:?}, want [4, 8] F32",
                t.shape(),
                t.dtype()
            )
            .into());
        }
        if let Some(want) = expected {
            if frame != want {
                return Err(format!("frame {frame} arrived, want frame {want}").into());
            }
        }
        expected = Some(frame + 1);
        let values = t.as_slice_of::<f32>()?; // the producer's bytes: no copy
        let scale = 2f32.powi(stages as i32);
        for (i, &x) in values.iter().enumerate() {
            let want = (frame * 100 + i as u64) as f32 * scale;
            if x != want {
                return Err(format!("frame {frame} element {i}: {x}, want {want}").into());
            }
        }
        let row0: Vec<String> = values[..COLS as usize].iter().map(f32::to_string).collect();
        println!(
            "consumer: frame {frame} seq {} stages {stages} row 0 [{}] ok",
            t.seq(),
            row0.join(", ")
        );
        // Dropping `t` releases the slot.
    }
    println!("consumer: {count} frames checked");
    Ok(())
}
