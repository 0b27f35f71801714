//! `Broker`, `Client`, `Producer`, `Consumer` and `Stage`.
//!
//! Each Rust handle lives in an `Arc`'d core. The Python handle object holds
//! one reference (dropped by `close()`), every tensor it handed out holds
//! another, so a tensor's borrowed view can never outlive its handle.

use crate::tensor::{Owner, PyTensor, View};
use crate::{parse_dtype, parse_mode, parse_policy, tb_err, timeout_of, AssertSend, WAIT_SLICE};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::cell::UnsafeCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};
use tensorbus::{
    ChannelSpec, Client, ConnectError, Consumer, ConsumerOptions, ForkedChild, LoanError,
    OpenError, Producer, ProducerOptions, Published, RecvError, RequestError, Stage, StagedTensor,
    Tensor, TensorMut, TryRecvError, WaitStrategy,
};
use tensorbus_broker::{Config, EmbeddedBroker};

/// Locks a mutex, ignoring poison (the guarded data stays consistent: every
/// critical section here only moves values in and out).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------- errors ---

pub(crate) fn connect_err(e: ConnectError) -> PyErr {
    let name = match &e {
        ConnectError::BrokerUnavailable { .. } => "BrokerUnavailable",
        ConnectError::PermissionDenied { .. } => "PermissionDenied",
        ConnectError::Protocol(_) => "ProtocolError",
        ConnectError::Map(_) => "TensorbusError",
    };
    tb_err(name, e.to_string())
}

pub(crate) fn request_err(e: RequestError) -> PyErr {
    let name = match &e {
        RequestError::BrokerUnavailable { .. } => "BrokerUnavailable",
        RequestError::Protocol(_) => "ProtocolError",
        RequestError::Timeout { .. } => "Timeout",
        RequestError::NoFreeFd { .. } => "LimitReached",
        RequestError::ForkedChild(_) => "ForkedChild",
    };
    tb_err(name, e.to_string())
}

pub(crate) fn open_err(e: OpenError) -> PyErr {
    let name = match &e {
        OpenError::ChannelNotFound { .. } => "ChannelNotFound",
        OpenError::InvalidName(_) | OpenError::InvalidArgument(_) => "InvalidArgument",
        OpenError::LimitReached(_) => "LimitReached",
        OpenError::PermissionDenied(_) => "PermissionDenied",
        OpenError::Request(r) => match r {
            RequestError::BrokerUnavailable { .. } => "BrokerUnavailable",
            RequestError::Protocol(_) => "ProtocolError",
            RequestError::Timeout { .. } => "Timeout",
            RequestError::NoFreeFd { .. } => "LimitReached",
            RequestError::ForkedChild(_) => "ForkedChild",
        },
        OpenError::Map(_) => "TensorbusError",
    };
    tb_err(name, e.to_string())
}

pub(crate) fn loan_err(e: LoanError) -> PyErr {
    let name = match &e {
        LoanError::PoolExhausted { .. } => "PoolExhausted",
        LoanError::TooLarge { .. } => "TooLarge",
        LoanError::Shape(_) => "ShapeError",
        LoanError::Timeout { .. } => "Timeout",
        LoanError::ForkedChild(_) => "ForkedChild",
    };
    tb_err(name, e.to_string())
}

pub(crate) fn recv_err(e: RecvError) -> PyErr {
    let name = match &e {
        RecvError::Timeout(_) => "Timeout",
        RecvError::Corrupted(_) => "Corrupted",
        RecvError::NotExclusive(_) => "TensorbusError",
        RecvError::Detached => "Closed",
        RecvError::ForkedChild(_) => "ForkedChild",
    };
    tb_err(name, e.to_string())
}

/// The `ForkedChild` error of a handle used in a forked child.
pub(crate) fn forked_err(e: ForkedChild) -> PyErr {
    tb_err("ForkedChild", e.to_string())
}

fn closed(what: &str) -> PyErr {
    tb_err("Closed", format!("this {what} is closed"))
}

/// A parsed shape: up to `MAX_DIMS` extents inline (no allocation),
/// more in a `Vec` (which the loan then refuses with a clear message).
pub(crate) enum Shape {
    Inline([usize; tensorbus::MAX_DIMS], usize),
    Long(Vec<usize>),
}

impl Shape {
    fn as_slice(&self) -> &[usize] {
        match self {
            Shape::Inline(a, n) => &a[..*n],
            Shape::Long(v) => v,
        }
    }
}

/// Parses a shape: an int or a sequence of ints (a tuple first: the common case).
fn parse_shape(obj: &Bound<'_, PyAny>) -> PyResult<Shape> {
    let bad = || {
        tb_err(
            "ShapeError",
            format!("shape must be a tuple of non-negative ints, not {obj}"),
        )
    };
    if let Ok(t) = obj.cast::<PyTuple>() {
        if t.len() <= tensorbus::MAX_DIMS {
            let mut a = [0usize; tensorbus::MAX_DIMS];
            for (slot, x) in a.iter_mut().zip(t.iter()) {
                *slot = x.extract::<usize>().map_err(|_| bad())?;
            }
            return Ok(Shape::Inline(a, t.len()));
        }
    } else if let Ok(n) = obj.extract::<usize>() {
        let mut a = [0usize; tensorbus::MAX_DIMS];
        a[0] = n;
        return Ok(Shape::Inline(a, 1));
    }
    obj.extract::<Vec<usize>>()
        .map(Shape::Long)
        .map_err(|_| bad())
}

/// The channel spec for run-time creation (`create=True`, from `pools` and
/// `mode`), None without `create`; `pools` or `mode` without it are a
/// `ValueError`.
fn create_spec(
    create: bool,
    pools: Option<Vec<String>>,
    mode: Option<&str>,
) -> PyResult<Option<ChannelSpec>> {
    if !create {
        if pools.is_some() || mode.is_some() {
            return Err(PyValueError::new_err(
                "pools and mode only apply with create=True",
            ));
        }
        return Ok(None);
    }
    Ok(Some(ChannelSpec {
        name: String::new(),
        pools: pools.unwrap_or_default(),
        mode: mode.map(parse_mode).transpose()?.unwrap_or_default(),
        depth: None,
        policy: None,
    }))
}

// ------------------------------------------------------------- children ---

/// Something a client closes when it is closed.
trait Closable: Send + Sync {
    fn close(&self);
}

