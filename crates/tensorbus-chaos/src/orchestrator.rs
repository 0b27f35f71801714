//! The orchestrator: an embedded broker, the client processes, the killing,
//! the quiescing, and the final line.

use crate::check::{self, Outcome, Record};
use crate::journal::{Journal, STATE_READY};
use crate::payload::Rng;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tensorbus::Client;
use tensorbus_broker::{Config, EmbeddedBroker};

/// Command-line options.
pub struct Opts {
    /// Stop after this many kills.
    pub kills: Option<u64>,
    /// Stop after this many seconds of chaos.
    pub seconds: Option<u64>,
    /// Seed of every random choice.
    pub seed: Option<u64>,
    /// Mean time between kills.
    pub interval_ms: u64,
    /// Journal directory.
    pub dir: Option<PathBuf>,
    /// Keep the journal directory.
    pub keep: bool,
}

/// The broker configuration: two size classes (tensors of up to 1 KiB use
/// the small pool, or the big one when it is exhausted), a broadcast
/// channel, a work queue, and a two-channel stage pipeline.
const CONFIG: &str = r#"
[limits]
max_channels = 8
max_producers_per_channel = 8
max_subscribers_per_channel = 16
ring_capacity = 16

[[pools]]
name = "small"
slot_size = "1KiB"
slots = 128
alignment = 64

[[pools]]
name = "big"
slot_size = "8KiB"
slots = 192
alignment = 64

[[channels]]
name = "bc"
mode = "broadcast"

[[channels]]
name = "wq"
mode = "workqueue"
policy = "block"

[[channels]]
name = "pipe/in"
mode = "workqueue"
policy = "block"

[[channels]]
name = "pipe/out"
mode = "broadcast"
"#;

/// What a client process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Publishes on `channel`.
    Producer,
    /// Subscribes to the broadcast `channel`.
    Consumer,
    /// Subscribes to the work queue `channel`.
    Worker,
    /// Takes from the work queue `channel`, forwards to `output`.
    Stage,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Producer => "producer",
            Kind::Consumer => "consumer",
            Kind::Worker => "worker",
            Kind::Stage => "stage",
        }
    }
}

/// One role: a client process slot that is restarted after each kill.
#[derive(Clone, Copy, Debug)]
pub struct Role {
    /// Name in the report.
    pub name: &'static str,
    /// What it does.
    pub kind: Kind,
    /// Channel it publishes to or subscribes to.
    pub channel: &'static str,
    /// A stage's output channel.
    pub output: Option<&'static str>,
    /// Subscription policy (`None`: the channel's default).
    pub policy: Option<&'static str>,
    /// Ring depth (`None`: the channel's default).
    pub depth: Option<u32>,
    /// Producers: up to this many µs between tensors.
    pub pace_us: u64,
    /// Receivers: hold each tensor up to this many µs.
    pub hold_us: u64,
    /// Value added to every byte by the stages upstream (receivers) or by
    /// this stage.
    pub delta: u8,
    /// Never killed; the lossless checks are made against survivors.
    pub survivor: bool,
}

const fn role(name: &'static str, kind: Kind, channel: &'static str) -> Role {
    Role {
        name,
        kind,
        channel,
        output: None,
        policy: None,
        depth: None,
        pace_us: 0,
        hold_us: 0,
        delta: 0,
        survivor: false,
    }
}

const fn producer(name: &'static str, channel: &'static str) -> Role {
    Role {
        pace_us: 500,
        ..role(name, Kind::Producer, channel)
    }
}

const fn sub(
    name: &'static str,
    kind: Kind,
    channel: &'static str,
    policy: &'static str,
    depth: Option<u32>,
    hold_us: u64,
) -> Role {
    Role {
        policy: Some(policy),
        depth,
        hold_us,
        ..role(name, kind, channel)
    }
}

const fn survivor(r: Role) -> Role {
    Role {
        survivor: true,
        ..r
    }
}

const fn plus1(r: Role) -> Role {
    Role { delta: 1, ..r }
}

