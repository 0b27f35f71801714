//! `tensorbus`: the command-line tool of tensorbus.
//!
//! * `tensorbus broker` runs a broker (pools, admission, reclaim, stats).
//! * `tensorbus stat` prints a broker's pools, channels and clients.
//! * `tensorbus top` shows them live in the terminal (or one frame: `--once`).
//! * `tensorbus bench` runs the benchmark harness (`tensorbus-bench`, built
//!   separately) against the cache-line limit, iceoryx2, Unix sockets and pipes.
//! * `tensorbus pub` / `tensorbus sub` pipe raw frames from stdin into a
//!   channel and from a channel to stdout (GStreamer, ffmpeg rawvideo).
//! * `tensorbus doctor` checks whether this machine can run a broker and
//!   its clients (memfd sealing, memory, limits, socket directory, ...).
//! * `tensorbus demo` runs a camera -> preprocess -> model pipeline as three
//!   processes exchanging 1080p frames and 640x640 f32 tensors without copies.
//!
//! Every subcommand lives in its own module; each returns a [`CliError`],
//! which `main` prints as one line before exiting with status 1.

mod bench;
mod bridge;
mod broker;
mod demo;
mod doctor;
mod pubsub;
mod stat;
mod table;
mod top;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Zero-copy shared-memory tensor IPC.
#[derive(Parser, Debug)]
#[command(
    name = "tensorbus",
    version,
    about = "Zero-copy shared-memory tensor IPC: run a broker, inspect it, run the demo pipeline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a broker: create the shared-memory pools and serve clients until Ctrl-C / SIGTERM.
    Broker(broker::Args),
    /// Print a running broker's pools, channels and clients.
    Stat(stat::Args),
    /// Watch a running broker's channels, pools and clients live (q quits, s sorts; --once: one frame as text).
    Top(top::Args),
    /// Run a camera -> preprocess -> model pipeline as three processes and report latency.
    Demo(demo::Args),
    /// Measure latency and throughput against the cache-line limit, iceoryx2 and copying paths (runs the separately built tensorbus-bench).
    Bench(bench::Args),
    /// Bridge channels to and from Eclipse Zenoh key expressions (runs the separately built tensorbus-bridge; docs/bridge.md).
    Bridge(bridge::Args),
    /// Read raw frames (--shape, --dtype) from stdin into loaned slots and publish them (a truncated last frame is dropped: exit 1).
    Pub(pubsub::PubArgs),
    /// Write every tensor received on a channel to stdout as raw bytes (waits for the channel; exits 0 at end of stream).
    Sub(pubsub::SubArgs),
    /// Remove a channel created at run time (refused while it is in use or when the config declares it).
    RmChannel(pubsub::RmChannelArgs),
    /// Check whether this machine can run a broker and its clients (exit 1 when a check fails).
    Doctor(doctor::Args),
    /// Demo role: the camera producer (spawned by `tensorbus demo`).
    #[command(hide = true)]
    DemoCamera(demo::RoleArgs),
    /// Demo role: the preprocessing stage (spawned by `tensorbus demo`).
    #[command(hide = true)]
    DemoPreprocess(demo::RoleArgs),
    /// Demo role: the model-side consumer (spawned by `tensorbus demo`).
    #[command(hide = true)]
    DemoConsumer(demo::RoleArgs),
}

/// An error a subcommand reports: printed as `tensorbus <cmd>: <message>`, exit status 1.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

impl CliError {
    /// The marker for "stdout was closed by its reader": `main` exits 0
    /// without a message (like `head` closing a pipe).
    pub fn broken_pipe() -> CliError {
        CliError(BROKEN_PIPE.to_owned())
    }

    /// Whether this is [`CliError::broken_pipe`].
    pub fn is_broken_pipe(&self) -> bool {
        self.0 == BROKEN_PIPE
    }
}

/// The text of [`CliError::broken_pipe`] (never printed).
const BROKEN_PIPE: &str = "\0stdout closed";

/// Writes `text` to stdout and flushes; a closed stdout (EPIPE) becomes
/// [`CliError::broken_pipe`], so the command exits quietly instead of
/// panicking as `print!` would.
pub fn print_stdout(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::broken_pipe()),
        Err(e) => Err(CliError(format!("writing to stdout: {e}"))),
    }
}

/// Parses a floating-point flag value: finite and within `min..=max`, or
/// exactly 0 when `zero_ok` (clap `value_parser`).
fn parse_f64_in(s: &str, min: f64, max: f64, zero_ok: bool) -> Result<f64, String> {
    let s = s.trim();
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{s:?} is not a finite number"));
    }
    if (zero_ok && v == 0.0) || (min..=max).contains(&v) {
        return Ok(v);
    }
    Err(format!(
        "{s} is out of range: expected {}a number between {min} and {max}",
        if zero_ok { "0 or " } else { "" }
    ))
}

/// `--fps`: 0 (no pacing) or 0.001 ..= 1000000 frames per second.
pub fn parse_fps(s: &str) -> Result<f64, String> {
    parse_f64_in(s, 0.001, 1_000_000.0, true)
}

/// A duration in seconds: 0 ..= 31536000 (365 days).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    parse_f64_in(s, 0.0, 31_536_000.0, false)
}

/// Shorthand for building a [`CliError`] from a message.
pub fn fail<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}

/// The socket argument every client subcommand takes.
#[derive(clap::Args, Debug, Clone)]
pub struct SocketArg {
    /// Broker socket (default: $TENSORBUS_SOCKET, $XDG_RUNTIME_DIR/tensorbus/broker.sock, /tmp/tensorbus-$UID/broker.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, result) = match cli.command {
        Command::Broker(a) => ("broker", broker::run(a)),
        Command::Stat(a) => ("stat", stat::run(a)),
        Command::Demo(a) => ("demo", demo::run(a)),
        Command::Bench(a) => ("bench", bench::run(a)),
        Command::Bridge(a) => ("bridge", bridge::run(a)),
        Command::Pub(a) => ("pub", pubsub::run_pub(a)),
        Command::Sub(a) => ("sub", pubsub::run_sub(a)),
        Command::RmChannel(a) => ("rm-channel", pubsub::run_rm_channel(a)),
        Command::Top(a) => match top::run(a) {
            Ok(code) => return code,
            Err(e) => ("top", Err(e)),
        },
        Command::Doctor(a) => match doctor::run(a) {
            Ok(code) => return code,
            Err(e) => ("doctor", Err(e)),
        },
        Command::DemoCamera(a) => ("demo-camera", demo::camera::run(a)),
        Command::DemoPreprocess(a) => ("demo-preprocess", demo::preprocess::run(a)),
        Command::DemoConsumer(a) => ("demo-consumer", demo::consumer::run(a)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tensorbus {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// issue 12.10: numeric flags refuse non-finite and out-of-range values.
    #[test]
    fn numeric_flags_are_range_checked() {
        for bad in ["1e-20", "-1", "nan", "inf", "1e30", "x", "2000000"] {
            assert!(parse_fps(bad).is_err(), "--fps {bad}");
        }
        for good in ["0", "30", "0.5", "1000000"] {
            assert!(parse_fps(good).is_ok(), "--fps {good}");
        }
        for bad in ["1e30", "-1", "nan", "-inf", "4e7"] {
            assert!(parse_seconds(bad).is_err(), "--timeout {bad}");
        }
        assert_eq!(parse_seconds("0.25"), Ok(0.25));
        assert!(CliError::broken_pipe().is_broken_pipe());
    }
}
