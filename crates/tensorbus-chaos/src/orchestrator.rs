//! The orchestrator: an embedded broker, the client processes, the killing,
//! the quiescing, and the final line.

mod adoption;

use crate::check::{self, Outcome, Record};
use crate::control::Control;
use crate::journal::{Journal, STATE_READY};
use crate::payload::{self, Rng};
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tensorbus::error::RequestError;
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
    /// Run the broker as its own process and `kill -9` it too.
    pub kill_broker: bool,
    /// With `kill_broker`: client kills between broker kills.
    pub broker_every: u64,
    /// Control-plane chaos too (see [`crate::control`]).
    pub control: bool,
    /// Hundreds of handles too: the crowd roles (see [`CROWD_SPREAD`]),
    /// most of them on extension holder ids, killed like the others.
    pub many: bool,
}

/// The broker configuration (also what `role broker` runs): two size classes (tensors of up to 1 KiB use
/// the small pool, or the big one when it is exhausted), a broadcast
/// channel, a work queue, and a two-channel stage pipeline.
pub const CONFIG: &str = r#"
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

/// The broker configuration of `--many`: [`CONFIG`] with room for the
/// crowd: 256 subscribers per channel, 1,024 handles, a third broadcast
/// channel (`crowd`), and pools big enough for every lossy ring entry of
/// the crowd's subscriptions to pin a slot while the crowd holds dozens.
pub const CONFIG_MANY: &str = r#"
[limits]
max_channels = 8
max_producers_per_channel = 8
max_subscribers_per_channel = 256
max_handles = 1024
ring_capacity = 16

[[pools]]
name = "small"
slot_size = "1KiB"
slots = 1024
alignment = 64

[[pools]]
name = "big"
slot_size = "8KiB"
slots = 2048
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

[[channels]]
name = "crowd"
mode = "broadcast"
"#;

/// What each crowd process subscribes to: `(channel, subscriptions, delta)`
/// (`delta`: what the stages upstream added to every byte). 64 in all;
/// [`CROWDS`] of them make 640 crowd subscriptions: 227 on `bc`, 222 on
/// `pipe/out` and 200 on `crowd` with the base roles, so a replacement
/// can subscribe before the broker has retired its killed predecessor's
/// without reaching 256 on any channel.
pub const CROWD_SPREAD: &[(&str, u32, u8)] =
    &[("bc", 22, 0), ("pipe/out", 22, 1), ("crowd", 20, 0)];

/// Crowd processes of `--many`.
pub const CROWDS: usize = 10;

/// Fewest handles open at once that `--many` must reach (its acceptance
/// bar); below it the run fails with `too_few_handles=1`.
pub const MANY_MIN_HANDLES: u32 = 500;

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
    /// `--many` only: 64 lossy subscriptions spread over the broadcast
    /// channels ([`CROWD_SPREAD`]), received round-robin, every byte
    /// checked, dozens held at once.
    Crowd,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Producer => "producer",
            Kind::Consumer => "consumer",
            Kind::Worker => "worker",
            Kind::Stage => "stage",
            Kind::Crowd => "crowd",
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
    /// Runs only with `--many`.
    pub many: bool,
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
        many: false,
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

const fn many(r: Role) -> Role {
    Role { many: true, ..r }
}

const fn crowd(name: &'static str) -> Role {
    many(Role {
        hold_us: 10_000,
        ..role(name, Kind::Crowd, "crowd")
    })
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
    // --many: a producer for the crowd's own channel, and the crowd.
    many(Role {
        pace_us: 1000,
        ..role("crowd/producer", Kind::Producer, "crowd")
    }),
    crowd("crowd/0"),
    crowd("crowd/1"),
    crowd("crowd/2"),
    crowd("crowd/3"),
    crowd("crowd/4"),
    crowd("crowd/5"),
    crowd("crowd/6"),
    crowd("crowd/7"),
    crowd("crowd/8"),
    crowd("crowd/9"),
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
    /// Current broker epoch (see [`Record::epoch`]).
    epoch: u32,
    /// Whether the current epoch's broker has been killed.
    broker_dead: bool,
    /// `--many`: the roles marked [`Role::many`] run too.
    many: bool,
    /// Broker processes started (names their stderr files).
    brokers: u32,
}

