//! Options, the plan of rounds, and the alternating-block orchestration.

use crate::common::{Result, Shared, Switches, Variant, INLINE_MAX, ROUND_TIMEOUT};
use crate::copying::{Copying, Kind};
use crate::iox::Iox;
use crate::limit::Limit;
use crate::report::{self, Row};
use crate::tb::{Tb, TbFan, TbPing};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The sizes the issue lists.
pub const DEFAULT_SIZES: [usize; 5] = [8, 4 << 10, 1 << 20, 16 << 20, 64 << 20];
/// Sizes of the fan-out and work-queue rows (when selected).
pub const FAN_SIZES: [usize; 2] = [8, 1 << 20];
/// Messages in flight when streaming and in work queues.
pub const WINDOW: usize = 8;
/// Consumers of the fan-out rows.
pub const FANOUT: [usize; 4] = [1, 2, 4, 8];
/// Workers of the work-queue rows.
pub const WORKERS: [usize; 4] = [1, 2, 3, 4];

/// How much to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The default: about a minute or two.
    Full,
    /// `--quick`: under a minute, every row.
    Quick,
    /// `--smoke` (hidden): a handful of rounds per row, for tests.
    Smoke,
}

impl Mode {
    /// Name printed in the report.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Quick => "quick",
            Mode::Smoke => "smoke",
        }
    }
}

/// Parsed command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Measurement effort.
    pub mode: Mode,
    /// Where to write JSON.
    pub json: Option<PathBuf>,
    /// Payload sizes (ascending).
    pub sizes: Vec<usize>,
    /// Bench/contender prefixes to run (empty: all).
    pub only: Vec<String>,
    /// Blocks per size (None: the mode's default).
    pub blocks: Option<usize>,
    /// Give every tensorbus handle of the run an extension holder id (the
    /// parent first takes the direct ids with placeholder consumers): the
    /// cost of handles past the sixteenth (issue 16).
    pub extension_ids: bool,
    /// `[broker] latency_sample_every` of the bench's broker (`None`: the
    /// broker's default; 0 turns the latency histograms off): the cost of
    /// the metrics on the receive path (issue 17.6).
    pub latency_sample_every: Option<u32>,
}

/// Parses `8`, `4096`, `4KiB`, `1MiB`, `64MiB`, `1GiB`.
pub fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: usize = n.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult = match unit {
        "" | "B" => 1,
        "K" | "KiB" | "k" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} in {s:?}").into()),
    };
    let v = n * mult;
    if v == 0 || v > 1 << 30 {
        return Err(format!("size {s:?} must be between 1 byte and 1 GiB").into());
    }
    Ok(v)
}

impl Options {
    /// Parses the arguments after the program name; `Ok(None)` for `--help`.
    pub fn parse(args: &[String]) -> Result<Option<Options>> {
        let mut o = Options {
            mode: Mode::Full,
            json: None,
            sizes: DEFAULT_SIZES.to_vec(),
            only: Vec::new(),
            blocks: None,
            extension_ids: false,
            latency_sample_every: None,
        };
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            let mut list = |name: &str| -> Result<Vec<String>> {
                let mut v = Vec::new();
                while let Some(x) = it.next_if(|x| !x.starts_with("--")) {
                    v.extend(x.split(',').filter(|s| !s.is_empty()).map(str::to_owned));
                }
                if v.is_empty() {
                    return Err(format!("{name} needs a value").into());
                }
                Ok(v)
            };
            match a.as_str() {
                "--quick" => o.mode = Mode::Quick,
                "--smoke" => o.mode = Mode::Smoke,
                "--json" => o.json = Some(PathBuf::from(list("--json")?.join(","))),
                "--sizes" => {
                    o.sizes = list("--sizes")?
                        .iter()
                        .map(|s| parse_size(s))
                        .collect::<Result<_>>()?
                }
                "--only" => o.only = list("--only")?,
                "--blocks" => {
                    let v = list("--blocks")?.join("");
                    o.blocks = Some(v.parse().map_err(|e| format!("--blocks {v:?}: {e}"))?);
                }
                "--extension-ids" => o.extension_ids = true,
                "--latency-sample-every" => {
                    let v = list("--latency-sample-every")?.join("");
                    o.latency_sample_every = Some(
                        v.parse()
                            .map_err(|e| format!("--latency-sample-every {v:?}: {e}"))?,
                    );
                }
                "-h" | "--help" => return Ok(None),
                other => return Err(format!("unknown argument {other:?}").into()),
            }
        }
        o.sizes.sort_unstable();
        o.sizes.dedup();
        if o.blocks == Some(0) {
            return Err("--blocks must be at least 1".into());
        }
        Ok(Some(o))
    }

    /// Whether a bench/contender pair is selected by `--only`.
    pub fn want(&self, bench: &str, contender: &str) -> bool {
        self.only.is_empty()
            || self
                .only
                .iter()
                .any(|o| bench.starts_with(o.as_str()) || contender.starts_with(o.as_str()))
    }

    fn base_bytes(&self) -> usize {
        match self.mode {
            Mode::Full => 1 << 30,
            Mode::Quick => 256 << 20,
            Mode::Smoke => 16 << 20,
        }
    }

    /// Recorded rounds (or streamed messages) for `size`.
    pub fn rounds(&self, size: usize) -> usize {
        let (lo, hi) = match self.mode {
            Mode::Full => (30, 20_000),
            Mode::Quick => (8, 3_000),
            Mode::Smoke => (1, 40),
        };
        (self.base_bytes() / size.max(1)).clamp(lo, hi)
    }

    /// Blocks for `rounds` recorded rounds.
    pub fn blocks(&self, rounds: usize) -> usize {
        let b = self.blocks.unwrap_or(match self.mode {
            Mode::Full => 10,
            Mode::Quick => 4,
            Mode::Smoke => 2,
        });
        b.min(rounds).max(1)
    }

    /// Unrecorded rounds before a block: more in the first block of a size
    /// (every pool slot gets touched), a few later.
    pub fn warmup(&self, size: usize, first: bool) -> usize {
        let small = size <= 1 << 20;
        match (self.mode, first, small) {
            (Mode::Smoke, true, true) => 2,
            (Mode::Smoke, true, false) => 1,
            (Mode::Smoke, false, _) => 0,
            (_, true, true) => 40,
            (_, true, false) => 4,
            (_, false, true) => 20,
            (_, false, false) => 1,
        }
    }
}

