//! stage: takes each example frame exclusively, doubles every value in
//! place (in the shared-memory slot itself, no copy), adds one to the stage
//! count in the user header and forwards the very same slot.
//!
//! Input: the frames of `examples/{rust,python,c}/producer.*`, or of another
//! stage; output: what `examples/{rust,python,c}/consumer.*` checks. A stage's
//! input must be a workqueue channel (each frame goes to one worker).
//!
//! ```sh
//! tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
//! cargo run --example consumer -- --socket /tmp/tb-ex.sock &
//! cargo run --example stage -- --socket /tmp/tb-ex.sock [--input frames/raw] [--output frames/doubled] &
//! cargo run --example producer -- --socket /tmp/tb-ex.sock
//! ```
//!
//! Options: `--input NAME` (default `frames/raw`), `--output NAME` (default
//! `frames/doubled`), `--count N` frames to forward (default 10), `--timeout S`
//! to wait for each one (default 10).

use std::path::PathBuf;
use std::time::Duration;
use tensorbus::Client;
use tensorbus::TensorView;

fn main() {
    if let Err(e) = run() {
        eprintln!("stage: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut socket: Option<PathBuf> = None;
    let mut input = String::from("frames/raw");
    let mut output = String::from("frames/doubled");
    let mut count: u64 = 10;
    let mut timeout = Duration::from_secs(10);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => socket = Some(value()?.into()),
            "--input" => input = value()?,
            "--output" => output = value()?,
            "--count" => count = value()?.parse()?,
            "--timeout" => timeout = Duration::from_secs_f64(value()?.parse()?),
            _ => return Err(format!("unknown argument {flag:?}").into()),
        }
    }

    let client = Client::connect_to(socket.as_deref(), "stage.rs")?;
    let stage = client.stage(&input, &output)?;
    println!("stage: {input} -> {output}");

    for _ in 0..count {
        let mut t = stage.recv_mut_timeout(timeout)?; // writable: we hold it alone
        for x in t.as_mut_slice_of::<f32>()? {
            *x *= 2.0;
        }
        let mut header = [0u8; 12];
        let old = t.meta().user_header();
        if old.len() < 12 {
            return Err(format!("user header has {} bytes, want 12", old.len()).into());
        }
        header.copy_from_slice(&old[..12]);
        let frame = u64::from_le_bytes(header[..8].try_into()?);
        let stages = u32::from_le_bytes(header[8..].try_into()?) + 1;
        header[8..].copy_from_slice(&stages.to_le_bytes());
        t.set_user_header(&header)?;
        let outcome = t.forward()?; // the same slot goes on to `output`
        println!(
            "stage: frame {frame} doubled, forwarded to {}",
            outcome.delivered
        );
    }
    println!("stage: {count} frames forwarded");
    Ok(())
}
