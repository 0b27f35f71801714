//! Bridge throughput and latency against raw Zenoh, in one run, over
//! loopback TCP (reports, asserts nothing).
//!
//! ```text
//! cargo run --release -p tensorbus-bridge --example bench -- --sizes 1MiB,6MiB --count 300 --pings 200
//! ```
//!
//! - raw: two Zenoh sessions (one listens, one connects); the publisher
//!   puts the same bytes (a shared `bytes::Bytes`, no copy per put), the
//!   subscriber reads only the 8-byte send time at the front.
//! - bridge: broker A + exporting bridge, broker B + importing bridge; a
//!   producer on A loans a slot, stamps the send time into its first 8
//!   bytes, publishes; a consumer on B receives.
//!
//! Throughput: `--count` tensors back to back (every route `block`, so
//! lossless), first send to last arrival. Latency: `--pings` tensors one
//! at a time (the next is sent when the previous arrived), one-way p50/p99.

use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tensorbus::{Client, ConsumerOptions, DType, Policy};
use tensorbus_bridge::{Bridge, Config};
use tensorbus_broker::{Config as BrokerConfig, EmbeddedBroker};
use zenoh::bytes::ZBytes;
use zenoh::qos::CongestionControl;
use zenoh::Wait;

static T0: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn parse_size(s: &str) -> usize {
    let s = s.trim();
    let (n, mult) = if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (s, 1)
    };
    n.parse::<usize>().expect("a size such as 1MiB") * mult
}

