//! `tensorbus-bridge --config FILE`: runs the routes of FILE until SIGINT
//! or SIGTERM, printing every route's counters every `--report-secs`
//! seconds and at exit.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;
use tensorbus_bridge::{Bridge, Config};

/// Bridges tensorbus channels and Eclipse Zenoh key expressions.
#[derive(Parser, Debug)]
#[command(name = "tensorbus-bridge", version)]
struct Args {
    /// The bridge's TOML config (see docs/bridge.md).
    #[arg(long, short)]
    config: PathBuf,
    /// Print each route's counters every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 10)]
    report_secs: u64,
}

fn report(bridge: &Bridge) {
    for r in bridge.stats() {
        eprintln!("tensorbus-bridge[{}]: {r}", bridge.name());
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::from_file(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tensorbus-bridge: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let (tx, rx) = mpsc::channel();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = tx.send(());
    }) {
        eprintln!("tensorbus-bridge: cannot handle signals: {e}");
        return ExitCode::FAILURE;
    }
    let bridge = match Bridge::start(&config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("tensorbus-bridge: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "tensorbus-bridge[{}]: ready: {} export and {} import routes",
        bridge.name(),
        config.export.len(),
        config.import.len()
    );
    let tick = if args.report_secs == 0 {
        Duration::from_secs(3600 * 24 * 365)
    } else {
        Duration::from_secs(args.report_secs)
    };
    while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(tick) {
        report(&bridge);
    }
    report(&bridge);
    bridge.shutdown();
    ExitCode::SUCCESS
}
