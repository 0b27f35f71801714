//! In-process tests of the whole stack: an embedded broker and clients on
//! threads of this process (the cross-process tests live in the workspace's
//! top-level tests/).

use std::path::PathBuf;
use std::time::Duration;
use tensorbus::error::{LoanError, OpenError};
use tensorbus::TensorView;
use tensorbus::{Client, ConsumerOptions, DType, Mode, Policy, ProducerOptions};
use tensorbus_broker::{Config, EmbeddedBroker};

fn socket(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tb-inproc-{}-{name}", std::process::id()));
    dir.join("broker.sock")
}

fn config() -> Config {
    Config::from_toml(
        r#"
        [limits]
        ring_capacity = 8
        [[pools]]
        name = "small"
        slot_size = 4096
        slots = 8
        [[pools]]
        name = "big"
        slot_size = "1MiB"
        slots = 4
        [[pools]]
        name = "huge-aligned"
        slot_size = 4096
        slots = 2
        alignment = "2MiB"
        [[channels]]
        name = "t/bcast"
        pools = ["small", "big"]
        [[channels]]
        name = "t/aligned"
        pools = ["huge-aligned"]
        [[channels]]
        name = "t/work"
        mode = "workqueue"
        [[channels]]
        name = "t/out"
    "#,
    )
    .unwrap()
}

fn free_slots(c: &Client) -> (u32, u32) {
    let s = c.stat().unwrap();
    (
        s.pools.iter().map(|p| p.slots_free).sum(),
        s.pools.iter().map(|p| p.slots_total).sum(),
    )
}

#[test]
fn publish_and_receive_same_bytes() {
    let sock = socket("basic");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "test").unwrap();
    let p = client.producer("t/bcast").unwrap();
    let c1 = client.consumer("t/bcast").unwrap();
    let c2 = client
        .consumer_with("t/bcast", ConsumerOptions::default().depth(2))
        .unwrap();
    let mut t = p.loan(&[16, 16], DType::U8).unwrap();
    for (i, b) in t.iter_mut().enumerate() {
        *b = i as u8;
    }
    t.set_user_header(b"hello").unwrap();
    let addr = t.as_ptr() as usize;
    let id = t.slot_id();
    assert_eq!(t.publish().unwrap().delivered, 2);
    let r1 = c1.recv_timeout(Duration::from_secs(1)).unwrap();
    let r2 = c2.try_recv().unwrap();
    assert_eq!(r1.slot_id(), id);
    assert_eq!(r1.as_ptr() as usize % 4096, addr % 4096);
    assert_eq!(r1.shape(), &[16, 16]);
    assert_eq!(r1.user_header(), b"hello");
    assert_eq!(r1.producer_id(), client.id());
    assert!(r1.iter().enumerate().all(|(i, &b)| b == i as u8));
    assert_eq!(&r1[..], &r2[..]);
    drop((r1, r2));
    assert_eq!(free_slots(&client), (14, 14));
}

#[test]
fn errors_are_clear() {
    let sock = socket("errors");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "test").unwrap();
    match client.consumer("nope") {
        Err(OpenError::ChannelNotFound { known, .. }) => {
            assert!(known.contains(&"t/bcast".to_string()))
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client.consumer("../x"),
        Err(OpenError::InvalidName(_))
    ));
    let p = client.producer("t/bcast").unwrap();
    match p.loan(&[2 << 20], DType::U8) {
        Err(e @ LoanError::TooLarge { .. }) => assert!(e.to_string().contains("1048576")),
        other => panic!("{other:?}"),
    }
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(p.loan(&[10], DType::U8).unwrap());
    }
    let err = p.loan(&[10], DType::U8).unwrap_err();
    assert!(matches!(err, LoanError::PoolExhausted { .. }), "{err}");
    assert!(err.to_string().contains("this producer holds 8"), "{err}");
    // Loans own their producer's core: they outlive the handle value, and
    // the broker handle stays open (their slots held) until the last one
    // goes. (A `mem::forget`ed loan therefore keeps its producer open
    // until the process ends, like any leaked `Arc`.)
    drop(p);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(free_slots(&client).0, 2);
    let last = held.pop().unwrap();
    assert_eq!(last.publish().unwrap().delivered, 0, "no subscriber yet");
    drop(held); // the last loans go: slots back, handle closed
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(free_slots(&client), (14, 14));
    assert!(
        client
            .stat()
            .unwrap()
            .channels
            .iter()
            .all(|c| c.producers == 0),
        "the producer's handle closed with its last loan"
    );
    let missing =
        Client::connect_to(Some(std::path::Path::new("/nonexistent/tb.sock")), "x").unwrap_err();
    assert!(
        missing.to_string().contains("tensorbus broker"),
        "{missing}"
    );
}

