//! Issue 14.1: late joiners and the end of a stream. A channel's history
//! gives a subscriber that joins late the latest tensors; a consumer that
//! waits for a channel that does not exist yet gets every tensor from the
//! first on; the last producer's clean close ends the stream once it is
//! drained (and only then), a crash does not, and a new producer starts a
//! new stream.

use std::time::Duration;
use tensorbus::error::{OpenError, RecvError, RemoveChannelError, TryRecvError};
use tensorbus::{ChannelSpec, Client, ConsumerOptions, DType, Mode, Policy, ProducerOptions};

mod common;

const CONFIG: &str = r#"
    [[pools]]
    name = "p"
    slot_size = 4096
    slots = 32
    [[channels]]
    name = "cam"
    history = 3
    [[channels]]
    name = "plain"
    [[channels]]
    name = "w"
    mode = "workqueue"
"#;

fn publish(p: &tensorbus::Producer, value: u8) {
    let mut t = p.loan(&[16], DType::U8).unwrap();
    t.fill(value);
    t.publish().unwrap();
}

fn free_slots(client: &Client) -> u32 {
    client.stat().unwrap().pools[0].slots_free
}

/// Receives everything queued now (a short timeout ends it).
fn drain(c: &tensorbus::Consumer) -> Vec<u8> {
    let mut got = Vec::new();
    while let Ok(t) = c.recv_timeout(Duration::from_millis(100)) {
        got.push(t[0]);
    }
    got
}

#[test]
fn a_late_subscriber_first_receives_the_last_n_tensors_in_order() {
    let (_b, client, _) = common::start("late", "history", CONFIG);
    let cam = client.producer("cam").unwrap();
    for v in 1..=5 {
        publish(&cam, v);
    }
    // Three kept (the channel's history), two released.
    assert_eq!(free_slots(&client), 32 - 3);
    let late = client
        .consumer_with("cam", ConsumerOptions::default().end_of_stream(false))
        .unwrap();
    publish(&cam, 6);
    assert_eq!(drain(&late), vec![3, 4, 5, 6]);
    // A `latest` subscriber gets only the newest kept one; a `drop_oldest`
    // one of depth 2 the newest two; a lossless one all of them, even
    // beyond its depth (they hold no extra slot).
    let two = client
        .consumer_with(
            "cam",
            ConsumerOptions::default()
                .depth(2)
                .policy(Policy::DropOldest),
        )
        .unwrap();
    assert_eq!(drain(&two), vec![5, 6]);
    let all = client
        .consumer_with(
            "cam",
            ConsumerOptions::default().depth(1).policy(Policy::Block),
        )
        .unwrap();
    assert_eq!(drain(&all), vec![4, 5, 6]);
    drop((two, all));
    let shallow = client
        .consumer_with(
            "cam",
            ConsumerOptions::default().depth(1).policy(Policy::Latest),
        )
        .unwrap();
    assert_eq!(drain(&shallow), vec![6]);
    // The history counts as "in flight" in stat, and is shown per channel.
    let stat = client.stat().unwrap();
    let ch = stat.channels.iter().find(|c| c.name == "cam").unwrap();
    assert_eq!((ch.history, ch.history_held), (3, 3));
    assert_eq!(
        ch.subscribers.len(),
        2,
        "the history record is not a subscriber"
    );
}

#[test]
fn history_outlives_its_producer_and_a_published_count_excludes_it() {
    let (_b, client, _) = common::start("late", "outlives", CONFIG);
    let calib = client.producer("cam").unwrap();
    let mut t = calib.loan(&[16], DType::U8).unwrap();
    t.fill(42);
    let published = t.publish().unwrap();
    assert_eq!((published.delivered, published.dropped), (0, 0));
    drop(calib);
    // A second producer comes and goes as well: both histories stay (three newest).
    let other = client.producer("cam").unwrap();
    publish(&other, 43);
    drop(other);
    let late = client.consumer("cam").unwrap();
    let a = late.recv_timeout(Duration::from_secs(5)).unwrap();
    let b = late.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((a[0], b[0]), (42, 43));
    drop((a, b));
    // The stream had ended (clean closes): after the history, end of stream.
    assert!(matches!(
        late.recv_timeout(Duration::from_secs(5)),
        Err(RecvError::EndOfStream)
    ));
}

#[test]
fn without_history_a_late_subscriber_gets_only_new_tensors() {
    let (_b, client, _) = common::start("late", "nohistory", CONFIG);
    let p = client.producer("plain").unwrap();
    publish(&p, 1);
    assert_eq!(free_slots(&client), 32);
    let c = client.consumer("plain").unwrap();
    publish(&p, 2);
    assert_eq!(drain(&c), vec![2]);
}