/// Ping-pong contenders, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pp {
    /// One cache line (plus shared buffers for larger payloads).
    Limit,
    /// tensorbus, both sides busy-polling.
    TbBusy,
    /// tensorbus, both sides sleeping on the futex.
    TbFutex,
    /// Reference for the sleeping path: two bare futex words, both sides
    /// sleep every round trip (payloads up to [`INLINE_MAX`] only).
    FutexRaw,
    /// iceoryx2, busy-polling `receive`.
    IoxBusy,
    /// iceoryx2 with event/listener wake-ups.
    IoxEvent,
    /// Unix domain socket.
    Uds,
    /// Pipes.
    Pipe,
}

impl Pp {
    /// All, in report order.
    pub const ALL: [Pp; 8] = [
        Pp::Limit,
        Pp::TbBusy,
        Pp::TbFutex,
        Pp::FutexRaw,
        Pp::IoxBusy,
        Pp::IoxEvent,
        Pp::Uds,
        Pp::Pipe,
    ];

    /// Name in the table and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Pp::Limit => "limit",
            Pp::TbBusy => "tensorbus-busy",
            Pp::TbFutex => "tensorbus-futex",
            Pp::FutexRaw => "futex-raw",
            Pp::IoxBusy => "iceoryx2-busy",
            Pp::IoxEvent => "iceoryx2-event",
            Pp::Uds => "uds",
            Pp::Pipe => "pipe",
        }
    }

    /// Whether the contender has a row at `size`: `futex-raw` measures the
    /// wake-up path, which the payload does not change, so it runs at the
    /// small sizes only (8 B by default).
    pub fn runs_at(self, size: usize) -> bool {
        self != Pp::FutexRaw || size <= INLINE_MAX
    }
}

/// Streaming contenders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum St {
    /// tensorbus, busy-polling consumer.
    Tb,
    /// iceoryx2, busy-polling subscriber.
    Iox,
}

impl St {
    /// All, in report order.
    pub const ALL: [St; 2] = [St::Tb, St::Iox];
    /// Name in the table and JSON.
    pub fn name(self) -> &'static str {
        match self {
            St::Tb => "tensorbus",
            St::Iox => "iceoryx2",
        }
    }
}

/// Everything the run keeps alive.
struct Rig {
    shared: Rc<Shared>,
    tb: Tb,
    limit: Option<Limit>,
    tb_ping: Option<TbPing>,
    iox: Option<Iox>,
    uds: Option<Copying>,
    pipe: Option<Copying>,
    tb_stream: Option<TbFan>,
}

