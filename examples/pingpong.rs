//! Cross-process ping-pong latency (round-trip time) of tensorbus against the
//! physical limit, one cache line bounced between the same two processes.
//!
//! # Method
//!
//! The parent process measures; a child process (this same executable,
//! re-spawned through [`std::env::current_exe`] with a role argument) echoes.
//! One run compares four contenders:
//!
//! * `cacheline`: one `AtomicU64` in a shared memfd mapping (the memfd is
//!   created by the parent and inherited by the child, whose `FD_CLOEXEC` is
//!   cleared before the spawn; its number is passed as an argument). The
//!   parent stores an odd value, the child spins until it sees an odd value
//!   and stores the next even one, the parent spins until it sees that. This
//!   is the floor for any shared-memory message passing between the two
//!   processes.
//! * `tensorbus-busy`: an [`EmbeddedBroker`] started by the parent serves two
//!   broadcast channels, `ping` and `pong` (one pool of 64 slots of 4096
//!   bytes, policy `block`, depth 8). The parent loans an 8-byte `u8` tensor
//!   on `ping`, writes the round number into its 8 bytes (little endian) and
//!   publishes; the child receives it, reads and checks all 8 bytes, drops the
//!   view, loans a tensor on `pong`, writes the bitwise complement and
//!   publishes; the parent receives it, checks it and drops the view. Both
//!   consumers busy-poll ([`WaitStrategy::BusyPoll`]).
//! * `tensorbus-futex`: the same, with [`WaitStrategy::Park`] on both sides,
//!   so that, unless the reply is already there, a receive sleeps on the
//!   futex and the peer's publish wakes it.
//! * `raw-futex` (a reference for the futex path, not in the headline ratios): two
//!   `AtomicU32` words on their own cache lines of the same memfd; the parent
//!   stores a new value into `ping` and `FUTEX_WAKE`s it, then `FUTEX_WAIT`s
//!   on `pong`; the child sleeps on `ping` at once (no polling), echoes the
//!   value into `pong` and wakes it. This is what a round trip costs when
//!   both sides really sleep, i.e. the scheduler's wake-up latency.
//!
//! A second table gives the context switches per round trip of the parent's
//! thread and the child's (from `/proc/.../status`): a voluntary switch per
//! round means that side slept, so it tells whether a "futex" contender
//! actually went through the futex. (An early version of `Consumer::recv`
//! spun for a few µs even under `WaitStrategy::Park`, longer than a whole
//! busy round trip, so `tensorbus-futex` never slept; this table caught it.)
//!
//! Both children are started once, open their handles (the parent subscribes
//! to `pong` before spawning the tensorbus child, the child subscribes to
//! `ping` before it prints `ready`), then wait on their stdin for a block
//! command, so an idle child never spins. The run is `--blocks` blocks; in
//! each block every contender runs `--warmup` unrecorded rounds followed by
//! `--rounds` recorded rounds, and the contenders' order rotates from block
//! to block so that drift of the machine affects them alike. Each round is
//! timed in the parent with [`Instant`] (`CLOCK_MONOTONIC`; its per-call cost
//! is measured and printed, and each sample contains about one call). All
//! samples of a contender, across blocks, go into its percentiles; the ratios
//! are computed within this one run.
//!
//! With `--pin` the parent's measuring thread is pinned to the first CPU it
//! may use and the children to the second (`sched_setaffinity`); by default
//! nothing is pinned.
//!
//! Every wait is bounded: the parent gives up on a round after 5 s, on a
//! child's `ready`/`done` line after 30 s, and kills its children on any
//! error; a child exits when its stdin closes or when no ping comes for 30 s.
//!
//! # Running
//!
//! ```text
//! cargo run --release --example pingpong -- [--rounds N] [--blocks B] [--warmup W] [--pin]
//! ```
//!
//! Defaults: 2000 rounds per block, 10 blocks, 500 warm-up rounds per block.
//! Run it on an otherwise idle machine: with only two CPUs, any other
//! runnable process (a compiler, say) preempts one of the spinning sides for
//! a whole scheduler tick, which shows up as multi-millisecond round trips
//! and involuntary context switches; the report prints `/proc/loadavg`.
//! The output is markdown: the machine, the exact command, one table of
//! percentiles per contender, the ratios, and each block's median.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tensorbus::{Client, Consumer, ConsumerOptions, DType, Policy, Producer, WaitStrategy};
use tensorbus_broker::{Config, EmbeddedBroker};
use tensorbus_shm::{futex, Access, Mapping, Memfd};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// How long the parent waits for one reply before it declares the child hung.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the parent waits for a child's `ready` or `done` line.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child waits for the next ping within a block.
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the parent waits for a child to exit after closing its stdin.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of the shared memfd holding the cache line (one page).
const CACHELINE_MAP_LEN: usize = 4096;

