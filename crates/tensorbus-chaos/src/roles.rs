//! The client roles, each run as its own process by the orchestrator:
//!
//! ```text
//! tensorbus-chaos role KIND --socket S --journal J --inc N --channel C
//!     [--output O] [--policy P] [--depth D] [--pace-us U] [--hold-us U]
//!     [--delta B] [--seed X]
//! tensorbus-chaos role broker --socket S
//! ```
//!
//! * `producer`: publishes `(inc, 0), (inc, 1), ...` until told to stop,
//!   journaling `begin_publish(seq)` before and `end_publish(seq)` after
//!   each `publish()`; sleeps up to `--pace-us` between tensors.
//! * `consumer`: a broadcast subscriber (`recv_timeout`); journals every
//!   tensor it receives (after checking every byte), holds it up to
//!   `--hold-us`, then releases it; when it exits, journals its own
//!   `delivered` and `dropped` counters from the broker's `stat`.
//! * `broker`: the broker, as a process of its own (`--kill-broker`,
//!   `--control`).
//! * `opener`, `greedy`, `forker`: the control-plane clients of
//!   `--control` (see [`crate::control`] and [`crate::forker`]).
//! * `worker`: a work-queue subscriber; like `consumer`, but each receive is
//!   a non-blocking attempt bracketed by `begin_pop`/`end_pop`, so the
//!   orchestrator knows whether a kill landed between "took an entry" and
//!   "journaled it".
//! * `crowd` (`--many`): 64 lossy subscriptions (`latest`, `drop_oldest`
//!   and `drop_newest` of depth 2, in turn) spread over the broadcast
//!   channels as [`crate::orchestrator::CROWD_SPREAD`] says, most of them
//!   on extension holder ids. Sweeps them round-robin with `try_recv`,
//!   checks every byte of each tensor and that each subscription's
//!   deliveries keep their publisher's order, holds everything one sweep
//!   got (dozens of tensors) for up to `--hold-us`, then releases it all.
//!   It journals no entries, only counts: a payload that does not verify
//!   (or `RecvError::Corrupted`) as corrupt, a delivery repeated or out of
//!   order as duplicated. Exits at once when told to stop (it need not
//!   drain: nothing checks its completeness).
//! * `stage`: `recv_mut` on a work queue (bracketed like a worker, journaled
//!   as `TOOK`), adds `--delta` to every byte in place, `forward`s the same
//!   slot to `--output`, journals `FWD`.
//!
//! Consumers, workers and stages exit once told to stop and nothing has
//! arrived for [`QUIET`]. Any error exits with status 2 and a message on
//! stderr: to the orchestrator that is a crash.

use crate::journal::{Entry, Journal, KIND_FWD, KIND_RECV, KIND_TOOK, STATE_DONE, STATE_READY};
use crate::payload::{self, Rng};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tensorbus::error::{LoanError, RecvError, TryRecvError};
use tensorbus::TensorView;
use tensorbus::{Client, ConsumerOptions, DType, Policy};

/// How long a draining receiver must see nothing before it exits.
pub const QUIET: Duration = Duration::from_millis(300);
/// Sleep between non-blocking receive attempts that found nothing.
const IDLE: Duration = Duration::from_micros(400);

/// `--key value` arguments.
pub(crate) struct Args(HashMap<String, String>);

impl Args {
    pub(crate) fn parse(args: &[String]) -> Args {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .unwrap_or_else(|| fail(&format!("unexpected argument {a:?}")));
            let value = it
                .next()
                .unwrap_or_else(|| fail(&format!("--{key} needs a value")));
            map.insert(key.to_owned(), value.clone());
        }
        Args(map)
    }
    pub(crate) fn str(&self, key: &str) -> &str {
        self.0
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| fail(&format!("--{key} is required")))
    }
    pub(crate) fn num(&self, key: &str, default: u64) -> u64 {
        self.0.get(key).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| fail(&format!("--{key} {v:?} is not a number")))
        })
    }
}

pub(crate) fn fail(msg: &str) -> ! {
    eprintln!("tensorbus-chaos role: {msg}");
    std::process::exit(2);
}

fn sleep_up_to(rng: &mut Rng, max_us: u64) {
    if max_us > 0 {
        std::thread::sleep(Duration::from_micros(rng.below(max_us + 1)));
    }
}