#[test]
fn policies() {
    let sock = socket("policies");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "test").unwrap();
    let p = client.producer("t/bcast").unwrap();
    let oldest = client
        .consumer_with(
            "t/bcast",
            ConsumerOptions::default()
                .policy(Policy::DropOldest)
                .depth(2),
        )
        .unwrap();
    let newest = client
        .consumer_with(
            "t/bcast",
            ConsumerOptions::default()
                .policy(Policy::DropNewest)
                .depth(2),
        )
        .unwrap();
    let latest = client
        .consumer_with("t/bcast", ConsumerOptions::default().policy(Policy::Latest))
        .unwrap();
    for i in 0..5u8 {
        let mut t = p.loan(&[1], DType::U8).unwrap();
        t[0] = i;
        t.publish().unwrap();
    }
    let drain = |c: &tensorbus::Consumer| {
        let mut v = Vec::new();
        while let Ok(t) = c.try_recv() {
            v.push(t[0]);
        }
        v
    };
    assert_eq!(drain(&oldest), vec![3, 4]);
    assert_eq!(drain(&newest), vec![0, 1]);
    assert_eq!(drain(&latest), vec![4]);
    let s = client.stat().unwrap();
    let ch = s.channels.iter().find(|c| c.name == "t/bcast").unwrap();
    let dropped: Vec<u64> = ch.subscribers.iter().map(|s| s.dropped).collect();
    assert_eq!(dropped, vec![3, 3, 4]);
    assert_eq!(free_slots(&client), (14, 14));
}

#[test]
fn workqueue_and_stage_in_place() {
    let sock = socket("stage");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "test").unwrap();
    let p = client.producer("t/work").unwrap();
    let stage = client.stage("t/work", "t/out").unwrap();
    let out = client.consumer("t/out").unwrap();
    let mut t = p.loan(&[4], DType::F32).unwrap();
    t.as_mut_slice_of::<f32>()
        .unwrap()
        .copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
    let id = t.slot_id();
    let addr = t.as_ptr() as usize;
    t.publish().unwrap();
    let mut s = stage.recv_mut_timeout(Duration::from_secs(1)).unwrap();
    assert_eq!(s.slot_id(), id);
    for x in s.as_mut_slice_of::<f32>().unwrap() {
        *x *= 10.0;
    }
    assert_eq!(s.as_ptr() as usize, addr, "same mapping in one process");
    s.forward().unwrap();
    let r = out.recv_timeout(Duration::from_secs(1)).unwrap();
    assert_eq!(r.slot_id(), id, "forwarded the same slot");
    assert_eq!(r.as_slice_of::<f32>().unwrap(), &[10.0, 20.0, 30.0, 40.0]);
    drop(r);
    assert_eq!(free_slots(&client), (14, 14));
    assert!(
        client.stage("t/bcast", "t/out").is_err(),
        "broadcast input refused"
    );
}

#[test]
fn runtime_channel_creation() {
    let sock = socket("create");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "test").unwrap();
    let p = client
        .producer_with(
            "rt/new",
            ProducerOptions::default()
                .create(tensorbus::ChannelSpec::new(Mode::Workqueue).pools(&["big"])),
        )
        .unwrap();
    let c = client.consumer("rt/new").unwrap();
    let t = p.loan(&[100], DType::U8).unwrap();
    assert_eq!(t.slot_id().pool, 1);
    t.publish().unwrap();
    assert!(c.recv_timeout(Duration::from_secs(1)).is_ok());
}

/// Permissions of the mapping that contains `addr`, from /proc/self/maps.
fn perms_at(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let range = it.next().unwrap();
        let perms = it.next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if (a..b).contains(&addr) {
            return perms.to_owned();
        }
    }
    panic!("address {addr:#x} is not mapped");
}