/// Role argument of the cache-line child.
const ROLE_CACHELINE: &str = "--child-cacheline";
/// Role argument of the tensorbus child.
const ROLE_TENSORBUS: &str = "--child-tensorbus";

const USAGE: &str = "usage: pingpong [--rounds N] [--blocks B] [--warmup W] [--pin]
  --rounds N   recorded round trips per contender per block (default 2000)
  --blocks B   number of blocks; contenders alternate within each (default 10)
  --warmup W   unrecorded round trips before each block (default 500)
  --pin        pin the parent to one CPU and the children to another";

/// An error as `main` reports it: its `Debug` is the message itself, so
/// `Error: ...` is printed readably.
struct Failure(Box<dyn Error>);

impl std::fmt::Debug for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn main() -> Result<(), Failure> {
    run().map_err(Failure)
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(ROLE_CACHELINE) => child_cacheline(&args[2..]),
        Some(ROLE_TENSORBUS) => child_tensorbus(&args[2..]),
        _ => parent(&args),
    }
}

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, Debug)]
struct Options {
    rounds: usize,
    blocks: usize,
    warmup: usize,
    pin: bool,
}

fn parse_options(args: &[String]) -> Result<Option<Options>> {
    let mut o = Options {
        rounds: 2000,
        blocks: 10,
        warmup: 500,
        pin: false,
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut number = |name: &str| -> Result<usize> {
            let v = it
                .next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?;
            v.parse::<usize>()
                .map_err(|e| format!("{name} {v:?}: {e}\n{USAGE}").into())
        };
        match a.as_str() {
            "--rounds" => o.rounds = number("--rounds")?,
            "--blocks" => o.blocks = number("--blocks")?,
            "--warmup" => o.warmup = number("--warmup")?,
            "--pin" => o.pin = true,
            "-h" | "--help" => {
                // Ignore a closed stdout (e.g. `--help | head -1`).
                let _ = writeln!(std::io::stdout(), "{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if o.rounds == 0 || o.blocks == 0 {
        return Err(format!("--rounds and --blocks must be at least 1\n{USAGE}").into());
    }
    Ok(Some(o))
}

// ---------------------------------------------------------------------------
// Contenders

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Cacheline,
    Busy,
    Futex,
    RawFutex,
}

/// Number of contenders.
const N: usize = 4;

impl Contender {
    const ALL: [Contender; N] = [
        Contender::Cacheline,
        Contender::Busy,
        Contender::Futex,
        Contender::RawFutex,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::Cacheline => "cacheline",
            Contender::Busy => "tensorbus-busy",
            Contender::Futex => "tensorbus-futex",
            Contender::RawFutex => "raw-futex",
        }
    }

    fn index(self) -> usize {
        match self {
            Contender::Cacheline => 0,
            Contender::Busy => 1,
            Contender::Futex => 2,
            Contender::RawFutex => 3,
        }
    }
}

/// The wait strategy a tensorbus block command names.
fn strategy(mode: &str) -> Result<WaitStrategy> {
    match mode {
        "busy" => Ok(WaitStrategy::BusyPoll),
        "park" => Ok(WaitStrategy::Park),
        other => Err(format!("unknown wait mode {other:?}").into()),
    }
}

// ---------------------------------------------------------------------------
// Shared cache line

/// The `AtomicU64` at the start of `map`.
fn word(map: &Mapping) -> &AtomicU64 {
    debug_assert!(map.len() >= std::mem::size_of::<AtomicU64>());
    // SAFETY: the mapping is page aligned (so aligned for AtomicU64), at
    // least 8 bytes long, readable and writable, and stays mapped for the
    // lifetime of the returned borrow of `map`. Every bit pattern is a valid
    // u64, and the word is only ever accessed atomically (by this process and
    // by the peer process that maps the same memfd).
    unsafe { &*map.as_ptr().cast::<AtomicU64>() }
}

/// The two `AtomicU32` futex words of the `raw-futex` contender: `ping`
/// (written by the parent) and `pong` (written by the child), each on its own
/// cache line after the `cacheline` word's.
fn futex_words(map: &Mapping) -> (&AtomicU32, &AtomicU32) {
    debug_assert!(map.len() >= 3 * 64);
    // SAFETY: offsets 64 and 128 lie inside the (at least 192-byte, page
    // aligned, hence 4-byte aligned) read-write mapping, which stays mapped
    // for the lifetime of the borrow of `map`; every bit pattern is a valid
    // u32 and both words are only ever accessed atomically (and by futex(2),
    // which reads them atomically).
    unsafe {
        (
            &*map.as_ptr().add(64).cast::<AtomicU32>(),
            &*map.as_ptr().add(128).cast::<AtomicU32>(),
        )
    }
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD takes no argument and touches no memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: F_SETFD takes an int argument and touches no memory of ours.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// CPU affinity

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; pid 0
    // means the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(format!("sched_getaffinity: {}", std::io::Error::last_os_error()).into());
    }
    let max = std::mem::size_of::<libc::cpu_set_t>() * 8;
    Ok((0..max)
        // SAFETY: `c` is below the bit size of the set, and `set` is initialised.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pins the calling thread (and threads it creates later) to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    let max = std::mem::size_of::<libc::cpu_set_t>() * 8;
    if cpu >= max {
        return Err(format!("CPU {cpu} is out of range").into());
    }
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the bit size of the set (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 means the
    // calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(format!(
            "sched_setaffinity(CPU {cpu}): {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    Ok(())
}

/// Handles a child's optional `--cpu N` argument.
fn child_pin(args: &[String]) -> Result<()> {
    match args {
        [] => Ok(()),
        [flag, cpu] if flag == "--cpu" => pin_to(cpu.parse()?),
        other => Err(format!("unexpected child arguments {other:?}").into()),
    }
}

// ---------------------------------------------------------------------------
// Children

/// Reads the next block command from stdin: `Ok(None)` at EOF (the parent is
/// done or gone).
fn next_command(stdin: &mut impl BufRead) -> Result<Option<Vec<String>>> {
    let mut line = String::new();
    if stdin.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.split_whitespace().map(str::to_owned).collect()))
}

