//! The running bridge: one Zenoh session, one tensorbus client, a thread
//! per export route and a subscriber plus a thread per import route.

use crate::config::{Compression, Config, ExportRoute, ImportRoute, Quantize, RoutePolicy};
use crate::encoding;
use crate::wire::{self, WireError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tensorbus::error::{LoanError, RecvError};
use tensorbus::{Client, ConsumerOptions, Producer, ProducerOptions, Tensor, TensorView};
use zenoh::bytes::ZBytes;
use zenoh::qos::CongestionControl;
use zenoh::sample::Sample;
use zenoh::Wait;

/// Which way a route carries tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Local channel to Zenoh.
    Export,
    /// Zenoh to local channel.
    Import,
}

impl Direction {
    /// `export` or `import`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Export => "export",
            Direction::Import => "import",
        }
    }
}

/// Live counters of one route.
#[derive(Debug)]
pub struct RouteStats {
    /// Which way.
    pub direction: Direction,
    /// The local channel.
    pub channel: String,
    /// The key expression.
    pub key: String,
    /// The route's policy.
    pub policy: RoutePolicy,
    samples: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    malformed: AtomicU64,
    errors: AtomicU64,
    raw_bytes: AtomicU64,
    /// f64 bits of the largest quantization error (one writer: the route's thread).
    quant_max_abs_err: AtomicU64,
    /// f64 bits of the sum of squared quantization errors.
    quant_sum_sq_err: AtomicU64,
    quant_count: AtomicU64,
}

/// A copy of one route's counters.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSnapshot {
    /// Which way.
    pub direction: Direction,
    /// The local channel.
    pub channel: String,
    /// The key expression.
    pub key: String,
    /// The route's policy.
    pub policy: RoutePolicy,
    /// Tensors carried (export: put to Zenoh; import: published locally).
    pub samples: u64,
    /// Payload plus attachment bytes of those tensors (Zenoh's own framing
    /// not included).
    pub bytes: u64,
    /// Tensors dropped by the route's policy (export: the bridge's local
    /// subscription, as the broker counts it; import: the queue between
    /// Zenoh and the local channel).
    pub dropped: u64,
    /// Import: samples refused as malformed (bad attachment, wrong payload
    /// length, a tensor that fits no slot of the channel).
    pub malformed: u64,
    /// Failures of Zenoh or the broker (put, loan, receive errors).
    pub errors: u64,
    /// What `bytes` would have been without quantizing and compressing
    /// (the tensors' own bytes plus attachments); equal to `bytes` on a
    /// plain route.
    pub raw_bytes: u64,
    /// Export routes that quantize: the largest absolute difference between
    /// a finite element and what the far side gets back.
    pub quant_max_abs_err: f64,
    /// Export routes that quantize: root mean square of those differences.
    pub quant_rmse: f64,
}

impl std::fmt::Display for RouteSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {}: samples={} bytes={} raw_bytes={} dropped={} malformed={} errors={}",
            self.direction.name(),
            self.channel,
            if self.direction == Direction::Export {
                "->"
            } else {
                "<-"
            },
            self.key,
            self.samples,
            self.bytes,
            self.raw_bytes,
            self.dropped,
            self.malformed,
            self.errors
        )?;
        if self.quant_rmse > 0.0 || self.quant_max_abs_err > 0.0 {
            write!(
                f,
                " quant_max_abs_err={:.6} quant_rmse={:.6}",
                self.quant_max_abs_err, self.quant_rmse
            )?;
        }
        Ok(())
    }
}

impl RouteStats {
    fn new(direction: Direction, channel: String, key: String, policy: RoutePolicy) -> Self {
        RouteStats {
            direction,
            channel,
            key,
            policy,
            samples: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            raw_bytes: AtomicU64::new(0),
            quant_max_abs_err: AtomicU64::new(0),
            quant_sum_sq_err: AtomicU64::new(0),
            quant_count: AtomicU64::new(0),
        }
    }

    /// Adds one tensor's quantization error (called by the route's one thread).
    fn add_quant_error(&self, max_abs: f64, sum_sq: f64, count: u64) {
        if count == 0 {
            return;
        }
        let max = f64::from_bits(self.quant_max_abs_err.load(Ordering::Relaxed)).max(max_abs);
        self.quant_max_abs_err
            .store(max.to_bits(), Ordering::Relaxed);
        let sum = f64::from_bits(self.quant_sum_sq_err.load(Ordering::Relaxed)) + sum_sq;
        self.quant_sum_sq_err
            .store(sum.to_bits(), Ordering::Relaxed);
        self.quant_count.fetch_add(count, Ordering::Relaxed);
    }