/// A handle core: told when its Python handle is closed (the core itself
/// may live on in tensors and waiters).
pub(crate) trait Core: Send + Sync {
    /// The Python handle was closed.
    fn closing(&self) {}
    /// `Err` in a process forked after the handle was opened (one relaxed
    /// load): the handle is inert there.
    fn fork_check(&self) -> Result<(), ForkedChild>;
}

/// The Python handle's reference to its core (`None` once closed).
pub(crate) struct Slot<T>(Mutex<Option<Arc<T>>>);

impl<T: Core> Closable for Slot<T> {
    fn close(&self) {
        let core = lock(&self.0).take();
        if let Some(c) = &core {
            c.closing();
        }
        drop(core); // outside the lock: may close the handle at the broker
    }
}

impl<T> Slot<T> {
    fn new(core: T) -> Arc<Slot<T>> {
        Arc::new(Slot(Mutex::new(Some(Arc::new(core)))))
    }
    fn get(&self) -> Option<Arc<T>> {
        lock(&self.0).clone()
    }

    /// The core, or `Closed` ("this {what} is closed") after `close()`,
    /// or `ForkedChild` in a process forked after the handle was opened
    /// (checked before any lock of the core is taken: a lock some thread of
    /// the parent held at the fork stays locked in the child forever).
    fn core(&self, what: &str) -> PyResult<Arc<T>>
    where
        T: Core,
    {
        let core = self.get().ok_or_else(|| closed(what))?;
        core.fork_check().map_err(forked_err)?;
        Ok(core)
    }
}

/// The one-at-a-time flag of a handle that lends `&mut` access to itself
/// (a producer's loan, a stage's staged tensor): whoever sets it holds the
/// only `&mut` until it is cleared.
pub(crate) struct Busy(AtomicBool);

impl Busy {
    fn new() -> Busy {
        Busy(AtomicBool::new(false))
    }

    /// Sets the flag; `Busy` (with `msg`) when it was already set.
    #[inline]
    fn take(&self, msg: &'static str) -> PyResult<()> {
        if self.0.swap(true, Ordering::AcqRel) {
            return Err(tb_err("Busy", msg));
        }
        Ok(())
    }

    /// Clears the flag: the lent `&mut` is gone.
    #[inline]
    fn clear(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A core that lends a view of itself under its [`Busy`] flag.
trait Lender: Core + Sized {
    /// The flag held while a view is out.
    fn busy(&self) -> &Busy;
    /// The tensor's [`Owner`] of this core.
    fn owner(core: Arc<Self>) -> Owner;
}

/// The Python tensor of a view `core` just lent (its `Busy` flag held), or,
/// when lending failed, the error with the flag cleared again.
#[inline]
fn lent<C: Lender, V>(
    py: Python<'_>,
    core: Arc<C>,
    r: PyResult<V>,
    view: impl FnOnce(V) -> View,
) -> PyResult<Py<PyTensor>> {
    match r {
        Ok(v) => PyTensor::new_py(py, view(v), C::owner(core)),
        Err(e) => {
            core.busy().clear();
            Err(e)
        }
    }
}

/// Runs `f(arg)` with the GIL released (broker requests, waits): `arg`
/// and the result cross to the detached closure as [`AssertSend`], whose
/// contract the callers keep (see each call).
#[inline]
pub(crate) fn detached<A, R>(py: Python<'_>, arg: A, f: impl FnOnce(A) -> R + Send) -> R {
    let arg = AssertSend(arg);
    let r = py.detach(move || {
        let arg = arg;
        AssertSend(f(arg.0))
    });
    r.0
}

/// The `Timeout` of a receive that got nothing on `channel` within `timeout`.
fn recv_timeout(channel: &str, timeout: Option<Duration>) -> PyErr {
    tb_err(
        "Timeout",
        format!(
            "no tensor arrived on {:?} within {:?}",
            channel,
            timeout.unwrap_or_default()
        ),
    )
}

/// The wait left before `timeout` (from `start`; None: forever) and the
/// slice to wait next (at most [`WAIT_SLICE`], so that signals and
/// `close()` are checked between slices).
#[inline]
fn next_slice(start: Instant, timeout: Option<Duration>) -> (Option<Duration>, Duration) {
    let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
    (left, left.map_or(WAIT_SLICE, |l| l.min(WAIT_SLICE)))
}

// ---------------------------------------------------------------- broker ---

/// A broker running on a thread of this process: handy for tests, demos
/// and single-process pipelines. Other processes connect to its socket as to
/// any broker. `config` is the TOML text of a broker config (see
/// `examples/tensorbus.toml`; default: the built-in pools); `socket` its
/// socket path (default: `tensorbus.socket_path()`).
///
/// ```python
/// with tb.Broker(config_toml, "/tmp/tb/broker.sock") as broker:
///     client = tb.Client(broker.socket)
/// ```
///
/// A process forked while the broker runs does not own it: in the child
/// `close()` (and the end of a `with` block, and the object's destructor)
/// leaves the parent's broker running and its socket in place.
#[pyclass(frozen, module = "tensorbus", name = "Broker")]
pub struct PyBroker {
    inner: Mutex<Option<EmbeddedBroker>>,
    socket: PathBuf,
    /// The process that started the broker (its thread lives only there).
    pid: u32,
}

impl PyBroker {
    /// Stops the broker in the process that started it; in a forked child
    /// forgets the copy instead (the broker thread is the parent's: joining
    /// it would wait forever, and the parent still serves its clients).
    fn stop(broker: Option<EmbeddedBroker>, pid: u32) {
        if std::process::id() == pid {
            drop(broker);
        } else {
            std::mem::forget(broker);
        }
    }
}

impl Drop for PyBroker {
    fn drop(&mut self) {
        let b = self
            .inner
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        PyBroker::stop(b, self.pid);
    }
}

#[pymethods]
impl PyBroker {
    #[new]
    #[pyo3(signature = (config = None, socket = None, *, config_file = None))]
    fn new(
        py: Python<'_>,
        config: Option<&str>,
        socket: Option<PathBuf>,
        config_file: Option<PathBuf>,
    ) -> PyResult<Self> {
        let cfg = match (config, config_file) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "give either config (TOML text) or config_file, not both",
                ))
            }
            (Some(text), None) => Config::from_toml(text),
            (None, Some(path)) => Config::from_file(&path),
            (None, None) => Ok(Config::default()),
        }
        .map_err(|e| tb_err("InvalidArgument", e.to_string()))?;
        let socket = socket
            .or_else(|| cfg.broker.socket.clone())
            .unwrap_or_else(|| tensorbus::socket_path(None));
        let started = py.detach(|| EmbeddedBroker::start(&cfg, &socket));
        let broker = started.map_err(|e| tb_err("TensorbusError", e.to_string()))?;
        Ok(PyBroker {
            inner: Mutex::new(Some(broker)),
            socket,
            pid: std::process::id(),
        })
    }

    /// The socket path clients connect to.
    #[getter]
    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// Whether the broker is still running.
    #[getter]
    fn running(&self) -> bool {
        lock(&self.inner).is_some()
    }

    /// Stops the broker and removes its socket. Clients keep exchanging
    /// tensors on the pools they have mapped; new connections fail.
    fn close(&self, py: Python<'_>) {
        let b = lock(&self.inner).take();
        let pid = self.pid;
        py.detach(move || PyBroker::stop(b, pid));
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "tensorbus.Broker(socket={:?}, running={})",
            self.socket,
            self.running()
        )
    }
}