#[test]
fn memory_is_aligned_read_only_for_consumers_and_not_in_dev_shm() {
    let sock = socket("memory");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let producer_client = Client::connect_to(Some(&sock), "producer").unwrap();
    // A separate client (own mappings) that only consumes.
    let consumer_client = Client::connect_to(Some(&sock), "consumer").unwrap();
    let p = producer_client.producer("t/aligned").unwrap();
    let c = consumer_client.consumer("t/aligned").unwrap();
    for _ in 0..2 {
        let t = p.loan(&[100], DType::U8).unwrap();
        assert_eq!(
            t.as_ptr() as usize % (2 << 20),
            0,
            "2 MiB alignment honoured"
        );
        assert!(
            perms_at(t.as_ptr() as usize).starts_with("rw"),
            "producer maps writable"
        );
        t.publish().unwrap();
        let r = c.try_recv().unwrap();
        assert_eq!(r.as_ptr() as usize % (2 << 20), 0);
        assert_eq!(
            perms_at(r.as_ptr() as usize),
            "r--s",
            "consumer maps read-only, shared"
        );
    }
    let q = producer_client.producer("t/bcast").unwrap();
    let t = q.loan(&[3], DType::U8).unwrap();
    assert_eq!(t.as_ptr() as usize % 4096, 0, "default alignment 4096");
    drop(t);
    if let Ok(dir) = std::fs::read_dir("/dev/shm") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.contains("tensorbus"), "/dev/shm/{name} was created");
        }
    }
}

#[test]
fn too_many_holders_is_a_clear_error() {
    let sock = socket("holders");
    // A small handle limit, hit before the channel table fills.
    let text = "[limits]\nring_capacity = 8\nmax_handles = 40\nmax_channels = 64\n\
                [[pools]]\nname = \"small\"\nslot_size = 4096\nslots = 8\n\
                [[channels]]\nname = \"t/bcast\"\n";
    let _b = EmbeddedBroker::start(&Config::from_toml(text).unwrap(), &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "test").unwrap();
    let mut handles = Vec::new();
    let err = loop {
        match client.consumer("t/bcast") {
            Ok(c) => handles.push(c),
            Err(e) => break e,
        }
    };
    // 16 subscribers per channel (the default limit) come first.
    assert!(matches!(err, OpenError::LimitReached(_)), "{err}");
    assert!(err.to_string().contains("subscribers"), "{err}");
    let mut more = Vec::new();
    let mut k = 0;
    let err = 'outer: loop {
        let name = format!("h/{k}");
        k += 1;
        for _ in 0..10 {
            let opts =
                ConsumerOptions::default().create(tensorbus::ChannelSpec::new(Mode::Broadcast));
            match client.consumer_with(&name, opts) {
                Ok(c) => more.push(c),
                Err(e) => break 'outer e,
            }
        }
    };
    assert_eq!(
        handles.len() + more.len(),
        40,
        "exactly max_handles holder handles fit"
    );
    assert!(
        err.to_string().contains("all 40 holder handles")
            && err.to_string().contains("max_handles = 40"),
        "{err}"
    );
    // Closing one makes room for one.
    handles.pop();
    handles.push(client.consumer("t/bcast").unwrap_or_else(|e| panic!("{e}")));
    drop((handles, more));
}

#[test]
fn stage_forwards_to_another_producer_of_the_same_client() {
    let sock = socket("forward-to");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "test").unwrap();
    let other = Client::connect_to(Some(&sock), "other").unwrap();
    let p = client.producer("t/work").unwrap();
    let stage = client.stage("t/work", "t/out").unwrap();
    let side = client.producer("t/bcast").unwrap();
    let foreign = other.producer("t/bcast").unwrap();
    let side_rx = client.consumer("t/bcast").unwrap();
    for _ in 0..2 {
        let t = p.loan(&[8], DType::U8).unwrap();
        assert_eq!(t.slot_id().pool, 0, "small pool, which t/bcast allows");
        t.publish().unwrap();
    }
    let s = stage.recv_mut_timeout(Duration::from_secs(1)).unwrap();
    let id = s.slot_id();
    assert_eq!(s.forward_to(&side).unwrap().delivered, 1);
    let r = side_rx.recv_timeout(Duration::from_secs(1)).unwrap();
    assert_eq!(r.slot_id(), id, "the same slot went to the other channel");
    drop(r);
    let s = stage.recv_mut_timeout(Duration::from_secs(1)).unwrap();
    let err = s.forward_to(&foreign).unwrap_err();
    assert!(
        matches!(err, tensorbus::error::PublishError::ForeignClient),
        "{err}"
    );
    drop((p, stage, side, foreign, side_rx));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        free_slots(&client),
        (14, 14),
        "the refused slot was released"
    );
}