impl Rig {
    fn has_pp(&self, c: Pp) -> bool {
        match c {
            Pp::Limit | Pp::FutexRaw => self.limit.is_some(),
            Pp::TbBusy | Pp::TbFutex => self.tb_ping.is_some(),
            Pp::IoxBusy | Pp::IoxEvent => self.iox.is_some(),
            Pp::Uds => self.uds.is_some(),
            Pp::Pipe => self.pipe.is_some(),
        }
    }

    /// The child process of a ping-pong contender.
    fn pp_pid(&self, c: Pp) -> Option<u32> {
        match c {
            Pp::Limit | Pp::FutexRaw => self.limit.as_ref().map(Limit::pid),
            Pp::TbBusy | Pp::TbFutex => self.tb_ping.as_ref().map(TbPing::pid),
            Pp::IoxBusy | Pp::IoxEvent => self.iox.as_ref().map(Iox::pid),
            Pp::Uds => self.uds.as_ref().map(Copying::pid),
            Pp::Pipe => self.pipe.as_ref().map(Copying::pid),
        }
    }

    /// [`Rig::pp_block`], adding the context switches of the parent's
    /// (measuring) thread and of the child process over the block's
    /// `warm + count` round trips to `sw` (left alone when unreadable).
    #[allow(clippy::too_many_arguments)]
    fn pp_block_counted(
        &mut self,
        c: Pp,
        size: usize,
        variant: Variant,
        warm: usize,
        count: usize,
        out: &mut Vec<u64>,
        sw: &mut Option<report::PerRound>,
    ) -> Result<()> {
        let pid = self.pp_pid(c);
        let before = (Switches::this_thread(), pid.and_then(Switches::process));
        self.pp_block(c, size, variant, warm, count, out)?;
        let after = (Switches::this_thread(), pid.and_then(Switches::process));
        if let ((Some(p0), Some(c0)), (Some(p1), Some(c1))) = (before, after) {
            sw.get_or_insert_with(Default::default).add(
                p1.since(p0),
                c1.since(c0),
                (warm + count) as u64,
            );
        }
        Ok(())
    }

    fn pp_block(
        &mut self,
        c: Pp,
        size: usize,
        variant: Variant,
        warm: usize,
        count: usize,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        let missing = || format!("{} is not running", c.name());
        match c {
            Pp::Limit => self
                .limit
                .as_mut()
                .ok_or_else(missing)?
                .block(size, variant, warm, count, out),
            Pp::FutexRaw => self
                .limit
                .as_mut()
                .ok_or_else(missing)?
                .futex_block(size, variant, warm, count, out),
            Pp::TbBusy | Pp::TbFutex => self.tb_ping.as_mut().ok_or_else(missing)?.block(
                c == Pp::TbBusy,
                size,
                variant,
                warm,
                count,
                out,
            ),
            Pp::IoxBusy | Pp::IoxEvent => self.iox.as_mut().ok_or_else(missing)?.block(
                c == Pp::IoxBusy,
                size,
                variant,
                warm,
                count,
                out,
            ),
            Pp::Uds => self
                .uds
                .as_mut()
                .ok_or_else(missing)?
                .block(size, variant, warm, count, out),
            Pp::Pipe => self
                .pipe
                .as_mut()
                .ok_or_else(missing)?
                .block(size, variant, warm, count, out),
        }
    }

    /// One streaming block: returns the ns the recorded messages took.
    fn st_block(
        &mut self,
        c: St,
        size: usize,
        variant: Variant,
        warm: usize,
        count: usize,
        out: &mut Vec<u64>,
    ) -> Result<u64> {
        let shared = self.shared.clone();
        reset(&shared);
        match c {
            St::Tb => {
                let f = self
                    .tb_stream
                    .as_mut()
                    .ok_or("tensorbus stream not running")?;
                f.begin(variant)?;
                let r = drive(&shared, WINDOW, 1, warm, count, false, out, || {
                    f.send(size, variant)
                });
                shared.stop().store(1, Ordering::Release);
                f.end()?;
                r
            }
            St::Iox => {
                let x = self.iox.as_mut().ok_or("iceoryx2 not running")?;
                x.stream_begin(size, variant)?;
                let r = drive(&shared, WINDOW, 1, warm, count, false, out, || {
                    x.stream_send(size, variant)
                });
                shared.stop().store(1, Ordering::Release);
                x.stream_end()?;
                r
            }
        }
    }
}

fn reset(shared: &Shared) {
    shared.done().store(0, Ordering::Release);
    shared.stop().store(0, Ordering::Release);
}

