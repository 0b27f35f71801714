//! `tensorbus`: the command-line tool of tensorbus.
//!
//! * `tensorbus broker` runs a broker (pools, admission, reclaim, stats).
//! * `tensorbus stat` prints a broker's pools, channels and clients.
//! * `tensorbus bench` runs the benchmark harness (`tensorbus-bench`, built
//!   separately) against the cache-line limit, iceoryx2, Unix sockets and pipes.
//! * `tensorbus pub` / `tensorbus sub` pipe raw frames from stdin into a
//!   channel and from a channel to stdout (GStreamer, ffmpeg rawvideo).
//! * `tensorbus demo` runs a camera -> preprocess -> model pipeline as three
//!   processes exchanging 1080p frames and 640x640 f32 tensors without copies.
//!
//! Every subcommand lives in its own module; each returns a [`CliError`],
//! which `main` prints as one line before exiting with status 1.

mod bench;
mod broker;
mod demo;
mod pubsub;
mod stat;
mod table;

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
    /// Run a camera -> preprocess -> model pipeline as three processes and report latency.
    Demo(demo::Args),
    /// Measure latency and throughput against the cache-line limit, iceoryx2 and copying paths (runs the separately built tensorbus-bench).
    Bench(bench::Args),
    /// Read raw frames (--shape, --dtype) from stdin into loaned slots and publish them.
    Pub(pubsub::PubArgs),
    /// Write every tensor received on a channel to stdout as raw bytes.
    Sub(pubsub::SubArgs),
    /// Demo role: the camera producer (spawned by `tensorbus demo`).
    #[command(hide = true)]
    DemoCamera(demo::RoleArgs),
    /// Demo role: the preprocessing stage (spawned by `tensorbus demo`).
    #[command(hide = true)]
    DemoPreprocess(demo::RoleArgs),
    /// Demo role: the model-side consumer (spawned by `tensorbus demo`).
    #[command(hide = true)]
    DemoConsumer(demo::RoleArgs),
    // Room for later subcommands: pub, sub, top, doctor.
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
        Command::Pub(a) => ("pub", pubsub::run_pub(a)),
        Command::Sub(a) => ("sub", pubsub::run_sub(a)),
        Command::DemoCamera(a) => ("demo-camera", demo::camera::run(a)),
        Command::DemoPreprocess(a) => ("demo-preprocess", demo::preprocess::run(a)),
        Command::DemoConsumer(a) => ("demo-consumer", demo::consumer::run(a)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tensorbus {name}: {e}");
            ExitCode::FAILURE
        }
    }
}