// ---------------------------------------------------------------- client ---

/// A connection to a tensorbus broker.
///
/// `socket`: the broker's socket path (default: `$TENSORBUS_SOCKET`, then
/// `$XDG_RUNTIME_DIR/tensorbus/broker.sock`, then
/// `/tmp/tensorbus-$UID/broker.sock`); `name`: shown by `tensorbus stat`.
/// Raises `BrokerUnavailable` when no broker listens there.
///
/// `close()` (or the end of a `with` block) closes every producer, consumer
/// and stage opened from it; tensors still alive keep their slot (and the
/// shared memory) until they are released.
#[pyclass(frozen, module = "tensorbus", name = "Client")]
pub struct PyClient {
    state: Mutex<ClientState>,
    id: u32,
    socket: PathBuf,
}

struct ClientState {
    client: Option<Client>,
    children: Vec<Weak<dyn Closable>>,
}

/// Wraps a `tensorbus::Client`, which is `Send + Sync` in substance (an
/// `Arc` of a mutex-guarded connection and shared-memory mappings).
struct ClientBox(Client);
// SAFETY: `Client` is a clone of an `Arc<Inner>` whose mutable state is
// behind mutexes; the raw pointers in it refer to mappings that live as long
// as the `Inner`, valid from every thread.
unsafe impl Send for ClientBox {}

impl PyClient {
    /// The client, or `Closed` after `close()`, or `ForkedChild` in a
    /// process forked after it connected.
    fn client(&self) -> PyResult<Client> {
        let client = lock(&self.state)
            .client
            .clone()
            .ok_or_else(|| closed("client"))?;
        client.fork_check().map_err(forked_err)?;
        Ok(client)
    }

    /// Opens a handle with `open(client)` (a clone from [`PyClient::client`],
    /// taken before the arguments are checked), the GIL released for the
    /// broker request; errors as `open_err` maps them.
    fn open_with<H>(
        py: Python<'_>,
        client: Client,
        open: impl FnOnce(Client) -> Result<H, OpenError> + Send,
    ) -> PyResult<H> {
        // `Client` is `Send` in substance (see `ClientBox`); the handle
        // comes back to this thread.
        detached(py, client, open).map_err(open_err)
    }

