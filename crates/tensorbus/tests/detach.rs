//! `Consumer::detach`: deliveries end at once, received tensors stay valid
//! and held until dropped (what Python's `close()` does while tensors live).

use tensorbus::error::{RecvError, TryRecvError};
use tensorbus::{ConsumerOptions, DType, Policy};

mod common;

const CONFIG: &str = r#"
    [[pools]]
    name = "p"
    slot_size = 4096
    slots = 8
    [[channels]]
    name = "bc"
    [[channels]]
    name = "wq"
    mode = "workqueue"
"#;

fn free(client: &tensorbus::Client) -> (u32, u32) {
    let s = client.stat().unwrap();
    (s.pools[0].slots_free, s.pools[0].slots_total)
}

fn subscribers(client: &tensorbus::Client, channel: &str) -> usize {
    let s = client.stat().unwrap();
    s.channels
        .iter()
        .find(|c| c.name == channel)
        .unwrap()
        .subscribers
        .len()
}

#[test]
fn detach_ends_deliveries_and_keeps_received_tensors() {
    let (_broker, client, _) = common::start("detach", "bc", CONFIG);
    let opts = ConsumerOptions::default().policy(Policy::Block).depth(1);
    let cons = client.consumer_with("bc", opts).unwrap();
    let prod = client.producer("bc").unwrap();
    let mut t = prod.loan(&[8], DType::U8).unwrap();
    t.fill(42);
    t.publish().unwrap();
    let held = cons.try_recv().unwrap();
    cons.detach().unwrap();
    cons.detach().unwrap(); // twice: nothing more
    assert_eq!(subscribers(&client, "bc"), 0);
    // A block subscriber of depth 1 would stall the second publish; gone now.
    for _ in 0..20 {
        let mut t = prod.loan(&[8], DType::U8).unwrap();
        t.fill(7);
        assert_eq!(t.publish().unwrap().delivered, 0);
    }
    assert!(
        held.iter().all(|&b| b == 42),
        "the held tensor was overwritten"
    );
    assert_eq!(
        free(&client).0,
        free(&client).1 - 1,
        "the held slot stays held"
    );
    assert!(matches!(cons.try_recv(), Err(TryRecvError::Empty)));
    assert!(matches!(
        cons.recv_timeout(std::time::Duration::from_secs(5)),
        Err(RecvError::Detached)
    ));
    drop(held);
    let (f, total) = free(&client);
    assert_eq!(f, total);
    drop(cons); // closes the handle
    assert_eq!(client.stat().unwrap().clients[0].handles, 1);
}

#[test]
fn detached_worker_hands_its_queue_to_the_others() {
    let (_broker, client, _) = common::start("detach", "wq", CONFIG);
    let a = client.consumer("wq").unwrap();
    let b = client.consumer("wq").unwrap();
    let prod = client.producer("wq").unwrap();
    for i in 0..6u8 {
        let mut t = prod.loan(&[1], DType::U8).unwrap();
        t.fill(i);
        t.publish().unwrap();
    }
    let held = a.try_recv().unwrap();
    a.detach().unwrap();
    let mut got = vec![held[0]];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while got.len() < 6 && std::time::Instant::now() < deadline {
        if let Ok(t) = b.recv_timeout(std::time::Duration::from_millis(100)) {
            got.push(t[0]);
        }
    }
    got.sort_unstable();
    assert_eq!(
        got,
        [0, 1, 2, 3, 4, 5],
        "every tensor reaches a worker exactly once"
    );
    drop(held);
    let (f, total) = free(&client);
    assert_eq!(f, total);
}