/// Every role of a run.
pub const ROLES: &[Role] = &[
    // Broadcast: all four policies, a block survivor and a block victim.
    producer("bc/producer-a", "bc"),
    producer("bc/producer-b", "bc"),
    survivor(sub(
        "bc/block-survivor",
        Kind::Consumer,
        "bc",
        "block",
        Some(8),
        0,
    )),
    sub("bc/block", Kind::Consumer, "bc", "block", Some(4), 400),
    sub(
        "bc/drop_oldest",
        Kind::Consumer,
        "bc",
        "drop_oldest",
        Some(4),
        2000,
    ),
    sub(
        "bc/drop_newest",
        Kind::Consumer,
        "bc",
        "drop_newest",
        Some(4),
        2000,
    ),
    sub("bc/latest", Kind::Consumer, "bc", "latest", None, 2000),
    // Work queue (block): a surviving worker and two victims.
    producer("wq/producer-a", "wq"),
    producer("wq/producer-b", "wq"),
    survivor(sub(
        "wq/worker-survivor",
        Kind::Worker,
        "wq",
        "block",
        None,
        300,
    )),
    sub("wq/worker-1", Kind::Worker, "wq", "block", None, 800),
    sub("wq/worker-2", Kind::Worker, "wq", "block", None, 800),
    // Pipeline: producer -> work queue -> stages (+1 in place) -> broadcast.
    producer("pipe/producer", "pipe/in"),
    survivor(Role {
        output: Some("pipe/out"),
        delta: 1,
        hold_us: 200,
        ..role("pipe/stage-survivor", Kind::Stage, "pipe/in")
    }),
    Role {
        output: Some("pipe/out"),
        delta: 1,
        hold_us: 600,
        ..role("pipe/stage-1", Kind::Stage, "pipe/in")
    },
    survivor(plus1(sub(
        "pipe/out/block-survivor",
        Kind::Consumer,
        "pipe/out",
        "block",
        Some(8),
        0,
    ))),
    plus1(sub(
        "pipe/out/drop_oldest",
        Kind::Consumer,
        "pipe/out",
        "drop_oldest",
        Some(2),
        2000,
    )),
];

/// A running client process.
struct Proc {
    record: usize,
    child: Child,
    journal: Journal,
}

struct Run {
    dir: PathBuf,
    socket: PathBuf,
    exe: PathBuf,
    seed: u64,
    records: Vec<Record>,
    live: Vec<Option<Proc>>,
    next_inc: u32,
}

/// Journal capacity in entries: survivors see everything for the whole run.
fn capacity(r: &Role) -> usize {
    if r.survivor {
        16 << 20
    } else {
        2 << 20
    }
}