/// Sends `warm + count` messages keeping at most `window` unacknowledged
/// (a message is acknowledged when the done counter has grown by `acks`
/// for it), records each recorded message's latency (send start to the
/// moment its acknowledgement is seen) and returns the ns from the first
/// recorded send to the last acknowledgement.
#[allow(clippy::too_many_arguments)]
fn drive(
    shared: &Shared,
    window: usize,
    acks: u64,
    warm: usize,
    count: usize,
    yield_cpu: bool,
    out: &mut Vec<u64>,
    mut send: impl FnMut() -> Result<()>,
) -> Result<u64> {
    let total = warm + count;
    let mut t_send = vec![0u64; total];
    let clock = Instant::now();
    let ns = || clock.elapsed().as_nanos() as u64;
    let (mut sent, mut completed) = (0usize, 0usize);
    let mut rec_start = 0u64;
    let mut last_progress = Instant::now();
    let mut spins = 0u32;
    while completed < total {
        let d = ((shared.done().load(Ordering::Acquire) / acks) as usize).min(total);
        if d > completed {
            let now = ns();
            for (k, &t) in t_send.iter().enumerate().take(d).skip(completed) {
                if k >= warm {
                    out.push(now - t);
                }
            }
            completed = d;
            last_progress = Instant::now();
            continue;
        }
        if sent < total && sent - completed < window {
            let now = ns();
            if sent == warm {
                rec_start = now;
            }
            t_send[sent] = now;
            send()?;
            sent += 1;
            continue;
        }
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins % 64 == 0 {
            if yield_cpu {
                std::thread::yield_now();
            }
            if last_progress.elapsed() > ROUND_TIMEOUT {
                return Err(format!(
                    "no acknowledgement within {ROUND_TIMEOUT:?} ({completed} of {total} done)"
                )
                .into());
            }
        }
    }
    Ok(ns() - rec_start)
}

