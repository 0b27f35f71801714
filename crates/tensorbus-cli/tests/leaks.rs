//! Issue 17.2: holds older than `[broker] leak_threshold_ms` are listed by
//! `tensorbus stat` (text and JSON) with who holds which slot and why:
//! a loan never published, a tensor queued for a consumer that is behind,
//! a tensor a consumer took and never released. Released, they are gone.

mod common;

use common::{spawn_broker, temp_dir, BIN};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tensorbus::{ChannelSpec, Client, DType, Mode, ProducerOptions};

fn stat_json(socket: &std::path::Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["stat", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn old_holds_are_attributed_to_their_holders() {
    let dir = temp_dir("leaks");
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        "[broker]\nleak_threshold_ms = 300\n[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 8\n",
    )
    .unwrap();
    let socket = dir.join("broker.sock");
    let _broker = spawn_broker(&config, &socket, Stdio::null());
    let client = Client::connect_to(Some(&socket), "leaky-app").unwrap();
    let producer = client
        .producer_with(
            "cam",
            ProducerOptions::default().create(ChannelSpec::new(Mode::Broadcast)),
        )
        .unwrap();
    let taker = client.consumer("cam").unwrap();
    let _behind = client.consumer("cam").unwrap();
    let mut t = producer.loan(&[16], DType::U8).unwrap();
    t.fill(1);
    t.publish().unwrap();
    let held = taker.recv().unwrap();
    let loan = producer.loan(&[16], DType::U8).unwrap();
    let none = stat_json(&socket);
    assert_eq!(none["leaks_total"], 0, "nothing is old yet: {none}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let json = loop {
        let j = stat_json(&socket);
        if j["leaks_total"] == 3 {
            break j;
        }
        assert!(Instant::now() < deadline, "three old holds expected: {j}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let kinds: Vec<&str> = json["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .collect();
    for k in ["loaned", "queued", "received"] {
        assert!(kinds.contains(&k), "{k} missing: {json}");
    }
    for l in json["leaks"].as_array().unwrap() {
        assert_eq!(l["name"], "leaky-app", "{l}");
        assert_eq!(l["pid"], std::process::id(), "{l}");
        assert_eq!(l["channel"], "cam", "{l}");
        assert_eq!(l["pool"], "p", "{l}");
        assert!(l["age_ms"].as_u64().unwrap() >= 300, "{l}");
    }
    assert!(json["clients"][0]["oldest_hold_ms"].as_u64().unwrap() >= 300);
    let out = Command::new(BIN)
        .args(["stat", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("held longer than 0.3s (3 holds)"), "{text}");
    assert!(
        text.contains("received") && text.contains("leaky-app"),
        "{text}"
    );

    // Released (and the behind consumer closed), nothing is listed.
    drop((held, loan, _behind));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = stat_json(&socket);
        if j["leaks_total"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "holds still listed: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop((taker, producer, client));
    let _ = std::fs::remove_dir_all(&dir);
}