impl Run {
    fn spawn(&mut self, role_index: usize) -> std::io::Result<()> {
        let r = &ROLES[role_index];
        let inc = self.next_inc;
        self.next_inc += 1;
        let journal_path = self.dir.join(format!("inc-{inc}.journal"));
        let err_path = self.dir.join(format!("inc-{inc}.stderr"));
        let journal = Journal::create(&journal_path, capacity(r))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("role")
            .arg(r.kind.arg())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--journal")
            .arg(&journal_path)
            .arg("--inc")
            .arg(inc.to_string())
            .arg("--channel")
            .arg(r.channel)
            .arg("--seed")
            .arg(self.seed.to_string())
            .arg("--pace-us")
            .arg(r.pace_us.to_string())
            .arg("--hold-us")
            .arg(r.hold_us.to_string())
            .arg("--delta")
            .arg(r.delta.to_string());
        if let Some(o) = r.output {
            cmd.arg("--output").arg(o);
        }
        if let Some(p) = r.policy {
            cmd.arg("--policy").arg(p);
        }
        if let Some(d) = r.depth {
            cmd.arg("--depth").arg(d.to_string());
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()?;
        self.records.push(Record {
            inc,
            role: role_index,
            journal: journal_path,
            stderr: err_path,
            outcome: Outcome::Running,
        });
        self.live[role_index] = Some(Proc {
            record: self.records.len() - 1,
            child,
            journal,
        });
        Ok(())
    }

    /// Records how a process that ended on its own ended.
    fn ended(&mut self, p: Proc, status: ExitStatus, stopped: bool) {
        let rec = &mut self.records[p.record];
        rec.outcome = if stopped && status.success() {
            Outcome::Exited
        } else {
            let why = if status.success() {
                "exited 0 without being asked to stop".to_string()
            } else {
                format!("{status}")
            };
            Outcome::Crashed(why)
        };
        if let Outcome::Crashed(why) = &rec.outcome {
            let role = ROLES[rec.role].name;
            let tail = std::fs::read_to_string(&rec.stderr).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            eprintln!(
                "chaos: CRASH {role} (inc {}): {why}; stderr: {:?}",
                rec.inc, tail
            );
        }
    }

    /// Kills the live process of `role_index` with SIGKILL.
    fn kill(&mut self, role_index: usize) -> bool {
        let Some(mut p) = self.live[role_index].take() else {
            return false;
        };
        // Child::kill sends SIGKILL to our own unreaped child.
        let _ = p.child.kill();
        let status = p.child.wait();
        match status {
            Ok(s) if s.signal() == Some(libc::SIGKILL) => {
                let rec = &mut self.records[p.record];
                rec.outcome = Outcome::Killed {
                    died_in_pop: p.journal.died_in_pop(),
                };
                true
            }
            Ok(s) => {
                // It had ended on its own before the signal arrived.
                self.ended(p, s, false);
                false
            }
            Err(e) => {
                let rec = &mut self.records[p.record];
                rec.outcome = Outcome::Crashed(format!("wait failed: {e}"));
                false
            }
        }
    }

    /// Reaps processes that ended on their own; returns their roles.
    fn reap(&mut self) -> Vec<usize> {
        let mut gone = Vec::new();
        for i in 0..self.live.len() {
            let done = match self.live[i].as_mut() {
                Some(p) => p.child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = done {
                let p = self.live[i].take().expect("checked above");
                self.ended(p, status, false);
                gone.push(i);
            }
        }
        gone
    }

    /// Waits until every live process of `roles` has journaled READY.
    fn wait_ready(&mut self, roles: &[usize]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !self.reap().is_empty() {
                return Err("a client exited while starting".into());
            }
            let pending: Vec<&str> = roles
                .iter()
                .filter(|&&i| {
                    self.live[i]
                        .as_ref()
                        .is_some_and(|p| p.journal.state() < STATE_READY)
                })
                .map(|&i| ROLES[i].name)
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 30 s: {pending:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks every live process of `roles` to stop and waits for them.
    fn stop(&mut self, roles: &[usize], limit: Duration) {
        for &i in roles {
            if let Some(p) = &self.live[i] {
                p.journal.request_stop();
            }
        }
        let deadline = Instant::now() + limit;
        for &i in roles {
            let Some(mut p) = self.live[i].take() else {
                continue;
            };
            let status = loop {
                match p.child.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => break None,
                }
            };
            match status {
                Some(s) => self.ended(p, s, true),
                None => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    let rec = &mut self.records[p.record];
                    rec.outcome = Outcome::Crashed(format!(
                        "hung: still running {limit:?} after being asked to stop"
                    ));
                    eprintln!(
                        "chaos: CRASH {} (inc {}): hung after stop; killed",
                        ROLES[rec.role].name, rec.inc
                    );
                }
            }
        }
    }
}

fn default_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut r = Rng::new(t ^ (u64::from(std::process::id()) << 32));
    r.next_u64() >> 16 // keep it short enough to type
}

fn roles_of(kinds: &[Kind]) -> Vec<usize> {
    (0..ROLES.len())
        .filter(|&i| kinds.contains(&ROLES[i].kind))
        .collect()
}

/// (free, total) slots over all pools.
fn slots(client: &Client) -> Result<(u32, u32), String> {
    let s = client.stat().map_err(|e| format!("stat: {e}"))?;
    Ok((
        s.pools.iter().map(|p| p.slots_free).sum(),
        s.pools.iter().map(|p| p.slots_total).sum(),
    ))
}

/// Runs the whole thing; returns the exit status.
pub fn run(opts: Opts) -> i32 {
    let seed = opts.seed.unwrap_or_else(default_seed);
    let kills_wanted = opts.kills.unwrap_or(if opts.seconds.is_some() {
        u64::MAX
    } else {
        200
    });
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tensorbus-chaos-{}", std::process::id()))
    });
    eprintln!(
        "chaos: seed={seed} kills={} seconds={} interval_ms={} dir={}",
        opts.kills.map_or("-".into(), |k| k.to_string()),
        opts.seconds.map_or("-".into(), |s| s.to_string()),
        opts.interval_ms,
        dir.display()
    );
    match run_in(&opts, seed, kills_wanted, &dir) {
        Ok(code) => {
            if !opts.keep && code == 0 {
                let _ = std::fs::remove_dir_all(&dir);
            } else {
                eprintln!("chaos: journals kept in {}", dir.display());
            }
            code
        }
        Err(e) => {
            eprintln!(
                "chaos: harness error: {e} (journals kept in {})",
                dir.display()
            );
            2
        }
    }
}

