//! Fork semantics (issue 12.4): a forked child's inherited handles are
//! inert. Using them fails with "opened by process PID before fork()",
//! dropping them (then a normal exit) leaves the parent's producer,
//! subscriber, loan, held tensor and readiness exactly as they were, and
//! the child can open a client of its own. `tb-peer forker` does the fork
//! (a helper process: forking this multi-threaded test harness is not
//! safe).

mod common;
use common::*;
use tensorbus::ConsumerOptions;
use tensorbus::TensorView;

const CHANNELS: &[(&str, &str)] = &[
    ("fork/a", "broadcast"),
    ("fork/own", "broadcast"),
    ("fork/wq", "workqueue"),
    ("fork/out", "broadcast"),
];

/// The `child WHAT` line's outcome.
fn child_line<'a>(lines: &'a [String], what: &str) -> &'a str {
    let prefix = format!("child {what} ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:#?}"))
}

/// Issue 12.4: before the fix the child's exit closed the parent's producer
/// and subscriber at the broker and released its holds; the parent's
/// publish then reached nobody, and its stale consumer took tensors meant
/// for another client's new subscriber (which got every other one).
#[test]
fn a_forked_child_leaves_the_parents_handles_alone() {
    const N: u64 = 6;
    let bus = Bus::start("fork", &config(32, CHANNELS));
    // Another client's subscriber, open before the fork.
    let before = bus
        .client
        .consumer_with("fork/a", ConsumerOptions::default().depth(16))
        .expect("subscribe");
    let mut forker = bus.spawn(
        "forker",
        "forker",
        &[
            "--channel",
            "fork/a",
            "--own-channel",
            "fork/own",
            "--stage-input",
            "fork/wq",
            "--stage-output",
            "fork/out",
            "--count",
            &N.to_string(),
        ],
    );
    let id: u32 = forker.wait_line("ready ")[6..].parse().expect("client id");
    forker.wait_line("forked");
    let lines = forker.lines.clone();
    let pid = forker.pid();
    // The parent's handles are all still open and hold what they held.
    let stat = bus.stat();
    let me = stat
        .clients
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("the forker's client is gone: {stat:#?}"));
    assert_eq!(
        me.handles, 4,
        "producer, consumer, stage input and output: {stat:#?}"
    );
    assert_eq!(me.holds, 2, "its kept loan and received tensor: {stat:#?}");
    assert_eq!(bus.loaned(), 1, "the kept loan: {stat:#?}");
    let a = stat.channels.iter().find(|c| c.name == "fork/a").unwrap();
    assert_eq!(a.producers, 1, "{stat:#?}");
    assert_eq!(a.subscribers.len(), 2, "{stat:#?}");
    let wq = stat.channels.iter().find(|c| c.name == "fork/wq").unwrap();
    assert_eq!(wq.subscribers.len(), 1, "the stage's input: {stat:#?}");
    let own = stat.channels.iter().find(|c| c.name == "fork/own").unwrap();
    assert!(
        own.subscribers.is_empty(),
        "the child's own closed: {stat:#?}"
    );

    // A new subscriber of another client: before the fix it got the
    // subscriber slot the child had closed, which the parent's stale
    // consumer still read.
    let after = bus
        .client
        .consumer_with("fork/a", ConsumerOptions::default().depth(16))
        .expect("subscribe");
    forker.send("go");
    let out = forker.finish();
    for seq in 1..=N {
        assert!(
            out.contains(&format!("parent pub {seq} 3")),
            "tensor {seq} must reach all 3 subscribers: {out:#?}"
        );
    }
    assert!(
        out.iter().any(|l| l == "parent ready-fd-after 1"),
        "{out:#?}"
    );
    assert!(
        out.contains(&format!("parent received {N}")),
        "the parent's consumer receives all: {out:#?}"
    );
    assert!(out.iter().any(|l| l == "parent t0-intact 1"), "{out:#?}");
    // Tensor 0 reached `before` before the fork.
    for (name, c, first) in [("before", &before, 0), ("after", &after, 1)] {
        let seqs: Vec<u64> = std::iter::from_fn(|| c.try_recv().ok().map(|t| t.seq())).collect();
        assert_eq!(
            seqs,
            (first..=N).collect::<Vec<_>>(),
            "{name}: every tensor, in order"
        );
    }
    drop((before, after));
    bus.assert_all_free();

    // What the child saw of its inherited handles, and its own client.
    let inert = format!("opened by process {pid} before fork()");
    for what in ["stat", "loan", "recv", "stage", "readiness"] {
        let got = child_line(&lines, what);
        assert!(
            got.starts_with("err ") && got.contains(&inert),
            "child {what}: expected an error naming process {pid}, got {got:?}"
        );
    }
    assert_eq!(
        child_line(&lines, "own"),
        "7",
        "the child's own client works"
    );
    assert!(lines.iter().any(|l| l == "child done"), "{lines:#?}");
    assert!(lines.iter().any(|l| l == "child exited 0"), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l == "parent ready-fd 0"),
        "the child's wake/clear reached the parent's readiness fd: {lines:#?}"
    );
}

/// Kills a process (not a child of ours) by pid when dropped.
struct KillOnDrop(libc::pid_t);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is a
        // grandchild that printed it moments ago.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// Issue 12.4: the child inherits the parent's broker connection; before
/// the fix its copy kept the connection open, so the broker did not notice
/// the parent's death (and reclaimed none of its holds) while the child
/// lived.
#[test]
fn the_broker_reclaims_a_dead_parent_while_its_forked_child_lives() {
    let bus = Bus::start("fork-linger", &config(32, CHANNELS));
    let mut forker = bus.spawn(
        "forker",
        "forker",
        &[
            "--channel",
            "fork/a",
            "--own-channel",
            "fork/own",
            "--stage-input",
            "fork/wq",
            "--stage-output",
            "fork/out",
            "--linger",
        ],
    );
    let id: u32 = forker.wait_line("ready ")[6..].parse().expect("client id");
    let child: libc::pid_t = forker.wait_line("child pid ")[10..]
        .parse()
        .expect("child pid");
    let _child = KillOnDrop(child);
    forker.wait_line("child done");
    forker.wait_line("forked");
    assert!(
        bus.stat().clients.iter().any(|c| c.id == id),
        "the parent is alive and connected"
    );
    assert!(bus.loaned() >= 1, "the parent's loan");
    forker.kill9();
    let start = std::time::Instant::now();
    while bus.stat().clients.iter().any(|c| c.id == id) {
        assert!(
            start.elapsed() < RECLAIM,
            "the dead parent is still connected while its child lives: {:#?}",
            bus.stat()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: see KillOnDrop; signal 0 only checks that the child exists.
    assert_eq!(unsafe { libc::kill(child, 0) }, 0, "the child still lives");
    bus.assert_all_free();
}
