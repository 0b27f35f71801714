//! Shared helpers of the cross-process tests: an embedded broker on a
//! private socket, `tb-peer` children with line-based reports, and parsers
//! for what they print.

#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tensorbus::stat::StatReport;
use tensorbus::{Client, SlotId};
use tensorbus_broker::{Config, EmbeddedBroker};

/// How long any single wait on a child may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);
/// How long the broker may take to reclaim after a death.
pub const RECLAIM: Duration = Duration::from_secs(5);

/// An embedded broker on a socket private to one test, and a client of the
/// test process for `stat`.
pub struct Bus {
    pub client: Client,
    pub socket: PathBuf,
    dir: PathBuf,
    _broker: Option<EmbeddedBroker>,
}

impl Bus {
    /// Starts a broker with `toml` (a full config) for the test `name`.
    pub fn start(name: &str, toml: &str) -> Bus {
        let dir = std::env::temp_dir().join(format!("tb-it-{}-{name}", std::process::id()));
        let socket = dir.join("broker.sock");
        let config = Config::from_toml(toml).expect("test config is valid");
        let broker = EmbeddedBroker::start(&config, &socket).expect("broker starts");
        let client = Client::connect_to(Some(&socket), "test").expect("test client connects");
        Bus {
            client,
            socket,
            dir,
            _broker: Some(broker),
        }
    }