    /// Puts a new handle core in its Python handle's slot and registers
    /// the slot to be closed with the client.
    fn adopt<C: Core + 'static>(&self, core: C) -> Arc<Slot<C>> {
        let slot = Slot::new(core);
        let child = Arc::downgrade(&slot) as Weak<dyn Closable>;
        let mut st = lock(&self.state);
        st.children.retain(|w| w.strong_count() > 0);
        st.children.push(child);
        drop(st);
        slot
    }
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (socket = None, name = None))]
    fn new(py: Python<'_>, socket: Option<PathBuf>, name: Option<String>) -> PyResult<Self> {
        let name = match name {
            Some(n) => n,
            None => default_name(py),
        };
        let connected = py.detach(|| {
            Client::connect_to(socket.as_deref(), &name).map(|c| AssertSend(ClientBox(c)))
        });
        let client = connected.map_err(connect_err)?.0 .0;
        Ok(PyClient {
            id: client.id(),
            socket: client.socket_path().to_path_buf(),
            state: Mutex::new(ClientState {
                client: Some(client),
                children: Vec::new(),
            }),
        })
    }

    /// This client's id at the broker (the `producer` of every tensor it publishes).
    #[getter]
    fn id(&self) -> u32 {
        self.id
    }

    /// The broker's socket path.
    #[getter]
    fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.state).client.is_none()
    }

    /// Opens a producer on `channel`. With `create=True` the channel is
    /// created at run time if it does not exist, using `pools` (names;
    /// default: every pool) and `mode` (`"broadcast"` or `"workqueue"`).
    #[pyo3(signature = (channel, *, pools = None, mode = None, create = false))]
    fn producer(
        &self,
        py: Python<'_>,
        channel: &str,
        pools: Option<Vec<String>>,
        mode: Option<&str>,
        create: bool,
    ) -> PyResult<PyProducer> {
        let client = self.client()?;
        let mut opts = ProducerOptions::default();
        if let Some(spec) = create_spec(create, pools, mode)? {
            opts = opts.create_with(spec);
        }
        let producer =
            Self::open_with(py, client.clone(), move |c| c.producer_with(channel, opts))?;
        let channel = producer.channel().to_owned();
        let slot = self.adopt(ProducerCore {
            p: UnsafeCell::new(producer),
            busy: Busy::new(),
            client,
        });
        Ok(PyProducer { slot, channel })
    }

    /// Subscribes to `channel`. `policy`: `"block"`, `"drop_oldest"`,
    /// `"drop_newest"` or `"latest"` (default: the channel's); `depth`: ring
    /// depth (default: the channel's); `wait`: `"spin"` (spin 50 µs, then
    /// sleep; default), `"busy"` (never sleep) or `"park"` (sleep at once).
    /// With `create=True` the channel is created if missing (`pools`, `mode`).
    #[pyo3(signature = (channel, *, policy = None, depth = None, wait = None, create = false, pools = None, mode = None))]
    #[allow(clippy::too_many_arguments)]
    fn consumer(
        &self,
        py: Python<'_>,
        channel: &str,
        policy: Option<&str>,
        depth: Option<u32>,
        wait: Option<&str>,
        create: bool,
        pools: Option<Vec<String>>,
        mode: Option<&str>,
    ) -> PyResult<PyConsumer> {
        let client = self.client()?;
        let mut opts = ConsumerOptions::default();
        if let Some(p) = policy {
            opts = opts.policy(parse_policy(p)?);
        }
        if let Some(d) = depth {
            opts = opts.depth(d);
        }
        if let Some(w) = wait {
            opts = opts.wait(parse_wait(w)?);
        }
        if let Some(spec) = create_spec(create, pools, mode)? {
            opts = opts.create_with(spec);
        }
        let consumer = Self::open_with(py, client, move |c| c.consumer_with(channel, opts))?;
        let info = (
            consumer.channel().to_owned(),
            policy_name(consumer.policy()),
            consumer.depth(),
        );
        let slot = self.adopt(ConsumerCore::new(consumer, self.client()?));
        Ok(PyConsumer {
            slot,
            channel: info.0,
            policy: info.1,
            depth: info.2,
        })
    }

    /// Opens a stage: an exclusive, writable subscription to the work-queue
    /// channel `input` (lossless) plus a producer on `output`. `recv_mut()`
    /// gives a writable tensor; `t.forward()` publishes the same slot on `output`.
    #[pyo3(signature = (input, output, *, depth = None))]
    fn stage(
        &self,
        py: Python<'_>,
        input: &str,
        output: &str,
        depth: Option<u32>,
    ) -> PyResult<PyStage> {
        let client = self.client()?;
        let mut opts = ConsumerOptions::default().policy(tensorbus::Policy::Block);
        if let Some(d) = depth {
            opts = opts.depth(d);
        }
        let stage = Self::open_with(py, client.clone(), move |c| {
            c.stage_with(input, output, opts)
        })?;
        let slot = self.adopt(StageCore {
            s: UnsafeCell::new(stage),
            busy: Busy::new(),
            output: output.to_owned(),
            client,
            extra: Mutex::new(Vec::new()),
        });
        Ok(PyStage {
            slot,
            input: input.to_owned(),
            output: output.to_owned(),
        })
    }

    /// A statistics snapshot from the broker, as a dict (the JSON of
    /// `tensorbus stat --json`): pools (slots_free, loaned, in_flight),
    /// channels (subscribers with delivered/dropped/queued) and clients.
    fn stat<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        // `Client` is `Send` in substance (see `ClientBox`).
        let report = detached(py, self.client()?, |c| c.stat()).map_err(request_err)?;
        let text =
            serde_json::to_string(&report).map_err(|e| tb_err("ProtocolError", e.to_string()))?;
        py.import("json")?.call_method1("loads", (text,))
    }

    /// Closes the client and every producer, consumer and stage opened
    /// from it. Tensors still alive keep working until they are released;
    /// the connection to the broker closes with the last of them.
    fn close(&self) {
        let (client, children) = {
            let mut st = lock(&self.state);
            (st.client.take(), std::mem::take(&mut st.children))
        };
        for child in children {
            if let Some(c) = child.upgrade() {
                c.close();
            }
        }
        drop(client);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "tensorbus.Client(id={}, socket={:?}{})",
            self.id,
            self.socket,
            if self.closed() { ", closed" } else { "" }
        )
    }
}

fn default_name(py: Python<'_>) -> String {
    py.import("sys")
        .and_then(|s| s.getattr("argv"))
        .and_then(|a| a.get_item(0))
        .and_then(|a| a.extract::<String>())
        .ok()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .filter(|n| !n.is_empty() && n != "-c")
        .unwrap_or_else(|| "python".into())
}

fn parse_wait(s: &str) -> PyResult<WaitStrategy> {
    match s {
        "spin" => Ok(WaitStrategy::default()),
        "busy" => Ok(WaitStrategy::BusyPoll),
        "park" => Ok(WaitStrategy::Park),
        other => Err(tb_err(
            "InvalidArgument",
            format!("unknown wait strategy {other:?}; use \"spin\", \"busy\" or \"park\""),
        )),
    }
}

fn policy_name(p: tensorbus::Policy) -> &'static str {
    match p {
        tensorbus::Policy::Block => "block",
        tensorbus::Policy::DropOldest => "drop_oldest",
        tensorbus::Policy::DropNewest => "drop_newest",
        tensorbus::Policy::Latest => "latest",
    }
}

// -------------------------------------------------------------- producer ---

/// A producer handle. `loan()` takes `&mut Producer` for as long as the
/// loan lives, so a producer has one loan at a time (`busy`).
pub(crate) struct ProducerCore {
    p: UnsafeCell<Producer>,
    busy: Busy,
    /// The client the producer came from (for `fork_check`).
    client: Client,
}

// SAFETY: the `Producer` is only reached through `&mut` by the thread that
// set `busy` (in `loan`), and its loan (which holds that `&mut`) clears
// `busy` only after it is gone; the raw pointers inside point to mappings
// valid from every thread.
unsafe impl Send for ProducerCore {}
// SAFETY: as above.
unsafe impl Sync for ProducerCore {}

impl Core for ProducerCore {
    fn fork_check(&self) -> Result<(), ForkedChild> {
        // The client, not the producer: a loan may hold `&mut Producer`.
        self.client.fork_check()
    }
}

impl Lender for ProducerCore {
    fn busy(&self) -> &Busy {
        &self.busy
    }
    fn owner(core: Arc<Self>) -> Owner {
        Owner::Producer(core)
    }
}

/// A producer claimed while no loan is out (to forward a staged tensor
/// through it); unclaimed on drop.
pub(crate) struct Claimed<'a>(&'a ProducerCore);

impl ProducerCore {
    /// Ends a loan: called after its `TensorMut` is dropped or published.
    pub(crate) fn idle(&self) {
        self.busy.clear();
    }

    /// Claims the producer (`Busy` while it has a loan out).
    pub(crate) fn claim(&self) -> PyResult<Claimed<'_>> {
        self.busy
            .take("that producer has a loan out: publish or release it first")?;
        Ok(Claimed(self))
    }
}

impl Claimed<'_> {
    /// The producer, shared.
    pub(crate) fn producer_ref(&self) -> &Producer {
        // SAFETY: as in `producer`; a shared borrow of the claim.
        unsafe { &*self.0.p.get() }
    }

    /// The producer, exclusively.
    pub(crate) fn producer(&mut self) -> &mut Producer {
        // SAFETY: `claim` set `busy`, which only `Drop` clears: this is the
        // only `&mut` to the producer while the claim (borrowed mutably
        // here) lives.
        unsafe { &mut *self.0.p.get() }
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.0.idle();
    }
}

