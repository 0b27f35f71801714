//! `Consumer::readiness`: the eventfd that turns readable when a tensor is
//! queued while armed, and `publish_stamped` / `forward_stamped`. An
//! embedded broker on a thread of this process.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};
use tensorbus::TensorView;
use tensorbus::{Client, DType};
use tensorbus_broker::EmbeddedBroker;

mod common;

const CONFIG: &str = r#"
    [[pools]]
    name = "p"
    slot_size = 4096
    slots = 8
    [[channels]]
    name = "b"
    [[channels]]
    name = "w"
    mode = "workqueue"
    [[channels]]
    name = "o"
"#;

fn start(name: &str) -> (EmbeddedBroker, Client) {
    let (broker, client, _) = common::start("ready", name, CONFIG);
    (broker, client)
}

/// Whether `fd` turns readable within `timeout`.
fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[test]
fn armed_fd_turns_readable_when_a_tensor_arrives() {
    let (_b, client) = start("arrive");
    let consumer = client.consumer("b").unwrap();
    let ready = consumer.readiness().unwrap();
    assert_eq!(
        consumer.readiness_fd().unwrap().as_raw_fd(),
        ready.fd().as_raw_fd()
    );
    assert!(consumer.try_recv().is_err());
    ready.arm();
    assert!(ready.is_armed());
    assert!(!readable(ready.fd(), Duration::from_millis(50)));

    let c2 = client.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let p = c2.producer("b").unwrap();
        let mut l = p.loan(&[4], DType::U8).unwrap();
        l.copy_from_slice(&[1, 2, 3, 4]);
        l.publish().unwrap();
        p
    });
    let start = Instant::now();
    assert!(readable(ready.fd(), Duration::from_secs(10)));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!ready.is_armed(), "one-shot: fired means disarmed");
    ready.clear();
    assert!(!readable(ready.fd(), Duration::ZERO));
    let got = consumer.try_recv().unwrap();
    assert_eq!(&*got, &[1, 2, 3, 4]);
    drop(got);
    drop(t.join().unwrap());
}

#[test]
fn arming_with_a_tensor_queued_fires_at_once() {
    let (_b, client) = start("queued");
    let consumer = client.consumer("b").unwrap();
    let p = client.producer("b").unwrap();
    p.loan(&[1], DType::U8).unwrap().publish().unwrap();
    let ready = consumer.readiness().unwrap();
    ready.arm();
    assert!(readable(ready.fd(), Duration::from_secs(5)));
    ready.clear();
    assert!(consumer.try_recv().is_ok());
}

#[test]
fn many_round_trips_lose_no_wakeup() {
    let (_b, client) = start("many");
    let consumer = client.consumer("b").unwrap();
    let ready = consumer.readiness().unwrap();
    let c2 = client.clone();
    let n = 500u64;
    let t = std::thread::spawn(move || {
        let p = c2.producer("b").unwrap();
        for i in 0..n {
            loop {
                match p.loan(&[8], DType::U8) {
                    Ok(mut l) => {
                        l.copy_from_slice(&i.to_le_bytes());
                        l.publish().unwrap();
                        break;
                    }
                    Err(_) => std::thread::yield_now(),
                }
            }
            if i % 7 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
    let mut next = 0u64;
    while next < n {
        if let Ok(got) = consumer.try_recv() {
            assert_eq!(u64::from_le_bytes(got[..8].try_into().unwrap()), next);
            next += 1;
            continue;
        }
        ready.arm();
        assert!(
            readable(ready.fd(), Duration::from_secs(10)),
            "lost wake-up at {next}"
        );
        ready.clear();
    }
    t.join().unwrap();
}

#[test]
fn disarmed_fd_stays_quiet_and_wake_makes_it_readable() {
    let (_b, client) = start("disarm");
    let consumer = client.consumer("b").unwrap();
    let ready = consumer.readiness().unwrap();
    ready.arm();
    ready.disarm();
    assert!(!ready.is_armed());
    let p = client.producer("b").unwrap();
    p.loan(&[1], DType::U8).unwrap().publish().unwrap();
    assert!(!readable(ready.fd(), Duration::from_millis(100)));
    ready.wake();
    assert!(readable(ready.fd(), Duration::ZERO));
    ready.clear();
    assert!(!readable(ready.fd(), Duration::ZERO));
}

#[test]
fn dropping_an_armed_consumer_is_prompt() {
    let (_b, client) = start("drop");
    let consumer = client.consumer("b").unwrap();
    consumer.readiness().unwrap().arm();
    std::thread::sleep(Duration::from_millis(20)); // let the thread park
    let start = Instant::now();
    drop(consumer);
    assert!(start.elapsed() < Duration::from_millis(90));
    // the subscription is gone and the channel still works
    let c = client.consumer("b").unwrap();
    let p = client.producer("b").unwrap();
    p.loan(&[1], DType::U8).unwrap().publish().unwrap();
    assert!(c.try_recv().is_ok());
}

#[test]
fn publish_and_forward_stamped_report_what_receivers_see() {
    let (_b, client) = start("stamped");
    let consumer = client.consumer("b").unwrap();
    let p = client.producer("b").unwrap();
    p.loan(&[1], DType::U8).unwrap().publish().unwrap();
    let a = p.loan(&[1], DType::U8).unwrap().publish().unwrap();
    assert_eq!(a.seq, 1);
    assert_eq!(a.delivered, 1);
    let r0 = consumer.try_recv().unwrap();
    assert_eq!(r0.seq(), 0);
    drop(r0);
    let r1 = consumer.try_recv().unwrap();
    assert_eq!((r1.seq(), r1.timestamp_ns()), (a.seq, a.timestamp_ns));
    drop(r1);

    let stage = client.stage("w", "o").unwrap();
    let out = client.consumer("o").unwrap();
    let w = client.producer("w").unwrap();
    w.loan(&[1], DType::U8).unwrap().publish().unwrap();
    let f = stage.try_recv_mut().unwrap().forward().unwrap();
    let got = out.try_recv().unwrap();
    assert_eq!((got.seq(), got.timestamp_ns()), (f.seq, f.timestamp_ns));
}
