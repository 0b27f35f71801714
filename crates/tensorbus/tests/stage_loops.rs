//! Stages in loop topologies (issue 11.1): a stage forwarding into its own
//! work-queue input (a retry loop), into a channel it also consumes through
//! another handle, and producers and consumers of one channel in one client.
//! Nothing may be lost or reported as corrupted, and every slot is free at
//! the end.

use tensorbus::error::TryRecvError;
use tensorbus::{Client, ConsumerOptions, DType, Policy};

mod common;

const CONFIG: &str = r#"
    [[pools]]
    name = "p"
    slot_size = 4096
    slots = 8
    [[channels]]
    name = "wq"
    mode = "workqueue"
    [[channels]]
    name = "wq2"
    mode = "workqueue"
    [[channels]]
    name = "bc"
"#;

fn all_free(client: &Client) {
    let stat = client.stat().unwrap();
    for p in &stat.pools {
        assert_eq!(p.slots_free, p.slots_total, "pool {} leaks slots", p.name);
    }
}

fn publish(client: &Client, channel: &str, value: u8) {
    let p = client.producer(channel).unwrap();
    let mut t = p.loan(&[4], DType::U8).unwrap();
    t.fill(value);
    t.publish().unwrap();
}

/// The reported case: `stage("wq", "wq")`, publish one, recv_mut, forward
/// (delivered to the stage itself), then recv_mut again. Before the fix the
/// second recv_mut said "slot is not held by this subscriber" and the slot
/// was already free while queued.
#[test]
fn stage_forwarding_into_its_own_input_keeps_the_tensor() {
    let (_broker, client, _) = common::start("loops", "self", CONFIG);
    let stage = client.stage("wq", "wq").unwrap();
    publish(&client, "wq", 7);
    for round in 0..100u32 {
        let mut t = stage
            .try_recv_mut()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(t.iter().all(|&b| b == 7u8.wrapping_add(round as u8)));
        for b in t.iter_mut() {
            *b = b.wrapping_add(1);
        }
        let out = t.forward().unwrap();
        assert_eq!(out.delivered, 1, "round {round}");
        // Still held while queued: no other loan may take it.
        let stat = client.stat().unwrap();
        assert_eq!(stat.pools[0].slots_free, stat.pools[0].slots_total - 1);
    }
    let t = stage.try_recv_mut().unwrap();
    assert!(t.iter().all(|&b| b == 107));
    drop(t);
    assert!(matches!(stage.try_recv_mut(), Err(TryRecvError::Empty)));
    all_free(&client);
}

/// `forward_to` a separate producer of the stage's own input channel: the
/// same loop through another handle.
#[test]
fn forward_to_a_producer_of_the_own_input() {
    let (_broker, client, _) = common::start("loops", "fwdto", CONFIG);
    let stage = client.stage("wq", "bc").unwrap();
    let back = client.producer("wq").unwrap();
    let watcher = client.consumer("bc").unwrap();
    publish(&client, "wq", 1);
    for _ in 0..50 {
        let t = stage.try_recv_mut().unwrap();
        assert_eq!(t.forward_to(&back).unwrap().delivered, 1);
    }
    stage.try_recv_mut().unwrap().forward().unwrap();
    assert_eq!(watcher.try_recv().unwrap()[0], 1);
    all_free(&client);
}

/// Two stages feeding each other (wq -> wq2 -> wq), plus a second worker
/// and a broadcast watcher of the loop's exit: every tensor arrives once.
#[test]
fn two_stages_in_a_cycle_and_shared_workers() {
    let (_broker, client, sock) = common::start("loops", "cycle", CONFIG);
    let a = client.stage("wq", "wq2").unwrap();
    let b = client.stage("wq2", "wq").unwrap();
    // Another client's worker on the loop's input, and a producer of wq in
    // the same client as the stages.
    let other = Client::connect_to(Some(&sock), "other").unwrap();
    let c = other.stage("wq", "bc").unwrap();
    let exit = client
        .consumer_with(
            "bc",
            ConsumerOptions::default().policy(Policy::Block).depth(16),
        )
        .unwrap();
    let src = client.producer("wq").unwrap();
    for i in 0..4u8 {
        let mut t = src.loan(&[4], DType::U8).unwrap();
        t.fill(i);
        t.publish().unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..1000 {
        if let Ok(t) = a.try_recv_mut() {
            t.forward().unwrap();
        }
        if let Ok(t) = b.try_recv_mut() {
            t.forward().unwrap();
        }
        if let Ok(t) = c.try_recv_mut() {
            t.forward().unwrap();
        }
        while let Ok(t) = exit.try_recv() {
            seen.push(t[0]);
        }
        if seen.len() == 4 {
            break;
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2, 3]);
    all_free(&client);
}

/// A producer and a consumer of one channel in one client, broadcast and
/// work queue: the client receives its own tensors.
#[test]
fn producer_and_consumer_of_one_channel_in_one_client() {
    let (_broker, client, _) = common::start("loops", "same", CONFIG);
    for ch in ["bc", "wq"] {
        let cons = client.consumer(ch).unwrap();
        let prod = client.producer(ch).unwrap();
        for i in 0..20u8 {
            let mut t = prod.loan(&[1], DType::U8).unwrap();
            t.fill(i);
            t.publish().unwrap();
            let r = cons.try_recv().unwrap();
            assert_eq!(r[0], i);
        }
        all_free(&client);
    }
}
