//! Issue 17.4 (first increment): `tensorbus broker --metrics ADDR` serves
//! the numbers of `tensorbus stat` as OpenMetrics / Prometheus text at
//! `GET /metrics`; bad or silent clients do not stop later scrapes; a real
//! Prometheus scrapes it (skipped without /usr/bin/prometheus unless
//! TENSORBUS_REQUIRE_PROMETHEUS=1) and promtool accepts the output.
//! Deadlines only guard against hangs; nothing asserts on timing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tensorbus::{Client, ConsumerOptions, DType};

mod common;

use common::{temp_dir, text, wait_for_socket, wait_or_kill, KillOnDrop, BIN};

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Writes a config with one 32 x 4 KiB pool and the channel `cam` (plus
/// `extra` lines in `[broker]`).
fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("tensorbus.toml");
    std::fs::write(
        &path,
        format!(
            "[broker]\n{extra}\n[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 32\n[[channels]]\nname = \"cam\"\n"
        ),
    )
    .unwrap();
    path
}

/// Starts `tensorbus broker --config .. --socket .. ARGS` and waits for its socket.
fn broker(config: &Path, socket: &Path, args: &[&str]) -> KillOnDrop {
    let child = Command::new(BIN)
        .arg("broker")
        .arg("--config")
        .arg(config)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(child);
    wait_for_socket(&mut guard.0, socket);
    guard
}