fn run_in(opts: &Opts, seed: u64, kills_wanted: u64, dir: &Path) -> Result<i32, String> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let socket = dir.join("broker.sock");
    let config = Config::from_toml(CONFIG).map_err(|e| e.to_string())?;
    let broker = EmbeddedBroker::start(&config, &socket).map_err(|e| e.to_string())?;
    let client = Client::connect_to(Some(&socket), "chaos").map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut run = Run {
        dir: dir.to_path_buf(),
        socket,
        exe,
        seed,
        records: Vec::new(),
        live: (0..ROLES.len()).map(|_| None).collect(),
        next_inc: 1,
    };
    let mut rng = Rng::new(seed);

    // Receivers first (survivors must be subscribed before anything is
    // published), then producers.
    let receivers = roles_of(&[Kind::Consumer, Kind::Worker, Kind::Stage]);
    let producers = roles_of(&[Kind::Producer]);
    for group in [&receivers, &producers] {
        for &i in group {
            run.spawn(i).map_err(|e| format!("spawn: {e}"))?;
        }
        run.wait_ready(group)?;
    }
    eprintln!(
        "chaos: {} clients up after {:.1} s; killing",
        ROLES.len(),
        t0.elapsed().as_secs_f64()
    );

    // Chaos.
    let victims: Vec<usize> = (0..ROLES.len()).filter(|&i| !ROLES[i].survivor).collect();
    let chaos_start = Instant::now();
    let interval = |rng: &mut Rng| Duration::from_millis(rng.below(2 * opts.interval_ms + 1));
    let mut next_kill = chaos_start + interval(&mut rng);
    let mut restarts: Vec<(Instant, usize)> = Vec::new();
    let mut kills = 0u64;
    let time_up = |now: Instant| {
        opts.seconds
            .is_some_and(|s| now.duration_since(chaos_start) >= Duration::from_secs(s))
    };
    while kills < kills_wanted && !time_up(Instant::now()) {
        for i in run.reap() {
            if !ROLES[i].survivor {
                restarts.push((Instant::now() + Duration::from_millis(10), i));
            }
        }
        let now = Instant::now();
        if now >= next_kill {
            let alive: Vec<usize> = victims
                .iter()
                .copied()
                .filter(|&i| run.live[i].is_some())
                .collect();
            if !alive.is_empty() {
                let i = alive[rng.below(alive.len() as u64) as usize];
                if run.kill(i) {
                    kills += 1;
                    if kills % 100 == 0 || kills == kills_wanted {
                        eprintln!(
                            "chaos: {kills} kills after {:.1} s",
                            chaos_start.elapsed().as_secs_f64()
                        );
                    }
                }
                // Most replacements start at once; some after a pause, so
                // the others run for a while without that role.
                let delay = if rng.below(4) == 0 {
                    rng.below(200)
                } else {
                    rng.below(10)
                };
                restarts.push((now + Duration::from_millis(delay), i));
            }
            next_kill = now + interval(&mut rng);
        }
        let now = Instant::now();
        let mut k = 0;
        while k < restarts.len() {
            if restarts[k].0 <= now {
                let (_, i) = restarts.swap_remove(k);
                if run.live[i].is_none() {
                    run.spawn(i).map_err(|e| format!("spawn: {e}"))?;
                }
            } else {
                k += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let chaos_secs = chaos_start.elapsed().as_secs_f64();

    // Quiesce: producers stop; then workers and stages drain and stop; then
    // the broadcast consumers drain and stop.
    eprintln!("chaos: {kills} kills in {chaos_secs:.1} s; quiescing");
    let limit = Duration::from_secs(30);
    run.stop(&producers, limit);
    run.stop(&roles_of(&[Kind::Worker, Kind::Stage]), limit);
    run.stop(&roles_of(&[Kind::Consumer]), limit);

    // Leaks: every slot free once the broker has reclaimed everything.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (free, total) = loop {
        let (free, total) = slots(&client)?;
        if free == total || Instant::now() > deadline {
            break (free, total);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let leaked = u64::from(total - free.min(total));
    if leaked > 0 {
        let s = client.stat().map_err(|e| format!("stat: {e}"))?;
        eprintln!("chaos: LEAK {leaked} of {total} slots not free 10 s after quiescing: {s:#?}");
    }
    drop(client);
    drop(broker);

    let report = check::check(&run.records)?;
    let ok = leaked == 0
        && report.lost == 0
        && report.duplicated == 0
        && report.corrupt == 0
        && report.crashed == 0;
    eprintln!(
        "chaos: {} incarnations, {:.1} s in all (seed {seed})",
        run.records.len(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "chaos: kills={kills} leaked_slots={leaked} lost={} duplicated={} corrupt={} crashed={}",
        report.lost, report.duplicated, report.corrupt, report.crashed
    );
    Ok(if ok { 0 } else { 1 })
}
