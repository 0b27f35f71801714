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
            let name = format!("consumer{i}");
            bus.subscriber(
                &name,
                "consumer",
                "b/frames",
                "block",
                "8",
                &["--count", &n],
            )
        })
        .collect();
    wait_all_ready(&mut consumers);
    let out = bus.producer("b/frames", N, &["--size", "12345"]).finish();
    assert_done(&out, N);
    for c in consumers {
        let who = c.name.clone();
        let lines = finish_all_in_order(c, N);
        assert!(
            msgs(&lines).iter().all(|m| m.meta_seq == m.seq),
            "{who}: metadata seq differs from the producer's"
        );
        assert_eq!(own_stat(&lines), (N, 0), "{who}: (delivered, dropped)");
    }
    bus.assert_all_free();
}