#[test]
fn history_is_refused_on_a_work_queue_and_beyond_the_ring_capacity() {
    let (_b, client, _) = common::start("late", "refused", CONFIG);
    let wq = ChannelSpec::new(Mode::Workqueue).history(1);
    let err = client
        .producer_with("new/wq", ProducerOptions::default().create(wq))
        .unwrap_err();
    assert!(err.to_string().contains("broadcast channels only"), "{err}");
    let big = ChannelSpec::new(Mode::Broadcast).history(100_000);
    let err = client
        .producer_with("new/big", ProducerOptions::default().create(big))
        .unwrap_err();
    assert!(err.to_string().contains("ring_capacity"), "{err}");
    let bad = tensorbus_broker::Config::from_toml(
        "[[pools]]\nname='p'\nslot_size=64\nslots=2\n[[channels]]\nname='q'\nmode='workqueue'\nhistory=2\n",
    );
    assert!(bad.is_err_and(|e| e.to_string().contains("broadcast channels only")));
}

#[test]
fn a_waiting_consumer_gets_every_tensor_from_the_first_on() {
    let (_b, client, sock) = common::start("late", "wait", CONFIG);
    let waiter = std::thread::spawn(move || {
        let c = Client::connect_to(Some(&sock), "waiter").unwrap();
        let cons = c
            .consumer_with(
                "later/raw",
                ConsumerOptions::default().wait_for_channel(Duration::from_secs(30)),
            )
            .unwrap();
        let mut got = Vec::new();
        loop {
            match cons.recv_timeout(Duration::from_secs(30)) {
                Ok(t) => got.push(t[0]),
                Err(RecvError::EndOfStream) => return got,
                Err(e) => panic!("{e}"),
            }
        }
    });
    // Wait until the subscription is registered (the channel shows as pending).
    while !client
        .stat()
        .unwrap()
        .channels
        .iter()
        .any(|c| c.name == "later/raw" && c.pending)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let p = client
        .producer_with(
            "later/raw",
            ProducerOptions::default().create(ChannelSpec::new(Mode::Broadcast).depth(4)),
        )
        .unwrap();
    // No wait for subscribers: the first publish already reaches the waiter.
    for v in 0..50 {
        let mut t = p.loan(&[16], DType::U8).unwrap();
        t.fill(v);
        assert_eq!(t.publish().unwrap().delivered, 1);
    }
    drop(p);
    assert_eq!(waiter.join().unwrap(), (0..50).collect::<Vec<u8>>());
}

#[test]
fn waiting_times_out_cleanly_and_frees_the_reserved_name() {
    let (_b, client, _) = common::start("late", "timeout", CONFIG);
    let t0 = std::time::Instant::now();
    let err = client
        .consumer_with(
            "never",
            ConsumerOptions::default().wait_for_channel(Duration::from_millis(200)),
        )
        .unwrap_err();
    assert!(matches!(err, OpenError::WaitTimeout { .. }), "{err}");
    assert!(t0.elapsed() >= Duration::from_millis(200));
    // Without wait, an unknown channel fails at once; the reservation is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client
        .stat()
        .unwrap()
        .channels
        .iter()
        .any(|c| c.name == "never")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "pending channel not freed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        client.consumer("never"),
        Err(OpenError::ChannelNotFound { .. })
    ));
    // A producer without create options is told consumers wait and --create is needed.
    let waiter = client.clone();
    let w = std::thread::spawn(move || {
        waiter.consumer_with(
            "soon",
            ConsumerOptions::default().wait_for_channel(Duration::from_secs(2)),
        )
    });
    while !client
        .stat()
        .unwrap()
        .channels
        .iter()
        .any(|c| c.name == "soon")
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    // A producer without create options cannot make it: for it, the channel
    // does not exist (the waiting consumers do not invent a mode or pools).
    let err = client.producer("soon").unwrap_err();
    assert!(matches!(err, OpenError::ChannelNotFound { .. }), "{err}");
    let interrupted = client.consumer_interruptible(
        "soon",
        ConsumerOptions::default().wait_for_channel(Duration::MAX),
        || true,
    );
    assert!(matches!(interrupted, Err(OpenError::Interrupted(_))));
    assert!(matches!(
        w.join().unwrap(),
        Err(OpenError::WaitTimeout { .. })
    ));
}