/// Prints a protocol line to the parent.
fn say(what: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{what}")?;
    out.flush()?;
    Ok(())
}

/// `--child-cacheline FD [--cpu N]`: bounces the shared word.
fn child_cacheline(args: &[String]) -> Result<()> {
    let fd: RawFd = args
        .first()
        .ok_or("missing memfd number")?
        .parse()
        .map_err(|e| format!("memfd number: {e}"))?;
    child_pin(&args[1..])?;
    // Check that the number is an open descriptor before taking ownership.
    // SAFETY: F_GETFD takes no argument and touches no memory of ours.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("inherited fd {fd}: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: the descriptor is open (checked above); it was inherited from
    // the parent for this purpose and nothing else in this process uses or
    // closes it, so this OwnedFd is its only owner.
    let memfd = Memfd::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    let map = Mapping::map(memfd.as_fd(), CACHELINE_MAP_LEN, Access::ReadWrite, 1)?;
    let w = word(&map);
    let (fping, fpong) = futex_words(&map);
    let mut last_ping = 0u32;
    say("ready")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(cmd) = next_command(&mut stdin)? {
        let (count, use_futex): (usize, bool) = match cmd.as_slice() {
            [go, count, mode] if go == "go" && (mode == "spin" || mode == "futex") => {
                (count.parse()?, mode == "futex")
            }
            other => return Err(format!("bad command {other:?}").into()),
        };
        if use_futex {
            for _ in 0..count {
                let start = Instant::now();
                let v = loop {
                    let v = fping.load(Ordering::Acquire);
                    if v != last_ping {
                        break v;
                    }
                    futex::wait(fping, last_ping, Some(Duration::from_secs(1)));
                    if start.elapsed() > CHILD_TIMEOUT {
                        return Err("raw-futex child: no ping from the parent".into());
                    }
                };
                last_ping = v;
                fpong.store(v, Ordering::Release);
                futex::wake(fpong, 1);
            }
            say("done")?;
            continue;
        }
        for _ in 0..count {
            let start = Instant::now();
            let mut spins = 0u32;
            let v = loop {
                let v = w.load(Ordering::Acquire);
                if v & 1 == 1 {
                    break v;
                }
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins % 65536 == 0 && start.elapsed() > CHILD_TIMEOUT {
                    return Err("cacheline child: no ping from the parent".into());
                }
            };
            w.store(v + 1, Ordering::Release);
        }
        say("done")?;
    }
    Ok(())
}

