//! `tb-peer`: the child process the cross-process tests in `tests/` spawn.
//!
//! ```text
//! tb-peer ROLE --socket PATH [--key value | --flag]...
//! ```
//!
//! Roles:
//!
//! * `producer --channel C --count N [--size B] [--pace-us U] [--report]`:
//!   publishes N tensors of B bytes (default 4096). The payload of the tensor
//!   with producer sequence `s` is [`fill`]`(s)`; its user header carries
//!   `checksum(payload)` and `s` (two little-endian u64). Prints
//!   `pub SEQ POOL INDEX GEN` per tensor with `--report`, then `done N`.
//! * `consumer --channel C [--policy P] [--depth D] [--sleep-us U]
//!   [--count N] [--verify sum|plus1] [--hold K] [--gate]` (alias `worker`):
//!   subscribes, prints `ready CLIENT HANDLE`, then
//!   `msg SEQ META_SEQ OK POOL INDEX GEN` per tensor, where SEQ is the
//!   producer's sequence from the user header and OK is 1 when the payload
//!   checksum verified (`plus1`: every byte was incremented by a stage). It
//!   stops after `--count` tensors, or when its stdin is closed and nothing is
//!   queued; then prints `stat DELIVERED DROPPED` (its own counters from the
//!   broker) and `end RECEIVED`. `--gate` waits for a `go` line on stdin
//!   before the first receive. `--hold K` keeps the first K views, prints
//!   `holding` and sleeps until killed (or stdin closes).
//! * `stage --input IN --output OUT [--sleep-us U]`: prints `ready`, then
//!   takes each tensor exclusively, adds 1 to every byte in place, forwards
//!   the same slot and prints `fwd SEQ POOL INDEX GEN`; stops like a consumer.
//! * `loaner --channel C --count K`: loans K slots, never publishes, prints
//!   `loaned K` and sleeps until killed (or stdin closes).
//! * `forker --channel C --own-channel O --stage-input I --stage-output S
//!   [--count N]` (issue 12.4, fork semantics): opens a producer and a
//!   consumer on C (its readiness armed) and a stage I -> S, publishes
//!   tensor 0 and keeps it received, loans tensor 1 and keeps the loan,
//!   prints `ready CLIENT`, then forks. The child tries every inherited
//!   handle (`child stat|loan|recv|stage|readiness ok|err MESSAGE`), drops
//!   them all, connects a client of its own that exchanges one tensor on O
//!   (`child own N`), prints `child done` and exits normally. The parent
//!   waits for it (`child exited CODE`), prints `parent ready-fd 0|1`
//!   (whether its readiness fd turned readable meanwhile) and `forked`,
//!   waits for `go`, publishes the kept loan and tensors 2..=N
//!   (`parent pub SEQ DELIVERED`), prints `parent ready-fd-after 0|1`,
//!   receives them (`parent received COUNT`), checks the kept tensor 0
//!   (`parent t0-intact 0|1`) and prints `done`. With `--linger` the child
//!   keeps its inherited handles, prints `child pid PID` and `child done`
//!   and sleeps until killed, and the parent prints `forked` at once and
//!   sleeps until killed (or stdin closes): the broker must notice the
//!   parent's death although the child inherited its connection.
//! * `many --channels C1,C2,... --consumers K --count N [--stall-after S]`
//!   (issue 16): opens K consumers in this one process, consumer `i` on
//!   channel `i mod len`, prints `ready CLIENT`, then receives round-robin
//!   over all of them until each has N tensors, checking that each one's
//!   producer sequence goes 0, 1, 2, ... and its checksum verifies; prints
//!   `done K N` (or `bad CONSUMER EXPECTED GOT OK` and exits 1). With
//!   `--stall-after S` it keeps the S-th view of every consumer, prints
//!   `stalled` and sleeps until killed (or stdin closes).
//! * `broker --config FILE`: runs a broker on `--socket` (prints
//!   `listening`) until killed or its stdin closes; for broker-death tests.
//! * `hostile --config FILE --count N [--seed S] [--pace-us U] [--target slots|holders|rings|both]`:
//!   a client that scribbles N random 64-bit words through its own mapping
//!   of the control segment into the slot headers of pool 0 (`slots`: any
//!   of their 32 words, the holder word included; `holders`: the holder
//!   word only), the live rings of channel 0 (`rings`), or both slot
//!   headers and rings (`both`, the default), then prints `wrote N`.
//!
//! Every line goes to stdout at once (Rust's stdout is line buffered), so a
//! parent that kills the process knows everything it printed. Errors go to
//! stderr with a non-zero exit status.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tensorbus::error::RecvError;
use tensorbus::TensorView;
use tensorbus::{Client, ConsumerOptions, DType, Policy};

