//! `--control`: the control plane under misuse (issue 12), while the data
//! plane chaos goes on around it. The broker runs as its own process, and
//! the orchestrator, at random moments:
//!
//! * freezes it (SIGSTOP) for 200-1200 ms, longer than the openers' request
//!   timeout, sometimes `kill -9`ing an opener while frozen (it dies with a
//!   request in flight) or a data-plane client (reclaimed after SIGCONT);
//! * starts a `greedy` client that sends stat requests and never reads a
//!   reply, which the broker must disconnect (and must not block on);
//! * `kill -9`s an opener or the forker at any moment (often mid-request).
//!
//! Two `opener` processes run all the time. Each opens and closes consumers
//! (block policy) and a producer on the channel [`CHANNEL`] with a short
//! request timeout, so that opens during a freeze time out; sometimes it
//! exhausts its file descriptors and opens (EMFILE must be reported as
//! such); and it keeps checking, with `stat`, that the broker holds exactly
//! its live objects: its subscribers on [`CHANNEL`] and its handle count
//! equal the consumers (and producer) it has. A mismatch is a phantom.
//!
//! A `forker` process runs all the time too (see [`crate::forker`]): it
//! forks children that must find every inherited handle inert
//! (`ForkedChild`), then use a client of their own, and exit or are
//! `kill -9`ed, while the parent's handles must keep working as before.
//!
//! At the end (after the data plane quiesced) the openers and the forker
//! are stopped and the broker must hold no subscriber and no producer at
//! all.
//!
//! ```text
//! tensorbus-chaos role opener --socket S --inc N --seed X --timeout-ms T
//! tensorbus-chaos role greedy --socket S
//! tensorbus-chaos role forker --socket S --inc N --seed X
//! ```
//!
//! An opener exits 0 when its stdin closes, 3 after a phantom; it prints a
//! `timeout` line per request that timed out, an `emfile` line per open
//! that reported EMFILE, a `phantom` line per failed check (so that the
//! orchestrator counts them even in openers it kills later), and `opener: opens=O timeouts=T emfile=E limits=L
//! phantoms=P` last. A greedy
//! client exits 0 once disconnected, 4 if the broker stopped reading its
//! requests.

use crate::payload::Rng;
use crate::roles::{fail, Args};
use std::fs::File;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus::error::{OpenError, RequestError};
use tensorbus::stat::StatReport;
use tensorbus::{Client, Consumer, ConsumerOptions, Mode, Policy, Producer, ProducerOptions};
use tensorbus_core::proto::{encode_frames, Request};

/// The channel the openers use (created at run time; nobody publishes).
pub const CHANNEL: &str = "ctl";
/// The openers' request timeout.
pub const OPENER_TIMEOUT_MS: u64 = 150;
/// Openers running at any time.
const OPENERS: usize = 2;

// ------------------------------------------------------------------ roles ---

/// A flag set when stdin reaches end of file (the orchestrator's stop).
fn stdin_closed() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        f.store(true, Ordering::Relaxed);
    });
    flag
}

impl OpenerStats {
    fn timeout(&mut self) {
        self.timeouts += 1;
        println!("timeout");
    }
}

#[derive(Default)]
struct OpenerStats {
    opens: u64,
    timeouts: u64,
    emfile: u64,
    limits: u64,
    phantoms: u64,
}

impl OpenerStats {
    /// Counts an expected failure of a control request (printing a
    /// `timeout` or `emfile` line, so that the count survives a kill -9);
    /// exits on others.
    fn failed(&mut self, what: &str, e: &OpenError) {
        match e {
            OpenError::Request(RequestError::Timeout { .. }) => self.timeout(),
            OpenError::Request(RequestError::NoFreeFd { .. }) => {
                self.emfile += 1;
                println!("emfile");
            }
            OpenError::LimitReached(_) => self.limits += 1,
            other => fail(&format!("{what}: {other}")),
        }
    }
}

