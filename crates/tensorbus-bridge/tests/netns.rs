//! Bridges in two network namespaces joined by a veth pair (`ip netns`, as
//! root): tensors cross unchanged; and on a link throttled with `tc`, the
//! same f32 tensors go over a plain and an int8 route (values within a
//! quantization step; the time each route took is printed, not asserted;
//! tests/thin.rs asserts the bytes).
//!
//! The brokers run in this process: their Unix sockets work across network
//! namespaces, only the bridges (and their TCP link) are split.
//!
//! Needs root, `ip` and `tc` (iproute2); skips with a message without them,
//! and fails instead when `TENSORBUS_REQUIRE_NETNS` is set (as .ci/run does).

mod common;

use common::{checksum, head, random_meta, read_back_strides, Host, Rng, WAIT};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tensorbus::{ConsumerOptions, DType, Policy, TensorView};
use tensorbus_bridge::bridge::wait_until;

/// Two namespaces `tbe<tag>` (edge, 10.218.<n>.1) and `tbs<tag>` (server,
/// 10.218.<n>.2) over a veth pair; removed on drop, with the bridges in them.
struct Link {
    edge: String,
    server: String,
    edge_ip: String,
    edge_dev: String,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Link {
    fn new(n: u8) -> Option<Link> {
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let link = Link {
            edge: format!("tbe{tag}"),
            server: format!("tbs{tag}"),
            edge_ip: format!("10.218.{n}.1"),
            edge_dev: format!("tbve{tag}"),
            children: Vec::new(),
        };
        let server_dev = format!("tbvs{tag}");
        let setup = || -> Result<(), String> {
            if unsafe_geteuid() != 0 {
                return Err("not root".into());
            }
            ip(&["netns", "add", &link.edge])?;
            ip(&["netns", "add", &link.server])?;
            ip(&[
                "link",
                "add",
                &link.edge_dev,
                "type",
                "veth",
                "peer",
                "name",
                &server_dev,
            ])?;
            ip(&["link", "set", &link.edge_dev, "netns", &link.edge])?;
            ip(&["link", "set", &server_dev, "netns", &link.server])?;
            let edge_cidr = format!("{}/24", link.edge_ip);
            let server_cidr = format!("10.218.{n}.2/24");
            ip(&[
                "-n",
                &link.edge,
                "addr",
                "add",
                &edge_cidr,
                "dev",
                &link.edge_dev,
            ])?;
            ip(&[
                "-n",
                &link.server,
                "addr",
                "add",
                &server_cidr,
                "dev",
                &server_dev,
            ])?;
            for (ns, dev) in [(&link.edge, &link.edge_dev), (&link.server, &server_dev)] {
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            Ok(())
        };
        match setup() {
            Ok(()) => Some(link),
            Err(why) => {
                drop(link);
                if std::env::var_os("TENSORBUS_REQUIRE_NETNS").is_some() {
                    panic!("TENSORBUS_REQUIRE_NETNS is set but namespaces cannot be made: {why}");
                }
                eprintln!("SKIPPED netns test: {why} (needs root and iproute2)");
                None
            }
        }
    }

    /// Starts `tensorbus-bridge --config FILE` inside namespace `ns`;
    /// returns its index for [`Link::kill9`].
    fn bridge(&mut self, ns: &str, config: &std::path::Path) -> usize {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(env!("CARGO_BIN_EXE_tensorbus-bridge"))
            .arg("--config")
            .arg(config)
            .args(["--report-secs", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("ip netns exec tensorbus-bridge");
        self.children.push(child);
        self.children.len() - 1
    }

    /// SIGKILLs the bridge `i` (`ip netns exec` execs it: same pid).
    fn kill9(&mut self, i: usize) {
        self.children[i].kill().expect("SIGKILL");
        self.children[i].wait().expect("reaped");
    }

    /// Limits what leaves the edge namespace (edge to server) to `rate`.
    fn throttle(&self, rate: &str) {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.edge,
                "tc",
                "qdisc",
                "add",
                "dev",
                &self.edge_dev,
            ])
            .args([
                "root", "tbf", "rate", rate, "burst", "64kb", "latency", "400ms",
            ])
            .output()
            .expect("tc runs");
        assert!(
            out.status.success(),
            "tc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["netns", "del", &self.edge]);
        let _ = ip(&["netns", "del", &self.server]);
    }
}

impl Link {
    /// Takes the veth pair down (both ends lose carrier) or up again.
    fn set(&self, up: bool) {
        ip(&[
            "-n",
            &self.edge,
            "link",
            "set",
            &self.edge_dev,
            if up { "up" } else { "down" },
        ])
        .expect("ip link set");
    }
}

/// Waits until `channel` on `host` has `n` subscribers (the bridge process
/// subscribed: what is published before that has no receiver).
fn wait_subscribed(host: &Host, channel: &str, n: usize) {
    assert!(
        wait_until(WAIT, || host.client.stat().is_ok_and(|s| s
            .channels
            .iter()
            .any(|c| c.name == channel && c.subscribers.len() == n))),
        "nobody subscribed to {channel}"
    );
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A bridge config: the edge one exports `channels` listening on its veth
/// address, the server one imports them connecting to it.
fn configs(
    a: &Host,
    b: &Host,
    link: &Link,
    exports: &str,
    imports: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let port = 7447;
    let mut ca = head("bridge-edge", a, None, None);
    ca = ca.replace(
        "listen = []",
        &format!("listen = [\"tcp/{}:{port}\"]", link.edge_ip),
    );
    let mut cb = head("bridge-server", b, None, None);
    cb = cb.replace(
        "connect = []",
        &format!("connect = [\"tcp/{}:{port}\"]", link.edge_ip),
    );
    let pa = a.file("edge.toml");
    let pb = b.file("server.toml");
    std::fs::write(&pa, format!("{ca}{exports}")).unwrap();
    std::fs::write(&pb, format!("{cb}{imports}")).unwrap();
    (pa, pb)
}

#[test]
fn thousand_tensors_cross_two_namespaces_unchanged() {
    let Some(mut link) = Link::new(1) else { return };
    let a = Host::start("netns", "edge", &["cam/raw"]);
    let b = Host::start("netns", "server", &["cam/in"]);
    let (pa, pb) = configs(
        &a,
        &b,
        &link,
        "[[export]]\nchannel = \"cam/raw\"\n",
        "[[import]]\nkey = \"tensorbus/cam/raw\"\nchannel = \"cam/in\"\n",
    );
    let consumer = b
        .client
        .consumer_with(
            "cam/in",
            ConsumerOptions::default().policy(Policy::Block).depth(32),
        )
        .unwrap();
    link.bridge(&link.edge.clone(), &pa);
    link.bridge(&link.server.clone(), &pb);
    wait_subscribed(&a, "cam/raw", 1);
    let producer = a.client.producer("cam/raw").unwrap();
    let sender = std::thread::spawn(move || {
        let mut rng = Rng(0xed9e);
        let mut sent = Vec::new();
        for i in 0..1000 {
            let meta = random_meta(&mut rng, i);
            let mut t = loop {
                match producer.loan_meta(meta) {
                    Ok(t) => break t,
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            rng.fill(t.as_mut_bytes());
            sent.push((
                t.dtype(),
                t.shape().to_vec(),
                read_back_strides(t.meta()),
                t.user_header().to_vec(),
                checksum(&t),
            ));
            t.publish().unwrap();
        }
        sent
    });
    let mut got = Vec::new();
    for i in 0..1000 {
        let t = consumer
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("tensor {i} never crossed: {e}"));
        got.push((
            t.dtype(),
            t.shape().to_vec(),
            read_back_strides(t.meta()),
            t.user_header().to_vec(),
            checksum(&t),
        ));
    }
    let sent = sender.join().unwrap();
    for (i, (s, g)) in sent.iter().zip(&got).enumerate() {
        assert_eq!(s, g, "tensor {i}");
    }
}

#[test]
fn plain_and_int8_routes_on_a_throttled_link() {
    const K: usize = 8;
    const RATE: &str = "20mbit";
    let Some(mut link) = Link::new(2) else { return };
    let a = Host::start("netns-tc", "edge", &["f/raw", "f/q8"]);
    let b = Host::start("netns-tc", "server", &["g/raw", "g/q8"]);
    let (pa, pb) = configs(
        &a,
        &b,
        &link,
        "[[export]]\nchannel = \"f/raw\"\n[[export]]\nchannel = \"f/q8\"\nquantize = \"int8\"\n",
        "[[import]]\nkey = \"tensorbus/f/raw\"\nchannel = \"g/raw\"\n\
         [[import]]\nkey = \"tensorbus/f/q8\"\nchannel = \"g/q8\"\n",
    );
    link.throttle(RATE);
    let opts = || ConsumerOptions::default().policy(Policy::Block).depth(32);
    let c_raw = b.client.consumer_with("g/raw", opts()).unwrap();
    let c_q8 = b.client.consumer_with("g/q8", opts()).unwrap();
    link.bridge(&link.edge.clone(), &pa);
    link.bridge(&link.server.clone(), &pb);
    wait_subscribed(&a, "f/raw", 1);
    wait_subscribed(&a, "f/q8", 1);
    // Warm up both routes (links, matching) with one tensor each.
    let values: Vec<f32> = (0..256 * 1024)
        .map(|k| ((k as f32) * 0.001).sin() * 8.0)
        .collect();
    let send = |channel: &str, n: usize| {
        let p = a.client.producer(channel).unwrap();
        for _ in 0..n {
            let mut t = p
                .loan_timeout(&[256, 1024], DType::F32, WAIT)
                .expect("a slot");
            t.as_mut_slice_of::<f32>().unwrap().copy_from_slice(&values);
            t.publish().unwrap();
        }
    };
    let mut timed = Vec::new();
    for (channel, consumer) in [("f/raw", &c_raw), ("f/q8", &c_q8)] {
        send(channel, 1);
        consumer.recv_timeout(WAIT).expect("warm-up tensor");
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| send(channel, K));
            for i in 0..K {
                let t = consumer
                    .recv_timeout(WAIT)
                    .unwrap_or_else(|e| panic!("{channel} tensor {i}: {e}"));
                let got = t.as_slice_of::<f32>().unwrap();
                let step = 16.0 / 255.0;
                assert!(
                    values.iter().zip(got).all(|(x, y)| (x - y).abs() <= step),
                    "{channel}: values beyond a quantization step"
                );
            }
        });
        timed.push(start.elapsed());
    }
    let mib = K as f64; // K tensors of 1 MiB of f32
    eprintln!(
        "thin link ({RATE} tbf between namespaces): {K} x 1 MiB f32: raw {:.2} s ({:.1} MiB/s), int8 {:.2} s ({:.1} MiB/s), {:.1}x faster",
        timed[0].as_secs_f64(),
        mib / timed[0].as_secs_f64(),
        timed[1].as_secs_f64(),
        mib / timed[1].as_secs_f64(),
        timed[0].as_secs_f64() / timed[1].as_secs_f64()
    );
}

/// Receives `n` more counters, each larger than the last (gaps allowed).
fn receive(consumer: &tensorbus::Consumer, n: usize, last: &mut Option<u64>) {
    for i in 0..n {
        let t = consumer
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("counter {i} of {n} never arrived: {e}"));
        let c = t.as_slice_of::<u64>().unwrap()[0];
        if let Some(prev) = *last {
            assert!(c > prev, "counter {c} after {prev}");
        }
        *last = Some(c);
    }
}

fn clients_named(host: &Host, name: &str) -> usize {
    host.client
        .stat()
        .map(|s| s.clients.iter().filter(|c| c.name == name).count())
        .unwrap_or(0)
}

/// A producer of u64 counters, one a millisecond, until `stop`.
fn feed(
    host: &Host,
    channel: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let producer = host.client.producer(channel).unwrap();
    std::thread::spawn(move || {
        let mut counter = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(mut t) = producer.loan_timeout(&[1], DType::U64, Duration::from_millis(100)) {
                t.as_mut_slice_of::<u64>().unwrap()[0] = counter;
                if t.wait_for_room(Duration::from_millis(100)) {
                    t.publish().unwrap();
                    counter += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
}

/// kill -9 of the edge bridge, then of the server bridge, each restarted in
/// its namespace: the stream over the veth pair resumes each time.
#[test]
fn kill_9_and_restart_across_namespaces_resumes() {
    let Some(mut link) = Link::new(4) else { return };
    let a = Host::start("netns-kill", "edge", &["k/src"]);
    let b = Host::start("netns-kill", "server", &["k/dst"]);
    let (pa, pb) = configs(
        &a,
        &b,
        &link,
        "[[export]]\nchannel = \"k/src\"\n",
        "[[import]]\nkey = \"tensorbus/k/src\"\nchannel = \"k/dst\"\n",
    );
    let consumer = b
        .client
        .consumer_with(
            "k/dst",
            ConsumerOptions::default()
                .policy(Policy::Block)
                .depth(64)
                .end_of_stream(false),
        )
        .unwrap();
    let (edge, server) = (link.edge.clone(), link.server.clone());
    let mut ea = link.bridge(&edge, &pa);
    let mut sb = link.bridge(&server, &pb);
    wait_subscribed(&a, "k/src", 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = feed(&a, "k/src", stop.clone());
    let mut last = None;
    receive(&consumer, 50, &mut last);
    link.kill9(ea);
    assert!(wait_until(WAIT, || clients_named(&a, "bridge-edge") == 0));
    ea = link.bridge(&edge, &pa);
    receive(&consumer, 50, &mut last);
    link.kill9(sb);
    assert!(wait_until(WAIT, || clients_named(&b, "bridge-server") == 0));
    sb = link.bridge(&server, &pb);
    receive(&consumer, 50, &mut last);
    assert_eq!(clients_named(&a, "bridge-edge"), 1);
    assert_eq!(clients_named(&b, "bridge-server"), 1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    feeder.join().unwrap();
    link.kill9(ea);
    link.kill9(sb);
}

/// The link goes down for longer than Zenoh's lease (1 s here), so both
/// bridges drop the session; when it comes back, the connecting bridge
/// reconnects and the stream resumes, with no bridge restarted.
#[test]
fn a_link_down_longer_than_the_lease_reconnects_and_resumes() {
    let Some(mut link) = Link::new(3) else { return };
    let a = Host::start("netns-down", "edge", &["c/src"]);
    let b = Host::start("netns-down", "server", &["c/dst"]);
    let lease = "[zenoh.settings]\n\"transport/link/tx/lease\" = 1000\n";
    let (pa, pb) = configs(
        &a,
        &b,
        &link,
        &format!("{lease}[[export]]\nchannel = \"c/src\"\n"),
        &format!("{lease}[[import]]\nkey = \"tensorbus/c/src\"\nchannel = \"c/dst\"\n"),
    );
    let consumer = b
        .client
        .consumer_with(
            "c/dst",
            ConsumerOptions::default()
                .policy(Policy::Block)
                .depth(64)
                .end_of_stream(false),
        )
        .unwrap();
    link.bridge(&link.edge.clone(), &pa);
    link.bridge(&link.server.clone(), &pb);
    wait_subscribed(&a, "c/src", 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = feed(&a, "c/src", stop.clone());
    let mut last = None;
    receive(&consumer, 50, &mut last);
    link.set(false);
    std::thread::sleep(Duration::from_secs(3));
    // Drain what arrived before the cut.
    while consumer.try_recv().is_ok() {}
    link.set(true);
    let before = Instant::now();
    receive(&consumer, 50, &mut last);
    eprintln!("resumed {:?} after the link came back", before.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    feeder.join().unwrap();
}