/// An HTTP answer: status line, headers (lower-case names), body.
struct Answer {
    status: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` to `addr` and reads the answer to the end.
fn http(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The server may answer (431) and close before it read everything.
    let _ = s.write_all(request);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = text(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no blank line after the headers in {raw:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().to_owned();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let answer = Answer {
        status,
        headers,
        body: body.to_owned(),
    };
    if let Some(len) = answer.header("content-length") {
        assert_eq!(len.parse::<usize>().unwrap(), answer.body.len(), "{raw}");
    }
    answer
}

fn scrape(addr: SocketAddr) -> String {
    let a = http(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: test\r\nUser-Agent: metrics-test\r\n\r\n",
    );
    assert_eq!(a.status, "HTTP/1.1 200 OK", "{}", a.body);
    assert_eq!(
        a.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(a.header("connection"), Some("close"));
    a.body
}

/// The value of the sample `name{labels}` (labels exactly as rendered).
fn value(scrape: &str, sample: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

fn publish(p: &tensorbus::Producer, v: u8) {
    let mut t = p.loan(&[16], DType::U8).unwrap();
    t.fill(v);
    t.publish().unwrap();
}

#[test]
fn scrape_shows_the_stat_numbers_and_bad_clients_do_not_stop_it() {
    let dir = temp_dir("metrics-scrape");
    let socket = dir.join("broker.sock");
    // The config names one address, the flag another: the flag wins.
    let from_config = free_addr();
    let addr = free_addr();
    let cfg = config(&dir, &format!("metrics = \"{from_config}\""));
    let _broker = broker(&cfg, &socket, &["--metrics", &addr.to_string()]);
    assert!(
        TcpStream::connect(from_config).is_err(),
        "the config's metrics address {from_config} is served although --metrics overrides it"
    );

    let client = Client::connect_to(Some(&socket), "metrics \"test\"").unwrap();
    let consumer = client
        .consumer_with("cam", ConsumerOptions::default().depth(16))
        .unwrap();
    let producer = client.producer("cam").unwrap();
    const N: u8 = 10;
    for v in 0..N {
        publish(&producer, v);
    }
    for v in 0..N {
        assert_eq!(consumer.recv().unwrap()[0], v);
    }
    // One slot loaned and not published.
    let loan = producer.loan(&[16], DType::U8).unwrap();
    let stat = client.stat().unwrap();
    let me = stat.clients[0].id;
    let sub = stat.channels[0].subscribers[0].handle;

    let m = scrape(addr);
    let sub_labels =
        format!("{{channel=\"cam\",subscriber=\"{sub}\",client=\"{me}\",policy=\"block\"}}");
    let pid = std::process::id();
    let client_labels = format!("{{client=\"{me}\",name=\"metrics \\\"test\\\"\",pid=\"{pid}\"}}");
    let expect = [
        (
            "tensorbus_channel_published_total{channel=\"cam\",mode=\"broadcast\"}".to_owned(),
            f64::from(N),
        ),
        ("tensorbus_channel_producers{channel=\"cam\"}".into(), 1.0),
        ("tensorbus_channel_subscribers{channel=\"cam\"}".into(), 1.0),
        ("tensorbus_channel_ended{channel=\"cam\"}".into(), 0.0),
        (
            format!("tensorbus_subscriber_delivered_total{sub_labels}"),
            f64::from(N),
        ),
        (
            format!("tensorbus_subscriber_dropped_total{sub_labels}"),
            0.0,
        ),
        (
            format!("tensorbus_subscriber_queued_tensors{sub_labels}"),
            0.0,
        ),
        ("tensorbus_pool_slots{pool=\"p\"}".into(), 32.0),
        ("tensorbus_pool_free_slots{pool=\"p\"}".into(), 31.0),
        ("tensorbus_pool_loaned_slots{pool=\"p\"}".into(), 1.0),
        ("tensorbus_pool_in_flight_slots{pool=\"p\"}".into(), 0.0),
        ("tensorbus_pool_slot_size_bytes{pool=\"p\"}".into(), 4096.0),
        (format!("tensorbus_client_handles{client_labels}"), 2.0),
        (format!("tensorbus_client_held_slots{client_labels}"), 1.0),
        ("tensorbus_clients".into(), 1.0),
    ];
    for (sample, want) in &expect {
        assert_eq!(value(&m, sample), Some(*want), "{sample} in\n{m}");
    }
    assert!(
        m.contains("# TYPE tensorbus_channel_published_total counter\n"),
        "{m}"
    );
    assert!(
        m.contains("# TYPE tensorbus_pool_free_slots gauge\n"),
        "{m}"
    );
    assert!(m.contains("tensorbus_broker_info{pid=\""), "{m}");
    assert!(!m.contains("# EOF"), "{m}");
    drop(loan);

    // OpenMetrics when asked for.
    let om = http(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
    );
    assert_eq!(om.status, "HTTP/1.1 200 OK");
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(om
        .body
        .contains("# TYPE tensorbus_channel_published counter\n"));
    assert!(om
        .body
        .contains("tensorbus_channel_published_total{channel=\"cam\",mode=\"broadcast\"} 10\n"));

    // Bad clients: one that connects and says nothing (held open while the
    // others come), garbage, an oversized head, a wrong path and method, a
    // request cut short. Every one gets an answer or a close, and the
    // broker still serves the scrape after them.
    let silent = TcpStream::connect(addr).unwrap();
    let garbage = http(addr, b"\x00\xff\xfegarbage\r\n\r\n");
    assert!(
        garbage.status.starts_with("HTTP/1.1 400"),
        "{}",
        garbage.status
    );
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while big.len() < 64 << 10 {
        big.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let oversized = http(addr, &big);
    assert!(
        oversized.status.starts_with("HTTP/1.1 431"),
        "{}",
        oversized.status
    );
    let missing = http(addr, b"GET /other HTTP/1.1\r\n\r\n");
    assert!(
        missing.status.starts_with("HTTP/1.1 404"),
        "{}",
        missing.status
    );
    let post = http(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
    assert!(post.status.starts_with("HTTP/1.1 405"), "{}", post.status);
    {
        let mut cut = TcpStream::connect(addr).unwrap();
        cut.write_all(b"GET /metr").unwrap();
    }
    let m = scrape(addr);
    assert_eq!(
        value(&m, "tensorbus_pool_free_slots{pool=\"p\"}"),
        Some(32.0),
        "{m}"
    );
    drop(silent);
    let m = scrape(addr);
    assert!(
        m.contains("tensorbus_channel_published_total{channel=\"cam\",mode=\"broadcast\"} 10\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_address_in_use_is_a_startup_error_naming_it() {
    let dir = temp_dir("metrics-bind");
    let socket = dir.join("broker.sock");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .arg("broker")
        .arg("--config")
        .arg(config(&dir, ""))
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("cannot serve metrics on {addr}")),
        "{err}"
    );
    assert!(!socket.exists(), "the broker left its socket behind");
    let out = Command::new(BIN)
        .args(["broker", "--socket"])
        .arg(&socket)
        .args(["--metrics", "not-an-address"])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot serve metrics on not-an-address"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Finds `name` on PATH or in /usr/bin.
fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Percent-encodes a query parameter.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path_and_query` from Prometheus's HTTP API; the body, if it answered.
fn api(addr: SocketAddr, path_and_query: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = text(&raw);
    let (_, body) = raw.split_once("\r\n\r\n")?;
    Some(body.to_owned())
}

#[test]
fn a_real_prometheus_scrapes_the_broker_and_promtool_accepts_the_output() {
    let required = std::env::var_os("TENSORBUS_REQUIRE_PROMETHEUS").is_some_and(|v| v == "1");
    let (Some(prometheus), Some(promtool)) = (tool("prometheus"), tool("promtool")) else {
        assert!(
            !required,
            "TENSORBUS_REQUIRE_PROMETHEUS=1 but prometheus/promtool are not installed (scripts/setup.sh installs Debian's prometheus)"
        );
        eprintln!("SKIPPED: prometheus / promtool not found (apt-get install --no-install-recommends prometheus); set TENSORBUS_REQUIRE_PROMETHEUS=1 to make this a failure");
        return;
    };
    let dir = temp_dir("metrics-prometheus");
    let socket = dir.join("broker.sock");
    let metrics = free_addr();
    let _broker = broker(
        &config(&dir, ""),
        &socket,
        &["--metrics", &metrics.to_string()],
    );

    // Traffic: 300 tensors through one subscriber.
    let client = Client::connect_to(Some(&socket), "prometheus-test").unwrap();
    let consumer = client
        .consumer_with("cam", ConsumerOptions::default().depth(16))
        .unwrap();
    let producer = client.producer("cam").unwrap();
    for i in 0..300u32 {
        publish(&producer, i as u8);
        assert_eq!(consumer.recv().unwrap()[0], i as u8);
    }

    // promtool lints a scrape (Prometheus text format).
    let body = scrape(metrics);
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\non:\n{body}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // Prometheus scrapes every second (it asks for OpenMetrics first).
    let web = free_addr();
    let yml = dir.join("prometheus.yml");
    std::fs::write(
        &yml,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tensorbus\n    static_configs:\n      - targets: [\"{metrics}\"]\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut prom = KillOnDrop(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", yml.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let query = "/api/v1/query?query=tensorbus_channel_published_total%7Bchannel%3D%22cam%22%7D";
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    let found = loop {
        if let Some(status) = prom.0.try_wait().unwrap() {
            panic!(
                "prometheus exited ({status}):\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        if let Some(body) = api(web, query) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                let result = &v["data"]["result"];
                if let Some(sample) = result.get(0) {
                    break sample.clone();
                }
            }
            last = body;
        }
        if Instant::now() >= deadline {
            panic!(
                "prometheus never had tensorbus_channel_published_total; last answer {last}\ntargets: {}\nlog:\n{}",
                api(web, "/api/v1/targets").unwrap_or_default(),
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(found["value"][1], "300", "{found}");
    assert_eq!(found["metric"]["mode"], "broadcast", "{found}");
    assert_eq!(found["metric"]["job"], "tensorbus", "{found}");
    // The subscriber's counter too, and the scrape was healthy.
    let q = "/api/v1/query?query=tensorbus_subscriber_delivered_total";
    let v: serde_json::Value = serde_json::from_str(&api(web, q).unwrap()).unwrap();
    assert_eq!(v["data"]["result"][0]["value"][1], "300", "{v}");
    let v: serde_json::Value =
        serde_json::from_str(&api(web, "/api/v1/query?query=up").unwrap()).unwrap();
    assert_eq!(v["data"]["result"][0]["value"][1], "1", "{v}");
    // Issue 17.4: the p99 of the channel's publish-to-receive latency, from
    // the shared-memory histograms, computed by Prometheus.
    let promql = "histogram_quantile(0.99, sum by (le) (tensorbus_subscriber_latency_seconds_bucket{channel=\"cam\"}))";
    let q = format!("/api/v1/query?query={}", url_encode(promql));
    let v: serde_json::Value = serde_json::from_str(&api(web, &q).unwrap()).unwrap();
    let p99: f64 = v["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .parse()
        .unwrap();
    assert!(p99 > 0.0 && p99 < 10.0, "p99 {p99} s: {v}");
    let q = format!(
        "/api/v1/query?query={}",
        url_encode("tensorbus_subscriber_latency_seconds_count{channel=\"cam\"}")
    );
    let v: serde_json::Value = serde_json::from_str(&api(web, &q).unwrap()).unwrap();
    // 300 receives, every 16th sampled (the default).
    assert_eq!(v["data"]["result"][0]["value"][1], "18", "{v}");
    eprintln!("prometheus: histogram_quantile(0.99) of channel cam = {p99} s");
    let _ = prom.0.kill();
    wait_or_kill(&mut prom.0, Duration::from_secs(30), "prometheus");
    let _ = std::fs::remove_dir_all(&dir);
}
