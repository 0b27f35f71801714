//! Route policies drop the oldest and count exactly what they drop.

mod common;

use common::{free_port, head, Host, WAIT};
use std::time::Duration;
use tensorbus::error::TryRecvError;
use tensorbus::{ConsumerOptions, DType, Policy, TensorView};
use tensorbus_bridge::bridge::wait_until;
use tensorbus_bridge::{Bridge, Config};

fn publish_counters(host: &Host, channel: &str, n: u64) {
    let producer = host.client.producer(channel).unwrap();
    for i in 0..n {
        let mut t = producer
            .loan_timeout(&[1], DType::U64, WAIT)
            .expect("a slot");
        t.as_mut_slice_of::<u64>().unwrap()[0] = i;
        t.publish().unwrap();
    }
}

fn counter(t: &impl TensorView) -> u64 {
    t.as_slice_of::<u64>().unwrap()[0]
}

/// An export route with `latest` while nobody listens on the Zenoh side:
/// the bridge takes nothing, its local subscription keeps the newest
/// tensor and the broker counts the rest as dropped; the far side, once
/// there, receives exactly that newest one.
#[test]
fn export_latest_keeps_the_newest_and_counts_the_rest() {
    let a = Host::start("export-latest", "a", &["x/src"]);
    let b = Host::start("export-latest", "b", &["x/dst"]);
    let port = free_port();
    let ca = Config::from_toml(&format!(
        "{}[[export]]\nchannel = \"x/src\"\npolicy = \"latest\"\n",
        head("bridge-a", &a, Some(port), None)
    ))
    .unwrap();
    let bridge_a = Bridge::start(&ca).unwrap();
    publish_counters(&a, "x/src", 20);
    assert!(
        wait_until(WAIT, || bridge_a.stats()[0].dropped == 19),
        "{}",
        bridge_a.stats()[0]
    );
    assert_eq!(bridge_a.stats()[0].samples, 0);

    let consumer = b
        .client
        .consumer_with("x/dst", ConsumerOptions::default().end_of_stream(false))
        .unwrap();
    let cb = Config::from_toml(&format!(
        "{}[[import]]\nkey = \"tensorbus/x/src\"\nchannel = \"x/dst\"\n",
        head("bridge-b", &b, None, Some(port))
    ))
    .unwrap();
    let bridge_b = Bridge::start(&cb).unwrap();
    let t = consumer.recv_timeout(WAIT).expect("the newest arrives");
    assert_eq!(counter(&t), 19);
    assert!(wait_until(WAIT, || bridge_a.stats()[0].samples == 1));
    std::thread::sleep(Duration::from_millis(200));
    assert!(matches!(consumer.try_recv(), Err(TryRecvError::Empty)));
    let s = bridge_a.stats()[0].clone();
    assert_eq!((s.samples, s.dropped, s.errors), (1, 19, 0), "{s}");
    drop(bridge_b);
}

/// An import route with `drop_oldest` (depth 4) in front of a channel of
/// 48 slots whose consumer does not read yet: the bridge publishes what
/// the slots allow, keeps at most one sample waiting for a slot and 4
/// queued, and drops (and counts) the oldest of the rest, whether it ran
/// out of slots or simply fell behind. Once the consumer reads, what was
/// held follows: in order, the newest last, `samples + dropped` = sent.
#[test]
fn import_drop_oldest_counts_what_it_drops_and_delivers_the_newest() {
    const N: u64 = 100;
    const SLOTS: u64 = 48; // the small pool of common::Host
    let a = Host::start("import-drop", "a", &["y/src"]);
    let b = Host::start("import-drop", "b", &["small:y/dst"]);
    let port = free_port();
    let ca = Config::from_toml(&format!(
        "{}[[export]]\nchannel = \"y/src\"\n",
        head("bridge-a", &a, Some(port), None)
    ))
    .unwrap();
    let cb = Config::from_toml(&format!(
        "{}[[import]]\nkey = \"tensorbus/y/src\"\nchannel = \"y/dst\"\npolicy = \"drop_oldest\"\ndepth = 4\n",
        head("bridge-b", &b, None, Some(port))
    ))
    .unwrap();
    let consumer = b
        .client
        .consumer_with(
            "y/dst",
            ConsumerOptions::default().policy(Policy::Block).depth(64),
        )
        .unwrap();
    let bridge_a = Bridge::start(&ca).unwrap();
    let bridge_b = Bridge::start(&cb).unwrap();
    publish_counters(&a, "y/src", N);
    // Everything but what is waiting for a slot (1) or queued (4) is
    // accounted for as published or dropped.
    assert!(
        wait_until(WAIT, || {
            let s = bridge_b.stats()[0].clone();
            s.samples + s.dropped + 5 >= N
        }),
        "{} / {}",
        bridge_a.stats()[0],
        bridge_b.stats()[0]
    );
    let s = bridge_b.stats()[0].clone();
    assert!(s.samples <= SLOTS, "{s}");
    assert!(s.dropped >= N - SLOTS - 5, "{s}");
    let mut got = Vec::new();
    assert!(
        wait_until(WAIT, || {
            while let Ok(t) = consumer.try_recv() {
                got.push(counter(&t));
            }
            let s = bridge_b.stats()[0].clone();
            s.samples + s.dropped == N && got.len() as u64 == s.samples
        }),
        "{} received {}",
        bridge_b.stats()[0],
        got.len()
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    assert_eq!(got[got.len() - 1], N - 1, "the newest is delivered");
    std::thread::sleep(Duration::from_millis(200));
    assert!(matches!(consumer.try_recv(), Err(TryRecvError::Empty)));
    let s = bridge_b.stats()[0].clone();
    assert_eq!((s.malformed, s.errors), (0, 0), "{s}");
    assert_eq!(bridge_a.stats()[0].samples, N);
}
