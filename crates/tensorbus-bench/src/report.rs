//! Percentiles, the markdown table, the JSON object and the ratios.

use crate::common::{Switches, Variant};
use crate::run::{Mode, Options};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// One row of the report.
#[derive(Clone, Debug)]
pub struct Row {
    /// `pingpong`, `streaming`, `fanout-N`, `workqueue-N`.
    pub bench: String,
    /// Who was measured.
    pub contender: String,
    /// `full` or `touch`.
    pub variant: Variant,
    /// Payload bytes.
    pub size: usize,
    /// Recorded samples.
    pub samples: usize,
    /// Percentiles and maximum (ns).
    pub p50: u64,
    /// 99th percentile (ns).
    pub p99: u64,
    /// 99.9th percentile (ns).
    pub p999: u64,
    /// Maximum (ns).
    pub max: u64,
    /// Round trips per second (ping-pong) or messages per second.
    pub msgs_per_s: f64,
    /// Ping-pong only: context switches of both sides over all round trips
    /// (warm-up included); `None` where they could not be read.
    pub switches: Option<PerRound>,
}

/// Context switches of the parent's measuring thread and of the child
/// process, summed over blocks, and the round trips they cover. One
/// voluntary switch per round trip on a side means that side slept every
/// time (the futex, a socket or pipe read); a "futex" contender near zero
/// never slept.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerRound {
    /// The parent's measuring thread.
    pub parent: Switches,
    /// All threads of the child process.
    pub child: Switches,
    /// Round trips covered.
    pub rounds: u64,
}

impl PerRound {
    /// Adds one block.
    pub fn add(&mut self, parent: Switches, child: Switches, rounds: u64) {
        self.parent.add(parent);
        self.child.add(child);
        self.rounds += rounds;
    }