/// The writing end of a channel: `loan()` a slot, write it through
/// `numpy.asarray(t)`, then `t.publish()`.
#[pyclass(frozen, module = "tensorbus", name = "Producer")]
pub struct PyProducer {
    slot: Arc<Slot<ProducerCore>>,
    channel: String,
}

impl PyProducer {
    /// The producer's core (`Closed` after `close()`).
    pub(crate) fn core(&self) -> PyResult<Arc<ProducerCore>> {
        self.slot.core("producer")
    }
}

#[pymethods]
impl PyProducer {
    /// The channel's name.
    #[getter]
    fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.slot.get().is_none()
    }

    /// Loans a slot for a C-contiguous tensor of `shape` and `dtype` and
    /// returns a writable `Tensor`. Raises `PoolExhausted` at once when
    /// every fitting slot is held, unless `timeout` (seconds) allows waiting
    /// (then `Timeout`). One loan per producer at a time (`Busy`).
    #[pyo3(signature = (shape, dtype = None, *, timeout = None))]
    fn loan(
        &self,
        py: Python<'_>,
        shape: &Bound<'_, PyAny>,
        dtype: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyTensor>> {
        let core = self.core()?;
        let shape = parse_shape(shape)?;
        let dtype = match dtype {
            Some(d) => parse_dtype(d)?,
            None => tensorbus::DType::U8,
        };
        let timeout = timeout_of(timeout)?;
        core.busy.take("this producer already has a loan (one at a time): publish or release it first; a loan whose numpy arrays are still alive after its with block is released when they are deleted")?;
        // SAFETY: `busy` was false and is now ours: no other `&mut` to the
        // producer exists until the loan made here ends (then `idle()`).
        // The producer is kept alive by the tensor's `Arc` of the core.
        let p: &'static mut Producer = unsafe { &mut *core.p.get() };
        let result = loan_with(py, p, shape.as_slice(), dtype, timeout);
        lent(py, core, result, View::Loan)
    }

    /// Closes the producer. A loan still alive keeps it open until the
    /// loan is published or released.
    fn close(&self) {
        self.slot.close();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        format!("tensorbus.Producer(channel={:?})", self.channel)
    }
}

fn loan_with(
    py: Python<'_>,
    p: &'static mut Producer,
    shape: &[usize],
    dtype: tensorbus::DType,
    timeout: Option<Duration>,
) -> PyResult<TensorMut<'static>> {
    let Some(timeout) = timeout else {
        return p.loan(shape, dtype).map_err(loan_err);
    };
    let deadline = Instant::now() + timeout;
    let raw = p as *mut Producer;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let slice = left.min(WAIT_SLICE);
        let r = detached(py, raw, move |p| {
            // SAFETY: the caller holds the producer's `busy` flag: this is
            // the only reference to it; it lives as long as the caller's core.
            let prod: &'static mut Producer = unsafe { &mut *p };
            prod.loan_timeout(shape, dtype, slice)
        });
        match r {
            Err(LoanError::Timeout { .. }) if !left.is_zero() && left > slice => {
                py.check_signals()?;
            }
            Err(LoanError::Timeout { channel, .. }) => {
                return Err(loan_err(LoanError::Timeout { channel, timeout }))
            }
            other => return other.map_err(loan_err),
        }
    }
}

// -------------------------------------------------------------- consumer ---

/// A subscription. `Consumer` is `!Sync` (a `Cell` cursor): receives are
/// serialized by `lock`; releases only touch atomics in shared memory.
///
/// Closing ends the subscription at the broker at once (issue 11.2), even
/// while other references to the core remain (an asyncio waiter kept by a
/// reference cycle, a readiness fd): the Rust `Consumer` is dropped as soon
/// as no tensor received from it is alive (`live`), else by the release of
/// the last one. Until then a closed core receives nothing more.
pub(crate) struct ConsumerCore {
    /// `None` once closed and every received tensor is gone. Tensors borrow
    /// the `Consumer` in here (lifetime erased): it is only taken out (under
    /// `lock` and the write lock) while `live` is 0.
    c: RwLock<Option<Consumer>>,
    /// Serializes receives (the `Cell` cursor) and the close.
    lock: Mutex<()>,
    /// Received tensors alive (each holds a [`ConsumerLease`]).
    live: AtomicUsize,
    /// `close()` was called: no more receives.
    closed: AtomicBool,
    /// Whether `recv_async` made the consumer's readiness fd.
    aio: AtomicBool,
    /// The client the consumer came from (for `fork_check`).
    client: Client,
    /// A duplicate of the consumer's readiness eventfd, made on first use:
    /// it stays open (for an event loop that watches it) after the consumer
    /// is closed and dropped, and keeps one fd number for the core's life.
    efd: OnceLock<Arc<std::fs::File>>,
}

// SAFETY: the only non-thread-safe state of `Consumer` is its ring cursor
// and detached flag (`Cell`s), touched by receives and `detach` alone, which
// `lock` serializes (`finish_close` detaches under it). Releasing a
// tensor reads immutable fields and clears a bit atomically; the readiness
// (a `OnceLock` of an eventfd and atomics) is thread-safe.
unsafe impl Send for ConsumerCore {}
// SAFETY: as above.
unsafe impl Sync for ConsumerCore {}

impl ConsumerCore {
    fn new(c: Consumer, client: Client) -> ConsumerCore {
        ConsumerCore {
            client,
            c: RwLock::new(Some(c)),
            lock: Mutex::new(()),
            live: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            aio: AtomicBool::new(false),
            efd: OnceLock::new(),
        }
    }

    /// Runs `f` on the consumer while it is open (`None` after close).
    fn with<R>(&self, f: impl FnOnce(&Consumer) -> R) -> Option<R> {
        let g = self.c.read().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(f)
    }

