//! `tensorbus-bench` (also reached as `tensorbus bench`): latency and
//! throughput of tensorbus across two processes, side by side with the
//! physical limit (one cache line bounced through shared memory), iceoryx2
//! and the copying paths (Unix socket, pipe), in one run on one machine.
//!
//! The parent process measures; children are this same executable started
//! with `--child ROLE ...`. Contenders run in alternating blocks (the order
//! rotates from block to block) and every percentile merges all blocks of a
//! contender, so drift of a noisy machine hits all of them alike; the ratios
//! are computed within the run. See `docs/benchmarks.md` for the method.

mod common;
mod copying;
mod iox;
mod limit;
mod report;
mod run;
mod tb;

use common::Result;
use std::process::ExitCode;

const USAGE: &str =
    "usage: tensorbus-bench [--quick] [--json FILE] [--sizes LIST] [--only LIST] [--blocks N]
  --quick        fewer rounds per size (all sizes, all rows): under a minute
  --json FILE    also write {\"rows\": [...], \"ratios\": {...}} to FILE
  --sizes LIST   payload sizes, comma-separated (default 8,4KiB,1MiB,16MiB,64MiB)
  --only LIST    benches or contenders to run, comma-separated, matched as prefixes:
                 pingpong, streaming, fanout, workqueue, limit, tensorbus,
                 futex-raw, iceoryx2, uds, pipe (default: everything;
                 futex-raw runs at sizes up to 56 B only)
  --blocks N     alternating blocks per size (default 10, --quick 4)
  --extension-ids  every tensorbus handle gets an extension holder id (the
                 parent takes the 15 direct ids first): the cost of handles
                 past the sixteenth
  --latency-sample-every N  the broker's [broker] latency_sample_every
                 (default: the broker's, 16; 0: no latency histograms):
                 the cost of the metrics on the receive path";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = if args.get(1).map(String::as_str) == Some("--child") {
        run_child(&args[2..])
    } else {
        match run::Options::parse(&args[1..]) {
            Ok(Some(opts)) => run::run(&opts),
            Ok(None) => common::print_stdout(&format!("{USAGE}\n")),
            Err(e) => Err(format!("{e}\n{USAGE}").into()),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tensorbus-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_child(args: &[String]) -> Result<()> {
    let (role, rest) = args.split_first().ok_or("--child needs a role")?;
    match role.as_str() {
        "limit" => limit::child(rest),
        "tb" => tb::child_ping(rest),
        "tbsub" => tb::child_sub(rest),
        "iox" => iox::child(rest),
        "uds" => copying::child(copying::Kind::Uds, rest),
        "pipe" => copying::child(copying::Kind::Pipe, rest),
        other => Err(format!("unknown child role {other:?}").into()),
    }
}