/// What a process that does not stop when asked counts as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hang {
    /// A crash (a hang).
    Crash,
    /// Expected: a `block` producer waiting for a subscriber that died
    /// while no broker ran to retire it. Killed, counted as stalled.
    Stalled,
}

/// The broker: on a thread of the orchestrator, or (`--kill-broker`) its
/// own process, `tensorbus-chaos role broker`.
enum BrokerHandle {
    /// Held for its `Drop`, which stops the broker thread.
    Embedded {
        _broker: EmbeddedBroker,
    },
    Process(Child),
}

impl BrokerHandle {
    /// Starts a broker and connects the orchestrator's client to it.
    fn start(run: &mut Run, external: bool) -> Result<(BrokerHandle, Client), String> {
        let handle = BrokerHandle::spawn(run, external)?;
        Ok((handle, connect(run)?))
    }

    /// Starts a broker on the run's socket: its own process (`external`),
    /// or a thread of the orchestrator.
    fn spawn(run: &mut Run, external: bool) -> Result<BrokerHandle, String> {
        if external {
            let err = run.dir.join(format!("broker-{}.stderr", run.brokers));
            run.brokers += 1;
            let mut cmd = Command::new(&run.exe);
            cmd.arg("role")
                .arg("broker")
                .arg("--socket")
                .arg(&run.socket);
            if run.many {
                cmd.arg("--many").arg("1");
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&err).map_err(|e| e.to_string())?)
                .spawn()
                .map_err(|e| format!("spawn the broker: {e}"))?;
            Ok(BrokerHandle::Process(child))
        } else {
            let config = Config::from_toml(if run.many { CONFIG_MANY } else { CONFIG })
                .map_err(|e| e.to_string())?;
            Ok(BrokerHandle::Embedded {
                _broker: EmbeddedBroker::start(&config, &run.socket).map_err(|e| e.to_string())?,
            })
        }
    }
}

