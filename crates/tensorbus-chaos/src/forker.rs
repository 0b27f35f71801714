//! `role forker`: fork semantics under chaos (issue 12.4). A forker is a
//! single-threaded process but for the client library's watcher (fork is
//! only safe there: no stdin thread, it
//! polls its stdin for the orchestrator's stop) that holds a producer and a
//! `block` consumer on [`FORK_CHANNEL`] and, over and over:
//!
//! 1. publishes a few tensors and receives them on its own consumer (every
//!    one of its own, in order, every byte checked), keeping the last two
//!    it received held, and checks with `stat` that the broker holds
//!    exactly its objects (one subscriber, two handles);
//! 2. forks. The child uses every inherited handle (client requests,
//!    opens, a loan, a receive, the held tensors): each must fail with
//!    [`tensorbus::error::ForkedChild`] (it prints a `forked_child` line per
//!    error); it drops them all, connects a client of its own, opens a
//!    producer and a consumer on the same channel, exchanges a few tensors
//!    (all its own must arrive intact and in order), and exits, normally
//!    (dropping its handles) or without dropping its own; or the parent
//!    `kill -9`s it at a random moment;
//! 3. meanwhile and afterwards the parent's handles must keep working: it
//!    publishes and receives more (all its own arrive, in order, intact),
//!    its held tensors are still intact once the child is gone, and `stat`
//!    still shows exactly one subscriber and two handles of its client.
//!
//! Output: a `fork` line per fork, a `forked_child` line per inherited
//! handle that refused in a child, a `child_kill` line per child the
//! parent killed, and a `fork_failure` line (details on stderr) per child
//! that did not behave (an inherited handle worked, or its own exchange
//! failed) or per check of the parent that failed after a fork; lines are
//! printed at once, so the orchestrator counts them even after it
//! `kill -9`s the forker. Last, `forker: forks=F`. Exit 0 when stdin
//! closes, 3 after a failure of the parent (its handles are then
//! suspect), 2 on any other error.

use crate::payload::{self, Rng};
use crate::roles::{fail, Args};
use std::path::Path;
use std::time::{Duration, Instant};
use tensorbus::error::{LoanError, OpenError, RecvError, RequestError, TryRecvError};
use tensorbus::TensorView;
use tensorbus::{
    Client, Consumer, ConsumerOptions, DType, Mode, Policy, Producer, ProducerOptions, Tensor,
};

/// The channel of the forkers (created at run time).
pub const FORK_CHANNEL: &str = "ctl/fork";
/// Queue depth of every consumer on [`FORK_CHANNEL`]: more than a parent
/// and a child ever publish while a child lives, so no publish waits.
const DEPTH: u32 = 16;
/// Tensors the parent publishes before and while each child lives.
const BURST: u64 = 4;
/// Tensors a child publishes on its own producer.
const CHILD_TENSORS: u64 = 3;
/// A child still alive after this is killed and counted as a failure.
const CHILD_DEADLINE: Duration = Duration::from_secs(20);
/// Exit status of a child that did not behave.
const CHILD_FAILED: i32 = 5;

/// True once stdin reached end of file (the orchestrator's stop); no
/// thread, so that the process stays single-threaded and may fork.
fn stdin_closed() -> bool {
    let mut p = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd that lives on our stack.
    if unsafe { libc::poll(&mut p, 1, 0) } <= 0 || p.revents == 0 {
        return false;
    }
    let mut b = [0u8; 64];
    // SAFETY: read writes at most 64 bytes into `b`; stdin was reported
    // readable (or hung up), so this does not block.
    unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) <= 0 }
}

/// Threads of this process, from /proc, but the client library's
/// reconnect watcher (`tensorbus-watch`, issue 16.2): the library makes a
/// fork wait until that thread holds no lock (a `pthread_atfork` gate,
/// `crates/tensorbus/src/reconnect.rs`), so it does not make forking unsafe.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .map_or(true, |n| n.trim_end() != "tensorbus-watch")
            })
            .count()
    })
}

fn consumer_opts() -> ConsumerOptions {
    ConsumerOptions::default()
        .end_of_stream(false)
        .policy(Policy::Block)
        .depth(DEPTH)
        .create(tensorbus::ChannelSpec::new(Mode::Broadcast))
}

fn open(client: &Client) -> Result<(Producer, Consumer), OpenError> {
    // The consumer first: it must see everything the producer publishes.
    let c = client.consumer_with(FORK_CHANNEL, consumer_opts())?;
    let p = client.producer_with(
        FORK_CHANNEL,
        ProducerOptions::default().create(tensorbus::ChannelSpec::new(Mode::Broadcast)),
    )?;
    Ok((p, c))
}