    /// Attaches to a broker some other process runs at `socket` (in a
    /// directory of its own, removed when the `Bus` drops).
    pub fn attach(socket: &std::path::Path) -> Bus {
        let deadline = Instant::now() + WAIT;
        let client = loop {
            match Client::connect_to(Some(socket), "test") {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("broker never came up: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        Bus {
            client,
            socket: socket.to_path_buf(),
            dir: socket
                .parent()
                .expect("socket has a directory")
                .to_path_buf(),
            _broker: None,
        }
    }

    /// Spawns `tb-peer ROLE --socket SOCKET ARGS...`; `name` labels failures.
    pub fn spawn(&self, name: &str, role: &str, args: &[&str]) -> Peer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tb-peer"))
            .arg(role)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tb-peer");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            sink.lock().unwrap().push_str(&s);
        });
        Peer {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            rx,
            lines: Vec::new(),
            stderr,
            reaped: false,
        }
    }

    /// Spawns a subscribing `role` (`consumer` or `worker`) named `name` on
    /// `channel` with `--policy POLICY --depth DEPTH`, then `extra`; does
    /// not wait for it to be ready.
    pub fn subscriber(
        &self,
        name: &str,
        role: &str,
        channel: &str,
        policy: &str,
        depth: &str,
        extra: &[&str],
    ) -> Peer {
        let mut args = vec!["--channel", channel, "--policy", policy, "--depth", depth];
        args.extend_from_slice(extra);
        self.spawn(name, role, &args)
    }

    /// Spawns a producer named `producer` that publishes `count` tensors on
    /// `channel`, with `extra` arguments after `--count`.
    pub fn producer(&self, channel: &str, count: u64, extra: &[&str]) -> Peer {
        let count = count.to_string();
        let mut args = vec!["--channel", channel, "--count", &count];
        args.extend_from_slice(extra);
        self.spawn("producer", "producer", &args)
    }

    /// Writes `toml` to `config.toml` in this bus's private directory (it
    /// goes with the `Bus`) and returns its path, for `tb-peer hostile
    /// --config`.
    pub fn write_config(&self, toml: &str) -> String {
        let path = self.dir.join("config.toml");
        std::fs::write(&path, toml).expect("write the config file");
        path.to_str().expect("a UTF-8 temp path").to_owned()
    }

    /// Runs `tb-peer hostile --config CONFIG --count COUNT --seed SEED
    /// --pace-us PACE [--target TARGET]` to a successful exit and returns
    /// what it printed.
    pub fn run_hostile(
        &self,
        config: &str,
        count: u32,
        seed: u64,
        pace_us: u32,
        target: Option<&str>,
    ) -> Vec<String> {
        let (count, seed, pace_us) = (count.to_string(), seed.to_string(), pace_us.to_string());
        let mut args = vec![
            "--config",
            config,
            "--count",
            &count,
            "--seed",
            &seed,
            "--pace-us",
            &pace_us,
        ];
        if let Some(target) = target {
            args.extend(["--target", target]);
        }
        self.spawn("hostile", "hostile", &args).finish()
    }

    /// Asserts that the broker still answers `stat` (it survived whatever
    /// the test did) and that every slot is free again.
    pub fn assert_survived_and_all_free(&self) -> StatReport {
        let stat = self.client.stat().expect("the broker survived");
        self.assert_all_free();
        stat
    }

    /// A stat snapshot.
    pub fn stat(&self) -> StatReport {
        self.client.stat().expect("stat")
    }

    /// (free, total) slots over all pools.
    pub fn free_slots(&self) -> (u32, u32) {
        let s = self.stat();
        (
            s.pools.iter().map(|p| p.slots_free).sum(),
            s.pools.iter().map(|p| p.slots_total).sum(),
        )
    }

    /// Polls until every slot of every pool is free (the broker reclaims
    /// asynchronously); fails with the last snapshot after `RECLAIM`.
    pub fn assert_all_free(&self) {
        let start = Instant::now();
        loop {
            let (free, total) = self.free_slots();
            if free == total {
                return;
            }
            if start.elapsed() > RECLAIM {
                panic!(
                    "{free} of {total} slots free {RECLAIM:?} after everything went quiet: {:#?}",
                    self.stat()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sum over pools of the `loaned` count.
    pub fn loaned(&self) -> u32 {
        self.stat().pools.iter().map(|p| p.loaned).sum()
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `tb-peer` child process. Dropping it kills the child (SIGKILL) if it
/// still runs, so a failing test leaves no process behind.
pub struct Peer {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<String>,
    /// Every stdout line received so far.
    pub lines: Vec<String>,
    stderr: Arc<Mutex<String>>,
    reaped: bool,
}

impl Peer {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn die(&mut self, why: &str) -> ! {
        self.kill9();
        // Give the stderr reader a moment to collect the child's last words.
        std::thread::sleep(Duration::from_millis(50));
        panic!(
            "{}: {why}\n--- stdout (last 20 lines) ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.lines[self.lines.len().saturating_sub(20)..].join("\n"),
            self.stderr()
        );
    }

    /// Waits until `n` lines starting with `prefix` have been printed in
    /// total; returns the last of them.
    pub fn wait_lines(&mut self, prefix: &str, n: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let have: Vec<&String> = self
                .lines
                .iter()
                .filter(|l| l.starts_with(prefix))
                .collect();
            if have.len() >= n {
                return have[n - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    self.die(&format!("timed out waiting for {n} {prefix:?} lines"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    self.reaped = true;
                    self.die(&format!(
                        "exited ({status:?}) before printing {n} {prefix:?} lines"
                    ))
                }
            }
        }
    }

    /// Waits for one line starting with `prefix`.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        self.wait_lines(prefix, 1)
    }

    /// Sends one line on the child's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to child stdin");
        stdin.flush().expect("flush child stdin");
    }

    /// Closes the child's stdin: consumers, stages and sleepers then finish.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the `ready` line and hands the peer back, for chaining
    /// after a spawn.
    pub fn ready(mut self) -> Peer {
        self.wait_line("ready");
        self
    }

    /// Closes stdin and waits (with a deadline) for the child to exit.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.close_stdin();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => self.die("did not exit in time"),
                Err(e) => self.die(&format!("wait failed: {e}")),
            }
        };
        self.reaped = true;
        status
    }

    /// Closes stdin, waits (with a deadline) for any exit and returns the
    /// status and every stdout line.
    pub fn finish_status(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = self.wait_exit();
        while let Ok(line) = self.rx.recv_timeout(WAIT) {
            self.lines.push(line);
        }
        if !status.success() {
            std::thread::sleep(Duration::from_millis(50));
            eprintln!("{}: {status}; stderr:\n{}", self.name, self.stderr());
        }
        (status, std::mem::take(&mut self.lines))
    }

    /// Like `finish_status`, and asserts that the child was not killed by a
    /// signal (`the NAME crashed`).
    pub fn finish_uncrashed(self) -> (std::process::ExitStatus, Vec<String>) {
        let name = self.name.clone();
        let (status, lines) = self.finish_status();
        assert!(status.signal().is_none(), "the {name} crashed: {status}");
        (status, lines)
    }

    /// Closes stdin, waits (with a deadline) for a successful exit and
    /// returns every stdout line.
    pub fn finish(mut self) -> Vec<String> {
        let status = self.wait_exit();
        // The reader thread ends at EOF, which follows the exit.
        loop {
            match self.rx.recv_timeout(WAIT) {
                Ok(line) => self.lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => self.die("stdout did not close"),
            }
        }
        if !status.success() {
            std::thread::sleep(Duration::from_millis(50));
            self.die(&format!("exited with {status}"));
        }
        std::mem::take(&mut self.lines)
    }

    /// Kills the child with SIGKILL and reaps it; returns every line it
    /// printed (all of them reach the pipe before the kill).
    pub fn kill9(&mut self) -> Vec<String> {
        if !self.reaped {
            let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
            // SAFETY: kill(2) with a pid of our own unreaped child: the pid
            // cannot have been reused while the child is a zombie we own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = self.child.wait();
            self.reaped = true;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(_) => break,
            }
        }
        self.lines.clone()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One `msg` line of a consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg {
    /// The producer's sequence number (from the user header).
    pub seq: u64,
    /// The sequence number in the metadata.
    pub meta_seq: u64,
    /// Whether the payload checksum verified.
    pub ok: bool,
    /// The slot it arrived in.
    pub slot: SlotId,
}

fn slot(fields: &[&str]) -> SlotId {
    SlotId {
        pool: fields[0].parse().expect("pool"),
        index: fields[1].parse().expect("index"),
        generation: fields[2].parse().expect("generation"),
    }
}

/// The `msg` lines of a consumer's output.
pub fn msgs(lines: &[String]) -> Vec<Msg> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("msg "))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Msg {
                seq: f[0].parse().expect("seq"),
                meta_seq: f[1].parse().expect("meta seq"),
                ok: f[2] == "1",
                slot: slot(&f[3..6]),
            }
        })
        .collect()
}