/// How long one receive waits before the stop condition is checked again.
const POLL: Duration = Duration::from_millis(20);

/// FNV-1a 64 of `bytes`.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills `out` with the splitmix64 stream seeded by `seq`.
fn fill(seq: u64, out: &mut [u8]) {
    let mut state = seq ^ 0x005e_ed0f_7e45_0b05;
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// What the parent said on stdin: `go` lines and end of file.
#[derive(Default)]
struct Stdin {
    gos: AtomicU32,
    closed: AtomicBool,
}

impl Stdin {
    /// Reads stdin on a thread for the life of the process.
    fn watch() -> Arc<Stdin> {
        let s = Arc::new(Stdin::default());
        let t = s.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(l) if l.trim() == "go" => {
                        t.gos.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            t.closed.store(true, Ordering::SeqCst);
        });
        s
    }
    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
    /// Sleeps until stdin is closed (or the process is killed).
    fn sleep_until_closed(&self) {
        while !self.closed() {
            std::thread::sleep(POLL);
        }
    }
    /// Waits for a `go` line; false if stdin closed first.
    fn wait_go(&self) -> bool {
        loop {
            if self.gos.load(Ordering::SeqCst) > 0 {
                return true;
            }
            if self.closed() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// `--key value` options and `--flag`s.
struct Args(HashMap<String, String>);

impl Args {
    fn parse(args: &[String]) -> Args {
        let mut map = HashMap::new();
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .unwrap_or_else(|| fail(&format!("unexpected argument {a:?}")));
            let value = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().cloned().unwrap_or_default(),
                _ => String::new(),
            };
            map.insert(key.to_owned(), value);
        }
        Args(map)
    }
    fn str(&self, key: &str) -> &str {
        self.0
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| fail(&format!("--{key} is required")))
    }
    fn num(&self, key: &str, default: u64) -> u64 {
        self.0.get(key).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| fail(&format!("--{key} {v:?} is not a number")))
        })
    }
    fn opt_num(&self, key: &str) -> Option<u64> {
        self.0.contains_key(key).then(|| self.num(key, 0))
    }
    fn flag(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("tb-peer: {msg}");
    std::process::exit(2);
}

fn sleep_us(us: u64) {
    if us > 0 {
        std::thread::sleep(Duration::from_micros(us));
    }
}

/// Splits a user header into (checksum, seq).
fn header(h: &[u8]) -> (u64, u64) {
    let word = |r: std::ops::Range<usize>| {
        h.get(r)
            .and_then(|b| b.try_into().ok())
            .map_or(u64::MAX, u64::from_le_bytes)
    };
    (word(0..8), word(8..16))
}

/// Runs a broker until killed or stdin closes.
fn broker(a: &Args, stdin: &Stdin) {
    let config = tensorbus_broker::Config::from_file(Path::new(a.str("config")))
        .unwrap_or_else(|e| fail(&e.to_string()));
    let mut broker = tensorbus_broker::Broker::bind(&config, Path::new(a.str("socket")))
        .unwrap_or_else(|e| fail(&e.to_string()));
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || broker.run(&flag));
    println!("listening");
    while !stdin.closed() {
        std::thread::sleep(POLL);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
}