fn zconfig(listen: Option<u16>, connect: Option<u16>) -> zenoh::Config {
    let mut c = zenoh::Config::default();
    let ep = |p: Option<u16>| match p {
        Some(p) => format!("[\"tcp/127.0.0.1:{p}\"]"),
        None => "[]".into(),
    };
    c.insert_json5("listen/endpoints", &ep(listen)).unwrap();
    c.insert_json5("connect/endpoints", &ep(connect)).unwrap();
    c.insert_json5("scouting/multicast/enabled", "false")
        .unwrap();
    c
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

struct Result {
    mbps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn raw(size: usize, count: usize, pings: usize) -> Result {
    let port = free_port();
    let a = zenoh::open(zconfig(Some(port), None)).wait().unwrap();
    let b = zenoh::open(zconfig(None, Some(port))).wait().unwrap();
    let (tx, rx) = mpsc::sync_channel::<u64>(1 << 16);
    let _sub = b
        .declare_subscriber("bench/raw")
        .callback(move |s| {
            let mut stamp = [0u8; 8];
            let _ = std::io::Read::read_exact(&mut s.payload().reader(), &mut stamp);
            let _ = tx.send(now_ns().saturating_sub(u64::from_le_bytes(stamp)));
        })
        .wait()
        .unwrap();
    let publisher = a
        .declare_publisher("bench/raw")
        .congestion_control(CongestionControl::Block)
        .wait()
        .unwrap();
    while !publisher.matching_status().wait().unwrap().matching() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let base = vec![0x5au8; size];
    let put = |base: &[u8]| {
        let mut buf = base.to_vec();
        buf[..8].copy_from_slice(&now_ns().to_le_bytes());
        bytes::Bytes::from(buf)
    };
    // Throughput: the buffers are made up front so that the timed loop is
    // Zenoh's alone.
    let bufs: Vec<bytes::Bytes> = (0..count.min(24)).map(|_| put(&base)).collect();
    let start = Instant::now();
    for i in 0..count {
        publisher
            .put(ZBytes::from(bufs[i % bufs.len()].clone()))
            .wait()
            .unwrap();
    }
    for _ in 0..count {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("raw arrival");
    }
    let secs = start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(pings);
    for _ in 0..pings {
        let b = put(&base);
        publisher.put(ZBytes::from(b)).wait().unwrap();
        lat.push(rx.recv_timeout(Duration::from_secs(60)).expect("raw ping"));
    }
    drop(publisher);
    let _ = b.close().wait();
    let _ = a.close().wait();
    Result {
        mbps: (size * count) as f64 / secs / 1e6,
        p50_us: percentile(&mut lat, 0.5),
        p99_us: percentile(&mut lat, 0.99),
    }
}

struct Host {
    client: Client,
    socket: std::path::PathBuf,
    dir: std::path::PathBuf,
    _broker: EmbeddedBroker,
}

impl Host {
    fn start(side: &str, channels: &[&str]) -> Host {
        let dir =
            std::env::temp_dir().join(format!("tb-bridge-bench-{}-{side}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join("broker.sock");
        let mut toml = String::from(
            "[limits]\nring_capacity = 64\n[[pools]]\nname = \"big\"\nslot_size = \"8MiB\"\nslots = 24\n",
        );
        for c in channels {
            toml.push_str(&format!(
                "[[channels]]\nname = \"{c}\"\nmode = \"broadcast\"\n"
            ));
        }
        let broker =
            EmbeddedBroker::start(&BrokerConfig::from_toml(&toml).unwrap(), &socket).unwrap();
        let client = Client::connect_to(Some(&socket), "bench").unwrap();
        Host {
            client,
            socket,
            dir,
            _broker: broker,
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bridged(size: usize, count: usize, pings: usize) -> Result {
    let a = Host::start("a", &["bench/src"]);
    let b = Host::start("b", &["bench/dst"]);
    let port = free_port();
    let head = |name: &str, h: &Host, listen: Option<u16>, connect: Option<u16>| {
        let ep = |p: Option<u16>| match p {
            Some(p) => format!("[\"tcp/127.0.0.1:{p}\"]"),
            None => "[]".into(),
        };
        format!(
            "name = \"{name}\"\n[broker]\nsocket = {:?}\n[zenoh]\nlisten = {}\nconnect = {}\n",
            h.socket.display().to_string(),
            ep(listen),
            ep(connect)
        )
    };
    let ca = Config::from_toml(&format!(
        "{}[[export]]\nchannel = \"bench/src\"\ndepth = 8\n",
        head("bench-a", &a, Some(port), None)
    ))
    .unwrap();
    let cb = Config::from_toml(&format!(
        "{}[[import]]\nkey = \"tensorbus/bench/src\"\nchannel = \"bench/dst\"\ndepth = 8\n",
        head("bench-b", &b, None, Some(port))
    ))
    .unwrap();
    let bridge_a = Bridge::start(&ca).unwrap();
    let bridge_b = Bridge::start(&cb).unwrap();
    let consumer = b
        .client
        .consumer_with(
            "bench/dst",
            ConsumerOptions::default().policy(Policy::Block).depth(8),
        )
        .unwrap();
    let producer = a.client.producer("bench/src").unwrap();
    let send = |fill: bool| {
        let mut t = producer
            .loan_timeout(&[size as u32], DType::U8, Duration::from_secs(60))
            .expect("loan");
        if fill {
            t.as_mut_bytes().fill(0x5a);
        }
        t.as_mut_bytes()[..8].copy_from_slice(&now_ns().to_le_bytes());
        t.publish().unwrap();
    };
    // Warm up: one tensor through, so both bridges are matched and every
    // slot is touched.
    for _ in 0..24 {
        send(true);
        consumer.recv_timeout(Duration::from_secs(60)).unwrap();
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..count {
                send(false);
            }
        });
        for _ in 0..count {
            consumer
                .recv_timeout(Duration::from_secs(60))
                .expect("bridged arrival");
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(pings);
    for _ in 0..pings {
        send(false);
        let t = consumer.recv_timeout(Duration::from_secs(60)).unwrap();
        let mut stamp = [0u8; 8];
        stamp.copy_from_slice(&t[..8]);
        lat.push(now_ns().saturating_sub(u64::from_le_bytes(stamp)));
    }
    let drops = bridge_a.stats()[0].dropped + bridge_b.stats()[0].dropped;
    assert_eq!(drops, 0, "block routes dropped");
    drop(consumer);
    drop(bridge_b);
    drop(bridge_a);
    Result {
        mbps: (size * count) as f64 / secs / 1e6,
        p50_us: percentile(&mut lat, 0.5),
        p99_us: percentile(&mut lat, 0.99),
    }
}

fn main() {
    let mut sizes = vec!["1MiB".to_string(), "6MiB".to_string()];
    let mut count = 300usize;
    let mut pings = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("a value after the flag");
        match a.as_str() {
            "--sizes" => sizes = val().split(',').map(str::to_owned).collect(),
            "--count" => count = val().parse().expect("--count N"),
            "--pings" => pings = val().parse().expect("--pings N"),
            other => panic!("unknown flag {other}; see the file's header"),
        }
    }
    now_ns();
    for s in &sizes {
        let size = parse_size(s);
        let r = raw(size, count, pings);
        let b = bridged(size, count, pings);
        println!(
            "bridge-bench size={s} count={count} pings={pings} raw_zenoh_MBps={:.0} bridge_MBps={:.0} ratio={:.2} \
             raw_p50_us={:.0} raw_p99_us={:.0} bridge_p50_us={:.0} bridge_p99_us={:.0} added_p50_us={:.0} added_p99_us={:.0}",
            r.mbps,
            b.mbps,
            b.mbps / r.mbps,
            r.p50_us,
            r.p99_us,
            b.p50_us,
            b.p99_us,
            b.p50_us - r.p50_us,
            b.p99_us - r.p99_us
        );
    }
}