#[test]
fn end_of_stream_comes_after_the_queue_is_drained_and_a_new_producer_resumes() {
    let (_b, client, _) = common::start("late", "eos", CONFIG);
    let cons = client.consumer("plain").unwrap();
    let service = client
        .consumer_with("plain", ConsumerOptions::default().end_of_stream(false))
        .unwrap();
    // Before any producer: nothing, not end of stream.
    assert!(matches!(cons.try_recv(), Err(TryRecvError::Empty)));
    let a = client.producer("plain").unwrap();
    let b = client.producer("plain").unwrap();
    publish(&a, 1);
    drop(a);
    // One producer left: no end of stream.
    assert_eq!(cons.recv().unwrap()[0], 1);
    assert!(matches!(cons.try_recv(), Err(TryRecvError::Empty)));
    publish(&b, 2);
    publish(&b, 3);
    drop(b);
    // Queued tensors come first, then end of stream, from recv and try_recv.
    assert_eq!(cons.recv().unwrap()[0], 2);
    assert_eq!(cons.try_recv().unwrap()[0], 3);
    assert!(matches!(cons.recv(), Err(RecvError::EndOfStream)));
    assert!(matches!(cons.try_recv(), Err(TryRecvError::EndOfStream)));
    // The opted-out consumer drains and then just times out.
    assert_eq!(drain(&service), vec![1, 2, 3]);
    assert!(matches!(
        service.recv_timeout(Duration::from_millis(50)),
        Err(RecvError::Timeout(_))
    ));
    // A new producer starts a new stream.
    let c = client.producer("plain").unwrap();
    assert!(matches!(cons.try_recv(), Err(TryRecvError::Empty)));
    publish(&c, 4);
    assert_eq!(cons.recv().unwrap()[0], 4);
}

#[test]
fn a_parked_consumer_wakes_at_end_of_stream() {
    let (_b, client, _) = common::start("late", "parked", CONFIG);
    let cons = client
        .consumer_with(
            "plain",
            ConsumerOptions::default().wait(tensorbus::WaitStrategy::Park),
        )
        .unwrap();
    let p = client.producer("plain").unwrap();
    let t = std::thread::spawn(move || cons.recv());
    std::thread::sleep(Duration::from_millis(200));
    drop(p);
    assert!(matches!(t.join().unwrap(), Err(RecvError::EndOfStream)));
}

#[test]
fn a_stage_sees_end_of_stream_and_its_close_ends_the_next_channel() {
    let (_b, client, _) = common::start("late", "stage", CONFIG);
    let sink = client.consumer("plain").unwrap();
    let stage = client.stage("w", "plain").unwrap();
    let camera = client.producer("w").unwrap();
    for v in 0..5 {
        publish(&camera, v);
    }
    drop(camera);
    let mut n = 0;
    loop {
        match stage.recv_mut() {
            Ok(mut t) => {
                t.as_mut_bytes()[0] += 100;
                t.forward().unwrap();
                n += 1;
            }
            Err(RecvError::EndOfStream) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(n, 5);
    drop(stage);
    let got: Vec<u8> = std::iter::from_fn(|| match sink.recv() {
        Ok(t) => Some(t[0]),
        Err(RecvError::EndOfStream) => None,
        Err(e) => panic!("{e}"),
    })
    .collect();
    assert_eq!(got, vec![100, 101, 102, 103, 104]);
}

#[test]
fn run_time_channels_can_be_removed_when_unused() {
    let (_b, client, _) = common::start("late", "remove", CONFIG);
    let spec = ChannelSpec::new(Mode::Broadcast).history(2);
    let p = client
        .producer_with("tmp/x", ProducerOptions::default().create(spec))
        .unwrap();
    publish(&p, 1);
    publish(&p, 2);
    assert_eq!(free_slots(&client), 30);
    let err = client.remove_channel("tmp/x").unwrap_err();
    assert!(matches!(err, RemoveChannelError::InUse(_)), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(p);
    // Closing the producer ends the stream; the history still holds two.
    client.remove_channel("tmp/x").unwrap();
    assert_eq!(free_slots(&client), 32, "the history's holds are released");
    assert!(!client
        .stat()
        .unwrap()
        .channels
        .iter()
        .any(|c| c.name == "tmp/x"));
    assert!(matches!(
        client.remove_channel("tmp/x"),
        Err(RemoveChannelError::NotFound { .. })
    ));
    let err = client.remove_channel("cam").unwrap_err();
    assert!(matches!(err, RemoveChannelError::Declared(_)), "{err}");
    assert!(
        err.to_string().contains("declared in the broker config"),
        "{err}"
    );
    // The name can be created again, fresh.
    let p = client
        .producer_with(
            "tmp/x",
            ProducerOptions::default().create(ChannelSpec::new(Mode::Broadcast)),
        )
        .unwrap();
    let c = client.consumer("tmp/x").unwrap();
    publish(&p, 9);
    assert_eq!(c.recv().unwrap()[0], 9);
    // Removing and re-creating many times does not exhaust channels or bits.
    drop((p, c));
    for i in 0..200 {
        let spec = ChannelSpec::new(Mode::Broadcast).history(1);
        let p = client
            .producer_with("tmp/x", ProducerOptions::default().create(spec))
            .unwrap();
        publish(&p, i as u8);
        drop(p);
        client.remove_channel("tmp/x").unwrap();
    }
    assert_eq!(free_slots(&client), 32);
}