    /// Ends the subscription of a closed core: drops the Rust consumer
    /// (Close at the broker) when no received tensor is alive, else detaches
    /// it (no more deliveries; the tensors' holds stay until released, and
    /// the last release comes back here to drop it).
    fn finish_close(&self) {
        // Inert in a forked child (and its locks may be held by a parent
        // thread that does not exist here).
        if !self.closed.load(Ordering::Acquire) || self.fork_check().is_err() {
            return;
        }
        let _g = lock(&self.lock); // no receive in progress
        if self.live.load(Ordering::Acquire) != 0 {
            // Best effort: a broker that is gone delivers nothing anyway.
            let _ = self.with(|c| c.detach());
            return;
        }
        let c = self.c.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(c); // sends Close to the broker
    }
}

impl Core for ConsumerCore {
    fn fork_check(&self) -> Result<(), ForkedChild> {
        // The client, not the consumer: no lock is taken (one a parent
        // thread held at fork time would stay locked in the child).
        self.client.fork_check()
    }

    /// Stops receiving, wakes `recv_async` waiters so that they see the
    /// consumer closed, and ends the subscription unless tensors are alive.
    fn closing(&self) {
        if self.fork_check().is_err() {
            return; // the parent's consumer: nothing to do from a child
        }
        self.closed.store(true, Ordering::Release);
        if self.aio.load(Ordering::Acquire) {
            self.with(|c| c.readiness().map(|r| r.wake()));
        }
        self.finish_close();
    }
}

/// A received tensor's hold on its consumer core: counted in `live`; the
/// last one dropped after `close()` ends the subscription.
pub(crate) struct ConsumerLease(Arc<ConsumerCore>);

impl Drop for ConsumerLease {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.finish_close();
        }
    }
}

/// One non-blocking receive as a Python tensor (`None`: nothing queued, or closed).
fn try_take_py(py: Python<'_>, core: Arc<ConsumerCore>) -> PyResult<Option<Py<PyTensor>>> {
    match take(&core, Duration::ZERO).map_err(recv_err)? {
        Some(t) => received_py(py, t, core).map(Some),
        None => Ok(None),
    }
}

/// The Python tensor of `t`, which [`take`] counted in `core.live`.
fn received_py(
    py: Python<'_>,
    t: Tensor<'static>,
    core: Arc<ConsumerCore>,
) -> PyResult<Py<PyTensor>> {
    PyTensor::new_py(py, View::Recv(t), Owner::Consumer(ConsumerLease(core)))
}

/// The asyncio helpers (`tensorbus/_aio.py`).
static AIO: pyo3::sync::PyOnceLock<Py<pyo3::types::PyModule>> = pyo3::sync::PyOnceLock::new();