/// Runs everything the options select and prints (and writes) the report.
pub fn run(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let max = *opts.sizes.iter().max().ok_or("no sizes")?;
    let shared = Rc::new(Shared::create(max)?);
    let tb = Tb::start(&opts.sizes, opts.extension_ids, opts.latency_sample_every)?;
    tb.prefault(&opts.sizes)?;
    let pp_want = |c: Pp| opts.want("pingpong", c.name());
    let st_want = |c: St| opts.want("streaming", c.name());
    let mut rig = Rig {
        limit: if pp_want(Pp::Limit) || pp_want(Pp::FutexRaw) {
            Some(Limit::start(shared.clone(), max)?)
        } else {
            None
        },
        tb_ping: if pp_want(Pp::TbBusy) || pp_want(Pp::TbFutex) {
            Some(TbPing::start(&tb)?)
        } else {
            None
        },
        iox: if pp_want(Pp::IoxBusy) || pp_want(Pp::IoxEvent) || st_want(St::Iox) {
            Some(Iox::start(&shared)?)
        } else {
            None
        },
        uds: if pp_want(Pp::Uds) {
            Some(Copying::start(Kind::Uds, max)?)
        } else {
            None
        },
        pipe: if pp_want(Pp::Pipe) {
            Some(Copying::start(Kind::Pipe, max)?)
        } else {
            None
        },
        tb_stream: if st_want(St::Tb) {
            Some(TbFan::start(&tb, &shared, "stream", 1, "busy")?)
        } else {
            None
        },
        shared: shared.clone(),
        tb,
    };
    let clock_ns = report::instant_cost_ns();
    let mut rows: Vec<Row> = Vec::new();

    for &size in &opts.sizes {
        let rounds = opts.rounds(size);
        let blocks = opts.blocks(rounds);
        let per = rounds.div_ceil(blocks);
        for variant in Variant::ALL {
            // Ping-pong.
            let list: Vec<Pp> = Pp::ALL
                .into_iter()
                .filter(|&c| pp_want(c) && rig.has_pp(c) && c.runs_at(size))
                .collect();
            let mut samples: Vec<Vec<u64>> = vec![Vec::with_capacity(per * blocks); list.len()];
            let mut switches: Vec<Option<report::PerRound>> = vec![None; list.len()];
            for b in 0..blocks {
                for k in 0..list.len() {
                    let i = (b + k) % list.len();
                    let warm = opts.warmup(size, b == 0);
                    rig.pp_block_counted(
                        list[i],
                        size,
                        variant,
                        warm,
                        per,
                        &mut samples[i],
                        &mut switches[i],
                    )
                    .map_err(|e| format!("pingpong {} {size} B: {e}", list[i].name()))?;
                }
            }
            for ((c, s), sw) in list.iter().zip(samples).zip(switches) {
                let mut row = Row::round_trips("pingpong", c.name(), variant, size, s);
                row.switches = sw;
                rows.push(row);
            }
            // Streaming.
            let list: Vec<St> = St::ALL
                .into_iter()
                .filter(|&c| {
                    st_want(c)
                        && match c {
                            St::Tb => rig.tb_stream.is_some(),
                            St::Iox => rig.iox.is_some(),
                        }
                })
                .collect();
            let mut samples: Vec<Vec<u64>> = vec![Vec::with_capacity(per * blocks); list.len()];
            let mut elapsed = vec![0u64; list.len()];
            for b in 0..blocks {
                for k in 0..list.len() {
                    let i = (b + k) % list.len();
                    let warm = opts.warmup(size, b == 0);
                    elapsed[i] += rig
                        .st_block(list[i], size, variant, warm, per, &mut samples[i])
                        .map_err(|e| format!("streaming {} {size} B: {e}", list[i].name()))?;
                }
            }
            for ((c, s), ns) in list.iter().zip(samples).zip(elapsed) {
                rows.push(Row::stream("streaming", c.name(), variant, size, s, ns));
            }
        }
        if let Some(x) = rig.iox.as_mut() {
            x.close()?;
        }
    }

    // Fan-out and work queues (tensorbus only), default wait strategy.
    let fan_sizes: Vec<usize> = {
        let v: Vec<usize> = FAN_SIZES
            .into_iter()
            .filter(|s| opts.sizes.contains(s))
            .collect();
        if v.is_empty() {
            vec![opts.sizes[0]]
        } else {
            v
        }
    };
    for &size in &fan_sizes {
        let rounds = opts.rounds(size).min(match opts.mode {
            Mode::Full => 5_000,
            Mode::Quick => 1_000,
            Mode::Smoke => 20,
        });
        for variant in Variant::ALL {
            for n in FANOUT {
                let bench = format!("fanout-{n}");
                if !opts.want(&bench, "tensorbus") {
                    continue;
                }
                let r = fan_row(
                    &rig,
                    &bench,
                    &format!("fanout/{n}"),
                    n,
                    1,
                    n as u64,
                    size,
                    variant,
                    rounds,
                    opts,
                )?;
                rows.push(r);
            }
            for n in WORKERS {
                let bench = format!("workqueue-{n}");
                if !opts.want(&bench, "tensorbus") {
                    continue;
                }
                let r = fan_row(
                    &rig,
                    &bench,
                    &format!("work/{n}"),
                    n,
                    WINDOW,
                    1,
                    size,
                    variant,
                    rounds,
                    opts,
                )?;
                rows.push(r);
            }
        }
    }

    let Rig {
        limit,
        tb_ping,
        iox,
        uds,
        pipe,
        tb_stream,
        tb,
        ..
    } = rig;
    if let Some(x) = limit {
        x.finish()?;
    }
    if let Some(x) = tb_ping {
        x.finish()?;
    }
    if let Some(x) = iox {
        x.finish()?;
        crate::iox::remove_empty_dirs();
    }
    if let Some(x) = uds {
        x.finish()?;
    }
    if let Some(x) = pipe {
        x.finish()?;
    }
    if let Some(x) = tb_stream {
        x.finish()?;
    }
    drop(tb);

    let ratios = report::ratios(&rows, &opts.sizes);
    let wall = started.elapsed();
    crate::common::print_stdout(&report::markdown(opts, &rows, &ratios, clock_ns, wall))?;
    if let Some(path) = &opts.json {
        let text = report::json(opts, &rows, &ratios, clock_ns, wall);
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// One fan-out or work-queue row: `n` consumer processes on `channel`.
#[allow(clippy::too_many_arguments)]
fn fan_row(
    rig: &Rig,
    bench: &str,
    channel: &str,
    n: usize,
    window: usize,
    acks: u64,
    size: usize,
    variant: Variant,
    rounds: usize,
    opts: &Options,
) -> Result<Row> {
    let mut f = TbFan::start(&rig.tb, &rig.shared, channel, n, "default")?;
    let mut samples = Vec::with_capacity(rounds);
    reset(&rig.shared);
    f.begin(variant)?;
    let warm = opts.warmup(size, true);
    let r = drive(
        &rig.shared,
        window,
        acks,
        warm,
        rounds,
        true,
        &mut samples,
        || f.send(size, variant),
    );
    rig.shared.stop().store(1, Ordering::Release);
    f.end()?;
    f.finish()?;
    let ns = r.map_err(|e| format!("{bench} {size} B: {e}"))?;
    Ok(Row::stream(bench, "tensorbus", variant, size, samples, ns))
}