/// Connects the orchestrator's client. A restarted broker must be found on
/// the same path (the dead one's socket file is stale, not an obstacle).
fn connect(run: &Run) -> Result<Client, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect_to(Some(&run.socket), "chaos") {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(format!(
                    "no broker at {} after 10 s: {e}",
                    run.socket.display()
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl BrokerHandle {
    /// The broker's process id, when it runs as its own process.
    fn pid(&self) -> Option<u32> {
        match self {
            BrokerHandle::Process(c) => Some(c.id()),
            BrokerHandle::Embedded { .. } => None,
        }
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        if let BrokerHandle::Process(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Journal capacity in entries: survivors see everything for the whole run.
fn capacity(r: &Role) -> usize {
    if r.survivor {
        16 << 20
    } else if r.kind == Kind::Crowd {
        1024 // no entries: a crowd checks in process and only counts
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
            epoch: self.epoch,
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
        } else if self.broker_dead && p.journal.state() < STATE_READY && status.code() == Some(2) {
            // Still connecting or opening its handle when the broker died:
            // it got a BrokerUnavailable error, as it should.
            Outcome::NoBroker
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
    /// Returns how many were killed as [`Hang::Stalled`].
    fn stop(&mut self, roles: &[usize], limit: Duration, hang: Hang) -> u64 {
        let mut stalled = 0;
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
            let status = crate::control::exit_by(&mut p.child, deadline);
            match status {
                Some(s) => self.ended(p, s, true),
                None => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    let rec = &mut self.records[p.record];
                    if hang == Hang::Stalled {
                        rec.outcome = Outcome::Killed { died_in_pop: false };
                        stalled += 1;
                        continue;
                    }
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
        stalled
    }

    /// Total journal entries of the live survivors (what they received).
    fn survivor_entries(&self) -> u64 {
        self.live
            .iter()
            .flatten()
            .filter(|p| ROLES[self.records[p.record].role].survivor)
            .map(|p| p.journal.count())
            .sum()
    }

    /// Starts every role (receivers first, so that the survivors are
    /// subscribed before anything is published) and waits until all are ready.
    fn start_all(&mut self) -> Result<(), String> {
        let receivers = self.roles_of(&[Kind::Consumer, Kind::Worker, Kind::Stage, Kind::Crowd]);
        let producers = self.roles_of(&[Kind::Producer]);
        for group in [&receivers, &producers] {
            for &i in group {
                self.spawn(i).map_err(|e| format!("spawn: {e}"))?;
            }
            self.wait_ready(group)?;
        }
        Ok(())
    }

    /// Stops every client: producers, then workers and stages (which
    /// drain), then broadcast consumers (which drain). Returns how many
    /// producers were killed as stalled (only with `hang` = Stalled).
    fn quiesce(&mut self, producer_limit: Duration, hang: Hang) -> u64 {
        let limit = Duration::from_secs(30);
        // The crowd first: it exits at once when asked (it need not drain)
        // and lets go of what it holds.
        self.stop(&self.roles_of(&[Kind::Crowd]), limit, Hang::Crash);
        let stalled = self.stop(&self.roles_of(&[Kind::Producer]), producer_limit, hang);
        self.stop(
            &self.roles_of(&[Kind::Worker, Kind::Stage]),
            limit,
            Hang::Crash,
        );
        self.stop(&self.roles_of(&[Kind::Consumer]), limit, Hang::Crash);
        stalled
    }

    /// The roles of this run (those marked [`Role::many`] only with `--many`).
    fn active(&self, i: usize) -> bool {
        self.many || !ROLES[i].many
    }

    /// The roles of this run of one of `kinds`.
    fn roles_of(&self, kinds: &[Kind]) -> Vec<usize> {
        (0..ROLES.len())
            .filter(|&i| self.active(i) && kinds.contains(&ROLES[i].kind))
            .collect()
    }
}

fn default_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut r = Rng::new(t ^ (u64::from(std::process::id()) << 32));
    r.next_u64() >> 16 // keep it short enough to type
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
        "chaos: seed={seed} kills={} seconds={} interval_ms={} kill_broker={} dir={}",
        opts.kills.map_or("-".into(), |k| k.to_string()),
        opts.seconds.map_or("-".into(), |s| s.to_string()),
        opts.interval_ms,
        if opts.kill_broker {
            format!("every {} kills", opts.broker_every)
        } else {
            "no".into()
        },
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
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut run = Run {
        dir: dir.to_path_buf(),
        socket: dir.join("broker.sock"),
        exe,
        seed,
        records: Vec::new(),
        live: (0..ROLES.len()).map(|_| None).collect(),
        next_inc: 1,
        epoch: 0,
        broker_dead: false,
        many: opts.many,
        brokers: 0,
    };
    let (mut broker, mut client) = BrokerHandle::start(&mut run, opts.kill_broker || opts.control)?;
    let mut rng = Rng::new(seed);
    run.start_all()?;
    let mut ctl = match (opts.control, broker.pid()) {
        (true, Some(pid)) => Some(Control::start(
            &run.dir,
            &run.socket,
            &run.exe,
            seed,
            pid,
            opts.interval_ms,
        )?),
        _ => None,
    };
    // Counted from the first kill on: what was open under the kills.
    let mut handles = HandleStats::default();
    eprintln!(
        "chaos: {} clients up after {:.1} s ({} handles open); killing",
        (0..ROLES.len()).filter(|&i| run.active(i)).count(),
        t0.elapsed().as_secs_f64(),
        client.stat().map_or(0, |s| s.handles_open)
    );

    if opts.many {
        eprintln!(
            "chaos: --many: {CROWDS} crowd processes of {} lossy subscriptions each",
            CROWD_SPREAD.iter().map(|&(_, n, _)| n).sum::<u32>()
        );
    }

    // Chaos.
    let victims: Vec<usize> = (0..ROLES.len())
        .filter(|&i| run.active(i) && !ROLES[i].survivor)
        .collect();
    let crowd: Vec<usize> = victims
        .iter()
        .copied()
        .filter(|&i| ROLES[i].kind == Kind::Crowd)
        .collect();
    let mut crowd_kills = 0u64;
    let mut next_sample = Instant::now();
    let chaos_start = Instant::now();
    let interval = |rng: &mut Rng| Duration::from_millis(rng.below(2 * opts.interval_ms + 1));
    let mut next_kill = chaos_start + interval(&mut rng);
    let mut restarts: Vec<(Instant, usize)> = Vec::new();
    let mut kills = 0u64;
    let mut b = BrokerStats::default();
    let mut ad = adoption::AdoptStats::default();
    let mut broker_kill_at: Option<Instant> = None;
    let mut stranded: HashMap<u32, HashSet<(u32, u64)>> = HashMap::new();
    let time_up = |now: Instant| {
        opts.seconds
            .is_some_and(|s| now.duration_since(chaos_start) >= Duration::from_secs(s))
    };
    while kills < kills_wanted && !time_up(Instant::now()) {
        if opts.many && Instant::now() >= next_sample {
            handles.sample(&client);
            next_sample = Instant::now() + Duration::from_millis(100);
        }
        for i in run.reap() {
            if !ROLES[i].survivor {
                restarts.push((Instant::now() + Duration::from_millis(10), i));
            }
        }
        let now = Instant::now();
        if broker_kill_at.is_some_and(|t| now >= t) {
            // The broker's turn: kill it, check the bus goes on without it,
            // start a new broker that adopts the bus (`adoption.rs`).
            broker_kill_at = None;
            restarts.clear();
            let end = adoption::cycle(&mut run, broker, client, &mut rng, &mut b, &mut ad)?;
            if let Some((epoch, set)) = end.stranded {
                stranded.insert(epoch, set);
            }
            (broker, client) = (end.broker, end.client);
            // The roles killed while no broker ran start again.
            for i in 0..ROLES.len() {
                if run.active(i) && run.live[i].is_none() {
                    restarts.push((Instant::now(), i));
                }
            }
            next_kill = Instant::now() + interval(&mut rng);
            continue;
        }
        if now >= next_kill && broker_kill_at.is_none() {
            // With --many, half the kills go to the crowd (processes each
            // holding dozens of tensors on extension holder ids), the other
            // half to any victim.
            let alive_crowd = alive_victims(&crowd, &run.live);
            let alive = if !alive_crowd.is_empty() && rng.below(2) == 0 {
                alive_crowd
            } else {
                alive_victims(&victims, &run.live)
            };
            if !alive.is_empty() {
                let i = alive[rng.below(alive.len() as u64) as usize];
                if run.kill(i) {
                    kills += 1;
                    crowd_kills += u64::from(ROLES[i].kind == Kind::Crowd);
                    if kills % 100 == 0 || kills == kills_wanted {
                        eprintln!(
                            "chaos: {kills} kills after {:.1} s",
                            chaos_start.elapsed().as_secs_f64()
                        );
                    }
                    if opts.kill_broker
                        && kills % opts.broker_every.max(1) == 0
                        && kills < kills_wanted
                    {
                        // Half the time within 0-2 ms, while the broker is
                        // still repairing after this death; otherwise later.
                        let delay = if rng.below(2) == 0 {
                            Duration::from_millis(rng.below(3))
                        } else {
                            interval(&mut rng)
                        };
                        broker_kill_at = Some(now + delay);
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
        if let Some(ctl) = ctl.as_mut() {
            ctl.tick(&mut |crng: &mut Rng| {
                // A data-plane client dies while the broker is frozen.
                let alive = alive_victims(&victims, &run.live);
                if !alive.is_empty() {
                    let i = alive[crng.below(alive.len() as u64) as usize];
                    if run.kill(i) {
                        kills += 1;
                    }
                    restarts.push((Instant::now() + Duration::from_millis(10), i));
                }
            })?;
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
    run.quiesce(Duration::from_secs(30), Hang::Crash);
    if let Some(ctl) = ctl.as_mut() {
        ctl.finish(&client)?;
    }

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

    let report = check::check(&run.records, &stranded)?;
    let too_few_handles = u64::from(opts.many && handles.peak < MANY_MIN_HANDLES);
    if opts.many {
        eprintln!(
            "chaos: handles: peak {} open at once under the kills, mean {:.0} over {} samples (every 100 ms), fewest {}; {crowd_kills} of {kills} kills hit a crowd process",
            handles.peak,
            handles.mean(),
            handles.samples,
            handles.min.unwrap_or(0)
        );
        if too_few_handles > 0 {
            eprintln!(
                "chaos: TOO FEW HANDLES: at most {} open at once, --many needs {MANY_MIN_HANDLES}",
                handles.peak
            );
        }
    }
    let ok = leaked == 0
        && too_few_handles == 0
        && report.lost == 0
        && report.duplicated == 0
        && report.corrupt == 0
        && report.crashed == 0
        && report.unaccounted_drops == 0
        && b.failures == 0
        && ad.failures == 0
        && ctl.as_ref().is_none_or(|c| {
            c.stats.phantoms == 0 && c.stats.failures == 0 && c.stats.fork_failures == 0
        });
    eprintln!(
        "chaos: {} incarnations, {:.1} s in all (seed {seed})",
        run.records.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut line = format!("chaos: kills={kills}");
    if opts.kill_broker {
        eprintln!(
            "chaos: broker: {} kills; survivors received {} tensors in {} ms without a broker (least in one outage: {}); {} clients killed while no broker ran; {} producers stalled on a dead block subscriber; {} clients refused while starting; {} slots stranded ({} tensors)",
            b.kills,
            b.flow,
            b.outage_ms,
            b.min_flow.unwrap_or(0),
            b.outage_kills,
            b.stalled,
            run.records.iter().filter(|r| r.outcome == Outcome::NoBroker).count(),
            b.stranded_slots,
            stranded.values().map(HashSet::len).sum::<usize>()
        );
        eprintln!(
            "chaos: adoption: {} clients adopted over {} restarts; {} handles of dead clients reclaimed by the new brokers; {} custody items released; a fresh client received from a pre-restart producer after {} restarts ({} without one left to check)",
            ad.adopted,
            b.kills,
            ad.reclaimed_handles,
            ad.custody_released,
            ad.fresh_received,
            ad.fresh_skipped
        );
        line += &format!(
            " broker_kills={} adopted={} fresh_received={}",
            b.kills, ad.adopted, ad.fresh_received
        );
    }
    if opts.many {
        line += &format!(
            " crowd_kills={crowd_kills} open_handles_peak={}",
            handles.peak
        );
    }
    if let Some(c) = &ctl {
        let c = &c.stats;
        eprintln!(
            "chaos: control: {} forks; {} inherited handles refused in children; {} children killed by their parent; {} forkers killed",
            c.forks, c.forked_child_errors, c.fork_child_kills, c.forker_kills
        );
        line += &format!(
            " freezes={} greedy_disconnected={} opener_kills={} request_timeouts={} emfile={} forks={} forked_child_errors={}",
            c.freezes,
            c.greedy_disconnected,
            c.opener_kills,
            c.timeouts,
            c.emfile,
            c.forks,
            c.forked_child_errors
        );
    }
    line += &format!(
        " leaked_slots={leaked} lost={} duplicated={} corrupt={} crashed={} unaccounted_drops={}",
        report.lost, report.duplicated, report.corrupt, report.crashed, report.unaccounted_drops
    );
    if opts.kill_broker {
        line += &format!(
            " broker_failures={} adoption_failures={}",
            b.failures, ad.failures
        );
    }
    if opts.many {
        line += &format!(" too_few_handles={too_few_handles}");
    }
    if let Some(c) = &ctl {
        line += &format!(
            " phantom_subscribers={} control_failures={} fork_failures={}",
            c.stats.phantoms, c.stats.failures, c.stats.fork_failures
        );
    }
    println!("{line}");
    Ok(if ok { 0 } else { 1 })
}

/// `handles_open` of the broker's `stat`, sampled during the chaos (from
/// the start of the kills to the last one).
#[derive(Default)]
struct HandleStats {
    peak: u32,
    min: Option<u32>,
    sum: u64,
    samples: u64,
}

impl HandleStats {
    /// One sample (a failed `stat` is skipped with a note: it is the
    /// crowd's handles that are measured, not the control plane).
    fn sample(&mut self, client: &Client) {
        match client.stat() {
            Ok(s) => {
                let n = s.handles_open;
                self.peak = self.peak.max(n);
                self.min = Some(self.min.map_or(n, |m| m.min(n)));
                self.sum += u64::from(n);
                self.samples += 1;
            }
            Err(e) => eprintln!("chaos: stat for handles_open: {e}"),
        }
    }
    fn mean(&self) -> f64 {
        self.sum as f64 / self.samples.max(1) as f64
    }
}

/// What the broker kills did.
#[derive(Default)]
struct BrokerStats {
    /// Broker kills.
    kills: u64,
    /// Checks that failed: a control call not refused while the broker was
    /// dead, or an outage in which no survivor received anything.
    failures: u64,
    /// Tensors the survivors received while no broker ran.
    flow: u64,
    /// Fewest in one outage.
    min_flow: Option<u64>,
    /// Milliseconds without a broker, in all.
    outage_ms: u64,
    /// Producers killed after not stopping (stalled on a dead subscriber).
    stalled: u64,
    /// Clients killed while no broker ran.
    outage_kills: u64,
    /// Slots still held in the orphaned buses after their clients exited.
    stranded_slots: u64,
}

/// Tensors stranded in the dead broker's bus, the new broker, its client.
type NextEpoch = (HashSet<(u32, u64)>, BrokerHandle, Client);

/// The first half of a broker kill: `kill -9` the broker; check that
/// control calls are refused and that the survivors keep receiving without
/// it for 200-500 ms; `kill -9` one more client, which nobody can repair
/// after until a broker adopts the bus.
fn kill_broker_and_outage(
    run: &mut Run,
    broker: BrokerHandle,
    client: &Client,
    rng: &mut Rng,
    b: &mut BrokerStats,
) {
    drop(broker); // SIGKILL and reap
    run.broker_dead = true;
    b.kills += 1;
    match client.stat() {
        Err(RequestError::BrokerUnavailable { .. }) => {}
        other => {
            b.failures += 1;
            eprintln!("chaos: BROKER a control call after its death returned {other:?}, not BrokerUnavailable");
        }
    }
    let before = run.survivor_entries();
    let outage = Duration::from_millis(200 + rng.below(301));
    let start = Instant::now();
    while start.elapsed() < outage {
        run.reap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let flow = run.survivor_entries().saturating_sub(before);
    b.flow += flow;
    b.outage_ms += outage.as_millis() as u64;
    b.min_flow = Some(b.min_flow.map_or(flow, |m| m.min(flow)));
    if flow == 0 {
        b.failures += 1;
        eprintln!(
            "chaos: BROKER no survivor received anything in {} ms without a broker",
            outage.as_millis()
        );
    }
    // One more client dies while no broker runs: nobody repairs after it
    // until the bus is adopted (a block producer it was subscribed to
    // waits for that).
    let victims: Vec<usize> = (0..ROLES.len())
        .filter(|&i| !ROLES[i].survivor && run.live[i].is_some())
        .collect();
    if !victims.is_empty() {
        let i = victims[rng.below(victims.len() as u64) as usize];
        if run.kill(i) {
            b.outage_kills += 1;
        }
        let pause = Instant::now();
        while pause.elapsed() < Duration::from_millis(50 + rng.below(101)) {
            run.reap();
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    eprintln!(
        "chaos: broker kill {}: {flow} received by survivors in {} ms without it",
        b.kills,
        outage.as_millis()
    );
}

/// The fallback when a new broker did not adopt the bus (what a broker
/// kill did before adoption): stop every client of the dead broker (they
/// drain over the pools they have mapped); record what is left held in
/// its slots (stranded: no broker repaired it); connect to the new broker
/// `nb` and start every role again as its clients.
fn broker_cycle_end_epoch(
    run: &mut Run,
    nb: BrokerHandle,
    client: Client,
    b: &mut BrokerStats,
) -> Result<NextEpoch, String> {
    // A block producer waiting for a subscriber that died while no broker
    // ran never returns from publish: killed as stalled.
    b.stalled += run.quiesce(Duration::from_secs(2), Hang::Stalled);
    let (set, held) = stranded_tensors(&client)?;
    b.stranded_slots += held;
    eprintln!("chaos: broker kill {}: {held} slots stranded", b.kills);
    drop(client);
    run.epoch += 1;
    run.broker_dead = false;
    let client = connect(run)?;
    run.start_all()?;
    Ok((set, nb, client))
}

/// After a dead broker's clients have all exited: the slots of its bus that
/// are still held (by handles it never reclaimed, queued in dead
/// subscribers' rings, or in its own custody), and the tensors `(inc, seq)`
/// in them, from their user headers. Read through the orchestrator's own
/// mapping of that bus's control segment, which `client` keeps alive.
fn stranded_tensors(client: &Client) -> Result<(HashSet<(u32, u64)>, u64), String> {
    let config = Config::from_toml(CONFIG).map_err(|e| e.to_string())?;
    let layout = tensorbus_core::layout::Layout::compute(&config.layout_params())
        .map_err(|e| e.to_string())?;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    let (base, len) = maps
        .lines()
        .filter(|l| l.contains("memfd:tensorbus-control") && l.contains("rw-s"))
        .find_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            let a = usize::from_str_radix(a, 16).ok()?;
            Some((a, usize::from_str_radix(b, 16).ok()? - a))
        })
        .ok_or("no control segment mapped")?;
    let _alive = client; // the mapping lives as long as the client
                         // SAFETY: the orchestrator's client maps exactly one control segment
                         // (the previous epoch's client is gone), read-write and shared, for as
                         // long as `client` lives, which outlives `ctl`; only atomics are used.
    let ctl = unsafe { tensorbus_core::control::Control::from_raw(base as *mut u8, len, layout) }
        .map_err(|e| e.to_string())?;
    let mut set = HashSet::new();
    let mut held = 0;
    for pool in 0..ctl.pools() {
        for index in 0..ctl.slots(pool) {
            let Some(slot) = ctl.slot(pool, index) else {
                continue;
            };
            if !slot.is_held() {
                continue;
            }
            held += 1;
            if let Some((_, seq, inc)) = slot
                .read_meta()
                .ok()
                .and_then(|m| payload::parse_header(m.user_header()))
            {
                set.insert((inc, seq));
            }
        }
    }
    Ok((set, held))
}

/// The roles among `victims` that have a live process now.
fn alive_victims(victims: &[usize], live: &[Option<Proc>]) -> Vec<usize> {
    victims
        .iter()
        .copied()
        .filter(|&i| live[i].is_some())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_config_fits_the_crowd() {
        let config = Config::from_toml(CONFIG_MANY).expect("CONFIG_MANY parses");
        let limit = config.limits.max_subscribers_per_channel;
        let crowd = ROLES.iter().filter(|r| r.kind == Kind::Crowd).count();
        assert_eq!(crowd, CROWDS);
        assert!(ROLES
            .iter()
            .filter(|r| r.kind == Kind::Crowd)
            .all(|r| r.many && !r.survivor));
        let per_crowd: u32 = CROWD_SPREAD.iter().map(|&(_, n, _)| n).sum();
        assert_eq!(per_crowd, 64);
        for &(channel, n, _) in CROWD_SPREAD {
            assert!(
                config.channels.iter().any(|c| c.name == channel),
                "{channel}"
            );
            let base = ROLES
                .iter()
                .filter(|r| r.channel == channel && matches!(r.kind, Kind::Consumer))
                .count() as u32;
            // Every crowd, plus one replacement subscribing before its
            // killed predecessor was retired.
            let most = base + n * (CROWDS as u32 + 1);
            assert!(most <= limit, "{channel}: {most} subscribers > {limit}");
        }
        // Every role's handles (a stage has two), plus two crowds' worth
        // of replacements not yet retired.
        let handles = ROLES.len() + 1 + per_crowd as usize * (CROWDS + 2);
        assert!(handles <= config.limits.max_handles as usize);
        assert!(per_crowd as usize * CROWDS >= MANY_MIN_HANDLES as usize);
    }
}