    /// `(voluntary, involuntary)` per round trip of `side`.
    pub fn per_round(&self, side: Switches) -> (f64, f64) {
        let n = self.rounds.max(1) as f64;
        (side.voluntary as f64 / n, side.involuntary as f64 / n)
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Row {
    fn new(
        bench: &str,
        contender: &str,
        variant: Variant,
        size: usize,
        mut s: Vec<u64>,
        rate: f64,
    ) -> Row {
        s.sort_unstable();
        Row {
            bench: bench.to_owned(),
            contender: contender.to_owned(),
            variant,
            size,
            samples: s.len(),
            p50: percentile(&s, 0.5),
            p99: percentile(&s, 0.99),
            p999: percentile(&s, 0.999),
            max: s.last().copied().unwrap_or(0),
            msgs_per_s: rate,
            switches: None,
        }
    }

    /// A ping-pong row: samples are round-trip times; the rate is round
    /// trips per second (1 / mean RTT).
    pub fn round_trips(
        bench: &str,
        contender: &str,
        variant: Variant,
        size: usize,
        s: Vec<u64>,
    ) -> Row {
        let total: u64 = s.iter().sum();
        let rate = if total == 0 {
            0.0
        } else {
            s.len() as f64 * 1e9 / total as f64
        };
        Row::new(bench, contender, variant, size, s, rate)
    }

    /// A streaming row: samples are send-to-consumed latencies; the rate is
    /// messages per second over `ns`.
    pub fn stream(
        bench: &str,
        contender: &str,
        variant: Variant,
        size: usize,
        s: Vec<u64>,
        ns: u64,
    ) -> Row {
        let rate = if ns == 0 {
            0.0
        } else {
            s.len() as f64 * 1e9 / ns as f64
        };
        Row::new(bench, contender, variant, size, s, rate)
    }
}

/// `8B`, `4KiB`, `1MiB`, `64MiB`.
pub fn size_label(n: usize) -> String {
    if n >= 1 << 30 && n % (1 << 30) == 0 {
        format!("{}GiB", n >> 30)
    } else if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

/// Average cost of one `Instant::now()` call (ns).
pub fn instant_cost_ns() -> f64 {
    const N: u32 = 200_000;
    let t0 = Instant::now();
    for _ in 0..N {
        std::hint::black_box(Instant::now());
    }
    t0.elapsed().as_nanos() as f64 / f64::from(N)
}

fn find<'r>(
    rows: &'r [Row],
    bench: &str,
    contender: &str,
    variant: Variant,
    size: usize,
) -> Option<&'r Row> {
    rows.iter().find(|r| {
        r.bench == bench && r.contender == contender && r.variant == variant && r.size == size
    })
}

fn div(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

/// A named ratio, its target and whether it is met (`None` when not measured).
pub struct Ratio {
    /// JSON key.
    pub key: String,
    /// Value.
    pub value: Option<f64>,
    /// Target, as text.
    pub target: &'static str,
    /// Whether the target holds.
    pub met: Option<bool>,
}

/// The four ratios, then streaming and copying ratios per size.
pub fn ratios(rows: &[Row], sizes: &[usize]) -> Vec<Ratio> {
    let p50 = |b: &str, c: &str, v: Variant, s: usize| find(rows, b, c, v, s).map(|r| r.p50 as f64);
    let rate =
        |b: &str, c: &str, v: Variant, s: usize| find(rows, b, c, v, s).map(|r| r.msgs_per_s);
    let q = |a: Option<f64>, b: Option<f64>| a.zip(b).and_then(|(a, b)| div(a, b));
    let mut out = Vec::new();
    let mut push = |key: String, value: Option<f64>, target: &'static str, ok: fn(f64) -> bool| {
        out.push(Ratio {
            key,
            met: value.map(ok),
            value,
            target,
        });
    };
    let full = Variant::Full;
    let touch = Variant::Touch;
    let big = sizes.iter().copied().max().unwrap_or(8);
    let small = sizes.iter().copied().min().unwrap_or(8);
    push(
        "tensorbus_over_limit_8B".into(),
        q(
            p50("pingpong", "tensorbus-busy", full, 8),
            p50("pingpong", "limit", full, 8),
        ),
        "<= 3",
        |x| x <= 3.0,
    );
    push(
        "tensorbus_over_iceoryx2_8B".into(),
        q(
            p50("pingpong", "tensorbus-busy", full, 8),
            p50("pingpong", "iceoryx2-busy", full, 8),
        ),
        "<= 0.4",
        |x| x <= 0.4,
    );
    push(
        "blocking_over_uds_8B".into(),
        q(
            p50("pingpong", "tensorbus-futex", full, 8),
            p50("pingpong", "uds", full, 8),
        ),
        "<= 0.5",
        |x| x <= 0.5,
    );
    push(
        format!("touch_{}_over_{}", size_label(big), size_label(small)),
        q(
            p50("pingpong", "tensorbus-busy", touch, big),
            p50("pingpong", "tensorbus-busy", touch, small),
        ),
        "<= 1.1",
        |x| x <= 1.1,
    );
    push(
        "tensorbus_futex_over_futex_raw_8B".into(),
        q(
            p50("pingpong", "tensorbus-futex", full, 8),
            p50("pingpong", "futex-raw", full, 8),
        ),
        "(info)",
        |_| true,
    );
    for &s in sizes {
        push(
            format!("streaming_tensorbus_over_iceoryx2_{}", size_label(s)),
            q(
                rate("streaming", "tensorbus", full, s),
                rate("streaming", "iceoryx2", full, s),
            ),
            ">= 2 (msgs/s)",
            |x| x >= 2.0,
        );
    }
    // Streaming latency tails side by side (per message, producer
    // timestamp to receive; lower is better, so tensorbus / iceoryx2 < 1
    // means tensorbus's tail is shorter).
    let p999 =
        |b: &str, c: &str, v: Variant, s: usize| find(rows, b, c, v, s).map(|r| r.p999 as f64);
    for &s in sizes {
        push(
            format!("streaming_p999_tensorbus_over_iceoryx2_{}", size_label(s)),
            q(
                p999("streaming", "tensorbus", full, s),
                p999("streaming", "iceoryx2", full, s),
            ),
            "(info, lower is better)",
            |_| true,
        );
    }
    for &s in sizes.iter().filter(|&&s| s != 8) {
        push(
            format!("tensorbus_over_limit_{}", size_label(s)),
            q(
                p50("pingpong", "tensorbus-busy", full, s),
                p50("pingpong", "limit", full, s),
            ),
            "(info)",
            |_| true,
        );
    }
    for c in ["uds", "pipe"] {
        for &s in sizes {
            push(
                format!("{c}_over_tensorbus_{}", size_label(s)),
                q(
                    p50("pingpong", c, full, s),
                    p50("pingpong", "tensorbus-busy", full, s),
                ),
                "(info)",
                |_| true,
            );
        }
    }
    out
}

fn machine() -> (usize, String, String) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    (nproc, cpu, kernel)
}

fn us(ns: u64) -> String {
    if ns < 10_000 {
        format!("{:.2}", ns as f64 / 1e3)
    } else if ns < 1_000_000 {
        format!("{:.1}", ns as f64 / 1e3)
    } else {
        format!("{:.0}", ns as f64 / 1e3)
    }
}

fn switches(v: Option<(f64, f64)>) -> String {
    v.map_or("—".into(), |(vol, inv)| format!("{vol:.2}/{inv:.2}"))
}