/// Sequence numbers of a consumer's `msg` lines, in arrival order.
pub fn seqs(lines: &[String]) -> Vec<u64> {
    msgs(lines).iter().map(|m| m.seq).collect()
}

/// `seq -> slot` from lines `PREFIX SEQ POOL INDEX GEN` (producer `pub`,
/// stage `fwd`).
pub fn slots(lines: &[String], prefix: &str) -> HashMap<u64, SlotId> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().expect("seq"), slot(&f[1..4]))
        })
        .collect()
}

/// `(delivered, dropped)` from a consumer's `stat` line.
pub fn own_stat(lines: &[String]) -> (u64, u64) {
    let l = lines
        .iter()
        .find_map(|l| l.strip_prefix("stat "))
        .expect("a stat line");
    let f: Vec<u64> = l.split(' ').map(|x| x.parse().expect("number")).collect();
    (f[0], f[1])
}

/// Asserts that a consumer printed no `corrupt` line and every checksum held.
pub fn assert_clean(who: &str, lines: &[String]) {
    let corrupt: Vec<&String> = lines.iter().filter(|l| l.starts_with("corrupt")).collect();
    assert!(corrupt.is_empty(), "{who}: corrupted receives: {corrupt:?}");
    let bad: Vec<Msg> = msgs(lines).into_iter().filter(|m| !m.ok).collect();
    assert!(bad.is_empty(), "{who}: checksum failures: {bad:?}");
}

/// Asserts that `seqs` is exactly 0..n in order.
pub fn assert_all_in_order(who: &str, seqs: &[u64], n: u64) {
    let want: Vec<u64> = (0..n).collect();
    if seqs != want.as_slice() {
        let first_diff = seqs.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "{who}: expected 0..{n} in order, got {} items (first difference at {first_diff:?})",
            seqs.len()
        );
    }
}

/// Asserts that `seqs` strictly increases.
pub fn assert_increasing(who: &str, seqs: &[u64]) {
    if let Some(w) = seqs.windows(2).find(|w| w[0] >= w[1]) {
        panic!("{who}: sequence not strictly increasing at {w:?}");
    }
}

/// Waits for the `ready` line of every peer in `peers`.
pub fn wait_all_ready<'a>(peers: impl IntoIterator<Item = &'a mut Peer>) {
    for p in peers {
        p.wait_line("ready");
    }
}

/// Asserts that a producer's output reports `done N`.
pub fn assert_done(out: &[String], n: u64) {
    assert!(out.contains(&format!("done {n}")), "{out:?}");
}

/// Finishes a consumer (successful exit) and asserts, under its name, that
/// it received exactly 0..n in order with intact bytes; returns its lines.
pub fn finish_all_in_order(peer: Peer, n: u64) -> Vec<String> {
    let who = peer.name.clone();
    let lines = peer.finish();
    assert_clean(&who, &lines);
    assert_all_in_order(&who, &seqs(&lines), n);
    lines
}

/// How many of `lines` start with `prefix`.
pub fn count_lines(lines: &[String], prefix: &str) -> usize {
    lines.iter().filter(|l| l.starts_with(prefix)).count()
}

/// A config with one 64 KiB pool of `slots` slots and the given
/// `(name, mode)` channels.
pub fn config(slots: u32, channels: &[(&str, &str)]) -> String {
    let mut s = format!(
        "[limits]\nring_capacity = 16\nmax_subscribers_per_channel = 8\n\
         [[pools]]\nname = \"p\"\nslot_size = \"64KiB\"\nslots = {slots}\n"
    );
    for (name, mode) in channels {
        s.push_str(&format!(
            "[[channels]]\nname = \"{name}\"\nmode = \"{mode}\"\n"
        ));
    }
    s
}