fn producer(client: &Client, a: &Args) {
    let p = client
        .producer(a.str("channel"))
        .unwrap_or_else(|e| fail(&e.to_string()));
    let count = a.num("count", 0);
    let size = a.num("size", 4096) as usize;
    let pace = a.num("pace-us", 0);
    let report = a.flag("report");
    for seq in 0..count {
        let mut t = p
            .loan_timeout(
                &[size as u32],
                DType::U8,
                Duration::from_millis(a.num("loan-timeout-ms", 30_000)),
            )
            .unwrap_or_else(|e| fail(&format!("loan {seq}: {e}")));
        fill(seq, &mut t);
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&checksum(&t).to_le_bytes());
        h[8..].copy_from_slice(&seq.to_le_bytes());
        t.set_user_header(&h)
            .unwrap_or_else(|e| fail(&e.to_string()));
        let id = t.slot_id();
        t.publish()
            .unwrap_or_else(|e| fail(&format!("publish {seq}: {e}")));
        if report {
            println!("pub {seq} {} {} {}", id.pool, id.index, id.generation);
        }
        sleep_us(pace);
    }
    println!("done {count}");
}

fn consumer(client: &Client, a: &Args, stdin: &Stdin) {
    // Peers run until the test closes their stdin, also after the stream
    // ended (`--end-of-stream` turns end of stream on).
    let mut opts = ConsumerOptions::default().end_of_stream(a.0.contains_key("end-of-stream"));
    if let Some(p) = a.0.get("policy") {
        opts = opts.policy(p.parse::<Policy>().unwrap_or_else(|e| fail(&e)));
    }
    if let Some(d) = a.opt_num("depth") {
        opts = opts.depth(d as u32);
    }
    let c = client
        .consumer_with(a.str("channel"), opts)
        .unwrap_or_else(|e| fail(&e.to_string()));
    println!("ready {} {}", client.id(), c.handle());
    let plus1 = match a.0.get("verify").map(String::as_str) {
        None | Some("sum") => false,
        Some("plus1") => true,
        Some(v) => fail(&format!("unknown --verify {v:?}")),
    };
    let sleep = a.num("sleep-us", 0);
    let count = a.opt_num("count");
    let hold = a.opt_num("hold");
    if a.flag("gate") && !stdin.wait_go() {
        fail("stdin closed before go");
    }
    let mut held = Vec::new();
    let mut received = 0u64;
    let mut scratch = Vec::new();
    while count.is_none_or(|n| received < n) {
        let t = match c.recv_timeout(POLL) {
            Ok(t) => t,
            Err(RecvError::Timeout(_)) if stdin.closed() => break,
            Err(RecvError::Timeout(_)) => continue,
            Err(e) => {
                println!("corrupt {e}");
                continue;
            }
        };
        received += 1;
        let (sum, seq) = header(t.user_header());
        let ok = if plus1 {
            scratch.clear();
            scratch.extend(t.iter().map(|b| b.wrapping_sub(1)));
            checksum(&scratch) == sum
        } else {
            checksum(&t) == sum && t.seq() == seq
        };
        let id = t.slot_id();
        println!(
            "msg {seq} {} {} {} {} {}",
            t.seq(),
            u8::from(ok),
            id.pool,
            id.index,
            id.generation
        );
        if hold.is_some() {
            held.push(t);
            if hold == Some(held.len() as u64) {
                println!("holding");
                stdin.sleep_until_closed();
                std::process::exit(0);
            }
        } else {
            sleep_us(sleep);
            drop(t);
        }
    }
    drop(held);
    let stat = match client.stat() {
        Ok(s) => s,
        Err(e) => {
            // The broker may be gone (broker-death tests): data kept flowing.
            println!("stat-error {e}");
            println!("end {received}");
            return;
        }
    };
    let me = stat
        .channels
        .iter()
        .flat_map(|ch| &ch.subscribers)
        .find(|s| s.handle == c.handle())
        .unwrap_or_else(|| fail("own subscription missing from stat"));
    println!("stat {} {}", me.delivered, me.dropped);
    println!("end {received}");
}

