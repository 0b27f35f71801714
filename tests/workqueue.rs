//! Work queues across processes: each tensor goes to exactly one worker.

mod common;
use common::*;
use std::collections::BTreeMap;

#[test]
fn three_worker_processes_share_every_tensor_exactly_once() {
    const N: u64 = 600;
    let bus = Bus::start("wq3", &config(32, &[("w/jobs", "workqueue")]));
    let mut workers: Vec<Peer> = (0..3)
        .map(|i| bus.subscriber(&format!("worker{i}"), "worker", "w/jobs", "block", "4", &[]))
        .collect();
    wait_all_ready(&mut workers);
    bus.producer("w/jobs", N, &[]).finish();
    // Workers still run: once they have drained everything, all is free.
    bus.assert_all_free();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for w in workers {
        let who = w.name.clone();
        let lines = w.finish();
        assert_clean(&who, &lines);
        let mine = seqs(&lines);
        // The first three publishes go to three distinct idle workers
        // (least loaded, ties round-robin), so every worker gets some.
        assert!(!mine.is_empty(), "{who} got nothing");
        // One producer, one ring per worker: each worker's share is in order.
        assert_increasing(&who, &mine);
        for s in mine {
            *seen.entry(s).or_default() += 1;
        }
    }
    let dups: Vec<u64> = seen
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(&s, _)| s)
        .collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    let missing: Vec<u64> = (0..N).filter(|s| !seen.contains_key(s)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(seen.len() as u64, N);
    bus.assert_all_free();
}