/// Runs the role named by `args[0]`; never returns.
pub fn run(args: &[String]) -> ! {
    // Die with the orchestrator, whatever happens to it.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes an integer signal number and
    // touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let Some((kind, rest)) = args.split_first() else {
        fail("usage: tensorbus-chaos role KIND --socket S --journal J --inc N --channel C ...");
    };
    let a = Args::parse(rest);
    if kind == "broker" {
        broker(&a);
    }
    if kind == "opener" {
        crate::control::opener(&a);
    }
    if kind == "greedy" {
        crate::control::greedy(&a);
    }
    if kind == "forker" {
        crate::forker::forker(&a);
    }
    let journal = Journal::open(Path::new(a.str("journal")))
        .unwrap_or_else(|e| fail(&format!("journal: {e}")));
    let inc = u32::try_from(a.num("inc", 0)).unwrap_or_else(|_| fail("--inc too large"));
    let mut rng = Rng::new(a.num("seed", 1) ^ (u64::from(inc) << 20));
    let client = Client::connect_to(
        Some(Path::new(a.str("socket"))),
        &format!("chaos-{kind}-{inc}"),
    )
    .unwrap_or_else(|e| fail(&format!("connect: {e}")));
    journal.set_client(client.id());
    match kind.as_str() {
        "producer" => producer(&client, &a, &journal, inc, &mut rng),
        "consumer" => consumer(&client, &a, &journal, &mut rng),
        "worker" => worker(&client, &a, &journal, &mut rng),
        "stage" => stage(&client, &a, &journal, &mut rng),
        "crowd" => crowd(&client, &a, &journal, &mut rng),
        other => fail(&format!("unknown role {other:?}")),
    }
    journal.set_state(STATE_DONE);
    std::process::exit(0);
}

/// `role broker --socket S`: the broker of `--kill-broker` runs, as its own
/// process, until it is killed (with the orchestrator, at the latest).
fn broker(a: &Args) -> ! {
    let config = if a.num("many", 0) != 0 {
        crate::orchestrator::CONFIG_MANY
    } else {
        crate::orchestrator::CONFIG
    };
    let config = tensorbus_broker::Config::from_toml(config)
        .unwrap_or_else(|e| fail(&format!("config: {e}")));
    let mut broker = tensorbus_broker::Broker::bind(&config, Path::new(a.str("socket")))
        .unwrap_or_else(|e| fail(&format!("broker: {e}")));
    broker.run(&std::sync::atomic::AtomicBool::new(false));
    std::process::exit(0);
}

fn producer(client: &Client, a: &Args, journal: &Journal, inc: u32, rng: &mut Rng) {
    let p = client
        .producer(a.str("channel"))
        .unwrap_or_else(|e| fail(&format!("open producer: {e}")));
    journal.set_state(STATE_READY);
    let pace = a.num("pace-us", 0);
    let mut seq = 0u64;
    while !journal.stop_requested() {
        let n = payload::len(inc, seq);
        let mut t = match p.loan_timeout(&[n as u32], DType::U8, Duration::from_millis(100)) {
            Ok(t) => t,
            Err(LoanError::Timeout { .. }) => continue,
            Err(e) => fail(&format!("loan {seq}: {e}")),
        };
        payload::fill(inc, seq, &mut t);
        let h = payload::header(payload::checksum(&t, 0), seq, inc);
        t.set_user_header(&h)
            .unwrap_or_else(|e| fail(&format!("user header: {e}")));
        journal.begin_publish(seq);
        t.publish()
            .unwrap_or_else(|e| fail(&format!("publish {seq}: {e}")));
        journal.end_publish(seq);
        seq += 1;
        sleep_up_to(rng, pace);
    }
}

fn options(a: &Args) -> ConsumerOptions {
    // Chaos roles run until told to stop; producers come and go.
    let mut opts = ConsumerOptions::default().end_of_stream(false);
    if let Some(p) = a.0.get("policy") {
        opts = opts.policy(p.parse::<Policy>().unwrap_or_else(|e| fail(&e)));
    }
    if let Some(d) = a.0.get("depth") {
        opts = opts.depth(d.parse().unwrap_or_else(|_| fail("--depth")));
    }
    opts
}

/// Tracks "told to stop and nothing arrived for QUIET".
struct Drain(Option<Instant>);

