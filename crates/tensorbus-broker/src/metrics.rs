//! The broker's metrics endpoint: the numbers of `tensorbus stat` in the
//! OpenMetrics / Prometheus text exposition format, served over HTTP
//! (`GET /metrics`) from a thread of the broker process.
//!
//! The broker's state lives on its event-loop thread and is never shared.
//! A scrape asks the event loop for a fresh [`StatReport`] over a channel
//! (the event loop answers between two polls, within its idle tick of
//! ~50 ms) and renders it on the metrics thread. This was chosen over the
//! event loop publishing a snapshot every tick because a snapshot walks
//! every slot header of every pool (a million slots take milliseconds): it
//! then costs the broker only when someone scrapes, and a scrape sees the
//! counters as they are at that moment, not up to a tick old.
//!
//! The HTTP side is a minimal HTTP/1.1 responder on `std::net`: it reads
//! the request line and headers up to a blank line ([`MAX_REQUEST_HEAD`]
//! bytes at most, [`CLIENT_TIMEOUT`] in all per connection), answers one
//! request per connection (`Connection: close`) and serves connections one
//! at a time; a silent or slow client delays other scrapes by at most
//! [`CLIENT_TIMEOUT`]. Bad input gets a 4xx answer or a closed connection,
//! never a panic.

use crate::server::StartError;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus_core::proto::StatReport;

/// The largest request line plus headers a scrape may send (bigger: 431).
pub const MAX_REQUEST_HEAD: usize = 8 << 10;

/// How long one connection may take to send its request and take the
/// answer; a client that is slower is dropped.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Content type of the OpenMetrics text format (sent when the request's
/// `Accept` header names `application/openmetrics-text`).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of the Prometheus text format 0.0.4 (the default).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A scrape's request to the event loop: where to send the snapshot.
pub(crate) type SnapshotRequest = SyncSender<StatReport>;

/// Binds the metrics endpoint's TCP listener at `addr` (`HOST:PORT`, e.g.
/// `127.0.0.1:9464`; port 0 picks a free one). Bind it before
/// [`crate::Broker::bind`] so that a bad address fails before the broker
/// creates its socket; then hand it to [`crate::Broker::serve_metrics`].
pub fn bind(addr: &str) -> Result<TcpListener, StartError> {
    let err = |source: std::io::Error| StartError::Metrics {
        addr: addr.to_owned(),
        source,
    };
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(err)?.collect();
    if addrs.is_empty() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )));
    }
    TcpListener::bind(&addrs[..]).map_err(err)
}

/// The running metrics thread; dropping it stops the thread (within
/// ~100 ms plus a connection being served).
pub(crate) struct MetricsServer {
    /// Scrapes waiting for a snapshot.
    pub(crate) requests: Receiver<SnapshotRequest>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Starts serving `listener` on a new thread.
    pub(crate) fn start(listener: TcpListener) -> Result<MetricsServer, StartError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tensorbus-metrics".into())
            .spawn(move || serve(&listener, &tx, &flag))
            .map_err(StartError::Thread)?;
        Ok(MetricsServer {
            requests: rx,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts and answers connections one at a time until `stop`.
fn serve(listener: &TcpListener, requests: &Sender<SnapshotRequest>, stop: &AtomicBool) {
    let mut ready = [tensorbus_shm::Ready::default()];
    while !stop.load(Ordering::Relaxed) {
        let fds = [(listener.as_fd(), false)];
        match tensorbus_shm::poll_ready(&fds, &mut ready, Some(Duration::from_millis(100))) {
            Ok(n) if n > 0 && ready[0].read => {}
            Ok(_) => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if let Ok((stream, _)) = listener.accept() {
            // Errors are the client's problem (it went away, it was too slow).
            let _ = answer(stream, requests);
        }
    }
}

/// What a request asked for.
#[derive(Debug, PartialEq)]
enum Parsed {
    /// `GET /metrics` (`head`: HEAD instead of GET).
    Metrics { openmetrics: bool, head: bool },
    /// An error answer: status line and text.
    Error(&'static str, &'static str),
}

/// Parses a request head (request line and headers, without the blank line).
fn parse_head(head: &[u8]) -> Parsed {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Error("400 Bad Request", "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Parsed::Error("400 Bad Request", "only HTTP/1.x is served\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Parsed::Error("405 Method Not Allowed", "only GET /metrics is served\n"),
    };
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Parsed::Error("404 Not Found", "only GET /metrics is served\n");
    }
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value
                    .to_ascii_lowercase()
                    .contains("application/openmetrics-text")
        })
    });
    Parsed::Metrics {
        openmetrics,
        head: head_only,
    }
}