fn aio(py: Python<'_>) -> PyResult<&Bound<'_, pyo3::types::PyModule>> {
    AIO.get_or_try_init(py, || py.import("tensorbus._aio").map(|m| m.unbind()))
        .map(|m| m.bind(py))
}

/// A consumer's readiness fd for the asyncio helpers (`tensorbus/_aio.py`):
/// it keeps the consumer's core, and so the eventfd, alive while an event
/// loop watches it, even after `Consumer.close()`.
#[pyclass(frozen, module = "tensorbus", name = "_Readiness")]
pub struct PyReadiness {
    core: Arc<ConsumerCore>,
    slot: Arc<Slot<ConsumerCore>>,
    /// A duplicate of the consumer's eventfd: it stays open (for the event
    /// loop that watches it) after the consumer is closed and dropped.
    fd: Arc<std::fs::File>,
}

impl PyReadiness {
    /// Runs `f` on the readiness of the open consumer (nothing once closed).
    fn readiness(&self, f: impl FnOnce(&tensorbus::Readiness)) -> PyResult<()> {
        self.core.fork_check().map_err(forked_err)?;
        match self.core.with(|c| c.readiness().map(f)) {
            Some(Err(e)) => Err(tb_err("TensorbusError", format!("readiness fd: {e}"))),
            _ => Ok(()),
        }
    }
}

#[pymethods]
impl PyReadiness {
    /// The eventfd to watch for readability.
    fn fileno(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Asks for one notification (the fd turns readable when a tensor is queued).
    fn arm(&self) -> PyResult<()> {
        self.readiness(|r| r.arm())
    }

    /// Withdraws `arm()`.
    fn disarm(&self) -> PyResult<()> {
        self.readiness(|r| r.disarm())
    }

    /// Makes the fd unreadable (call after it was readable).
    fn clear(&self) -> PyResult<()> {
        self.core.fork_check().map_err(forked_err)?;
        // The eventfd is non-blocking (one file with the consumer's): a read
        // resets its count, or fails with EAGAIN when nothing is pending.
        let _ = std::io::Read::read(&mut &*self.fd, &mut [0u8; 8]);
        Ok(())
    }

    /// Whether the consumer was closed.
    #[getter]
    fn closed(&self) -> bool {
        self.slot.get().is_none()
    }

    /// The next tensor if one is queued, else None; `Closed` once the
    /// consumer is closed.
    fn try_recv(&self, py: Python<'_>) -> PyResult<Option<Py<PyTensor>>> {
        if self.slot.get().is_none() {
            return Err(closed("consumer"));
        }
        try_take_py(py, self.core.clone())
    }
}

/// Receives one tensor; `None`: nothing arrived within `wait` (`ZERO`
/// polls) or the consumer is closed. A tensor returned is counted in
/// `core.live`: make it a Python tensor with [`received_py`].
fn take(core: &ConsumerCore, wait: Duration) -> Result<Option<Tensor<'static>>, RecvError> {
    // Before the lock: in a forked child it may be held forever.
    core.fork_check()?;
    let _g = lock(&core.lock);
    if core.closed.load(Ordering::Acquire) {
        return Ok(None);
    }
    let guard = core.c.read().unwrap_or_else(|p| p.into_inner());
    let Some(c) = guard.as_ref() else {
        return Ok(None);
    };
    // SAFETY: the tensor's borrow of the consumer is erased to 'static. The
    // consumer stays in place while the tensor lives: it is counted in
    // `live` below (before `lock` is released) and its lease, dropped after
    // the view, keeps the core; `finish_close` takes the consumer out only
    // under `lock` with `live` at 0.
    let c: &'static Consumer = unsafe { &*(c as *const Consumer) };
    let got = if wait.is_zero() {
        match c.try_recv() {
            Ok(t) => Ok(Some(t)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Corrupted(x)) => Err(RecvError::Corrupted(x)),
            Err(TryRecvError::ForkedChild(f)) => Err(RecvError::ForkedChild(f)),
            Err(TryRecvError::NotExclusive(d)) => Err(RecvError::NotExclusive(d)),
        }
    } else {
        match c.recv_timeout(wait) {
            Ok(t) => Ok(Some(t)),
            Err(RecvError::Timeout(_)) => Ok(None),
            Err(e) => Err(e),
        }
    };
    if let Ok(Some(_)) = got {
        core.live.fetch_add(1, Ordering::AcqRel);
    }
    got
}

/// The reading end of a channel: `recv()` returns read-only tensors;
/// iterating yields tensors until the consumer is closed.
#[pyclass(frozen, weakref, module = "tensorbus", name = "Consumer")]
pub struct PyConsumer {
    slot: Arc<Slot<ConsumerCore>>,
    channel: String,
    policy: &'static str,
    depth: u32,
}

impl PyConsumer {
    /// Waits up to `timeout` (None: forever), in slices, checking signals
    /// (Ctrl-C) and `close()` between them. `Ok(None)`: timed out or closed.
    fn wait(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<Option<Py<PyTensor>>> {
        // Fast path: a tensor is already queued; no clock, no GIL release.
        let core = self.slot.core("consumer")?;
        if let Some(t) = try_take_py(py, core)? {
            return Ok(Some(t));
        }
        if timeout.is_some_and(|t| t.is_zero()) {
            return Ok(None);
        }
        let start = Instant::now();
        loop {
            let core = self.slot.core("consumer")?;
            let (left, slice) = next_slice(start, timeout);
            let got = if slice.is_zero() {
                take(&core, Duration::ZERO)
            } else {
                // The core is `Sync`; the tensor is taken by this thread.
                detached(py, &*core, |c| take(c, slice))
            };
            match got.map_err(recv_err)? {
                Some(t) => return received_py(py, t, core).map(Some),
                None if left.is_some_and(|l| l <= slice) => return Ok(None),
                None => py.check_signals()?,
            }
        }
    }
}

#[pymethods]
impl PyConsumer {
    /// The channel's name.
    #[getter]
    fn channel(&self) -> &str {
        &self.channel
    }

    /// The backpressure policy in effect.
    #[getter]
    fn policy(&self) -> &'static str {
        self.policy
    }

    /// The ring depth in effect.
    #[getter]
    fn depth(&self) -> u32 {
        self.depth
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.slot.get().is_none()
    }

    /// Tensors producers dropped for this subscriber since it subscribed
    /// (drop_oldest, drop_newest, latest; always 0 under block): the
    /// counter `tensorbus stat` shows, one atomic load. Raises `Closed`
    /// after `close()`.
    #[getter]
    fn dropped(&self) -> PyResult<u64> {
        let core = self.slot.core("consumer")?;
        core.with(|c| c.dropped()).ok_or_else(|| closed("consumer"))
    }

    /// Tensors this subscriber has received since it subscribed. Raises
    /// `Closed` after `close()`.
    #[getter]
    fn received(&self) -> PyResult<u64> {
        let core = self.slot.core("consumer")?;
        core.with(|c| c.received())
            .ok_or_else(|| closed("consumer"))
    }

    /// Waits for the next tensor (at most `timeout` seconds; None: forever)
    /// and returns a read-only `Tensor`. Raises `Timeout`. The GIL is
    /// released while waiting and Ctrl-C interrupts the wait.
    #[pyo3(signature = (timeout = None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyTensor>> {
        let t = timeout_of(timeout)?;
        match self.wait(py, t)? {
            Some(x) => Ok(x),
            None => Err(recv_timeout(&self.channel, t)),
        }
    }

    /// The next tensor if one is queued, else None (never waits).
    fn try_recv(&self, py: Python<'_>) -> PyResult<Option<Py<PyTensor>>> {
        let core = self.slot.core("consumer")?;
        try_take_py(py, core)
    }

    /// `await consumer.recv_async(timeout=None)`: waits for the next tensor
    /// without blocking the event loop (asyncio; the consumer's readiness
    /// eventfd is watched with `loop.add_reader`). Raises `Timeout` after
    /// `timeout` seconds and `Closed` when the consumer is closed while
    /// waiting; cancelling the awaiting task loses no tensor.
    #[pyo3(signature = (timeout = None))]
    fn recv_async<'py>(
        slf: &Bound<'py, Self>,
        timeout: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        aio(py)?.getattr("recv_async")?.call1((slf, timeout))
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// `async for t in consumer`: ends when the consumer is closed.
    fn __anext__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        aio(py)?.getattr("anext")?.call1((slf,))
    }

    /// The readiness fd helper of `recv_async` (internal).
    fn _readiness(&self) -> PyResult<PyReadiness> {
        let core = self.slot.core("consumer")?;
        let fd = match core.efd.get() {
            Some(fd) => fd.clone(),
            None => {
                let fd = core
                    .with(|c| c.readiness_fd().and_then(|fd| fd.try_clone_to_owned()))
                    .ok_or_else(|| closed("consumer"))?
                    .map_err(|e| {
                        tb_err("TensorbusError", format!("cannot make a readiness fd: {e}"))
                    })?;
                core.efd
                    .get_or_init(|| Arc::new(std::fs::File::from(fd)))
                    .clone()
            }
        };
        core.aio.store(true, Ordering::Release);
        Ok(PyReadiness {
            core,
            slot: self.slot.clone(),
            fd,
        })
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyTensor>>> {
        if self.closed() {
            return Ok(None);
        }
        match self.wait(py, None) {
            Err(_) if self.closed() => Ok(None),
            other => other,
        }
    }

    /// Unsubscribes at once, whatever references to this consumer remain
    /// (an `await` that timed out, a readiness fd an event loop watches):
    /// nothing more is delivered to it (a `block` producer no longer waits
    /// for it). Tensors received from it and still alive keep their slots
    /// until released.
    fn close(&self) {
        self.slot.close();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "tensorbus.Consumer(channel={:?}, policy={:?}, depth={})",
            self.channel, self.policy, self.depth
        )
    }
}

/// Dropping the last reference to a Python consumer closes it (issue 11.2):
/// the subscription must not wait for the cycle collector to free an object
/// (a readiness fd, an `await` that timed out) that still refers to the core.
impl Drop for PyConsumer {
    fn drop(&mut self) {
        self.slot.close();
    }
}

// ----------------------------------------------------------------- stage ---