impl Drain {
    fn got(&mut self) {
        self.0 = None;
    }
    /// Called when nothing arrived; true when it is time to exit.
    fn idle(&mut self, journal: &Journal) -> bool {
        if !journal.stop_requested() {
            self.0 = None;
            return false;
        }
        self.0.get_or_insert_with(Instant::now).elapsed() >= QUIET
    }
}

fn entry(kind: u8, ok: bool, seq: u64, inc: u32, meta: &tensorbus::TensorMeta) -> Entry {
    Entry {
        kind,
        ok,
        inc,
        seq,
        meta_producer: meta.producer,
        meta_seq: meta.seq,
    }
}

fn consumer(client: &Client, a: &Args, journal: &Journal, rng: &mut Rng) {
    let c = client
        .consumer_with(a.str("channel"), options(a))
        .unwrap_or_else(|e| fail(&format!("subscribe: {e}")));
    journal.set_state(STATE_READY);
    let delta = a.num("delta", 0) as u8;
    let hold = a.num("hold-us", 0);
    let mut drain = Drain(None);
    loop {
        match c.recv_timeout(Duration::from_millis(20)) {
            Ok(t) => {
                drain.got();
                let (ok, seq, inc) = payload::verify(t.user_header(), &t, delta);
                journal.push(entry(KIND_RECV, ok, seq, inc, t.meta()));
                sleep_up_to(rng, hold);
                drop(t);
            }
            Err(RecvError::Timeout(_)) => {
                if drain.idle(journal) {
                    record_stat(client, &c, journal);
                    return;
                }
            }
            Err(RecvError::Corrupted(e)) => {
                eprintln!("corrupted receive: {e}");
                journal.count_corrupt();
            }
            Err(e) => fail(&format!("receive: {e}")),
        }
    }
}

/// Journals the subscription's own `delivered` and `dropped` counters, for
/// the drop reconciliation of lossy subscribers. Skipped (with a note) when
/// no broker answers: the data path needs none, `stat` does.
fn record_stat(client: &Client, c: &tensorbus::Consumer, journal: &Journal) {
    match client.stat() {
        Ok(s) => {
            if let Some(me) = s
                .channels
                .iter()
                .flat_map(|ch| &ch.subscribers)
                .find(|s| s.handle == c.handle())
            {
                journal.set_stat(me.delivered, me.dropped);
            }
        }
        Err(e) => eprintln!("no stat at exit: {e}"),
    }
}

fn worker(client: &Client, a: &Args, journal: &Journal, rng: &mut Rng) {
    let c = client
        .consumer_with(a.str("channel"), options(a))
        .unwrap_or_else(|e| fail(&format!("subscribe: {e}")));
    journal.set_state(STATE_READY);
    let hold = a.num("hold-us", 0);
    let mut drain = Drain(None);
    loop {
        journal.begin_pop();
        match c.try_recv() {
            Ok(t) => {
                let (ok, seq, inc) = payload::verify(t.user_header(), &t, 0);
                journal.push(entry(KIND_RECV, ok, seq, inc, t.meta()));
                journal.end_pop();
                drain.got();
                sleep_up_to(rng, hold);
                drop(t);
            }
            Err(TryRecvError::Empty) => {
                journal.end_pop();
                if drain.idle(journal) {
                    return;
                }
                std::thread::sleep(IDLE);
            }
            Err(TryRecvError::Corrupted(e)) => {
                journal.end_pop();
                eprintln!("corrupted receive: {e}");
                journal.count_corrupt();
            }
            Err(e) => fail(&format!("receive: {e}")),
        }
    }
}

/// One subscription of a crowd process.
struct CrowdSub {
    consumer: tensorbus::Consumer,
    channel: &'static str,
    delta: u8,
    /// Order within a publisher's stream: by the user header's `(inc, seq)`
    /// on the channels producers publish to, by `TensorMeta`'s
    /// `(producer, seq)` on `pipe/out`, where the stages forward.
    by_meta: bool,
    /// Last position received per stream.
    last: HashMap<u64, u64>,
}