/// Where the request head ends in `buf` (the index after the blank line).
fn head_end(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some((i, i + 4))
        } else if buf[i..].starts_with(b"\n\n") {
            Some((i, i + 2))
        } else {
            None
        }
    })
}

/// Reads one request from `stream` and answers it.
fn answer(mut stream: TcpStream, requests: &Sender<SnapshotRequest>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))
    };
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let parsed = loop {
        if let Some((end, _)) = head_end(&buf) {
            break parse_head(&buf[..end]);
        }
        if buf.len() > MAX_REQUEST_HEAD {
            break Parsed::Error(
                "431 Request Header Fields Too Large",
                "the request head is over 8 KiB\n",
            );
        }
        stream.set_read_timeout(Some(remaining()?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(());
            }
            break Parsed::Error(
                "400 Bad Request",
                "the request ended before its blank line\n",
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (status, content_type, body, head) = match parsed {
        Parsed::Error(status, text) => (status, "text/plain; charset=utf-8", text.into(), false),
        Parsed::Metrics { openmetrics, head } => match snapshot(requests) {
            Some(report) => (
                "200 OK",
                if openmetrics {
                    OPENMETRICS_CONTENT_TYPE
                } else {
                    PROMETHEUS_CONTENT_TYPE
                },
                render(&report, openmetrics),
                head,
            ),
            None => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                "the broker's event loop did not answer\n".into(),
                head,
            ),
        },
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes())?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Closing with unread input (an error answer may leave some, e.g. the
    // rest of an oversized head) would reset the connection, and the client
    // could lose the answer: read what it still sends (bounded in bytes and
    // by the connection's deadline) before closing. A good request has been
    // read whole: its connection closes at once.
    let mut drained = if status.starts_with('2') {
        MAX_DRAIN
    } else {
        0
    };
    while drained < MAX_DRAIN {
        let Ok(left) = remaining() else { break };
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

/// How much unread input a connection may still send after its answer.
const MAX_DRAIN: usize = 1 << 20;

/// Asks the event loop for a snapshot; None if it is gone or does not
/// answer within [`CLIENT_TIMEOUT`].
fn snapshot(requests: &Sender<SnapshotRequest>) -> Option<StatReport> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    requests.send(tx).ok()?;
    rx.recv_timeout(CLIENT_TIMEOUT).ok()
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Builds the exposition text family by family.
struct Out {
    text: String,
    openmetrics: bool,
}

impl Out {
    /// Starts a family: `name` is the sample name (counters end in `_total`;
    /// OpenMetrics names the family without it).
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let family = if self.openmetrics {
            match kind {
                "counter" => name.strip_suffix("_total").unwrap_or(name),
                "info" => name.strip_suffix("_info").unwrap_or(name),
                _ => name,
            }
        } else {
            name
        };
        let kind = if !self.openmetrics && kind == "info" {
            "gauge"
        } else {
            kind
        };
        let _ = writeln!(self.text, "# HELP {family} {help}");
        let _ = writeln!(self.text, "# TYPE {family} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// The subscribers' publish-to-receive latency histograms
/// (`tensorbus_subscriber_latency_seconds`, `_bucket`/`_sum`/`_count`): the
/// shared-memory buckets merged in pairs (bounds at 2^k and 1.5 x 2^k
/// nanoseconds, 128 ns to ~17 s, then `+Inf`), cumulative as the formats
/// require. The counts are samples (every `latency_sample_every`-th receive).
fn latency_histograms(o: &mut Out, report: &StatReport) {
    use tensorbus_core::latency::{upper_bound_ns, BUCKETS};
    let name = "tensorbus_subscriber_latency_seconds";
    o.family(
        name,
        "histogram",
        "Publish-to-receive latency of sampled receives (every [broker] latency_sample_every-th).",
    );
    for c in &report.channels {
        for s in &c.subscribers {
            let Some(l) = &s.latency else { continue };
            let handle = s.handle.to_string();
            let client = s.client.to_string();
            let mut counts = [0u64; BUCKETS];
            for &(i, n) in &l.buckets {
                if let Some(x) = counts.get_mut(i as usize) {
                    *x = n;
                }
            }
            let mut cumulative = 0u64;
            for (i, n) in counts.iter().enumerate().take(BUCKETS - 1) {
                cumulative += n;
                // Every other bound: 128 ns, then 1.5 x 2^k and 2^k.
                if i % 2 == 0 {
                    let le = format!("{}", upper_bound_ns(i) as f64 / 1e9);
                    let bucket = format!("{name}_bucket");
                    o.sample(
                        &bucket,
                        &[
                            ("channel", &c.name),
                            ("subscriber", &handle),
                            ("client", &client),
                            ("policy", &s.policy),
                            ("le", &le),
                        ],
                        cumulative,
                    );
                }
            }
            let labels = [
                ("channel", c.name.as_str()),
                ("subscriber", &handle),
                ("client", &client),
                ("policy", &s.policy),
            ];
            let mut inf = labels.to_vec();
            inf.push(("le", "+Inf"));
            // The snapshot may catch the writer between a bucket and the
            // count: the total is never less than the buckets below it.
            let total = l.samples.max(cumulative + counts[BUCKETS - 1]);
            o.sample(&format!("{name}_bucket"), &inf, total);
            o.sample(&format!("{name}_sum"), &labels, l.sum_ns as f64 / 1e9);
            o.sample(&format!("{name}_count"), &labels, total);
        }
    }
}

/// Renders `report` in the OpenMetrics text format (`openmetrics`, ending
/// in `# EOF`) or the Prometheus text format 0.0.4.
pub fn render(report: &StatReport, openmetrics: bool) -> String {
    let mut o = Out {
        text: String::with_capacity(4096),
        openmetrics,
    };
    let pid = report.broker_pid.to_string();
    o.family(
        "tensorbus_broker_info",
        "info",
        "The broker process (value 1).",
    );
    o.sample("tensorbus_broker_info", &[("pid", &pid)], 1);

    type PoolField = fn(&tensorbus_core::proto::PoolStat) -> u64;
    let pool_families: [(&str, &str, PoolField); 5] = [
        ("tensorbus_pool_slots", "Slots in the pool.", |p| {
            p.slots_total.into()
        }),
        ("tensorbus_pool_free_slots", "Slots nobody holds.", |p| {
            p.slots_free.into()
        }),
        (
            "tensorbus_pool_loaned_slots",
            "Slots held only by producers (loaned, not yet published).",
            |p| p.loaned.into(),
        ),
        (
            "tensorbus_pool_in_flight_slots",
            "Slots held by at least one subscriber (queued or being read) or the history.",
            |p| p.in_flight.into(),
        ),
        (
            "tensorbus_pool_slot_size_bytes",
            "Payload bytes per slot.",
            |p| p.slot_size,
        ),
    ];
    for (name, help, value) in pool_families {
        o.family(name, "gauge", help);
        for p in &report.pools {
            o.sample(name, &[("pool", &p.name)], value(p));
        }
    }
    // How size classes run dry (issue 17.1).
    let dry_families: [(&str, &str, &str, PoolField); 4] = [
        (
            "tensorbus_pool_high_water_slots",
            "gauge",
            "Most slots held at once since the broker started (sampled every 100 ms and at every scrape).",
            |p| p.high_water.into(),
        ),
        (
            "tensorbus_pool_loans_refused_total",
            "counter",
            "Loans refused because every pool that fits was full, counted against the tensor's size class (the smallest pool that fits).",
            |p| p.loans_refused,
        ),
        (
            "tensorbus_pool_loans_spilled_total",
            "counter",
            "Loans of this size class served by a larger pool because this one was full.",
            |p| p.loans_spilled,
        ),
        (
            "tensorbus_pool_starving",
            "gauge",
            "1 while this size class runs dry (refused or spilled loans in the last second) while another pool has at least half of its slots free.",
            |p| p.starving.into(),
        ),
    ];
    for (name, kind, help, value) in dry_families {
        o.family(name, kind, help);
        for p in &report.pools {
            o.sample(name, &[("pool", &p.name)], value(p));
        }
    }

    o.family(
        "tensorbus_channel_published_total",
        "counter",
        "Tensors published on the channel.",
    );
    for c in &report.channels {
        o.sample(
            "tensorbus_channel_published_total",
            &[("channel", &c.name), ("mode", &c.mode)],
            c.published,
        );
    }
    type ChannelField = fn(&tensorbus_core::proto::ChannelStat) -> u64;
    let channel_families: [(&str, &str, ChannelField); 6] = [
        (
            "tensorbus_channel_producers",
            "Open producer handles.",
            |c| c.producers.into(),
        ),
        ("tensorbus_channel_subscribers", "Open subscribers.", |c| {
            c.subscribers.len() as u64
        }),
        (
            "tensorbus_channel_history_tensors",
            "Tensors the channel keeps for late subscribers (its configured history).",
            |c| c.history.into(),
        ),
        (
            "tensorbus_channel_history_held_tensors",
            "Tensors the channel's history holds now.",
            |c| c.history_held.into(),
        ),
        (
            "tensorbus_channel_ended",
            "1 when the channel's last producer closed cleanly (end of stream), else 0.",
            |c| c.ended.into(),
        ),
        (
            "tensorbus_channel_pending",
            "1 while no producer has declared the channel yet (consumers wait for it), else 0.",
            |c| c.pending.into(),
        ),
    ];
    for (name, help, value) in channel_families {
        o.family(name, "gauge", help);
        for c in &report.channels {
            o.sample(name, &[("channel", &c.name)], value(c));
        }
    }

    type SubField = fn(&tensorbus_core::proto::SubscriberStat) -> u64;
    let sub_families: [(&str, &str, &str, SubField); 4] = [
        (
            "tensorbus_subscriber_delivered_total",
            "counter",
            "Tensors the subscriber received.",
            |s| s.delivered,
        ),
        (
            "tensorbus_subscriber_dropped_total",
            "counter",
            "Tensors the subscriber's policy dropped.",
            |s| s.dropped,
        ),
        (
            "tensorbus_subscriber_queued_tensors",
            "gauge",
            "Tensors waiting in the subscriber's rings.",
            |s| s.queued,
        ),
        (
            "tensorbus_subscriber_depth_tensors",
            "gauge",
            "The subscriber's ring depth.",
            |s| s.depth.into(),
        ),
    ];
    for (name, kind, help, value) in sub_families {
        o.family(name, kind, help);
        for c in &report.channels {
            for s in &c.subscribers {
                let handle = s.handle.to_string();
                let client = s.client.to_string();
                o.sample(
                    name,
                    &[
                        ("channel", &c.name),
                        ("subscriber", &handle),
                        ("client", &client),
                        ("policy", &s.policy),
                    ],
                    value(s),
                );
            }
        }
    }

    latency_histograms(&mut o, report);

    type ClientField = fn(&tensorbus_core::proto::ClientStat) -> f64;
    let client_families: [(&str, &str, ClientField); 3] = [
        (
            "tensorbus_client_handles",
            "Open handles of the client.",
            |c| c.handles.into(),
        ),
        (
            "tensorbus_client_held_slots",
            "Slots any handle of the client holds.",
            |c| c.holds.into(),
        ),
        (
            "tensorbus_client_oldest_hold_seconds",
            "Age of the client's oldest hold (0: it holds nothing).",
            |c| c.oldest_hold_ms as f64 / 1000.0,
        ),
    ];
    for (name, help, value) in client_families {
        o.family(name, "gauge", help);
        for c in &report.clients {
            let id = c.id.to_string();
            let pid = c.pid.to_string();
            o.sample(
                name,
                &[("client", &id), ("name", &c.name), ("pid", &pid)],
                value(c),
            );
        }
    }
    o.family(
        "tensorbus_clients",
        "gauge",
        "Connected (admitted) clients.",
    );
    o.sample("tensorbus_clients", &[], report.clients.len());
    o.family(
        "tensorbus_handles_open",
        "gauge",
        "Holder handles open in the broker (producers, subscribers, stage halves, channel histories).",
    );
    o.sample("tensorbus_handles_open", &[], report.handles_open);
    o.family(
        "tensorbus_handles_max",
        "gauge",
        "The broker's [limits] max_handles: opens past it fail.",
    );
    o.sample("tensorbus_handles_max", &[], report.max_handles);
    o.family(
        "tensorbus_leaked_holds",
        "gauge",
        "Holds older than [broker] leak_threshold_ms, by holder and kind (loaned, queued, received).",
    );
    let mut leaks: std::collections::BTreeMap<(u32, &str, i32, &str, &str), u32> =
        std::collections::BTreeMap::new();
    for l in &report.leaks {
        *leaks
            .entry((
                l.client,
                l.name.as_str(),
                l.pid,
                l.channel.as_str(),
                l.kind.as_str(),
            ))
            .or_default() += 1;
    }
    for ((client, name, pid, channel, kind), n) in leaks {
        let (client, pid) = (client.to_string(), pid.to_string());
        o.sample(
            "tensorbus_leaked_holds",
            &[
                ("client", &client),
                ("name", name),
                ("pid", &pid),
                ("channel", channel),
                ("kind", kind),
            ],
            n,
        );
    }
    o.family(
        "tensorbus_holds_over_threshold",
        "gauge",
        "All holds older than [broker] leak_threshold_ms (the per-holder family lists at most 256).",
    );
    o.sample("tensorbus_holds_over_threshold", &[], report.leaks_total);
    let a = report.adoption.clone().unwrap_or_default();
    o.family(
        "tensorbus_bus_adoptions",
        "gauge",
        "Times a restarted broker adopted this bus (0: this broker created it).",
    );
    o.sample("tensorbus_bus_adoptions", &[], a.adoptions);
    o.family(
        "tensorbus_adoption_clients",
        "gauge",
        "Clients of the broker that died, by what became of them (adopted, refused, waiting).",
    );
    o.sample(
        "tensorbus_adoption_clients",
        &[("state", "adopted")],
        a.adopted_clients,
    );
    o.sample(
        "tensorbus_adoption_clients",
        &[("state", "refused")],
        a.refused_clients,
    );
    o.sample(
        "tensorbus_adoption_clients",
        &[("state", "waiting")],
        a.waiting_clients,
    );
    if openmetrics {
        o.text.push_str("# EOF\n");
    }
    o.text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorbus_core::proto::{ChannelStat, ClientStat, PoolStat, SubscriberStat};

    fn report() -> StatReport {
        StatReport {
            broker_pid: 42,
            pools: vec![PoolStat {
                name: "frames".into(),
                slot_size: 4096,
                slots_total: 8,
                slots_free: 5,
                loaned: 1,
                in_flight: 2,
                high_water: 6,
                loans_refused: 3,
                loans_spilled: 4,
                starving: true,
            }],
            channels: vec![ChannelStat {
                name: "cam".into(),
                mode: "broadcast".into(),
                published: 7,
                producers: 1,
                subscribers: vec![SubscriberStat {
                    handle: 3,
                    client: 2,
                    policy: "block".into(),
                    depth: 8,
                    delivered: 6,
                    dropped: 1,
                    queued: 0,
                    latency: Some(tensorbus_core::proto::LatencyStat {
                        sample_every: 1,
                        samples: 3,
                        sum_ns: 3_000,
                        p50_ns: 1024,
                        p99_ns: 1024,
                        p999_ns: 1024,
                        buckets: vec![(12, 3)],
                    }),
                }],
                ..ChannelStat::default()
            }],
            clients: vec![ClientStat {
                id: 2,
                pid: 99,
                uid: 0,
                name: "a \"b\"\\c\nd".into(),
                handles: 1,
                holds: 2,
                adopted: false,
                oldest_hold_ms: 7000,
            }],
            leaks: vec![tensorbus_core::proto::LeakStat {
                client: 2,
                name: "a".into(),
                pid: 99,
                handle: 3,
                channel: "cam".into(),
                kind: "received".into(),
                pool: "frames".into(),
                slot: 4,
                seq: 9,
                age_ms: 7000,
            }],
            leaks_total: 1,
            handles_open: 3,
            max_handles: 1024,
            ..StatReport::default()
        }
    }

    #[test]
    fn prometheus_text() {
        let t = render(&report(), false);
        assert!(t.contains("\ntensorbus_handles_open 3\n"), "{t}");
        assert!(
            t.contains("\ntensorbus_leaked_holds{client=\"2\",name=\"a\",pid=\"99\",channel=\"cam\",kind=\"received\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("\ntensorbus_holds_over_threshold 1\n"), "{t}");
        // Bucket 12 ends at 1024 ns: cumulative 0 below, 3 from there on.
        let lab = "channel=\"cam\",subscriber=\"3\",client=\"2\",policy=\"block\"";
        assert!(
            t.contains(&format!(
                "\ntensorbus_subscriber_latency_seconds_bucket{{{lab},le=\"0.000000768\"}} 0\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "\ntensorbus_subscriber_latency_seconds_bucket{{{lab},le=\"0.000001024\"}} 3\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "\ntensorbus_subscriber_latency_seconds_bucket{{{lab},le=\"+Inf\"}} 3\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "\ntensorbus_subscriber_latency_seconds_count{{{lab}}} 3\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "\ntensorbus_subscriber_latency_seconds_sum{{{lab}}} 0.000003\n"
            )),
            "{t}"
        );
        assert!(t.contains("\ntensorbus_handles_max 1024\n"), "{t}");
        assert!(
            t.contains("# TYPE tensorbus_channel_published_total counter\n"),
            "{t}"
        );
        assert!(
            t.contains("tensorbus_channel_published_total{channel=\"cam\",mode=\"broadcast\"} 7\n")
        );
        assert!(t.contains("tensorbus_subscriber_delivered_total{channel=\"cam\",subscriber=\"3\",client=\"2\",policy=\"block\"} 6\n"));
        assert!(t.contains("tensorbus_pool_free_slots{pool=\"frames\"} 5\n"));
        assert!(t.contains("tensorbus_pool_high_water_slots{pool=\"frames\"} 6\n"));
        assert!(t.contains("tensorbus_pool_loans_refused_total{pool=\"frames\"} 3\n"));
        assert!(t.contains("tensorbus_pool_loans_spilled_total{pool=\"frames\"} 4\n"));
        assert!(t.contains("tensorbus_pool_starving{pool=\"frames\"} 1\n"));
        assert!(
            t.contains("# TYPE tensorbus_broker_info gauge\ntensorbus_broker_info{pid=\"42\"} 1\n")
        );
        assert!(t.contains(r#"name="a \"b\"\\c\nd""#), "{t}");
        assert!(!t.contains("# EOF"));
        // Every sample's family has HELP and TYPE.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let sample = line.split(['{', ' ']).next().unwrap();
            // A histogram's samples belong to the family without the suffix.
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| sample.strip_suffix(s))
                .filter(|f| t.contains(&format!("# TYPE {f} histogram")))
                .unwrap_or(sample);
            assert!(t.contains(&format!("# TYPE {name} ")), "{name} has no TYPE");
            assert!(t.contains(&format!("# HELP {name} ")), "{name} has no HELP");
        }
    }

    #[test]
    fn openmetrics_text() {
        let t = render(&report(), true);
        assert!(t.ends_with("\n# EOF\n") || t.ends_with("# EOF\n"));
        assert!(
            t.contains("# TYPE tensorbus_channel_published counter\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE tensorbus_broker info\ntensorbus_broker_info{pid=\"42\"} 1\n"));
    }

    #[test]
    fn request_heads() {
        let m = |openmetrics| Parsed::Metrics {
            openmetrics,
            head: false,
        };
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost: x"), m(false));
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.0\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            m(true)
        );
        assert!(
            matches!(parse_head(b"GET / HTTP/1.1"), Parsed::Error(s, _) if s.starts_with("404"))
        );
        assert!(
            matches!(parse_head(b"POST /metrics HTTP/1.1"), Parsed::Error(s, _) if s.starts_with("405"))
        );
        assert!(
            matches!(parse_head(b"\xff\xfe garbage"), Parsed::Error(s, _) if s.starts_with("400"))
        );
        assert!(matches!(parse_head(b""), Parsed::Error(s, _) if s.starts_with("400")));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some((14, 18)));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some((14, 16)));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