fn many(client: &Client, a: &Args, stdin: &Stdin) {
    let channels: Vec<&str> = a.str("channels").split(',').collect();
    let k = a.num("consumers", 1) as usize;
    let n = a.num("count", 1);
    let stall = a.opt_num("stall-after");
    let consumers: Vec<_> = (0..k)
        .map(|i| {
            client
                .consumer_with(
                    channels[i % channels.len()],
                    ConsumerOptions::default().end_of_stream(false),
                )
                .unwrap_or_else(|e| fail(&format!("consumer {i}: {e}")))
        })
        .collect();
    println!("ready {}", client.id());
    let mut next = vec![0u64; k];
    let mut kept = Vec::new();
    let mut stalled = vec![false; k];
    let mut left = k;
    while left > 0 {
        let mut idle = true;
        for (i, c) in consumers.iter().enumerate() {
            if next[i] == n || stalled[i] {
                continue;
            }
            let Ok(t) = c.try_recv() else {
                continue;
            };
            idle = false;
            let (sum, seq) = header(t.user_header());
            let ok = checksum(&t) == sum;
            if seq != next[i] || !ok {
                println!("bad {i} {} {seq} {}", next[i], u8::from(ok));
                std::process::exit(1);
            }
            next[i] += 1;
            if stall == Some(next[i]) {
                kept.push(t);
                stalled[i] = true;
                if kept.len() == k {
                    println!("stalled");
                    stdin.sleep_until_closed();
                    std::process::exit(0);
                }
                continue;
            }
            if next[i] == n {
                left -= 1;
            }
        }
        if idle {
            if stdin.closed() {
                fail("stdin closed before every consumer got its tensors");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    println!("done {k} {n}");
}

fn stage(client: &Client, a: &Args, stdin: &Stdin) {
    let s = client
        .stage_with(
            a.str("input"),
            a.str("output"),
            ConsumerOptions::default()
                .policy(Policy::Block)
                .end_of_stream(false),
        )
        .unwrap_or_else(|e| fail(&e.to_string()));
    println!("ready {} {}", client.id(), s.input().handle());
    let sleep = a.num("sleep-us", 0);
    loop {
        let mut t = match s.recv_mut_timeout(POLL) {
            Ok(t) => t,
            Err(RecvError::Timeout(_)) if stdin.closed() => break,
            Err(RecvError::Timeout(_)) => continue,
            Err(e) => fail(&format!("stage receive: {e}")),
        };
        for b in t.iter_mut() {
            *b = b.wrapping_add(1);
        }
        let (_, seq) = header(t.meta().user_header());
        let id = t.slot_id();
        t.forward()
            .unwrap_or_else(|e| fail(&format!("forward {seq}: {e}")));
        println!("fwd {seq} {} {} {}", id.pool, id.index, id.generation);
        sleep_us(sleep);
    }
    println!("end");
}

fn loaner(client: &Client, a: &Args, stdin: &Stdin) {
    let p = client
        .producer(a.str("channel"))
        .unwrap_or_else(|e| fail(&e.to_string()));
    let count = a.num("count", 1);
    for _ in 0..count {
        let t = p
            .loan_bytes(a.num("size", 4096) as usize)
            .unwrap_or_else(|e| fail(&e.to_string()));
        // Keep the loan past the view: only the broker can take it back now.
        std::mem::forget(t);
    }
    println!("loaned {count}");
    stdin.sleep_until_closed();
}

/// The address range of this process's mapping of the control segment.
fn control_mapping() -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_else(|e| fail(&e.to_string()));
    maps.lines()
        .filter(|l| l.contains("memfd:tensorbus-control") && l.contains("rw-s"))
        .find_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .unwrap_or_else(|| fail("no control segment mapping"))
}

/// Scribbles over slot headers and rings (see the module docs).
fn hostile(a: &Args) {
    let config = tensorbus_broker::Config::from_file(Path::new(a.str("config")))
        .unwrap_or_else(|e| fail(&e.to_string()));
    let layout = tensorbus_core::layout::Layout::compute(&config.layout_params())
        .unwrap_or_else(|e| fail(&e.to_string()));
    let (start, end) = control_mapping();
    let mut x = a.num("seed", 42) | 1;
    let mut rng = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let count = a.num("count", 10_000);
    let pace = a.num("pace-us", 20);
    let slots = layout.params.pool_slots[0] as u64;
    let rings = (layout.rows() * layout.params.max_subscribers as usize) as u64;
    let target = a.0.get("target").map_or("both", String::as_str);
    if !["slots", "holders", "rings", "both"].contains(&target) {
        fail(&format!("unknown --target {target:?}"));
    }
    for _ in 0..count {
        let slot = match target {
            "slots" | "holders" => true,
            "rings" => false,
            _ => rng() % 2 == 0,
        };
        let offset = if slot {
            // Any word of a slot header (word 0 is the holder word).
            let word = if target == "holders" { 0 } else { rng() % 32 };
            layout.slots_offset[0] + (rng() % slots) as usize * 256 + word as usize * 8
        } else {
            // A ring header word or cell of channel 0, subscriber 0: the
            // rings in use (the broker's row 0 and the first producer rows).
            let row = (rng() % 3).min(rings - 1) as usize;
            let ring = layout.channels_offset
                + layout.rings_in_block
                + row * layout.params.max_subscribers as usize * layout.ring_stride;
            let words = (layout.ring_stride / 8) as u64;
            ring + (rng() % words) as usize * 8
        };
        let addr = start + offset;
        if addr + 8 > end {
            fail("offset outside the mapping");
        }
        // SAFETY: `addr` is 8-aligned (layout offsets and word steps are) and
        // inside our shared mapping of the control segment, which lives as
        // long as the client (leaked below until exit); other processes only
        // access it atomically. Writing garbage there is the point.
        let word = unsafe { std::sync::atomic::AtomicU64::from_ptr(addr as *mut u64) };
        let holder_word = slot && (offset - layout.slots_offset[0]) % 256 == 0;
        let value = if holder_word {
            // Free the slot under its holders, drop or add one holder, or
            // anything at all (mostly bits of handles that do not exist).
            match rng() % 4 {
                0 => 0,
                1 => word.load(Ordering::Relaxed) ^ (1 << (rng() % 64)),
                2 => 1 << (rng() % 64),
                _ => rng(),
            }
        } else {
            match rng() % 4 {
                0 => rng(),
                1 => rng() % 64,
                2 => rng() & 0xFFFF_0000_FFFF,
                _ => u64::MAX,
            }
        };
        word.store(value, Ordering::Relaxed);
        sleep_us(pace);
    }
    println!("wrote {count}");
}

/// Writes tensor `seq`'s payload and user header (as `producer` does).
fn stamp(t: &mut tensorbus::TensorMut, seq: u64) {
    fill(seq, t);
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&checksum(t).to_le_bytes());
    h[8..].copy_from_slice(&seq.to_le_bytes());
    t.set_user_header(&h)
        .unwrap_or_else(|e| fail(&e.to_string()));
}

/// `ok`, or `err MESSAGE`.
fn outcome<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("err {e}"),
    }
}

