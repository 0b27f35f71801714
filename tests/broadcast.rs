//! Broadcast across processes: every consumer process sees every tensor,
//! in order, with intact bytes.

mod common;
use common::*;

#[test]
fn three_consumer_processes_see_every_tensor_in_order() {
    const N: u64 = 500;
    let bus = Bus::start("bcast3", &config(32, &[("b/frames", "broadcast")]));
    let n = N.to_string();
    let mut consumers: Vec<Peer> = (0..3)
        .map(|i| {
            bus.spawn(
                &format!("consumer{i}"),
                "consumer",
                &[
                    "--channel",
                    "b/frames",
                    "--policy",
                    "block",
                    "--depth",
                    "8",
                    "--count",
                    &n,
                ],
            )
        })
        .collect();
    for c in &mut consumers {
        c.wait_line("ready");
    }
    let producer = bus.spawn(
        "producer",
        "producer",
        &["--channel", "b/frames", "--count", &n, "--size", "12345"],
    );
    let out = producer.finish();
    assert!(out.contains(&format!("done {N}")), "{out:?}");
    for (i, c) in consumers.into_iter().enumerate() {
        let who = format!("consumer{i}");
        let lines = c.finish();
        assert_clean(&who, &lines);
        assert_all_in_order(&who, &seqs(&lines), N);
        assert!(
            msgs(&lines).iter().all(|m| m.meta_seq == m.seq),
            "{who}: metadata seq differs from the producer's"
        );
        assert_eq!(own_stat(&lines), (N, 0), "{who}: (delivered, dropped)");
    }
    bus.assert_all_free();
}
