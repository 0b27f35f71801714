//! producer: publishes small float32 frames, written in place in shared memory.
//!
//! Every frame is a 4 x 8 float32 tensor; element `i` (row-major) of frame
//! `n` is `n * 100 + i`. The user header carries the frame counter (`u64`,
//! little-endian, bytes 0..8) and how many stages changed the frame (`u32`,
//! bytes 8..12; 0 here). The same frames come from `examples/python/producer.py`
//! and `examples/c/producer.c`, so any consumer or stage of the three languages
//! reads them.
//!
//! Run it against a broker that has the example channels:
//!
//! ```sh
//! tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
//! cargo run --example consumer -- --socket /tmp/tb-ex.sock --channel frames/raw &
//! cargo run --example producer -- --socket /tmp/tb-ex.sock [--count 10] [--interval-ms 100]
//! ```
//!
//! Without `--socket` it connects to `$TENSORBUS_SOCKET` or the default socket.
//! Options: `--channel NAME` (default `frames/raw`), `--count N` frames
//! (default 10), `--interval-ms MS` between frames (default 100).

use std::path::PathBuf;
use std::time::Duration;
use tensorbus::{Client, DType};

const ROWS: u32 = 4;
const COLS: u32 = 8;

fn main() {
    if let Err(e) = run() {
        eprintln!("producer: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut socket: Option<PathBuf> = None;
    let mut channel = String::from("frames/raw");
    let mut count: u64 = 10;
    let mut interval_ms: u64 = 100;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(value()?.into()),
            "--channel" => channel = value()?,
            "--count" => count = value()?.parse()?,
            "--interval-ms" => interval_ms = value()?.parse()?,
            _ => return Err(format!("unknown argument {flag:?}").into()),
        }
    }

    let client = Client::connect_to(socket.as_deref(), "producer.rs")?;
    let producer = client.producer(&channel)?;
    println!("producer: publishing {count} frames of {ROWS}x{COLS} float32 on {channel}");

    for frame in 0..count {
        // Wait up to 1 s for a free slot if every slot is still being read.
        let mut t = producer.loan_timeout(&[ROWS, COLS], DType::F32, Duration::from_secs(1))?;
        for (i, x) in t.as_mut_slice_of::<f32>()?.iter_mut().enumerate() {
            *x = (frame * 100 + i as u64) as f32; // written straight into the slot: no copy
        }
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&frame.to_le_bytes()); // frame counter
        header[8..].copy_from_slice(&0u32.to_le_bytes()); // stages so far
        t.set_user_header(&header)?;
        let outcome = t.publish()?; // the loan ends; readers hold the slot now
        println!("producer: frame {frame} delivered to {}", outcome.delivered);
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    println!("producer: published {count} frames");
    Ok(())
}
