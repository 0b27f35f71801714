//! Bridges as processes: kill -9 either one mid-stream, start it again, and
//! the stream resumes (the surviving bridge reconnects to the new one);
//! each bridge shows in its broker's `stat` as a client, once.

mod common;

use common::{free_port, head, Host, WAIT};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus::{Consumer, ConsumerOptions, DType, Policy, TensorView};
use tensorbus_bridge::bridge::wait_until;

fn spawn_bridge(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tensorbus-bridge"))
        .arg("--config")
        .arg(config)
        .args(["--report-secs", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tensorbus-bridge starts")
}

fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
}

/// Receives `n` more tensors; each one's counter (its payload) must be
/// larger than the last one seen (gaps are allowed across a restart,
/// duplicates and reordering are not).
fn receive(consumer: &Consumer, n: usize, last: &mut Option<u64>) {
    for i in 0..n {
        let t = consumer
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("tensor {i} of {n} never arrived: {e}"));
        let counter = t.as_slice_of::<u64>().expect("u64 payload")[0];
        assert_eq!(t.user_header(), counter.to_le_bytes());
        if let Some(prev) = *last {
            assert!(counter > prev, "counter {counter} after {prev}");
        }
        *last = Some(counter);
    }
}

fn clients_named(host: &Host, name: &str) -> usize {
    host.client
        .stat()
        .map(|s| s.clients.iter().filter(|c| c.name == name).count())
        .unwrap_or(0)
}

#[test]
fn kill_9_and_restart_either_bridge_resumes_the_stream() {
    let a = Host::start("restart", "a", &["s/src"]);
    let b = Host::start("restart", "b", &["s/dst"]);
    let port = free_port();
    let ca = a.file("bridge-a.toml");
    std::fs::write(
        &ca,
        format!(
            "{}[[export]]\nchannel = \"s/src\"\npolicy = \"block\"\n",
            head("bridge-a", &a, Some(port), None)
        ),
    )
    .unwrap();
    let cb = b.file("bridge-b.toml");
    std::fs::write(
        &cb,
        format!(
            "{}[[import]]\nkey = \"tensorbus/s/src\"\nchannel = \"s/dst\"\n",
            head("bridge-b", &b, None, Some(port))
        ),
    )
    .unwrap();
    let consumer = b
        .client
        .consumer_with(
            "s/dst",
            ConsumerOptions::default()
                .policy(Policy::Block)
                .depth(64)
                .end_of_stream(false),
        )
        .unwrap();

    // A producer of counters, one every millisecond, until the end.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = a.client.producer("s/src").unwrap();
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut counter = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut t) =
                    producer.loan_timeout(&[1], DType::U64, Duration::from_millis(100))
                {
                    t.as_mut_slice_of::<u64>().unwrap()[0] = counter;
                    t.set_user_header(&counter.to_le_bytes()).unwrap();
                    // While the exporting bridge waits, `block` holds the
                    // producer: give up on the wait now and then to see `stop`.
                    if t.wait_for_room(Duration::from_millis(100)) {
                        t.publish().unwrap();
                        counter += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let mut bridge_a = spawn_bridge(&ca);
    let mut bridge_b = spawn_bridge(&cb);
    let mut last = None;
    receive(&consumer, 50, &mut last);
    assert_eq!(clients_named(&a, "bridge-a"), 1);
    assert_eq!(clients_named(&b, "bridge-b"), 1);

    // The exporting (listening) bridge dies; the importing one keeps trying
    // its connect endpoint and finds the new one.
    kill9(&mut bridge_a);
    assert!(
        wait_until(WAIT, || clients_named(&a, "bridge-a") == 0),
        "broker a never reclaimed the dead bridge"
    );
    let before = Instant::now();
    bridge_a = spawn_bridge(&ca);
    receive(&consumer, 50, &mut last);
    eprintln!(
        "resumed {:?} after restarting the exporting bridge",
        before.elapsed()
    );
    assert_eq!(clients_named(&a, "bridge-a"), 1);

    // The importing (connecting) bridge dies and comes back.
    kill9(&mut bridge_b);
    assert!(
        wait_until(WAIT, || clients_named(&b, "bridge-b") == 0),
        "broker b never reclaimed the dead bridge"
    );
    let before = Instant::now();
    bridge_b = spawn_bridge(&cb);
    receive(&consumer, 50, &mut last);
    eprintln!(
        "resumed {:?} after restarting the importing bridge",
        before.elapsed()
    );
    assert_eq!(clients_named(&b, "bridge-b"), 1);

    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    kill9(&mut bridge_a);
    kill9(&mut bridge_b);
}
