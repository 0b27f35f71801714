//! The control plane under misuse and at scale (issue 12, items 7 and 8):
//! a client that never reads its replies cannot freeze the broker, and
//! replies larger than a socket buffer (a `stat` of 2,000 channels, the
//! channel list of an "unknown channel" error) arrive whole.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tensorbus::error::OpenError;
use tensorbus::stat::StatReport;
use tensorbus::Client;
use tensorbus_broker::{Config, EmbeddedBroker};
use tensorbus_core::proto::{encode_frames, parse_frame, Request, MAX_CHUNK, MAX_MESSAGE};
use tensorbus_shm::SeqpacketConn;

fn socket(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tb-ctl-{}-{name}", std::process::id()));
    dir.join("broker.sock")
}

/// A raw protocol client: it speaks frames itself, so that a test can make
/// it misbehave (never read, vanish mid-way).
struct Raw {
    conn: SeqpacketConn,
    next_id: u64,
}

impl Raw {
    /// Connects and says hello (reads the welcome, drops its descriptor).
    fn connect(socket: &std::path::Path, name: &str) -> Raw {
        let mut raw = Raw {
            conn: SeqpacketConn::connect(socket).expect("raw client connects"),
            next_id: 1,
        };
        let hello = Request::Hello {
            name: name.into(),
            version: tensorbus_core::layout::LAYOUT_VERSION,
        };
        raw.send(&hello).expect("hello goes out");
        let json = raw.recv();
        assert!(json.contains("welcome"), "{json}");
        raw
    }

    fn frame(&mut self, req: &Request) -> Vec<u8> {
        let id = self.next_id;
        self.next_id += 1;
        encode_frames(id, &serde_json::to_vec(req).unwrap()).remove(0)
    }

    fn send(&mut self, req: &Request) -> std::io::Result<()> {
        let f = self.frame(req);
        self.conn.send(&f, &[])
    }

    /// Receives one single-part reply as text (its descriptors are closed).
    fn recv(&self) -> String {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut fds = Vec::new();
        let n = self.conn.recv(&mut buf, &mut fds).expect("a reply");
        let (h, body) = parse_frame(&buf[..n]).expect("a frame");
        assert_eq!(h.parts, 1);
        String::from_utf8_lossy(body).into_owned()
    }
}

fn subscribers(stat: &StatReport, channel: &str) -> usize {
    stat.channels
        .iter()
        .find(|c| c.name == channel)
        .map_or(0, |c| c.subscribers.len())
}

/// Issue 12.7: a client that sends requests and never reads the replies.
/// Before the fix the broker sent replies on blocking sockets: after a few
/// hundred unread replies it blocked in `send`, every other client's
/// request timed out and nobody reclaimed after the dead. Now its output
/// queues (bounded), other clients are answered, a death is still
/// reclaimed, and the greedy client is disconnected once over its bound.
#[test]
fn a_client_that_does_not_read_cannot_freeze_the_broker() {
    let sock = socket("greedy");
    let config = Config::from_toml(
        "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 8\n\
         [[channels]]\nname = \"g/c\"\npolicy = \"block\"\n",
    )
    .unwrap();
    let _broker = EmbeddedBroker::start(&config, &sock).unwrap();
    let good = Client::connect_to(Some(&sock), "good").unwrap();
    // A stuck broker shows up as a request timeout of the good client.
    good.set_request_timeout(Duration::from_secs(5));

    // A client that will die holding a block-policy subscriber.
    let mut victim = Raw::connect(&sock, "victim");
    victim
        .send(&Request::OpenConsumer {
            channel: "g/c".into(),
            policy: None,
            depth: None,
            writable: false,
            create: None,
            wait: false,
        })
        .unwrap();
    assert!(victim.recv().contains("consumer"));
    assert_eq!(subscribers(&good.stat().unwrap(), "g/c"), 1);

    let mut greedy = Raw::connect(&sock, "greedy");
    greedy.conn.set_nonblocking(true).unwrap();
    let stat = greedy.frame(&Request::Stat);
    let mut sent = 0u64;
    let mut victim = Some(victim);
    let mut stuck_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let disconnected = loop {
        assert!(
            Instant::now() < deadline,
            "the greedy client was never disconnected ({sent} requests sent)"
        );
        match greedy.conn.try_send(&stat, &[]) {
            Ok(()) => {
                sent += 1;
                stuck_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // The broker reads requests as fast as they come; a full
                // queue for long means it stopped reading (it is blocked).
                let since = *stuck_since.get_or_insert_with(Instant::now);
                assert!(
                    since.elapsed() < Duration::from_secs(10),
                    "the broker stopped reading requests after {sent}"
                );
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => break e,
        }
        if sent == 1000 {
            // Well past the socket's capacity for unread replies: the
            // broker still answers others, and still reclaims a death.
            let t = good.stat().expect("another client is still answered");
            assert!(t.clients.iter().any(|c| c.name == "greedy"));
            drop(victim.take());
            let start = Instant::now();
            while subscribers(&good.stat().unwrap(), "g/c") != 0 {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "the dead client's subscriber was never reclaimed"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if sent % 500 == 0 {
            good.stat().expect("another client is still answered");
        }
    };
    assert!(
        matches!(
            disconnected.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
        ),
        "{disconnected}"
    );
    assert!(sent > 1000, "disconnected after only {sent} requests");
    // The greedy client is gone from the broker; the good one still works.
    let start = Instant::now();
    loop {
        let t = good.stat().unwrap();
        if !t.clients.iter().any(|c| c.name == "greedy") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(good.consumer("g/c").is_ok());
}

/// Issue 12.8: replies larger than a socket buffer. Before the fix a
/// `stat` of 2,000 channels (about 250 KB of JSON) exceeded the socket's
/// send buffer: the broker's send failed, it dropped the client, and
/// `stat` reported "broker unavailable"; the "unknown channel" error (which
/// lists every channel) failed the same way.
#[test]
fn replies_of_any_size_arrive() {
    let sock = socket("large");
    let mut toml = String::from(
        "[limits]\nmax_channels = 2048\nmax_subscribers_per_channel = 2\n\
         max_producers_per_channel = 2\nring_capacity = 8\n\
         [[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 8\n",
    );
    let names: Vec<String> = (0..2000)
        .map(|i| format!("site-a/building-3/camera/front-left/stream-{i:04}"))
        .collect();
    for n in &names {
        toml.push_str(&format!("[[channels]]\nname = \"{n}\"\n"));
    }
    let config = Config::from_toml(&toml).unwrap();
    let _broker = EmbeddedBroker::start(&config, &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "large").unwrap();

    let stat = client.stat().expect("a stat of 2000 channels arrives");
    let got: Vec<&str> = stat.channels.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(got.len(), 2000);
    for n in &names {
        assert!(got.contains(&n.as_str()), "{n} missing");
    }
    // It really was a multi-part reply.
    let json = serde_json::to_vec(&stat).unwrap();
    assert!(json.len() > 4 * MAX_CHUNK, "{} bytes", json.len());

    // The channel list of an unknown-channel error (also from the broker's
    // own error message, which lists every name).
    match client.consumer("no/such/channel") {
        Err(OpenError::ChannelNotFound { known, .. }) => assert_eq!(known.len(), 2000),
        other => panic!("expected ChannelNotFound, got {other:?}"),
    }
    // The connection is still in step: small requests work after big ones.
    let c = client.consumer(&names[1999]).unwrap();
    assert_eq!(subscribers(&client.stat().unwrap(), &names[1999]), 1);
    drop(c);
    assert_eq!(subscribers(&client.stat().unwrap(), &names[1999]), 0);
}
