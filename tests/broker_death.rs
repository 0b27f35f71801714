//! kill -9 of the broker mid-stream: producers and consumers keep
//! exchanging tensors over the pools they have mapped; control calls fail
//! with BrokerUnavailable and a clear message; a restarted broker is found
//! again (by new clients: see docs/reliability.md for what is and is not
//! recovered); nothing is left in /dev/shm and no stale socket blocks the
//! restart.

mod common;

use common::{assert_all_in_order, assert_done, finish_all_in_order, seqs, Bus};
use std::process::{Child, Command, Stdio};
use tensorbus::error::RequestError;

const CONFIG: &str = "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 16\n\
[[channels]]\nname = \"d/c\"\npolicy = \"block\"\n";

fn start_broker(dir: &std::path::Path) -> Child {
    let config = dir.join("broker.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tb-peer"))
        .arg("broker")
        .arg("--socket")
        .arg(dir.join("broker.sock"))
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the broker");
    assert!(child.try_wait().unwrap().is_none());
    child
}

fn kill9(child: &mut Child) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = child.wait();
}

fn tensorbus_in_dev_shm() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("tensorbus"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn data_keeps_flowing_when_the_broker_dies_and_a_restart_is_found() {
    let dir = std::env::temp_dir().join(format!("tb-it-{}-broker-death", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut broker = start_broker(&dir);
    let bus = Bus::attach(&dir.join("broker.sock"));

    let mut consumer = bus
        .spawn(
            "consumer",
            "consumer",
            &["--channel", "d/c", "--depth", "8"],
        )
        .ready();
    let n = 1500u64;
    let producer = bus.producer("d/c", n, &["--pace-us", "300", "--size", "1024"]);
    consumer.wait_lines("msg", 100);
    kill9(&mut broker);

    // Control calls fail with a clear error...
    match bus.client.stat() {
        Err(e @ RequestError::BrokerUnavailable { .. }) => {
            assert!(e.to_string().contains("keep flowing"), "{e}")
        }
        other => panic!("expected BrokerUnavailable, got {other:?}"),
    }
    // ...while the data path goes on without the broker.
    assert_done(&producer.finish(), n);
    let lines = finish_all_in_order(consumer, n);
    assert!(
        lines.iter().any(|l| l.starts_with("stat-error")),
        "the consumer saw the broker gone"
    );

    // A restarted broker binds the same path (the dead one's socket file is
    // stale, not an obstacle) and new clients find it.
    let mut broker = start_broker(&dir);
    let again = Bus::attach(&dir.join("broker.sock"));
    let stat = again.stat();
    assert_eq!(stat.pools[0].slots_free, stat.pools[0].slots_total);
    let c2 = again
        .spawn("consumer2", "consumer", &["--channel", "d/c"])
        .ready();
    let p2 = again.spawn(
        "producer2",
        "producer",
        &["--channel", "d/c", "--count", "50"],
    );
    p2.finish();
    let lines = c2.finish();
    assert_all_in_order("consumer2", &seqs(&lines), 50);
    kill9(&mut broker);
    assert_eq!(
        tensorbus_in_dev_shm(),
        Vec::<String>::new(),
        "nothing in /dev/shm"
    );
}
