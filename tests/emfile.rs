//! Opens in a process with no free file descriptor (issue 12.6).
//!
//! This binary holds ONE test on purpose: it lowers RLIMIT_NOFILE of its
//! own process, which would break any test running beside it. The broker
//! runs in a process of its own (`tb-peer broker`), untouched by the limit.
//!
//! Before the fix the open failed with "BrokerUnavailable: control data
//! truncated: more than 32 descriptors attached" (wrong on both counts) and
//! left a `block` subscriber at the broker that stalled unrelated producers.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tensorbus::error::{OpenError, RequestError};
use tensorbus::stat::StatReport;
use tensorbus::Client;

const CONFIG: &str = "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 16\n\
[[pools]]\nname = \"q\"\nslot_size = 65536\nslots = 4\n\
[[channels]]\nname = \"e/c\"\npolicy = \"block\"\n";

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nofile() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim
}

fn set_nofile(lim: libc::rlimit) {
    // SAFETY: setrlimit reads one valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

/// Highest descriptor number open in this process.
fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd is readable")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap_or(2)
}

fn counts(stat: &StatReport) -> (u32, usize) {
    let c = stat.channels.iter().find(|c| c.name == "e/c").unwrap();
    (c.producers, c.subscribers.len())
}

#[test]
fn an_open_without_a_free_descriptor_reports_emfile_and_leaves_nothing_behind() {
    let dir = std::env::temp_dir().join(format!("tb-it-{}-emfile", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("broker.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let socket = dir.join("broker.sock");
    let _broker = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tb-peer"))
            .arg("broker")
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the broker"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match Client::connect_to(Some(&socket), "emfile") {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("broker never came up: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    assert_eq!(counts(&client.stat().unwrap()), (0, 0));

    // Exhaust the descriptor table: limit it to what is open now, then fill
    // the holes below the limit.
    let saved = nofile();
    set_nofile(libc::rlimit {
        rlim_cur: highest_fd() + 1,
        rlim_max: saved.rlim_max,
    });
    let mut fillers = Vec::new();
    let full = loop {
        match File::open("/dev/null") {
            Ok(f) => fillers.push(f),
            Err(e) => break e,
        }
        assert!(fillers.len() < 100_000, "the descriptor table never filled");
    };
    assert_eq!(full.raw_os_error(), Some(libc::EMFILE), "{full}");

    let consumer = client.consumer("e/c");
    let producer = client.producer("e/c");
    // Control requests that carry no descriptors still work.
    let during = client.stat().unwrap();
    drop(fillers);
    set_nofile(saved);

    for (what, result) in [
        ("consumer", consumer.map(drop)),
        ("producer", producer.map(drop)),
    ] {
        let e = result.expect_err(what);
        assert!(
            matches!(e, OpenError::Request(RequestError::NoFreeFd { .. })),
            "{what}: {e:?}"
        );
        let msg = e.to_string();
        for needle in [
            "no free file descriptor in this process (EMFILE)",
            "the pool descriptors of channel \"e/c\"",
            "ulimit -n",
        ] {
            assert!(msg.contains(needle), "{what}: {needle:?} not in {msg}");
        }
    }
    // Nothing was left behind at the broker: no subscriber, no producer.
    assert_eq!(counts(&during), (0, 0));
    assert_eq!(counts(&client.stat().unwrap()), (0, 0));
    // With descriptors to spare, the same opens work.
    let c = client.consumer("e/c").unwrap();
    let p = client.producer("e/c").unwrap();
    assert_eq!(counts(&client.stat().unwrap()), (1, 1));
    drop((c, p));
}