fn rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// The markdown report.
pub fn markdown(
    opts: &Options,
    rows: &[Row],
    ratios: &[Ratio],
    clock_ns: f64,
    wall: Duration,
) -> String {
    let (nproc, cpu, kernel) = machine();
    let mut s = String::new();
    let cmd: Vec<String> = std::env::args().collect();
    let _ = writeln!(s, "# tensorbus bench ({} mode)\n", opts.mode.name());
    let _ = writeln!(s, "- command: `{}`", cmd.join(" "));
    let _ = writeln!(s, "- machine: nproc {nproc}, {cpu}, Linux {kernel}");
    let _ = writeln!(
        s,
        "- clock: std::time::Instant (CLOCK_MONOTONIC via the vDSO), {clock_ns:.1} ns per call; two calls per sample"
    );
    let _ = writeln!(
        s,
        "- ping-pong: round-trip time (the reply has the payload's size); streaming, fan-out, work queue: send-start to consumed latency, {} in flight (fan-out: 1), rate over the recorded messages",
        crate::run::WINDOW
    );
    let _ = writeln!(
        s,
        "- contenders alternate in blocks (order rotating); percentiles merge all blocks; times in µs; wall time {:.1} s\n",
        wall.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "- ctx sw/RT: context switches per round trip (ping-pong), voluntary/involuntary, of the parent's measuring thread and of the child process (getrusage, /proc/PID/task/*/status); a voluntary 1.00 means that side slept every round trip\n"
    );
    let header = "| bench | contender | variant | size | samples | p50 µs | p99 µs | p99.9 µs | max µs | msgs/s | ctx sw/RT parent | ctx sw/RT child |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";
    let _ = writeln!(s, "{header}");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.bench,
            r.contender,
            r.variant.name(),
            size_label(r.size),
            r.samples,
            us(r.p50),
            us(r.p99),
            us(r.p999),
            us(r.max),
            rate(r.msgs_per_s),
            switches(r.switches.map(|w| w.per_round(w.parent))),
            switches(r.switches.map(|w| w.per_round(w.child))),
        );
    }
    let _ = writeln!(s, "\n## Ratios (p50 within this run; streaming: msgs/s)\n");
    let _ = writeln!(s, "| ratio | value | target | met |\n|---|---:|---|---|");
    for r in ratios {
        let v = r.value.map_or("n/a".into(), |v| format!("{v:.3}"));
        let met = match (r.target.starts_with('('), r.met) {
            (true, _) => "",
            (false, Some(true)) => "yes",
            (false, Some(false)) => "no",
            (false, None) => "n/a",
        };
        let _ = writeln!(s, "| {} | {v} | {} | {met} |", r.key, r.target);
    }
    if opts.mode != Mode::Full {
        let _ = writeln!(
            s,
            "\n({} mode: few samples per row; p99.9 and max are close to the maximum of a handful of rounds at large sizes)",
            opts.mode.name()
        );
    }
    s
}

/// The JSON object: `{"rows": [...], "ratios": {...}, "meta": {...}}`.
pub fn json(
    opts: &Options,
    rows: &[Row],
    ratios: &[Ratio],
    clock_ns: f64,
    wall: Duration,
) -> String {
    let (nproc, cpu, kernel) = machine();
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "bench": r.bench,
                "contender": r.contender,
                "variant": r.variant.name(),
                "size_bytes": r.size,
                "samples": r.samples,
                "p50_ns": r.p50,
                "p99_ns": r.p99,
                "p999_ns": r.p999,
                "max_ns": r.max,
                "msgs_per_s": r.msgs_per_s,
                "ctx_switches_per_rt": r.switches.map_or(Value::Null, |w| {
                    let (pv, pi) = w.per_round(w.parent);
                    let (cv, ci) = w.per_round(w.child);
                    json!({
                        "parent_voluntary": pv,
                        "parent_involuntary": pi,
                        "child_voluntary": cv,
                        "child_involuntary": ci,
                        "round_trips": w.rounds,
                    })
                }),
            })
        })
        .collect();
    let mut map = Map::new();
    for r in ratios {
        map.insert(r.key.clone(), r.value.map_or(Value::Null, |v| json!(v)));
    }
    let v = json!({
        "rows": rows,
        "ratios": map,
        "meta": {
            "mode": opts.mode.name(),
            "nproc": nproc,
            "cpu": cpu,
            "kernel": kernel,
            "clock": "std::time::Instant",
            "clock_ns_per_call": clock_ns,
            "wall_s": wall.as_secs_f64(),
        },
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}
