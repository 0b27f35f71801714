//! Issue 16.2: a broker that starts on the socket of a broker that died
//! adopts the running bus. The brokers are real `tensorbus broker`
//! processes killed with SIGKILL; the survivors are clients in this
//! process (and a `tensorbus sub` process that dies while no broker runs).

mod common;

use common::{spawn_broker, temp_dir, KillOnDrop, BIN};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tensorbus::{ChannelSpec, Client, ConsumerOptions, DType, Mode, Policy, ProducerOptions};

const CONFIG: &str = "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 32\n\
[[channels]]\nname = \"declared\"\n";

fn kill9(b: &mut KillOnDrop) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(b.0.id() as i32, libc::SIGKILL) };
    let _ = b.0.wait();
}

/// Waits until `f` holds, failing with `what` after 30 s.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect(socket: &Path, name: &str) -> Client {
    let mut last = None;
    for _ in 0..500 {
        match Client::connect_to(Some(socket), name) {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot connect: {last:?}");
}

fn publish(p: &mut tensorbus::Producer, v: u8) {
    let mut t = p.loan(&[4096], DType::U8).unwrap();
    t.fill(v);
    t.publish().unwrap();
}

#[test]
fn a_restarted_broker_adopts_the_running_bus() {
    let dir = temp_dir("adopt");
    let config = dir.join("broker.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let socket = dir.join("broker.sock");
    let mut a = spawn_broker(&config, &socket, Stdio::null());

    let pc = connect(&socket, "camera");
    let cc = connect(&socket, "viewer");
    let before = pc.stat().unwrap();
    let mut producer = pc
        .producer_with(
            "cam",
            ProducerOptions::default().create(ChannelSpec::new(Mode::Broadcast)),
        )
        .unwrap();
    let consumer = cc
        .consumer_with(
            "cam",
            ConsumerOptions::default().policy(Policy::Block).depth(16),
        )
        .unwrap();
    // A subscriber in another process that dies while no broker runs.
    let mut doomed = KillOnDrop(
        Command::new(BIN)
            .args([
                "sub",
                "--channel",
                "cam",
                "--policy",
                "drop_oldest",
                "--socket",
            ])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the sub process to subscribe", || {
        pc.stat()
            .unwrap()
            .channels
            .iter()
            .any(|c| c.name == "cam" && c.subscribers.len() == 2)
    });
    for v in 1..=3 {
        publish(&mut producer, v);
    }
    let held = consumer.recv().unwrap();
    assert_eq!(held[0], 1);

    // The broker dies; the data path goes on without it.
    kill9(&mut a);
    publish(&mut producer, 4);
    // The other process dies too, while no broker can reclaim it.
    kill9(&mut doomed);

    let mut b = spawn_broker(&config, &socket, Stdio::null());
    let nc = connect(&socket, "late-joiner");
    wait_until("both survivors to reconnect", || {
        nc.stat()
            .unwrap()
            .adoption
            .is_some_and(|a| a.adopted_clients == 2 && a.waiting_clients == 0)
    });
    let s = nc.stat().unwrap();
    assert_eq!(s.bus_id, before.bus_id, "the same bus");
    let adoption = s.adoption.clone().unwrap();
    assert!(adoption.reclaimed_handles >= 1, "{adoption:?}");
    assert_eq!(adoption.refused_clients, 0, "{adoption:?}");
    let adopted: Vec<u32> = s
        .clients
        .iter()
        .filter(|c| c.adopted)
        .map(|c| c.id)
        .collect();
    assert_eq!(adopted.len(), 2, "{:?}", s.clients);
    assert!(adopted.contains(&pc.id()) && adopted.contains(&cc.id()));
    assert!(s.channels.iter().any(|c| c.name == "declared"));
    let cam = s
        .channels
        .iter()
        .find(|c| c.name == "cam")
        .expect("cam survived");
    assert_eq!(
        cam.subscribers.len(),
        1,
        "the dead sub process is reclaimed: {cam:?}"
    );
    assert_eq!(cam.producers, 1);

    // `tensorbus stat` says so, in text and JSON.
    let out = Command::new(BIN)
        .arg("stat")
        .arg("--socket")
        .arg(&socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("bus {:016x}", before.bus_id))
            && text.contains("2 clients reconnected, 0 refused, 0 still to reconnect"),
        "{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.trim_end().ends_with(" yes"))
            .count(),
        2,
        "{text}"
    );
    let out = Command::new(BIN)
        .args(["stat", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["adoption"]["adopted_clients"], 2, "{json}");
    assert_eq!(json["bus_id"], format!("{:016x}", before.bus_id), "{json}");

    // A new client joins the same bus: it receives what the old producer
    // publishes now; the old consumer receives everything in order.
    let late = nc.consumer("cam").unwrap();
    publish(&mut producer, 5);
    assert_eq!(late.recv().unwrap()[0], 5);
    for v in 2..=5u8 {
        let t = consumer.recv().unwrap();
        assert!(t.iter().all(|&b| b == v), "tensor {v}");
    }
    assert!(held.iter().all(|&b| b == 1), "a held tensor survives");
    // Control requests of survivors work again (they reconnected).
    let mut p2 = pc.producer("declared").unwrap();
    publish(&mut p2, 9);

    // Closing everything leaves nothing held: the adopted handles are
    // this broker's and reclaimed exactly.
    drop((held, late, consumer, producer, p2));
    wait_until("every slot to be free", || {
        let s = nc.stat().unwrap();
        s.pools[0].slots_free == s.pools[0].slots_total && s.handles_open == 0
    });
    drop((pc, cc, nc));
    kill9(&mut b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_incompatible_config_is_refused_naming_the_difference() {
    let dir = temp_dir("adopt-incompatible");
    let config = dir.join("broker.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let socket = dir.join("broker.sock");
    let mut a = spawn_broker(&config, &socket, Stdio::null());
    let pc = connect(&socket, "camera");
    let old = pc.stat().unwrap().bus_id;
    let mut producer = pc
        .producer_with(
            "cam",
            ProducerOptions::default().create(ChannelSpec::new(Mode::Broadcast)),
        )
        .unwrap();
    kill9(&mut a);

    let other = dir.join("other.toml");
    std::fs::write(&other, CONFIG.replace("slots = 32", "slots = 64")).unwrap();
    let mut b = spawn_broker(&other, &socket, Stdio::piped());
    let nc = connect(&socket, "newcomer");
    let s = nc.stat().unwrap();
    assert_ne!(s.bus_id, old, "a new bus");
    assert!(s.adoption.is_none());
    // The survivor's data path still works among the old bus's clients.
    publish(&mut producer, 1);
    drop((producer, pc, nc));
    kill9(&mut b);
    let mut err = String::new();
    use std::io::Read;
    b.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("refusing to adopt")
            && err.contains("pool #0 slots is 32 in the running bus, 64 in the config"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bus outlives two broker deaths in a row; a handle closed while no
/// broker ran is not claimed, so the next broker reclaims it.
#[test]
fn the_bus_survives_two_broker_deaths_and_closes_while_none_runs() {
    let dir = temp_dir("adopt-twice");
    let config = dir.join("broker.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let socket = dir.join("broker.sock");
    let mut a = spawn_broker(&config, &socket, Stdio::null());
    let c = connect(&socket, "both");
    let bus = c.stat().unwrap().bus_id;
    let mut producer = c
        .producer_with(
            "cam",
            ProducerOptions::default().create(ChannelSpec::new(Mode::Broadcast)),
        )
        .unwrap();
    let keep = c.consumer("cam").unwrap();
    let gone = c.consumer("cam").unwrap();
    for v in 1..=4 {
        publish(&mut producer, v);
    }
    kill9(&mut a);
    // Closed while no broker runs: the close cannot reach anyone.
    drop(gone);
    let mut b = spawn_broker(&config, &socket, Stdio::null());
    let probe = connect(&socket, "probe");
    wait_until("the first adoption", || {
        probe
            .stat()
            .unwrap()
            .adoption
            .is_some_and(|a| a.adopted_clients == 1)
    });
    let s = probe.stat().unwrap();
    assert_eq!(s.bus_id, bus);
    let cam = s.channels.iter().find(|c| c.name == "cam").unwrap();
    assert_eq!(
        cam.subscribers.len(),
        1,
        "the closed consumer is reclaimed: {cam:?}"
    );
    drop(probe);
    kill9(&mut b);
    publish(&mut producer, 5);
    let mut c2 = spawn_broker(&config, &socket, Stdio::null());
    let probe = connect(&socket, "probe");
    wait_until("the second adoption", || {
        probe
            .stat()
            .unwrap()
            .adoption
            .is_some_and(|a| a.adoptions == 2 && a.adopted_clients == 1)
    });
    assert_eq!(probe.stat().unwrap().bus_id, bus);
    for v in 1..=5u8 {
        let t = keep.recv().unwrap();
        assert!(t.iter().all(|&b| b == v), "tensor {v}");
    }
    drop((keep, producer));
    wait_until("every slot to be free", || {
        let s = probe.stat().unwrap();
        s.pools[0].slots_free == s.pools[0].slots_total && s.handles_open == 0
    });
    drop((c, probe));
    kill9(&mut c2);
    let _ = std::fs::remove_dir_all(&dir);
}