    /// A copy of the counters now.
    pub fn snapshot(&self) -> RouteSnapshot {
        RouteSnapshot {
            direction: self.direction,
            channel: self.channel.clone(),
            key: self.key.clone(),
            policy: self.policy,
            samples: self.samples.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            raw_bytes: self.raw_bytes.load(Ordering::Relaxed),
            quant_max_abs_err: f64::from_bits(self.quant_max_abs_err.load(Ordering::Relaxed)),
            quant_rmse: {
                let n = self.quant_count.load(Ordering::Relaxed);
                if n == 0 {
                    0.0
                } else {
                    (f64::from_bits(self.quant_sum_sq_err.load(Ordering::Relaxed)) / n as f64)
                        .sqrt()
                }
            },
        }
    }
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The broker could not be reached.
    #[error("cannot connect to the tensorbus broker: {0}")]
    Connect(#[from] tensorbus::error::ConnectError),
    /// A route's local channel could not be opened.
    #[error("{direction} route of channel {channel:?}: {source}")]
    Open {
        /// `export` or `import`.
        direction: &'static str,
        /// The channel.
        channel: String,
        /// Why.
        source: tensorbus::error::OpenError,
    },
    /// Zenoh refused the config, the session, a publisher or subscriber.
    #[error("zenoh: {0}")]
    Zenoh(String),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

fn zerr(e: impl std::fmt::Display) -> StartError {
    StartError::Zenoh(e.to_string())
}

/// Writes one log line to stderr.
pub(crate) fn log(name: &str, msg: std::fmt::Arguments<'_>) {
    eprintln!("tensorbus-bridge[{name}]: {msg}");
}

/// Whether the `n`th occurrence of something is logged: the first 20,
/// then every power of two (a flood of bad samples cannot flood the log).
fn worth_logging(n: u64) -> bool {
    n <= 20 || n.is_power_of_two()
}

fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A running bridge. Dropping it stops it (see [`Bridge::shutdown`]).
pub struct Bridge {
    name: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    routes: Vec<Arc<RouteStats>>,
    subscribers: Vec<zenoh::pubsub::Subscriber<()>>,
    queues: Vec<Arc<Queue>>,
    session: Option<zenoh::Session>,
    _client: Option<Client>,
}

/// The Zenoh config the `[zenoh]` section describes.
pub fn zenoh_config(c: &Config) -> Result<zenoh::Config, StartError> {
    let mut z = zenoh::Config::default();
    fn json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String, StartError> {
        serde_json::to_string(v).map_err(zerr)
    }
    z.insert_json5("mode", &json(&c.zenoh.mode)?)
        .map_err(zerr)?;
    z.insert_json5("listen/endpoints", &json(&c.zenoh.listen)?)
        .map_err(zerr)?;
    z.insert_json5("connect/endpoints", &json(&c.zenoh.connect)?)
        .map_err(zerr)?;
    z.insert_json5("scouting/multicast/enabled", &json(&c.zenoh.scouting)?)
        .map_err(zerr)?;
    for (key, value) in &c.zenoh.settings {
        z.insert_json5(key, &json(value)?)
            .map_err(|e| StartError::Zenoh(format!("[zenoh] settings {key:?}: {e}")))?;
    }
    Ok(z)
}

impl Bridge {
    /// Connects to the broker and to Zenoh and starts every route. Returns
    /// once every route's local channel is open and its Zenoh publisher or
    /// subscriber declared (peers named in `connect` may come later: Zenoh
    /// keeps trying them).
    pub fn start(config: &Config) -> Result<Bridge, StartError> {
        let client = Client::connect_to(config.broker.socket.as_deref(), &config.name)?;
        let session = zenoh::open(zenoh_config(config)?).wait().map_err(zerr)?;
        let mut bridge = Bridge {
            name: config.name.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            routes: Vec::new(),
            subscribers: Vec::new(),
            queues: Vec::new(),
            session: None,
            _client: None,
        };
        for route in &config.export {
            bridge.start_export(&client, &session, route)?;
        }
        for route in &config.import {
            bridge.start_import(&client, &session, route)?;
        }
        bridge.session = Some(session);
        bridge._client = Some(client);
        Ok(bridge)
    }

    fn start_export(
        &mut self,
        client: &Client,
        session: &zenoh::Session,
        route: &ExportRoute,
    ) -> Result<(), StartError> {
        let key = route.key();
        let open_err = |source| StartError::Open {
            direction: "export",
            channel: route.channel.clone(),
            source,
        };
        if let Some(create) = &route.create {
            // Opening a producer with `create` makes the channel if it is
            // missing; the producer itself is not used.
            drop(
                client
                    .producer_with(
                        &route.channel,
                        ProducerOptions::default().create(create.spec()),
                    )
                    .map_err(open_err)?,
            );
        }
        let consumer = client
            .consumer_with(
                &route.channel,
                ConsumerOptions::default()
                    .policy(route.policy.local())
                    .depth(route.depth())
                    .end_of_stream(false),
            )
            .map_err(open_err)?;
        let publisher = session
            .declare_publisher(key.clone())
            .congestion_control(CongestionControl::Block)
            .wait()
            .map_err(zerr)?;
        let stats = Arc::new(RouteStats::new(
            Direction::Export,
            route.channel.clone(),
            key,
            route.policy,
        ));
        self.routes.push(stats.clone());
        let stop = self.stop.clone();
        let name = self.name.clone();
        let thin = (route.quantize, route.compression);
        let thread = std::thread::Builder::new()
            .name(format!("export {}", route.channel))
            .spawn(move || export_loop(&name, consumer, publisher, thin, &stats, &stop))
            .map_err(StartError::Thread)?;
        self.threads.push(thread);
        Ok(())
    }

    fn start_import(
        &mut self,
        client: &Client,
        session: &zenoh::Session,
        route: &ImportRoute,
    ) -> Result<(), StartError> {
        let channel = route.channel();
        let open_err = |source| StartError::Open {
            direction: "import",
            channel: channel.clone(),
            source,
        };
        let opts = match &route.create {
            Some(c) => ProducerOptions::default().create(c.spec()),
            None => ProducerOptions::default(),
        };
        let producer = client.producer_with(&channel, opts).map_err(open_err)?;
        let stats = Arc::new(RouteStats::new(
            Direction::Import,
            channel.clone(),
            route.key.clone(),
            route.policy,
        ));
        let queue = Arc::new(Queue {
            items: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
            depth: route.depth() as usize,
            policy: route.policy,
        });
        let subscriber = {
            let queue = queue.clone();
            let stats = stats.clone();
            let stop = self.stop.clone();
            session
                .declare_subscriber(route.key.clone())
                .callback(move |sample| queue.push(sample, &stats, &stop))
                .wait()
                .map_err(zerr)?
        };
        self.routes.push(stats.clone());
        self.subscribers.push(subscriber);
        self.queues.push(queue.clone());
        let stop = self.stop.clone();
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("import {channel}"))
            .spawn(move || import_loop(&name, &producer, &queue, &stats, &stop))
            .map_err(StartError::Thread)?;
        self.threads.push(thread);
        Ok(())
    }

    /// Every route's counters now, exports first, in config order.
    pub fn stats(&self) -> Vec<RouteSnapshot> {
        self.routes.iter().map(|r| r.snapshot()).collect()
    }

    /// The bridge's name (its client name on the broker).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops every route, undeclares from Zenoh and closes the session.
    /// Tensors in flight inside the bridge are dropped.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for q in &self.queues {
            q.cv.notify_all();
        }
        self.subscribers.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(s) = self.session.take() {
            let _ = s.close().wait();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A received tensor lent to Zenoh as a payload buffer: Zenoh reads the
/// slot's bytes in place, and the slot is released when Zenoh drops its
/// last reference (right after the put, once the bytes are in its
/// transmission batches).
struct SlotBytes(Tensor);

impl AsRef<[u8]> for SlotBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn export_loop(
    name: &str,
    consumer: tensorbus::Consumer,
    publisher: zenoh::pubsub::Publisher<'static>,
    (quantize, compression): (Quantize, Compression),
    stats: &RouteStats,
    stop: &AtomicBool,
) {
    let plain = quantize == Quantize::None && compression == Compression::None;
    // The bridge takes tensors only while someone on the Zenoh side listens:
    // without a subscriber a put goes nowhere, so while there is none the
    // local channel's policy applies (block: the producer waits; drop_oldest
    // and latest: the broker drops and counts).
    let matched = Arc::new(AtomicBool::new(false));
    let listener = {
        let matched = matched.clone();
        publisher
            .matching_listener()
            .callback(move |s| matched.store(s.matching(), Ordering::Relaxed))
            .wait()
    };
    if let Ok(status) = publisher.matching_status().wait() {
        if status.matching() {
            matched.store(true, Ordering::Relaxed);
        }
    }
    if let Err(e) = &listener {
        log(
            name,
            format_args!(
                "{}: no matching listener ({e}); sending regardless",
                stats.key
            ),
        );
        matched.store(true, Ordering::Relaxed);
    }
    let mut waiting_logged = false;
    while !stop.load(Ordering::Relaxed) {
        stats.dropped.store(consumer.dropped(), Ordering::Relaxed);
        if !matched.load(Ordering::Relaxed) {
            if !waiting_logged {
                log(
                    name,
                    format_args!("{}: no subscriber on the Zenoh side; waiting", stats.key),
                );
                waiting_logged = true;
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if waiting_logged {
            log(
                name,
                format_args!("{}: subscriber present; sending", stats.key),
            );
            waiting_logged = false;
        }
        let tensor = match consumer.recv_timeout(Duration::from_millis(50)) {
            Ok(t) => t,
            Err(RecvError::Timeout(_)) => continue,
            Err(RecvError::Corrupted(e)) => {
                let n = stats.errors.fetch_add(1, Ordering::Relaxed) + 1;
                if worth_logging(n) {
                    log(
                        name,
                        format_args!("{}: skipped a corrupted descriptor: {e}", stats.channel),
                    );
                }
                continue;
            }
            Err(e) => {
                log(name, format_args!("{}: export stops: {e}", stats.channel));
                stats.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let (payload, attachment, raw_len) = if plain {
            let attachment = wire::encode(tensor.meta(), realtime_ns());
            let raw_len = (tensor.len() + attachment.len()) as u64;
            // The slot itself is the payload: no copy here.
            let payload = ZBytes::from(bytes::Bytes::from_owner(SlotBytes(tensor)));
            (payload, attachment, raw_len)
        } else {
            let enc = encoding::encode(tensor.meta(), &tensor, quantize, compression);
            let attachment = wire::encode_with(&enc.meta, realtime_ns(), enc.encoding, &enc.params);
            let raw_len = (tensor.len() + attachment.len()) as u64;
            stats.add_quant_error(enc.max_abs_err, enc.sum_sq_err, enc.count);
            let payload = match enc.payload {
                Some(p) => {
                    drop(tensor); // the slot is free as soon as it is encoded
                    ZBytes::from(p)
                }
                None => ZBytes::from(bytes::Bytes::from_owner(SlotBytes(tensor))),
            };
            (payload, attachment, raw_len)
        };
        let len = (payload.len() + attachment.len()) as u64;
        match publisher.put(payload).attachment(attachment).wait() {
            Ok(()) => {
                stats.samples.fetch_add(1, Ordering::Relaxed);
                stats.bytes.fetch_add(len, Ordering::Relaxed);
                stats.raw_bytes.fetch_add(raw_len, Ordering::Relaxed);
            }
            Err(e) => {
                let n = stats.errors.fetch_add(1, Ordering::Relaxed) + 1;
                if worth_logging(n) {
                    log(name, format_args!("{}: put failed: {e}", stats.key));
                }
            }
        }
    }
    stats.dropped.store(consumer.dropped(), Ordering::Relaxed);
}

/// The samples between Zenoh's callback and the import thread.
struct Queue {
    items: Mutex<VecDeque<Sample>>,
    cv: Condvar,
    depth: usize,
    policy: RoutePolicy,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called on Zenoh's thread: `block` waits for room (holding back the
    /// link), the others drop the oldest.
    fn push(&self, sample: Sample, stats: &RouteStats, stop: &AtomicBool) {
        let mut q = self.lock();
        while q.len() >= self.depth {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match self.policy {
                RoutePolicy::Block => {
                    q = self
                        .cv
                        .wait_timeout(q, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                RoutePolicy::DropOldest | RoutePolicy::Latest => {
                    q.pop_front();
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        q.push_back(sample);
        self.cv.notify_all();
    }

    fn pop(&self, stop: &AtomicBool) -> Option<Sample> {
        let mut q = self.lock();
        loop {
            if let Some(s) = q.pop_front() {
                self.cv.notify_all();
                return Some(s);
            }
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            q = self
                .cv
                .wait_timeout(q, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Why an arriving sample was not published.
enum Reject {
    /// Malformed: counted, logged, dropped.
    Malformed(String),
    /// A broker-side failure.
    Error(String),
    /// The bridge is stopping.
    Stopped,
}

fn import_loop(
    name: &str,
    producer: &Producer,
    queue: &Queue,
    stats: &RouteStats,
    stop: &AtomicBool,
) {
    while let Some(sample) = queue.pop(stop) {
        match import_one(producer, &sample, stop) {
            Ok((len, raw_len)) => {
                stats.samples.fetch_add(1, Ordering::Relaxed);
                stats.bytes.fetch_add(len, Ordering::Relaxed);
                stats.raw_bytes.fetch_add(raw_len, Ordering::Relaxed);
            }
            Err(Reject::Malformed(why)) => {
                let n = stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
                if worth_logging(n) {
                    log(
                        name,
                        format_args!(
                            "{} -> {}: dropped a malformed sample (#{n}): {why}",
                            sample.key_expr(),
                            stats.channel
                        ),
                    );
                }
            }
            Err(Reject::Error(why)) => {
                let n = stats.errors.fetch_add(1, Ordering::Relaxed) + 1;
                if worth_logging(n) {
                    log(
                        name,
                        format_args!(
                            "{} -> {}: dropped (#{n}): {why}",
                            sample.key_expr(),
                            stats.channel
                        ),
                    );
                }
            }
            Err(Reject::Stopped) => return,
        }
    }
}

/// Validates one sample, loans a slot, copies the payload into it (the
/// only copy the bridge makes; an encoded payload is decoded into the slot
/// instead) and publishes it. Returns the bytes carried on the wire and
/// what they stand for (the tensor's bytes plus the attachment).
fn import_one(
    producer: &Producer,
    sample: &Sample,
    stop: &AtomicBool,
) -> Result<(u64, u64), Reject> {
    let attachment = sample
        .attachment()
        .ok_or(Reject::Malformed(WireError::Missing.to_string()))?
        .to_bytes();
    let header = wire::decode(&attachment).map_err(|e| Reject::Malformed(e.to_string()))?;
    let payload = sample.payload();
    wire::check_payload(&header, payload.len()).map_err(|e| Reject::Malformed(e.to_string()))?;
    let mut backoff = 0u32;
    let mut slot = loop {
        match producer.loan_meta(header.meta) {
            Ok(t) => break t,
            Err(LoanError::PoolExhausted { .. }) => {
                // Every slot is held: wait for a release (the queue in front
                // applies the route's policy meanwhile).
                if stop.load(Ordering::Relaxed) {
                    return Err(Reject::Stopped);
                }
                backoff = (backoff + 1).min(10);
                if backoff < 4 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(20 << (backoff - 4)));
                }
            }
            Err(e @ (LoanError::TooLarge { .. } | LoanError::Shape(_))) => {
                return Err(Reject::Malformed(format!("does not fit the channel: {e}")))
            }
            Err(e) => return Err(Reject::Error(format!("loan failed: {e}"))),
        }
    };
    let dst = slot.as_mut_bytes();
    if header.encoding == wire::ENCODING_RAW {
        let mut at = 0;
        for part in payload.slices() {
            // check_payload made the parts add up to dst.len().
            dst[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    } else {
        // Decoders need the payload in one piece (a copy only when Zenoh
        // delivered it fragmented). A failure drops the loan unpublished.
        let whole = payload.to_bytes();
        let params = &header.params[..encoding::params_len(header.encoding)];
        encoding::decode_into(header.encoding, params, &header.meta, &whole, dst)
            .map_err(|e| Reject::Malformed(e.to_string()))?;
    }
    slot.publish()
        .map_err(|e| Reject::Error(format!("publish failed: {e}")))?;
    Ok((
        (payload.len() + attachment.len()) as u64,
        header.meta.nbytes + attachment.len() as u64,
    ))
}

/// Waits up to `timeout` until `f` holds, polling every 10 ms.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