fn crowd(client: &Client, a: &Args, journal: &Journal, rng: &mut Rng) {
    let policies = [
        (Policy::Latest, None),
        (Policy::DropOldest, Some(2)),
        (Policy::DropNewest, Some(2)),
    ];
    let mut subs = Vec::new();
    for &(channel, n, delta) in crate::orchestrator::CROWD_SPREAD {
        for k in 0..n as usize {
            let (policy, depth) = policies[(k + subs.len()) % policies.len()];
            let mut opts = ConsumerOptions::default()
                .end_of_stream(false)
                .policy(policy);
            if let Some(d) = depth {
                opts = opts.depth(d);
            }
            let consumer = client
                .consumer_with(channel, opts)
                .unwrap_or_else(|e| fail(&format!("subscribe {channel} ({policy:?}): {e}")));
            subs.push(CrowdSub {
                consumer,
                channel,
                delta,
                by_meta: channel == "pipe/out",
                last: HashMap::new(),
            });
        }
    }
    journal.set_state(STATE_READY);
    let hold = a.num("hold-us", 0);
    let mut held: Vec<tensorbus::Tensor> = Vec::with_capacity(subs.len());
    let mut received = 0u64;
    // Each problem is counted; the first few are described on stderr.
    let mut told = 0u32;
    let mut tell = |msg: String| {
        told += 1;
        if told <= 20 {
            eprintln!("crowd: {msg}");
        }
    };
    while !journal.stop_requested() {
        for s in &mut subs {
            match s.consumer.try_recv() {
                Ok(t) => {
                    let (ok, seq, inc) = payload::verify(t.user_header(), &t, s.delta);
                    if !ok {
                        tell(format!(
                            "{}: payload of inc {inc} seq {seq} does not verify (meta {:?})",
                            s.channel,
                            t.meta()
                        ));
                        journal.count_corrupt();
                    }
                    let (stream, pos) = if s.by_meta {
                        (u64::from(t.meta().producer), t.meta().seq)
                    } else {
                        (u64::from(inc), seq)
                    };
                    if let Some(prev) = s.last.insert(stream, pos) {
                        if pos <= prev {
                            tell(format!(
                                "{}: stream {stream}: position {pos} after {prev} (repeated or out of order)",
                                s.channel
                            ));
                            journal.count_duplicated();
                        }
                    }
                    held.push(t);
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Corrupted(e)) => {
                    tell(format!("{}: corrupted receive: {e}", s.channel));
                    journal.count_corrupt();
                }
                Err(e) => fail(&format!("crowd: {}: receive: {e}", s.channel)),
            }
        }
        if held.is_empty() {
            std::thread::sleep(IDLE);
        } else {
            received += held.len() as u64;
            journal.crowd_sweep(received, held.len() as u64);
            sleep_up_to(rng, hold);
            held.clear();
        }
    }
}

fn stage(client: &Client, a: &Args, journal: &Journal, rng: &mut Rng) {
    let s = client
        .stage_with(
            a.str("channel"),
            a.str("output"),
            ConsumerOptions::default()
                .policy(Policy::Block)
                .end_of_stream(false),
        )
        .unwrap_or_else(|e| fail(&format!("open stage: {e}")));
    journal.set_state(STATE_READY);
    let delta = a.num("delta", 1) as u8;
    let hold = a.num("hold-us", 0);
    let mut drain = Drain(None);
    loop {
        journal.begin_pop();
        match s.recv_mut_timeout(Duration::ZERO) {
            Ok(mut t) => {
                let (ok, seq, inc) = payload::verify(t.meta().user_header(), &t, 0);
                journal.push(entry(KIND_TOOK, ok, seq, inc, t.meta()));
                journal.end_pop();
                drain.got();
                for b in t.iter_mut() {
                    *b = b.wrapping_add(delta);
                }
                sleep_up_to(rng, hold);
                let meta = *t.meta();
                t.forward()
                    .unwrap_or_else(|e| fail(&format!("forward {inc}/{seq}: {e}")));
                journal.push(entry(KIND_FWD, ok, seq, inc, &meta));
            }
            Err(RecvError::Timeout(_)) => {
                journal.end_pop();
                if drain.idle(journal) {
                    return;
                }
                std::thread::sleep(IDLE);
            }
            Err(RecvError::Corrupted(e)) => {
                journal.end_pop();
                eprintln!("corrupted receive: {e}");
                journal.count_corrupt();
            }
            Err(RecvError::NotExclusive(d)) => {
                // The stage keeps the tensor and the next receive retries it.
                journal.end_pop();
                eprintln!("stage input not exclusive after {d:?}; the stage keeps the tensor");
                journal.count_not_exclusive();
            }
            Err(RecvError::Detached) => fail("stage input detached (never done by chaos roles)"),
            Err(e) => fail(&format!("receive: {e}")),
        }
    }
}
