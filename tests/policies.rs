//! Backpressure policies across processes.

mod common;
use common::*;

/// Consumers that read nothing until the producer has finished: each
/// policy's outcome is then exact.
#[test]
fn each_policy_keeps_what_it_promises_for_a_stalled_consumer() {
    const N: u64 = 50;
    let bus = Bus::start("policies-gated", &config(32, &[("p/gated", "broadcast")]));
    let spec = [("drop_oldest", "4"), ("drop_newest", "4"), ("latest", "1")];
    let mut consumers: Vec<Peer> = spec
        .iter()
        .map(|(policy, depth)| {
            bus.subscriber(policy, "consumer", "p/gated", policy, depth, &["--gate"])
        })
        .collect();
    wait_all_ready(&mut consumers);
    // No consumer reads, and none blocks: the producer runs to the end.
    assert_done(&bus.producer("p/gated", N, &[]).finish(), N);
    let expect: [Vec<u64>; 3] = [(N - 4..N).collect(), (0..4).collect(), vec![N - 1]];
    for ((policy, _), (mut c, want)) in spec.iter().zip(consumers.into_iter().zip(expect)) {
        c.send("go");
        let lines = c.finish();
        assert_clean(policy, &lines);
        assert_eq!(seqs(&lines), want, "{policy}: received");
        let (delivered, dropped) = own_stat(&lines);
        assert_eq!(delivered, want.len() as u64, "{policy}: delivered");
        assert_eq!(dropped, N - want.len() as u64, "{policy}: dropped");
    }
    bus.assert_all_free();
}

/// Slow lossy consumers (sleeping per message) next to a fast lossless one:
/// the producer is never stalled by them and the fast one gets everything.
#[test]
fn slow_lossy_consumers_do_not_stall_producer_or_fast_block_consumer() {
    const N: u64 = 300;
    let bus = Bus::start("policies-slow", &config(48, &[("p/live", "broadcast")]));
    let n = N.to_string();
    let mut fast = bus.subscriber(
        "fast-block",
        "consumer",
        "p/live",
        "block",
        "8",
        &["--count", &n],
    );
    let slow_spec = [("drop_oldest", "4"), ("drop_newest", "4"), ("latest", "1")];
    let mut slow: Vec<Peer> = slow_spec
        .iter()
        .map(|(policy, depth)| {
            bus.subscriber(
                policy,
                "consumer",
                "p/live",
                policy,
                depth,
                &["--sleep-us", "3000"],
            )
        })
        .collect();
    wait_all_ready(std::iter::once(&mut fast).chain(&mut slow));
    assert_done(&bus.producer("p/live", N, &[]).finish(), N);
    let lines = finish_all_in_order(fast, N);
    assert_eq!(own_stat(&lines), (N, 0), "fast-block: (delivered, dropped)");
    let published = bus
        .stat()
        .channels
        .iter()
        .find(|c| c.name == "p/live")
        .map(|c| c.published)
        .expect("channel in stat");
    assert_eq!(published, N);
    for ((policy, depth), c) in slow_spec.iter().zip(slow) {
        let lines = c.finish();
        assert_clean(policy, &lines);
        let got = seqs(&lines);
        assert_increasing(policy, &got);
        let (delivered, dropped) = own_stat(&lines);
        assert_eq!(delivered, got.len() as u64, "{policy}: delivered");
        assert_eq!(
            dropped,
            published - got.len() as u64,
            "{policy}: dropped must be published - received"
        );
        match *policy {
            // The newest tensor always gets in (the oldest queued makes way).
            "drop_oldest" | "latest" => {
                assert_eq!(got.last(), Some(&(N - 1)), "{policy}: newest missing")
            }
            // The first `depth` tensors found an empty ring.
            _ => {
                let d: u64 = depth.parse().unwrap();
                assert_eq!(
                    got[..d as usize],
                    (0..d).collect::<Vec<_>>()[..],
                    "{policy}"
                );
            }
        }
    }
    bus.assert_all_free();
}

/// A slow `block` consumer with a small ring loses nothing.
#[test]
fn slow_block_consumer_receives_everything() {
    const N: u64 = 150;
    let bus = Bus::start(
        "policies-block",
        &config(16, &[("p/lossless", "broadcast")]),
    );
    let c = bus
        .subscriber(
            "block",
            "consumer",
            "p/lossless",
            "block",
            "2",
            &["--sleep-us", "1000"],
        )
        .ready();
    bus.producer("p/lossless", N, &[]).finish();
    let lines = finish_all_in_order(c, N);
    assert_eq!(own_stat(&lines), (N, 0), "block: (delivered, dropped)");
    bus.assert_all_free();
}