/// `role opener`: see the module docs.
pub fn opener(a: &Args) -> ! {
    let inc = a.num("inc", 0);
    let mut rng = Rng::new(a.num("seed", 1) ^ (inc << 24) ^ 0x0C0C);
    let stop = stdin_closed();
    let client = Client::connect_to(
        Some(Path::new(a.str("socket"))),
        &format!("chaos-opener-{inc}"),
    )
    .unwrap_or_else(|e| fail(&format!("connect: {e}")));
    client.set_request_timeout(Duration::from_millis(
        a.num("timeout-ms", OPENER_TIMEOUT_MS),
    ));
    let consumer_opts = || {
        ConsumerOptions::default()
            .end_of_stream(false)
            .policy(Policy::Block)
            .depth(2)
            .create(tensorbus::ChannelSpec::new(Mode::Broadcast))
    };
    let mut consumers: Vec<Consumer> = Vec::new();
    let mut producer: Option<Producer> = None;
    let mut s = OpenerStats::default();
    while !stop.load(Ordering::Relaxed) {
        match rng.below(12) {
            0..=3 if consumers.len() < 3 => match client.consumer_with(CHANNEL, consumer_opts()) {
                Ok(c) => {
                    s.opens += 1;
                    consumers.push(c);
                }
                Err(e) => s.failed("open consumer", &e),
            },
            4 | 5 if !consumers.is_empty() => {
                let i = rng.below(consumers.len() as u64) as usize;
                drop(consumers.swap_remove(i));
            }
            6 => match producer.take() {
                Some(p) => drop(p),
                None => match client.producer_with(
                    CHANNEL,
                    ProducerOptions::default().create(tensorbus::ChannelSpec::new(Mode::Broadcast)),
                ) {
                    Ok(p) => {
                        s.opens += 1;
                        producer = Some(p);
                    }
                    Err(e) => s.failed("open producer", &e),
                },
            },
            7 | 8 => check(&client, &consumers, producer.is_some(), &mut s),
            9 => {
                if let Some(c) = exhausted_open(&client, &consumer_opts, &mut s) {
                    consumers.push(c);
                }
                check(&client, &consumers, producer.is_some(), &mut s);
            }
            _ => std::thread::sleep(Duration::from_micros(rng.below(3000))),
        }
    }
    drop(consumers);
    drop(producer);
    check(&client, &[], false, &mut s);
    println!(
        "opener: opens={} timeouts={} emfile={} limits={} phantoms={}",
        s.opens, s.timeouts, s.emfile, s.limits, s.phantoms
    );
    std::process::exit(if s.phantoms == 0 { 0 } else { 3 });
}

/// Compares what the broker holds for this client with its live objects.
fn check(client: &Client, consumers: &[Consumer], producer: bool, s: &mut OpenerStats) {
    let stat = match client.stat() {
        Ok(stat) => stat,
        Err(RequestError::Timeout { .. }) => {
            s.timeout();
            return;
        }
        Err(e) => fail(&format!("stat: {e}")),
    };
    let me = client.id();
    let subs = stat
        .channels
        .iter()
        .filter(|c| c.name == CHANNEL)
        .flat_map(|c| &c.subscribers)
        .filter(|sub| sub.client == me)
        .count();
    let handles = stat
        .clients
        .iter()
        .find(|c| c.id == me)
        .map_or(0, |c| c.handles as usize);
    let want = consumers.len() + usize::from(producer);
    if subs != consumers.len() || handles != want {
        s.phantoms += 1;
        println!("phantom");
        eprintln!(
            "opener: PHANTOM: the broker holds {subs} subscribers and {handles} handles of client {me}, which has {} consumers and {} producer",
            consumers.len(),
            usize::from(producer)
        );
    }
}

struct Rlimit(libc::rlimit);

impl Rlimit {
    fn get() -> Rlimit {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `lim`.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            fail("getrlimit failed");
        }
        Rlimit(lim)
    }
    fn set(&self, cur: u64) {
        let lim = libc::rlimit {
            rlim_cur: cur,
            rlim_max: self.0.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            fail("setrlimit failed");
        }
    }
}

