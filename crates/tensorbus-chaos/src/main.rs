//! `tensorbus-chaos`: runs producers, stages and consumers of a live
//! tensorbus on broadcast and work-queue channels with all four policies,
//! `kill -9`s random ones at random moments and restarts them, then
//! quiesces and checks that no slot leaked and no tensor was lost,
//! duplicated or corrupted. See `docs/reliability.md` ("Chaos") for what
//! each counter means exactly.
//!
//! ```text
//! tensorbus-chaos [--kills N] [--seconds S] [--seed X] [--interval-ms M] [--dir D] [--keep]
//!                 [--kill-broker [--broker-every K] | --control] [--many]
//! ```
//!
//! Progress goes to stderr; stdout gets one line:
//! `chaos: kills=N leaked_slots=L lost=M duplicated=D corrupt=C crashed=X unaccounted_drops=U`
//! (with `--kill-broker`: `broker_kills=B adopted=N fresh_received=R` after
//! `kills`, `broker_failures=F adoption_failures=A` at the end; with `--control`: `freezes=F greedy_disconnected=G
//! opener_kills=K request_timeouts=T emfile=E forks=N forked_child_errors=R`
//! after `kills`, and `phantom_subscribers=P control_failures=C
//! fork_failures=X` at the end, see [`control`] and [`forker`]; with
//! `--many`: `crowd_kills=K open_handles_peak=N` after `kills` and
//! `too_few_handles=T` at the end, 1 when fewer than 500 handles were ever
//! open at once).
//! The exit status is 0 only if every counter but `kills`, `broker_kills`,
//! `adopted`, `fresh_received`,
//! the `--control` activity counts, `crowd_kills` and `open_handles_peak`
//! is 0.
//!
//! The same binary, run as `tensorbus-chaos role KIND ...`, is every client
//! process (see [`roles`]).

mod check;
mod control;
mod forker;
mod journal;
mod orchestrator;
mod payload;
mod roles;

use std::path::PathBuf;

fn usage() -> ! {
    eprintln!(
        "usage: tensorbus-chaos [--kills N] [--seconds S] [--seed X] [--interval-ms M] [--dir D] [--keep]\n\
         \x20                      [--kill-broker [--broker-every K] | --control] [--many]\n\
         \n\
         --kills N        stop after N kill -9s (default 200, or unlimited with --seconds)\n\
         --seconds S      stop after S seconds of chaos, even if fewer kills were made\n\
         --seed X         seed of every random choice (default: from the clock; printed)\n\
         --interval-ms M  mean time between kills (default 150; uniform in 0..2M)\n\
         --dir D          where the journals go (default: a fresh directory in $TMPDIR)\n\
         --keep           keep the journals and the clients' stderr files (kept anyway when a check fails)\n\
         --kill-broker    run the broker as its own process and kill -9 it too, after every K client\n\
         \x20                kills; each time, check that the clients go on without it, start a new\n\
         \x20                broker on the same socket, check that it adopts the bus (every live client\n\
         \x20                reconnects and is adopted, a fresh client receives from a producer older\n\
         \x20                than the restart) and go on on the same bus (see docs/reliability.md)\n\
         --broker-every K client kills between broker kills (default 50)\n\
         --control        control-plane chaos too: the broker runs as its own process and is frozen\n\
         \x20                (SIGSTOP) past the openers' request timeout; clients that never read their\n\
         \x20                replies, run out of descriptors, die mid-request, or fork (the children's\n\
         \x20                inherited handles must be inert, the parent's must keep working); at the\n\
         \x20                end no phantom subscriber may be left (see docs/reliability.md)\n\
         --many           hundreds of handles too: 10 crowd processes of 64 lossy subscriptions each\n\
         \x20                (most on extension holder ids), every byte checked, dozens held at once,\n\
         \x20                half the kills theirs; the broker admits 256 subscribers per channel and\n\
         \x20                1,024 handles; fails unless at least 500 handles were open at once.\n\
         \x20                With --kill-broker too; not with --control (see docs/reliability.md)"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("role") {
        roles::run(&args[1..]);
    }
    let mut opts = orchestrator::Opts {
        kills: None,
        seconds: None,
        seed: None,
        interval_ms: 150,
        dir: None,
        keep: false,
        kill_broker: false,
        broker_every: 50,
        control: false,
        many: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| -> String {
            it.next().cloned().unwrap_or_else(|| {
                eprintln!("tensorbus-chaos: {a} needs {what}");
                usage()
            })
        };
        let num = |s: String| -> u64 {
            s.parse().unwrap_or_else(|_| {
                eprintln!("tensorbus-chaos: {a}: {s:?} is not a non-negative integer");
                usage()
            })
        };
        match a.as_str() {
            "--kills" => opts.kills = Some(num(value("a count"))),
            "--seconds" => opts.seconds = Some(num(value("a number of seconds"))),
            "--seed" => opts.seed = Some(num(value("a seed"))),
            "--interval-ms" => opts.interval_ms = num(value("milliseconds")).max(1),
            "--dir" => opts.dir = Some(PathBuf::from(value("a directory"))),
            "--keep" => opts.keep = true,
            "--kill-broker" => opts.kill_broker = true,
            "--broker-every" => opts.broker_every = num(value("a count")).max(1),
            "--control" => opts.control = true,
            "--many" => opts.many = true,
            "-h" | "--help" => usage(),
            other => {
                eprintln!("tensorbus-chaos: unknown argument {other:?}");
                usage()
            }
        }
    }
    if opts.control && opts.kill_broker {
        eprintln!("tensorbus-chaos: --control and --kill-broker do not go together");
        usage()
    }
    if opts.many && opts.control {
        eprintln!("tensorbus-chaos: --many and --control do not go together");
        usage()
    }
    std::process::exit(orchestrator::run(opts));
}