/// Publishes `(inc, seq)` (payload and header as every chaos producer).
fn publish(p: &mut Producer, inc: u32, seq: u64) -> Result<(), String> {
    let n = payload::len(inc, seq);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut t = loop {
        match p.loan_timeout(&[n as u32], DType::U8, Duration::from_millis(100)) {
            Ok(t) => break t,
            // The data plane may hold every slot for a while.
            Err(LoanError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(e) => return Err(format!("loan {inc}/{seq}: {e}")),
        }
    };
    payload::fill(inc, seq, &mut t);
    let h = payload::header(payload::checksum(&t, 0), seq, inc);
    t.set_user_header(&h)
        .map_err(|e| format!("user header {inc}/{seq}: {e}"))?;
    t.publish()
        .map_err(|e| format!("publish {inc}/{seq}: {e}"))?;
    Ok(())
}

/// Receives until the own tensors `inc/from..to` arrived, in order and
/// intact (others' tensors are checked and released). Keeps the last two
/// own ones in `held` (when given).
fn receive(
    c: &Consumer,
    inc: u32,
    from: u64,
    to: u64,
    mut held: Option<&mut Vec<Tensor>>,
) -> Result<(), String> {
    let mut next = from;
    while next < to {
        let t = match c.recv_timeout(Duration::from_secs(10)) {
            Ok(t) => t,
            Err(RecvError::Timeout(d)) => {
                return Err(format!("own tensor {inc}/{next} not received within {d:?}"))
            }
            Err(e) => return Err(format!("receive {inc}/{next}: {e}")),
        };
        let (ok, seq, from_inc) = payload::verify(t.user_header(), &t, 0);
        if !ok {
            return Err(format!("corrupt tensor {from_inc}/{seq} received"));
        }
        if from_inc != inc {
            continue; // someone else's (a child's, or the parent's)
        }
        if seq != next {
            return Err(format!(
                "own tensor {inc}/{seq} received, {inc}/{next} expected"
            ));
        }
        next += 1;
        if let Some(held) = held.as_deref_mut() {
            if held.len() == 2 {
                held.remove(0);
            }
            held.push(t);
        }
    }
    Ok(())
}

/// The broker must hold exactly one subscriber on [`FORK_CHANNEL`] and two
/// handles (that consumer and the producer) of this client.
fn check(client: &Client) -> Result<(), String> {
    let stat = client.stat().map_err(|e| format!("stat: {e}"))?;
    let me = client.id();
    let subs = stat
        .channels
        .iter()
        .filter(|c| c.name == FORK_CHANNEL)
        .flat_map(|c| &c.subscribers)
        .filter(|s| s.client == me)
        .count();
    let handles = stat
        .clients
        .iter()
        .find(|c| c.id == me)
        .map_or(0, |c| c.handles);
    if subs != 1 || handles != 2 {
        return Err(format!(
            "the broker holds {subs} subscribers and {handles} handles of client {me}, which has 1 consumer and 1 producer"
        ));
    }
    Ok(())
}

/// A failure of the parent after a fork: reported, then exit 3.
fn parent_failed(msg: &str) -> ! {
    println!("fork_failure");
    eprintln!("forker: FORK parent affected: {msg}");
    std::process::exit(3);
}

/// `role forker`: see the module docs.
pub fn forker(a: &Args) -> ! {
    let inc = u32::try_from(a.num("inc", 0)).unwrap_or_else(|_| fail("--inc too large"));
    let socket = a.str("socket").to_owned();
    let mut rng = Rng::new(a.num("seed", 1) ^ (u64::from(inc) << 24) ^ 0xF0_4C);
    let client = Client::connect_to(Some(Path::new(&socket)), &format!("chaos-forker-{inc}"))
        .unwrap_or_else(|e| fail(&format!("connect: {e}")));
    let (mut producer, consumer) = open(&client).unwrap_or_else(|e| fail(&format!("open: {e}")));
    let mut held: Vec<Tensor> = Vec::new();
    let mut seq = 0u64;
    let mut forks = 0u64;
    let mut round = 0u32;
    while !stdin_closed() {
        // 1. The parent's handles work; two of its tensors stay held.
        for s in seq..seq + BURST {
            publish(&mut producer, inc, s).unwrap_or_else(|e| parent_failed(&e));
        }
        receive(&consumer, inc, seq, seq + BURST, Some(&mut held))
            .unwrap_or_else(|e| parent_failed(&e));
        seq += BURST;
        check(&client).unwrap_or_else(|e| parent_failed(&e));
        let n = threads();
        if n != 1 {
            fail(&format!(
                "{n} threads: fork only from a single-threaded process"
            ));
        }
        // 2. Fork. The child's fate is drawn before, so both know it.
        round = round.wrapping_add(1);
        let fate = rng.below(4); // 0, 1: exits dropping all; 2: exits; 3: killed
        let kill_after = Duration::from_micros(rng.below(20_000));
        let parent = std::process::id();
        // SAFETY: this process is single-threaded (checked just above), so
        // the child may do anything the parent could (allocate, lock).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            fail(&format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // The child: use the inherited handles, drop them, go on alone.
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes an integer signal.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } as u32 != parent {
                std::process::exit(0); // the parent died already
            }
            let refused = inherited(&client, &mut producer, &consumer, &held);
            drop(held);
            drop(consumer);
            drop(producer);
            drop(client);
            let child_inc = 0x8000_0000 | (inc << 16) | (round & 0xFFFF);
            let code = match (refused, child(&socket, child_inc, fate != 2)) {
                (Ok(()), Ok(())) => 0,
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("forker: FORK child: {e}");
                    CHILD_FAILED
                }
            };
            std::process::exit(code);
        }
        forks += 1;
        println!("fork");
        // 3. Meanwhile the parent goes on with its handles.
        let started = Instant::now();
        let mut killed = false;
        for s in seq..seq + BURST {
            publish(&mut producer, inc, s).unwrap_or_else(|e| parent_failed(&e));
        }
        receive(&consumer, inc, seq, seq + BURST, None).unwrap_or_else(|e| parent_failed(&e));
        seq += BURST;
        let status = loop {
            if fate == 3 && !killed && started.elapsed() >= kill_after {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed = true;
            }
            let mut status = 0;
            // SAFETY: waitpid on our own child writes one int.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                break status;
            }
            if r < 0 {
                fail(&format!("waitpid: {}", std::io::Error::last_os_error()));
            }
            if started.elapsed() > CHILD_DEADLINE && !killed {
                println!("fork_failure");
                eprintln!("forker: FORK child {pid} still alive after {CHILD_DEADLINE:?}; killed");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed = true;
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        let by_kill = libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
        if killed && by_kill {
            if fate == 3 {
                println!("child_kill");
            }
        } else if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            println!("fork_failure");
            eprintln!("forker: FORK child {pid} ended with wait status {status:#x}");
        }
        // The child is gone: whatever it dropped or did left the parent's
        // tensors held and its handles open.
        for t in &held {
            if !payload::verify(t.user_header(), t, 0).0 {
                parent_failed("a tensor the parent held across the fork changed");
            }
        }
        check(&client).unwrap_or_else(|e| parent_failed(&e));
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
    }
    drop(held);
    drop(consumer);
    drop(producer);
    println!("forker: forks={forks}");
    std::process::exit(0);
}