/// `--child-tensorbus SOCKET [--cpu N]`: echoes `ping` onto `pong`.
fn child_tensorbus(args: &[String]) -> Result<()> {
    let socket = PathBuf::from(args.first().ok_or("missing socket path")?);
    child_pin(&args[1..])?;
    let client = Client::connect_to(Some(&socket), "pingpong-child")?;
    let mut ping = client.consumer_with(
        "ping",
        ConsumerOptions::default()
            .policy(Policy::Block)
            .depth(8)
            .wait(WaitStrategy::BusyPoll),
    )?;
    let mut pong = client.producer("pong")?;
    say("ready")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(cmd) = next_command(&mut stdin)? {
        let (first, count, mode) = match cmd.as_slice() {
            [go, first, count, mode] if go == "go" => {
                (first.parse::<u64>()?, count.parse::<u64>()?, mode.as_str())
            }
            other => return Err(format!("bad command {other:?}").into()),
        };
        ping.set_wait_strategy(strategy(mode)?);
        for expected in first..first + count {
            let t = ping.recv_timeout(CHILD_TIMEOUT)?;
            let bytes: [u8; 8] = t[..]
                .try_into()
                .map_err(|_| format!("ping has {} bytes, not 8", t.len()))?;
            drop(t);
            let v = u64::from_le_bytes(bytes);
            if v != expected {
                return Err(format!("ping carried {v}, expected {expected}").into());
            }
            let mut r = pong.loan(&[8], DType::U8)?;
            r.copy_from_slice(&(!v).to_le_bytes());
            let out = r.publish()?;
            if out.delivered != 1 {
                return Err(format!("pong reached {} subscribers, not 1", out.delivered).into());
            }
        }
        say("done")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Parent side of a child

/// A running child: its stdin (block commands) and its stdout lines.
/// Dropping it kills the child if it is still running.
struct Peer {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Peer {
    fn spawn(name: &'static str, args: &[String]) -> Result<Peer> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning the {name} child: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, lines) = mpsc::channel();
        // Build the peer first so that the child is killed if anything below fails.
        let mut peer = Peer {
            name,
            child,
            stdin,
            lines,
        };
        let stdout = stdout.ok_or("child has no stdout pipe")?;
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        peer.expect("ready")?;
        Ok(peer)
    }

    /// The child's process id.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a block command.
    fn send(&mut self, cmd: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or("child stdin already closed")?;
        writeln!(stdin, "{cmd}").map_err(|e| format!("{}: writing {cmd:?}: {e}", self.name))?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the line `what` from the child.
    fn expect(&mut self, what: &str) -> Result<()> {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) if line == what => Ok(()),
            Ok(line) => Err(format!("{} child: expected {what:?}, got {line:?}", self.name).into()),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("{} child: no {what:?} within {LINE_TIMEOUT:?}", self.name).into())
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = match self.child.wait() {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                Err(format!("{} child exited before {what:?} ({status})", self.name).into())
            }
        }
    }

    /// Closes the child's stdin and waits (bounded) for it to exit cleanly.
    fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("{} child: {status}", self.name).into())
                };
            }
            if Instant::now() >= deadline {
                return Err(format!("{} child did not exit; killing it", self.name).into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Parent rounds

/// One cache-line round trip; returns its duration in ns.
fn cacheline_round(w: &AtomicU64, next: &mut u64) -> Result<u64> {
    let odd = *next;
    *next += 2;
    let t0 = Instant::now();
    w.store(odd, Ordering::Release);
    let mut spins = 0u32;
    while w.load(Ordering::Acquire) != odd + 1 {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins % 65536 == 0 && t0.elapsed() > ROUND_TIMEOUT {
            return Err(format!("cacheline: no reply within {ROUND_TIMEOUT:?}").into());
        }
    }
    Ok(t0.elapsed().as_nanos() as u64)
}

/// One raw futex round trip: store and wake on `ping`, sleep on `pong`
/// until the child echoes; returns its duration in ns.
fn raw_futex_round(ping: &AtomicU32, pong: &AtomicU32, next: &mut u32) -> Result<u64> {
    *next = next.wrapping_add(1).max(1);
    let n = *next;
    let t0 = Instant::now();
    ping.store(n, Ordering::Release);
    futex::wake(ping, 1);
    loop {
        let v = pong.load(Ordering::Acquire);
        if v == n {
            break;
        }
        futex::wait(pong, v, Some(ROUND_TIMEOUT));
        if t0.elapsed() > ROUND_TIMEOUT {
            return Err(format!("raw-futex: no reply within {ROUND_TIMEOUT:?}").into());
        }
    }
    Ok(t0.elapsed().as_nanos() as u64)
}

/// One tensorbus round trip (loan, write, publish on `ping`; receive, check,
/// release on `pong`); returns its duration in ns.
fn tensorbus_round(ping: &mut Producer, pong: &Consumer, value: u64) -> Result<u64> {
    let t0 = Instant::now();
    let mut t = ping.loan(&[8], DType::U8)?;
    t.copy_from_slice(&value.to_le_bytes());
    let out = t.publish()?;
    let r = pong.recv_timeout(ROUND_TIMEOUT)?;
    let bytes: Option<[u8; 8]> = r[..].try_into().ok();
    drop(r);
    let ns = t0.elapsed().as_nanos() as u64;
    if out.delivered != 1 {
        return Err(format!("ping reached {} subscribers, not 1", out.delivered).into());
    }
    let got = bytes
        .map(u64::from_le_bytes)
        .ok_or("pong does not have 8 bytes")?;
    if got != !value {
        return Err(format!("pong carried {got:#x}, expected {:#x}", !value).into());
    }
    Ok(ns)
}

/// Voluntary and involuntary context switches of one thread, from
/// `/proc/.../status`.
fn context_switches(status: &str) -> Option<[u64; 2]> {
    let text = std::fs::read_to_string(status).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some([
        field("voluntary_ctxt_switches:")?,
        field("nonvoluntary_ctxt_switches:")?,
    ])
}

/// Context switches (voluntary, involuntary) of the parent's measuring
/// thread and of the child's main thread, summed over a contender's blocks.
#[derive(Clone, Copy, Debug, Default)]
struct Switches {
    parent: [u64; 2],
    child: [u64; 2],
    rounds: u64,
}

/// The parent's state for all contenders.
struct Bench<'m> {
    cl_word: &'m AtomicU64,
    cl_next: u64,
    fx_words: (&'m AtomicU32, &'m AtomicU32),
    fx_next: u32,
    cl_peer: Peer,
    ping: Producer,
    pong: Consumer,
    tb_next: u64,
    tb_peer: Peer,
    switches: [Switches; N],
}

impl Bench<'_> {
    /// Runs `warmup + rounds` round trips of `c`, pushing the last `rounds`,
    /// and counts the context switches both sides made meanwhile.
    fn block(
        &mut self,
        c: Contender,
        warmup: usize,
        rounds: usize,
        samples: &mut Vec<u64>,
    ) -> Result<()> {
        let pid = match c {
            Contender::Cacheline | Contender::RawFutex => self.cl_peer.pid(),
            Contender::Busy | Contender::Futex => self.tb_peer.pid(),
        };
        let child_status = format!("/proc/{pid}/task/{pid}/status");
        let parent_status = "/proc/thread-self/status";
        let before = (
            context_switches(parent_status),
            context_switches(&child_status),
        );
        self.run_block(c, warmup, rounds, samples)?;
        let after = (
            context_switches(parent_status),
            context_switches(&child_status),
        );
        let sw = &mut self.switches[c.index()];
        if let ((Some(p0), Some(c0)), (Some(p1), Some(c1))) = (before, after) {
            for i in 0..2 {
                sw.parent[i] += p1[i].saturating_sub(p0[i]);
                sw.child[i] += c1[i].saturating_sub(c0[i]);
            }
            sw.rounds += (warmup + rounds) as u64;
        }
        Ok(())
    }

    fn run_block(
        &mut self,
        c: Contender,
        warmup: usize,
        rounds: usize,
        samples: &mut Vec<u64>,
    ) -> Result<()> {
        let count = warmup + rounds;
        match c {
            Contender::Cacheline => {
                self.cl_peer.send(&format!("go {count} spin"))?;
                for i in 0..count {
                    let ns = cacheline_round(self.cl_word, &mut self.cl_next)?;
                    if i >= warmup {
                        samples.push(ns);
                    }
                }
                self.cl_peer.expect("done")
            }
            Contender::RawFutex => {
                self.cl_peer.send(&format!("go {count} futex"))?;
                let (ping, pong) = self.fx_words;
                for i in 0..count {
                    let ns = raw_futex_round(ping, pong, &mut self.fx_next)?;
                    if i >= warmup {
                        samples.push(ns);
                    }
                }
                self.cl_peer.expect("done")
            }
            Contender::Busy | Contender::Futex => {
                let (wait, mode) = if c == Contender::Busy {
                    (WaitStrategy::BusyPoll, "busy")
                } else {
                    (WaitStrategy::Park, "park")
                };
                self.pong.set_wait_strategy(wait);
                let first = self.tb_next;
                self.tb_peer.send(&format!("go {first} {count} {mode}"))?;
                for i in 0..count {
                    let value = self.tb_next;
                    self.tb_next += 1;
                    let ns = tensorbus_round(&mut self.ping, &self.pong, value)
                        .map_err(|e| format!("{} round {i}: {e}", c.name()))?;
                    if i >= warmup {
                        samples.push(ns);
                    }
                }
                self.tb_peer.expect("done")
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Report helpers

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(samples: &[u64]) -> u64 {
    let mut s = samples.to_vec();
    s.sort_unstable();
    percentile(&s, 0.5)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `/proc/loadavg` (1, 5, 15 min load, runnable/total tasks): other busy
/// processes on the machine preempt the spinning contenders.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Average cost of one `Instant::now()` call, in ns.
fn instant_cost_ns() -> f64 {
    const N: u32 = 1_000_000;
    let t0 = Instant::now();
    for _ in 0..N {
        std::hint::black_box(Instant::now());
    }
    t0.elapsed().as_nanos() as f64 / f64::from(N)
}

fn broker_config() -> Result<Config> {
    Ok(Config::from_toml(
        r#"
        [[pools]]
        name = "pingpong"
        slot_size = 4096
        slots = 64
        [[channels]]
        name = "ping"
        mode = "broadcast"
        policy = "block"
        depth = 8
        [[channels]]
        name = "pong"
        mode = "broadcast"
        policy = "block"
        depth = 8
        "#,
    )?)
}

/// Removes the broker's socket directory when the run ends (best effort).
struct SocketDir(PathBuf);

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Parent

fn parent(args: &[String]) -> Result<()> {
    let Some(opts) = parse_options(args)? else {
        return Ok(());
    };

    // CPUs: with --pin the parent takes the first allowed CPU, children the second.
    let cpus = allowed_cpus()?;
    let (parent_cpu, child_cpu) = if opts.pin {
        match cpus.as_slice() {
            [a, b, ..] => (Some(*a), Some(*b)),
            _ => return Err(format!("--pin needs two CPUs, only {cpus:?} allowed").into()),
        }
    } else {
        (None, None)
    };
    let cpu_args = |args: &mut Vec<String>| {
        if let Some(c) = child_cpu {
            args.push("--cpu".into());
            args.push(c.to_string());
        }
    };

    // Broker (its thread is started before pinning, so it is not pinned).
    let dir = std::env::temp_dir().join(format!("tb-pingpong-{}", std::process::id()));
    let _dir_guard = SocketDir(dir.clone());
    let socket = dir.join("broker.sock");
    let broker = EmbeddedBroker::start(&broker_config()?, &socket)?;
    if let Some(c) = parent_cpu {
        pin_to(c)?;
    }

    // Cache line: a memfd inherited by the child.
    let memfd = Memfd::create("pingpong-cacheline", CACHELINE_MAP_LEN, false)?;
    let map = Mapping::map(memfd.as_fd(), CACHELINE_MAP_LEN, Access::ReadWrite, 1)?;
    let cl_word = word(&map);
    cl_word.store(0, Ordering::Release);
    let raw = memfd.as_fd().as_raw_fd();
    set_cloexec(raw, false)?;
    let mut cl_args = vec![ROLE_CACHELINE.to_owned(), raw.to_string()];
    cpu_args(&mut cl_args);
    let cl_peer = Peer::spawn("cacheline", &cl_args);
    // Only the cache-line child needs the descriptor.
    set_cloexec(raw, true)?;
    let cl_peer = cl_peer?;

    // tensorbus: the parent subscribes to "pong" before the child exists.
    let client = Client::connect_to(Some(broker.socket()), "pingpong-parent")?;
    let ping = client.producer("ping")?;
    let pong = client.consumer_with(
        "pong",
        ConsumerOptions::default()
            .policy(Policy::Block)
            .depth(8)
            .wait(WaitStrategy::BusyPoll),
    )?;
    let mut tb_args = vec![
        ROLE_TENSORBUS.to_owned(),
        path_arg(broker.socket())?.to_owned(),
    ];
    cpu_args(&mut tb_args);
    let tb_peer = Peer::spawn("tensorbus", &tb_args)?;

    let mut bench = Bench {
        cl_word,
        cl_next: 1,
        fx_words: futex_words(&map),
        fx_next: 0,
        cl_peer,
        ping,
        pong,
        tb_next: 1,
        tb_peer,
        switches: Default::default(),
    };

    let load_before = loadavg();
    let clock_ns = instant_cost_ns();
    let mut samples: [Vec<u64>; N] = Default::default();
    let mut block_p50: Vec<[u64; N]> = Vec::with_capacity(opts.blocks);
    for b in 0..opts.blocks {
        let mut p50s = [0u64; N];
        for k in 0..N {
            let c = Contender::ALL[(b + k) % N];
            let mut block = Vec::with_capacity(opts.rounds);
            bench.block(c, opts.warmup, opts.rounds, &mut block)?;
            p50s[c.index()] = median(&block);
            samples[c.index()].extend_from_slice(&block);
        }
        block_p50.push(p50s);
    }

    let Bench {
        cl_peer,
        tb_peer,
        ping,
        pong,
        switches,
        ..
    } = bench;
    cl_peer.finish()?;
    tb_peer.finish()?;
    drop((ping, pong, client));

    let load = [load_before, loadavg()];
    print_report(
        &opts,
        &cpus,
        clock_ns,
        &load,
        &mut samples,
        &block_p50,
        &switches,
    );
    Ok(())
}

fn path_arg(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| format!("socket path {p:?} is not UTF-8").into())
}

fn print_report(
    opts: &Options,
    cpus: &[usize],
    clock_ns: f64,
    load: &[String; 2],
    samples: &mut [Vec<u64>; N],
    block_p50: &[[u64; N]],
    switches: &[Switches; N],
) {
    // nproc = CPUs this process may use, taken before --pin narrowed them.
    let nproc = cpus.len();
    let command: Vec<String> = std::env::args().collect();
    println!("## tensorbus cross-process ping-pong (round-trip time)\n");
    println!("- command: `{}`", command.join(" "));
    println!(
        "- machine: nproc {nproc} (allowed CPUs {cpus:?}), {}, Linux {}",
        cpu_model(),
        kernel()
    );
    println!(
        "- /proc/loadavg before: `{}`, after: `{}` (other runnable tasks preempt the spinners; compare only quiet runs)",
        load[0], load[1]
    );
    println!(
        "- pinning: {}",
        if opts.pin {
            format!(
                "parent on CPU {}, children on CPU {}",
                cpus.first().copied().unwrap_or(0),
                cpus.get(1).copied().unwrap_or(0)
            )
        } else {
            "none".to_owned()
        }
    );
    println!(
        "- {} blocks x {N} contenders x {} recorded round trips ({} unrecorded warm-up rounds before each), contender order rotating per block",
        opts.blocks, opts.rounds, opts.warmup
    );
    println!(
        "- clock: std::time::Instant (CLOCK_MONOTONIC), {clock_ns:.1} ns per call; each sample includes about one call\n"
    );
    println!("| contender | rounds | p50 (ns) | p99 (ns) | p99.9 (ns) | max (ns) |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut p50 = [0u64; N];
    for c in Contender::ALL {
        let s = &mut samples[c.index()];
        s.sort_unstable();
        p50[c.index()] = percentile(s, 0.5);
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            c.name(),
            s.len(),
            percentile(s, 0.5),
            percentile(s, 0.99),
            percentile(s, 0.999),
            s.last().copied().unwrap_or(0)
        );
    }
    let ratio = |c: Contender| {
        let base = p50[Contender::Cacheline.index()];
        if base == 0 {
            f64::NAN
        } else {
            p50[c.index()] as f64 / base as f64
        }
    };
    println!();
    println!(
        "- tensorbus-busy p50 / cacheline p50 = {:.2}x",
        ratio(Contender::Busy)
    );
    println!(
        "- tensorbus-futex p50 / cacheline p50 = {:.2}x",
        ratio(Contender::Futex)
    );
    println!(
        "- (reference) raw-futex p50 / cacheline p50 = {:.2}x",
        ratio(Contender::RawFutex)
    );
    println!();
    println!(
        "Context switches per round trip (voluntary = the thread slept, e.g. on the futex; involuntary = it was preempted), warm-up rounds included:\n"
    );
    println!("| contender | parent vol. | parent invol. | child vol. | child invol. |");
    println!("|---|---:|---:|---:|---:|");
    for c in Contender::ALL {
        let sw = &switches[c.index()];
        let per = |n: u64| {
            if sw.rounds == 0 {
                "n/a".to_owned()
            } else {
                format!("{:.3}", n as f64 / sw.rounds as f64)
            }
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            c.name(),
            per(sw.parent[0]),
            per(sw.parent[1]),
            per(sw.child[0]),
            per(sw.child[1])
        );
    }
    println!();
    println!("Per-block p50 (ns):\n");
    let names: Vec<&str> = Contender::ALL.iter().map(|c| c.name()).collect();
    println!("| block | {} |", names.join(" | "));
    println!("|---:|{}", "---:|".repeat(N));
    for (b, p) in block_p50.iter().enumerate() {
        let cells: Vec<String> = p.iter().map(u64::to_string).collect();
        println!("| {} | {} |", b + 1, cells.join(" | "));
    }
}