/// A stage handle: `recv_mut` takes `&mut Stage` for as long as the staged
/// tensor lives, so a stage holds one tensor at a time (`busy`).
pub(crate) struct StageCore {
    s: UnsafeCell<Stage>,
    busy: Busy,
    output: String,
    /// The client the stage came from: opens producers for `forward("name")`.
    client: Client,
    /// Producers this stage opened for `forward(to)` to other channels.
    extra: Mutex<Vec<(String, Producer)>>,
}

// SAFETY: as for `ProducerCore`: `&mut Stage` is only formed by the holder
// of `busy`, which is cleared after the staged tensor is gone.
unsafe impl Send for StageCore {}
// SAFETY: as above.
unsafe impl Sync for StageCore {}

impl Core for StageCore {
    fn fork_check(&self) -> Result<(), ForkedChild> {
        self.client.fork_check()
    }
}

impl Lender for StageCore {
    fn busy(&self) -> &Busy {
        &self.busy
    }
    fn owner(core: Arc<Self>) -> Owner {
        Owner::Stage(core)
    }
}

impl StageCore {
    /// Ends a staged tensor: called after it is dropped or forwarded.
    pub(crate) fn idle(&self) {
        self.busy.clear();
    }

    /// The output channel's name.
    pub(crate) fn output_name(&self) -> &str {
        &self.output
    }

    /// Opens (once) the producer `forward(channel)` uses for a channel
    /// other than the stage's output, and keeps it.
    pub(crate) fn open_extra(&self, py: Python<'_>, channel: &str) -> PyResult<()> {
        if lock(&self.extra).iter().any(|(n, _)| n == channel) {
            return Ok(());
        }
        // Open outside the lock (the broker request runs without the GIL).
        // `Client` is `Send` in substance (see `ClientBox`).
        let p = detached(py, self.client.clone(), |c| c.producer(channel)).map_err(open_err)?;
        let mut extra = lock(&self.extra);
        if !extra.iter().any(|(n, _)| n == channel) {
            extra.push((channel.to_owned(), p));
        }
        Ok(())
    }

    /// Whether `t` may be forwarded on `channel` (opened by
    /// [`StageCore::open_extra`]), without consuming it.
    pub(crate) fn check_extra(
        &self,
        t: &StagedTensor<'static>,
        channel: &str,
    ) -> Result<(), tensorbus::PublishError> {
        let extra = lock(&self.extra);
        match extra.iter().find(|(n, _)| n == channel) {
            Some((_, p)) => t.check_forward_to(p),
            None => unreachable!("open_extra ran first"),
        }
    }

    /// Waits up to `timeout` until a forward on `channel` (opened by
    /// [`StageCore::open_extra`]) would not wait for room.
    pub(crate) fn wait_extra(&self, channel: &str, timeout: Duration) -> bool {
        let extra = lock(&self.extra);
        match extra.iter().find(|(n, _)| n == channel) {
            Some((_, p)) => p.wait_for_room(timeout),
            None => true,
        }
    }

    /// Forwards `t` (a tensor of this stage) on `channel` through the
    /// producer [`StageCore::open_extra`] opened.
    pub(crate) fn forward_on(
        &self,
        t: StagedTensor<'static>,
        channel: &str,
    ) -> Result<Published, tensorbus::PublishError> {
        let mut extra = lock(&self.extra);
        match extra.iter_mut().find(|(n, _)| n == channel) {
            Some((_, p)) => t.forward_to_stamped(p),
            None => unreachable!("open_extra ran first"),
        }
    }
}

/// A work-queue stage: `recv_mut()` takes a tensor exclusively and
/// writable; `t.forward()` publishes the very same slot downstream.
#[pyclass(frozen, module = "tensorbus", name = "Stage")]
pub struct PyStage {
    slot: Arc<Slot<StageCore>>,
    input: String,
    output: String,
}

#[pymethods]
impl PyStage {
    /// The input (work-queue) channel.
    #[getter]
    fn input(&self) -> &str {
        &self.input
    }

    /// The output channel `forward()` publishes on.
    #[getter]
    fn output(&self) -> &str {
        &self.output
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.slot.get().is_none()
    }

    /// Waits for the next input tensor (at most `timeout` seconds) and
    /// takes it exclusively: a writable `Tensor` to change in place and
    /// `forward()`. Raises `Timeout`; one tensor per stage at a time (`Busy`).
    #[pyo3(signature = (timeout = None))]
    fn recv_mut(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyTensor>> {
        let timeout = timeout_of(timeout)?;
        let core = self.slot.core("stage")?;
        core.busy.take(
            "this stage already holds a tensor (one at a time): forward or release it first",
        )?;
        let result = self.recv_mut_with(py, &core, timeout);
        lent(py, core, result, View::Staged)
    }

    /// Closes the stage. A staged tensor still alive keeps it open.
    fn close(&self) {
        self.slot.close();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "tensorbus.Stage(input={:?}, output={:?})",
            self.input, self.output
        )
    }
}

impl PyStage {
    fn recv_mut_with(
        &self,
        py: Python<'_>,
        core: &Arc<StageCore>,
        timeout: Option<Duration>,
    ) -> PyResult<StagedTensor<'static>> {
        let start = Instant::now();
        loop {
            let (left, slice) = next_slice(start, timeout);
            let r = detached(py, core.s.get(), move |s| {
                // SAFETY: the caller holds `busy`: this is the only reference
                // to the stage, which the caller's `Arc` keeps alive; the
                // staged tensor is stored with that `Arc` and dropped first.
                let stage: &'static mut Stage = unsafe { &mut *s };
                if slice.is_zero() {
                    stage.try_recv_mut().map_err(|e| match e {
                        TryRecvError::Empty => RecvError::Timeout(Duration::ZERO),
                        TryRecvError::Corrupted(c) => RecvError::Corrupted(c),
                        TryRecvError::ForkedChild(f) => RecvError::ForkedChild(f),
                        TryRecvError::NotExclusive(d) => RecvError::NotExclusive(d),
                    })
                } else {
                    stage.recv_mut_timeout(slice)
                }
            });
            match r {
                Ok(t) => return Ok(t),
                Err(RecvError::Timeout(_)) if left.is_none_or(|l| l > slice) => {
                    py.check_signals()?;
                    if self.slot.get().is_none() {
                        return Err(closed("stage"));
                    }
                }
                Err(RecvError::Timeout(_)) => return Err(recv_timeout(&self.input, timeout)),
                Err(e) => return Err(recv_err(e)),
            }
        }
    }
}
