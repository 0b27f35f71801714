//! Issue 13.1: owned handles. Loans, received and staged tensors own what
//! they need: they move between threads and outlive their handle; handles
//! are shared between threads; dropping a consumer or stage while its
//! tensors live ends deliveries at once and closes the broker handle with
//! the last tensor.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tensorbus::error::RecvError;
use tensorbus::{DType, TensorView};

mod common;

const CONFIG: &str = r#"
    [[pools]]
    name = "p"
    slot_size = 4096
    slots = 16
    [[channels]]
    name = "c"
    [[channels]]
    name = "w"
    mode = "workqueue"
    [[channels]]
    name = "out"
"#;

fn free_slots(client: &tensorbus::Client) -> u32 {
    client.stat().unwrap().pools[0].slots_free
}

#[test]
fn several_loans_of_one_producer_are_in_flight_and_publish_in_any_order() {
    let (_b, client, _) = common::start("owned", "loans", CONFIG);
    let producer = client.producer("c").unwrap();
    let consumer = client.consumer("c").unwrap();
    let mut loans: Vec<_> = (0..4u8)
        .map(|i| {
            let mut t = producer.loan(&[8], DType::U8).unwrap();
            t.fill(i);
            t
        })
        .collect();
    let ids: HashSet<_> = loans.iter().map(|t| t.slot_id()).collect();
    assert_eq!(ids.len(), 4, "four distinct slots");
    // Publish the last loan first: sequence numbers follow publish order.
    let last = loans.pop().unwrap();
    assert_eq!(last.publish().unwrap().seq, 0);
    for (n, t) in loans.into_iter().enumerate() {
        assert_eq!(t.publish().unwrap().seq, n as u64 + 1);
    }
    let got: Vec<(u64, u8)> = (0..4)
        .map(|_| {
            let t = consumer.try_recv().unwrap();
            (t.seq(), t[0])
        })
        .collect();
    assert_eq!(got, vec![(0, 3), (1, 0), (2, 1), (3, 2)]);
    assert_eq!(free_slots(&client), 16);
}

#[test]
fn loans_move_to_other_threads_and_outlive_their_producer() {
    let (_b, client, _) = common::start("owned", "threads", CONFIG);
    let consumer = client.consumer("c").unwrap();
    let producer = client.producer("c").unwrap();
    let loan = producer.loan(&[2, 2], DType::F32).unwrap();
    drop(producer); // the loan keeps the producer's core (and handle) alive
    let published = std::thread::spawn(move || {
        let mut loan = loan;
        loan.as_mut_slice_of::<f32>().unwrap().fill(2.5);
        loan.publish().unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(published.delivered, 1);
    let t = consumer.recv_timeout(Duration::from_secs(5)).unwrap();
    // The received tensor moves to another thread too.
    let sum = std::thread::spawn(move || t.as_slice_of::<f32>().unwrap().iter().sum::<f32>())
        .join()
        .unwrap();
    assert_eq!(sum, 10.0);
    std::thread::sleep(Duration::from_millis(50));
    let stat = client.stat().unwrap();
    let c = stat.channels.iter().find(|c| c.name == "c").unwrap();
    assert_eq!(c.producers, 0, "the producer closed with its last loan");
    assert_eq!(free_slots(&client), 16);
}

/// Threads receiving through one `&Consumer` of a work queue together get
/// every tensor exactly once (the rings stay single-consumer: taking is
/// one thread at a time).
#[test]
fn threads_share_one_consumer_and_each_tensor_goes_to_one_of_them() {
    let (_b, client, _) = common::start("owned", "shared", CONFIG);
    let consumer = Arc::new(client.consumer("w").unwrap());
    let producer = Arc::new(client.producer("w").unwrap());
    const N: u64 = 20_000;
    let receivers: Vec<_> = (0..3)
        .map(|_| {
            let consumer = consumer.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                loop {
                    match consumer.recv_timeout(Duration::from_millis(500)) {
                        Ok(t) => seen.push(u64::from_le_bytes(t[..8].try_into().unwrap())),
                        Err(RecvError::Timeout(_)) => return seen,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let senders: Vec<_> = (0..2u64)
        .map(|k| {
            let producer = producer.clone();
            std::thread::spawn(move || {
                for i in (k..N).step_by(2) {
                    let mut t = producer
                        .loan_timeout(&[8], DType::U8, Duration::from_secs(10))
                        .unwrap();
                    t.copy_from_slice(&i.to_le_bytes());
                    t.publish().unwrap();
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let mut all: Vec<u64> = receivers
        .into_iter()
        .flat_map(|r| r.join().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..N).collect::<Vec<_>>(), "every tensor once");
    assert_eq!(free_slots(&client), 16);
}

#[test]
fn dropping_a_consumer_with_live_tensors_detaches_it_at_once() {
    let (_b, client, _) = common::start("owned", "detach", CONFIG);
    let producer = client.producer("c").unwrap();
    let consumer = client.consumer("c").unwrap();
    producer.loan(&[4], DType::U8).unwrap().publish().unwrap();
    let kept = consumer.try_recv().unwrap();
    drop(consumer);
    // No more deliveries: the subscriber left its channel at once.
    let p = producer.loan(&[4], DType::U8).unwrap().publish().unwrap();
    assert_eq!(p.delivered, 0, "a dropped consumer receives nothing more");
    let stat = client.stat().unwrap();
    assert!(stat.channels.iter().all(|c| c.subscribers.is_empty()));
    // The kept tensor is still the same bytes, held until dropped.
    assert_eq!(kept.len(), 4);
    assert_eq!(free_slots(&client), 15);
    drop(kept);
    assert_eq!(free_slots(&client), 16);
    std::thread::sleep(Duration::from_millis(50));
    let stat = client.stat().unwrap();
    let me = stat.clients.iter().find(|c| c.id == client.id()).unwrap();
    assert_eq!(me.handles, 1, "only the producer is left open");
}

#[test]
fn detach_from_another_thread_ends_a_blocked_recv() {
    let (_b, client, _) = common::start("owned", "wake", CONFIG);
    let consumer = Arc::new(client.consumer("c").unwrap());
    let waiter = {
        let consumer = consumer.clone();
        std::thread::spawn(move || consumer.recv().map(|_| ()))
    };
    std::thread::sleep(Duration::from_millis(100));
    consumer.detach().unwrap();
    assert!(matches!(waiter.join().unwrap(), Err(RecvError::Detached)));
}

#[test]
fn a_stage_dropped_with_a_staged_tensor_stops_receiving_and_still_forwards() {
    let (_b, client, _) = common::start("owned", "stage", CONFIG);
    let src = client.producer("w").unwrap();
    let out = client.consumer("out").unwrap();
    let stage = client.stage("w", "out").unwrap();
    src.loan(&[4], DType::U8).unwrap().publish().unwrap();
    let mut staged = stage.try_recv_mut().unwrap();
    drop(stage);
    // The stage's input left the work queue: nothing is delivered to it.
    assert_eq!(
        src.loan(&[4], DType::U8)
            .unwrap()
            .publish()
            .unwrap()
            .delivered,
        0
    );
    staged.fill(7);
    assert_eq!(staged.forward().unwrap().delivered, 1);
    assert_eq!(&out.try_recv().unwrap()[..], &[7, 7, 7, 7]);
    assert_eq!(free_slots(&client), 16);
}