/// Opens a consumer with no free descriptor: it must fail with NoFreeFd
/// (or time out during a freeze) and leave nothing behind (which the next
/// check verifies). Returns the consumer if it opened anyway.
fn exhausted_open(
    client: &Client,
    opts: &dyn Fn() -> ConsumerOptions,
    s: &mut OpenerStats,
) -> Option<Consumer> {
    let saved = Rlimit::get();
    let highest = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
                .max()
                .unwrap_or(2)
        })
        .unwrap_or_else(|e| fail(&format!("/proc/self/fd: {e}")));
    saved.set(highest + 1);
    let mut fillers = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        fillers.push(f);
        if fillers.len() > 100_000 {
            fail("the descriptor table never filled");
        }
    }
    let result = client.consumer_with(CHANNEL, opts());
    drop(fillers);
    saved.set(saved.0.rlim_cur);
    match result {
        Ok(c) => {
            // Only possible if a descriptor was freed meanwhile (none is).
            eprintln!("opener: a consumer opened with no free descriptor");
            s.opens += 1;
            Some(c)
        }
        Err(e) => {
            s.failed("open consumer without a free descriptor", &e);
            None
        }
    }
}

/// `role greedy`: see the module docs.
pub fn greedy(a: &Args) -> ! {
    let conn = tensorbus_shm::SeqpacketConn::connect(Path::new(a.str("socket")))
        .unwrap_or_else(|e| fail(&format!("connect: {e}")));
    let frame = |id: u64, req: &Request| {
        let json = serde_json::to_vec(req).unwrap_or_else(|e| fail(&e.to_string()));
        encode_frames(id, &json).swap_remove(0)
    };
    let hello = Request::Hello {
        name: "chaos-greedy".into(),
        version: tensorbus_core::layout::LAYOUT_VERSION,
    };
    conn.send(&frame(1, &hello), &[])
        .unwrap_or_else(|e| fail(&format!("hello: {e}")));
    let mut buf = vec![0u8; tensorbus_core::proto::MAX_MESSAGE];
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    conn.recv(&mut buf, &mut Vec::new())
        .unwrap_or_else(|e| fail(&format!("welcome: {e}")));
    conn.set_nonblocking(true)
        .unwrap_or_else(|e| fail(&format!("nonblocking: {e}")));
    let stat = frame(2, &Request::Stat);
    let mut sent = 0u64;
    let mut stuck: Option<Instant> = None;
    loop {
        match conn.try_send(&stat, &[]) {
            Ok(()) => {
                sent += 1;
                stuck = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // A freeze lasts at most 1.2 s; the broker otherwise reads
                // requests as fast as they come.
                if stuck.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(30) {
                    eprintln!("greedy: the broker stopped reading requests after {sent}");
                    std::process::exit(4);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                println!("greedy: disconnected after {sent} unread requests");
                std::process::exit(0);
            }
            Err(e) => fail(&format!("send: {e}")),
        }
    }
}

// ----------------------------------------------------------- orchestrator ---

/// A control-plane client process.
struct CtlProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

impl CtlProc {
    fn tail(&self) -> Vec<String> {
        let s = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        s.lines().rev().take(5).map(str::to_owned).collect()
    }
}

/// What `--control` did and found.
#[derive(Default)]
pub struct ControlStats {
    /// Broker freezes (SIGSTOP ... SIGCONT).
    pub freezes: u64,
    /// Greedy clients the broker disconnected.
    pub greedy_disconnected: u64,
    /// Openers killed (`kill -9`), while the broker was frozen or not.
    pub opener_kills: u64,
    /// Opener requests that timed out (summed from the openers' reports).
    pub timeouts: u64,
    /// Opens without a free descriptor that reported EMFILE.
    pub emfile: u64,
    /// Phantoms: an opener's check that failed, plus subscribers and
    /// producers the broker still held after everything stopped.
    pub phantoms: u64,
    /// Control-plane clients that failed otherwise (crash, greedy never
    /// disconnected, broker stopped reading).
    pub failures: u64,
    /// Forks made by forkers.
    pub forks: u64,
    /// Inherited handles that refused with `ForkedChild` in a child.
    pub forked_child_errors: u64,
    /// Forked children their parent killed (`kill -9`) on purpose.
    pub fork_child_kills: u64,
    /// Forkers killed (`kill -9`) by the orchestrator.
    pub forker_kills: u64,
    /// Fork failures: a child whose inherited handle did not refuse or whose
    /// own client failed, a parent whose handles a child affected, or a
    /// forker that crashed or hung.
    pub fork_failures: u64,
}

/// The control-plane side of a run.
pub struct Control {
    dir: PathBuf,
    socket: PathBuf,
    exe: PathBuf,
    seed: u64,
    broker_pid: libc::pid_t,
    rng: Rng,
    openers: Vec<Option<CtlProc>>,
    greedy: Option<CtlProc>,
    forker: Option<CtlProc>,
    next_inc: u64,
    next_action: Instant,
    interval_ms: u64,
    /// Counters.
    pub stats: ControlStats,
}

impl Control {
    /// Starts the openers.
    pub fn start(
        dir: &Path,
        socket: &Path,
        exe: &Path,
        seed: u64,
        broker_pid: u32,
        interval_ms: u64,
    ) -> Result<Control, String> {
        let mut c = Control {
            dir: dir.to_path_buf(),
            socket: socket.to_path_buf(),
            exe: exe.to_path_buf(),
            seed,
            broker_pid: libc::pid_t::try_from(broker_pid).map_err(|e| e.to_string())?,
            rng: Rng::new(seed ^ 0xC0_47_20_1C),
            openers: (0..OPENERS).map(|_| None).collect(),
            greedy: None,
            forker: None,
            next_inc: 1,
            next_action: Instant::now(),
            interval_ms: interval_ms.max(1) * 4,
            stats: ControlStats::default(),
        };
        for i in 0..OPENERS {
            c.openers[i] = Some(c.spawn("opener")?);
        }
        c.forker = Some(c.spawn("forker")?);
        c.next_action = Instant::now() + c.interval();
        Ok(c)
    }

    fn interval(&mut self) -> Duration {
        Duration::from_millis(self.rng.below(2 * self.interval_ms + 1))
    }

    fn spawn(&mut self, kind: &str) -> Result<CtlProc, String> {
        let inc = self.next_inc;
        self.next_inc += 1;
        let stdout = self.dir.join(format!("ctl-{kind}-{inc}.stdout"));
        let stderr = self.dir.join(format!("ctl-{kind}-{inc}.stderr"));
        let mut child = Command::new(&self.exe)
            .arg("role")
            .arg(kind)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--inc")
            .arg(inc.to_string())
            .arg("--seed")
            .arg(self.seed.to_string())
            .arg("--timeout-ms")
            .arg(OPENER_TIMEOUT_MS.to_string())
            .stdin(Stdio::piped())
            .stdout(File::create(&stdout).map_err(|e| e.to_string())?)
            .stderr(File::create(&stderr).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("spawn {kind}: {e}"))?;
        Ok(CtlProc {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            started: Instant::now(),
        })
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own broker child.
        unsafe { libc::kill(self.broker_pid, sig) };
    }

    /// Adds what an opener printed (one line per timeout, EMFILE, phantom)
    /// to the counters.
    fn absorb(&mut self, p: &CtlProc) {
        let out = std::fs::read_to_string(&p.stdout).unwrap_or_default();
        for line in out.lines() {
            match line {
                "timeout" => self.stats.timeouts += 1,
                "emfile" => self.stats.emfile += 1,
                "phantom" => self.stats.phantoms += 1,
                "fork" => self.stats.forks += 1,
                "forked_child" => self.stats.forked_child_errors += 1,
                "child_kill" => self.stats.fork_child_kills += 1,
                "fork_failure" => self.stats.fork_failures += 1,
                _ => {}
            }
        }
    }

    /// Kills opener `i` (SIGKILL) and starts a new one.
    fn kill_opener(&mut self, i: usize) -> Result<(), String> {
        if let Some(mut p) = self.openers[i].take() {
            let _ = p.child.kill();
            if let Ok(s) = p.child.wait() {
                if s.signal() == Some(libc::SIGKILL) {
                    self.stats.opener_kills += 1;
                    self.absorb(&p);
                } else {
                    self.opener_ended(&p, s);
                }
            }
        }
        self.openers[i] = Some(self.spawn("opener")?);
        Ok(())
    }

    /// Kills control client `i` (an opener, or the forker for `OPENERS`).
    fn kill_client(&mut self, i: usize) -> Result<(), String> {
        if i < OPENERS {
            return self.kill_opener(i);
        }
        if let Some(mut p) = self.forker.take() {
            let _ = p.child.kill();
            if let Ok(s) = p.child.wait() {
                if s.signal() == Some(libc::SIGKILL) {
                    self.stats.forker_kills += 1;
                    self.absorb(&p);
                } else {
                    self.forker_ended(&p, s);
                }
            }
        }
        self.forker = Some(self.spawn("forker")?);
        Ok(())
    }

    fn forker_ended(&mut self, p: &CtlProc, status: std::process::ExitStatus) {
        self.absorb(p);
        match status.code() {
            Some(0) => {}
            // It printed a `fork_failure` line (counted) before exiting.
            Some(3) => eprintln!("chaos: FORK a forker's parent was affected: {:?}", p.tail()),
            _ => {
                self.stats.fork_failures += 1;
                eprintln!("chaos: FORK forker ended with {status}: {:?}", p.tail());
            }
        }
    }

    fn opener_ended(&mut self, p: &CtlProc, status: std::process::ExitStatus) {
        self.absorb(p);
        match status.code() {
            Some(0) => {}
            Some(3) => {
                eprintln!("chaos: PHANTOM reported by an opener: {:?}", p.tail());
            }
            _ => {
                self.stats.failures += 1;
                eprintln!("chaos: CONTROL opener ended with {status}: {:?}", p.tail());
            }
        }
    }

    /// Reaps control clients that ended on their own (restarting openers).
    fn reap(&mut self) -> Result<(), String> {
        for i in 0..self.openers.len() {
            let done = self.openers[i]
                .as_mut()
                .and_then(|p| p.child.try_wait().ok().flatten());
            if let Some(status) = done {
                let p = self.openers[i].take().expect("checked above");
                self.opener_ended(&p, status);
                self.openers[i] = Some(self.spawn("opener")?);
            }
        }
        let done = self
            .forker
            .as_mut()
            .and_then(|p| p.child.try_wait().ok().flatten());
        if let Some(status) = done {
            let p = self.forker.take().expect("checked above");
            self.forker_ended(&p, status);
            self.forker = Some(self.spawn("forker")?);
        }
        let done = self
            .greedy
            .as_mut()
            .and_then(|p| p.child.try_wait().ok().flatten());
        if let Some(status) = done {
            let p = self.greedy.take().expect("checked above");
            if status.success() {
                self.stats.greedy_disconnected += 1;
            } else {
                self.stats.failures += 1;
                eprintln!(
                    "chaos: CONTROL greedy client ended with {status}: {:?}",
                    p.tail()
                );
            }
        }
        Ok(())
    }

    /// Does the next control action if it is due. `kill_data` kills a
    /// data-plane victim (the orchestrator's own bookkeeping and restart)
    /// and is called at most once, while the broker is frozen.
    pub fn tick(&mut self, kill_data: &mut dyn FnMut(&mut Rng)) -> Result<(), String> {
        self.reap()?;
        if Instant::now() < self.next_action {
            return Ok(());
        }
        match self.rng.below(4) {
            0 | 1 => {
                // Freeze the broker past the openers' request timeout.
                let ms = 200 + self.rng.below(1001);
                self.signal(libc::SIGSTOP);
                let start = Instant::now();
                let kill_at = Duration::from_millis(self.rng.below(ms));
                let what = self.rng.below(3);
                let mut done = false;
                while start.elapsed() < Duration::from_millis(ms) {
                    if !done && start.elapsed() >= kill_at {
                        done = true;
                        match what {
                            0 => {
                                let i = self.rng.below(OPENERS as u64 + 1) as usize;
                                self.kill_client(i)?;
                            }
                            1 => kill_data(&mut self.rng),
                            _ => {}
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                self.signal(libc::SIGCONT);
                self.stats.freezes += 1;
            }
            2 => {
                if self.greedy.is_none() {
                    self.greedy = Some(self.spawn("greedy")?);
                }
            }
            _ => {
                let i = self.rng.below(OPENERS as u64 + 1) as usize;
                self.kill_client(i)?;
            }
        }
        self.next_action = Instant::now() + self.interval();
        Ok(())
    }

    /// Stops every control client, then checks that the broker holds no
    /// subscriber and no producer at all (everything else is stopped).
    pub fn finish(&mut self, client: &Client) -> Result<(), String> {
        self.signal(libc::SIGCONT);
        if let Some(mut g) = self.greedy.take() {
            // Disconnected within milliseconds of the broker running.
            let deadline = g.started.max(Instant::now()) + Duration::from_secs(10);
            let status = exit_by(&mut g.child, deadline);
            match status {
                Some(s) if s.success() => self.stats.greedy_disconnected += 1,
                other => {
                    let _ = g.child.kill();
                    let _ = g.child.wait();
                    self.stats.failures += 1;
                    eprintln!(
                        "chaos: CONTROL greedy client not disconnected ({other:?}): {:?}",
                        g.tail()
                    );
                }
            }
        }
        for i in 0..self.openers.len() {
            let Some(mut p) = self.openers[i].take() else {
                continue;
            };
            drop(p.stdin.take());
            let status = exit_by(&mut p.child, Instant::now() + Duration::from_secs(30));
            match status {
                Some(s) => self.opener_ended(&p, s),
                None => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    self.absorb(&p);
                    self.stats.failures += 1;
                    eprintln!("chaos: CONTROL opener hung after stop: {:?}", p.tail());
                }
            }
        }
        if let Some(mut p) = self.forker.take() {
            drop(p.stdin.take());
            // It finishes its round first: a child lives for milliseconds.
            let status = exit_by(&mut p.child, Instant::now() + Duration::from_secs(30));
            match status {
                Some(s) => self.forker_ended(&p, s),
                None => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    self.absorb(&p);
                    self.stats.fork_failures += 1;
                    eprintln!("chaos: FORK forker hung after stop: {:?}", p.tail());
                }
            }
        }
        // Dead openers are reclaimed by the broker promptly; wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = client.stat().map_err(|e| format!("stat: {e}"))?;
            let left = held(&stat);
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stats.phantoms += left;
                eprintln!(
                    "chaos: PHANTOM {left} subscribers/producers held after every client stopped: {:#?}",
                    stat.channels
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        for p in self
            .openers
            .iter_mut()
            .chain([&mut self.greedy, &mut self.forker])
            .flatten()
        {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Subscribers and producers the broker holds on every channel.
fn held(stat: &StatReport) -> u64 {
    stat.channels
        .iter()
        .map(|c| u64::from(c.producers) + c.subscribers.len() as u64)
        .sum()
}

/// The child's exit status if it exits by `deadline` (polled every 5 ms),
/// else `None` (it is still running, or waiting for it failed).
pub(crate) fn exit_by(
    child: &mut std::process::Child,
    deadline: Instant,
) -> Option<std::process::ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}