/// Whether `fd` turns readable within `ms` milliseconds.
fn readable(fd: std::os::fd::BorrowedFd<'_>, ms: i32) -> u8 {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    u8::from(n > 0 && pfd.revents & libc::POLLIN != 0)
}

/// The `forker` role (see the module docs).
fn forker(client: Client, a: &Args, stdin: &Stdin) {
    let or_fail = |e: &dyn std::fmt::Display| -> ! { fail(&e.to_string()) };
    let size = 4096;
    let count = a.num("count", 6);
    let p = client
        .producer(a.str("channel"))
        .unwrap_or_else(|e| or_fail(&e));
    let k = client
        .consumer(a.str("channel"))
        .unwrap_or_else(|e| or_fail(&e));
    let stage = client
        .stage_with(
            a.str("stage-input"),
            a.str("stage-output"),
            ConsumerOptions::default()
                .policy(Policy::Block)
                .end_of_stream(false),
        )
        .unwrap_or_else(|e| or_fail(&e));
    let ready = k.readiness().unwrap_or_else(|e| or_fail(&e));
    let mut t = p.loan_bytes(size).unwrap_or_else(|e| or_fail(&e));
    stamp(&mut t, 0);
    t.publish().unwrap_or_else(|e| or_fail(&e));
    let t0 = k.recv_timeout(POLL * 100).unwrap_or_else(|e| or_fail(&e));
    let t0_sum = checksum(&t0);
    ready.arm();
    let mut held = p.loan_bytes(size).unwrap_or_else(|e| or_fail(&e));
    stamp(&mut held, 1);
    println!("ready {}", client.id());
    // SAFETY: fork(2) has no memory-safety preconditions; the child below
    // only uses what it inherited (the point of the test), its own new
    // client, and exits without returning into the caller.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail(&format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 && a.flag("linger") {
        // Keeps every inherited handle (as a long-lived worker would) and
        // lets go of the parent's pipes, so that whoever reads them sees
        // their end when the parent dies.
        println!("child pid {}", std::process::id());
        println!("child done");
        // SAFETY: plain descriptor calls on this process's own table.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
        }
        loop {
            std::thread::sleep(POLL);
        }
    }
    if pid == 0 {
        println!("child stat {}", outcome(client.stat()));
        ready.wake();
        ready.clear();
        drop(held);
        println!("child loan {}", outcome(p.loan_bytes(size)));
        drop(t0);
        println!("child recv {}", outcome(k.try_recv()));
        println!("child stage {}", outcome(stage.try_recv_mut()));
        println!("child readiness {}", outcome(k.readiness()));
        drop(stage);
        drop(k);
        drop(p);
        drop(client);
        let own = Client::connect_to(Some(Path::new(a.str("socket"))), "tb-peer-forker-child")
            .unwrap_or_else(|e| or_fail(&e));
        let op = own
            .producer(a.str("own-channel"))
            .unwrap_or_else(|e| or_fail(&e));
        let oc = own
            .consumer(a.str("own-channel"))
            .unwrap_or_else(|e| or_fail(&e));
        let mut t = op.loan_bytes(size).unwrap_or_else(|e| or_fail(&e));
        stamp(&mut t, 7);
        t.publish().unwrap_or_else(|e| or_fail(&e));
        let got = oc.recv_timeout(POLL * 100).unwrap_or_else(|e| or_fail(&e));
        println!("child own {}", header(got.user_header()).1);
        drop(got);
        drop((oc, op, own));
        println!("child done");
        // Everything is dropped above. `_exit`, not `exit`: a forked child of
        // a threaded process must not run the parent's atexit handlers (under
        // ASan, LeakSanitizer's exit check counts the parent's threads' state,
        // which the child only inherited, as leaks and exits 1).
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        // SAFETY: _exit(2) ends the process at once; nothing is used after.
        unsafe { libc::_exit(0) }
    }
    if a.flag("linger") {
        println!("forked");
        return stdin.sleep_until_closed();
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a live int.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        fail(&format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    println!("child exited {code}");
    println!("parent ready-fd {}", readable(ready.fd(), 0));
    println!("forked");
    if !stdin.wait_go() {
        fail("stdin closed before go");
    }
    let out = held.publish().unwrap_or_else(|e| or_fail(&e));
    println!("parent pub 1 {}", out.delivered);
    for seq in 2..=count {
        let mut t = p.loan_bytes(size).unwrap_or_else(|e| or_fail(&e));
        stamp(&mut t, seq);
        let out = t.publish().unwrap_or_else(|e| or_fail(&e));
        println!("parent pub {seq} {}", out.delivered);
    }
    println!("parent ready-fd-after {}", readable(ready.fd(), 5000));
    let mut received = 0;
    for seq in 1..=count {
        match k.recv_timeout(POLL * 50) {
            Ok(t) if header(t.user_header()) == (checksum(&t), seq) => received += 1,
            Ok(t) => fail(&format!(
                "tensor {seq}: got header {:?}",
                header(t.user_header())
            )),
            Err(e) => {
                println!("parent recv {seq}: {e}");
                break;
            }
        }
    }
    println!("parent received {received}");
    println!("parent t0-intact {}", u8::from(checksum(&t0) == t0_sum));
    drop(t0);
    drop((stage, k, p));
    println!("done");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((role, rest)) = args.split_first() else {
        fail("usage: tb-peer ROLE --socket PATH [--key value]...");
    };
    let a = Args::parse(rest);
    let stdin = Stdin::watch();
    if role == "broker" {
        return broker(&a, &stdin);
    }
    let client = Client::connect_to(Some(Path::new(a.str("socket"))), &format!("tb-peer-{role}"))
        .unwrap_or_else(|e| fail(&e.to_string()));
    match role.as_str() {
        "producer" => producer(&client, &a),
        "consumer" | "worker" => consumer(&client, &a, &stdin),
        "stage" => stage(&client, &a, &stdin),
        "many" => many(&client, &a, &stdin),
        "loaner" => loaner(&client, &a, &stdin),
        "forker" => forker(client, &a, &stdin),
        "hostile" => hostile(&a),
        other => fail(&format!("unknown role {other:?}")),
    }
}