/// In the child: every inherited handle must refuse with ForkedChild
/// (one `forked_child` line each). `Err` names the first that did not.
fn inherited(
    client: &Client,
    producer: &mut Producer,
    consumer: &Consumer,
    held: &[Tensor],
) -> Result<(), String> {
    let mut first: Option<String> = None;
    let mut note = |what: &str, forked: bool, got: String| {
        if forked {
            println!("forked_child");
        } else if first.is_none() {
            first = Some(format!(
                "inherited {what} did not refuse with ForkedChild: {got}"
            ));
        }
    };
    match client.stat() {
        Err(RequestError::ForkedChild(_)) => note("client stat", true, String::new()),
        other => note(
            "client stat",
            false,
            format!("{:?}", other.map(|_| "a report")),
        ),
    }
    match client.consumer_with(FORK_CHANNEL, consumer_opts()) {
        Err(OpenError::Request(RequestError::ForkedChild(_))) => note("open", true, String::new()),
        other => note(
            "client open",
            false,
            format!("{:?}", other.map(|_| "a consumer")),
        ),
    }
    match producer.loan(&[16], DType::U8) {
        Err(LoanError::ForkedChild(_)) => note("loan", true, String::new()),
        other => note(
            "producer loan",
            false,
            format!("{:?}", other.map(|_| "a loan")),
        ),
    }
    match consumer.try_recv() {
        Err(TryRecvError::ForkedChild(_)) => note("receive", true, String::new()),
        other => note(
            "consumer try_recv",
            false,
            format!("{:?}", other.map(|_| "a tensor")),
        ),
    }
    for t in held {
        note(
            "received tensor",
            t.fork_check().is_err(),
            "fork_check passed".into(),
        );
    }
    first.map_or(Ok(()), Err)
}

/// The child's own life: a client of its own, a producer and a consumer
/// on the parent's channel, [`CHILD_TENSORS`] tensors out and back in.
/// With `tidy`, it drops them before returning (else the exit does).
fn child(socket: &str, inc: u32, tidy: bool) -> Result<(), String> {
    let client = Client::connect_to(Some(Path::new(socket)), &format!("chaos-fork-child-{inc}"))
        .map_err(|e| format!("connect: {e}"))?;
    let (mut p, c) = open(&client).map_err(|e| format!("open: {e}"))?;
    for s in 0..CHILD_TENSORS {
        publish(&mut p, inc, s)?;
    }
    receive(&c, inc, 0, CHILD_TENSORS, None)?;
    if tidy {
        drop(c);
        drop(p);
        drop(client);
    } else {
        std::mem::forget((c, p, client));
    }
    Ok(())
}
