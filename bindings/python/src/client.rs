//! `Client`: a connection to a broker; opens producers, consumers and
//! stages, and closes them all when it is closed.

use crate::consumer::PyConsumer;
use crate::convert::{create_spec, parse_policy, parse_wait, parse_wait_arg, WaitArg};
use crate::errors::{closed, connect_err, forked_err, open_err, remove_err, request_err, tb_err};
use crate::producer::PyProducer;
use crate::slot::{lock, Closable, Handle, Slot, StageHandle};
use crate::stage::PyStage;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use tensorbus::error::OpenError;
use tensorbus::{Client, Consumer, ConsumerOptions, Policy, ProducerOptions};

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
    /// The slots of the handles opened from this client.
    children: Vec<Weak<dyn Closable>>,
}

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

    /// Registers a handle's slot, to be closed with the client.
    fn adopt<H: Handle>(&self, slot: &Arc<Slot<H>>) {
        let child = Arc::downgrade(slot) as Weak<dyn Closable>;
        let mut st = lock(&self.state);
        st.children.retain(|w| w.strong_count() > 0);
        st.children.push(child);
    }

    /// Subscribes with `opts`; when they wait for the channel, without the
    /// GIL and checking for signals (Ctrl-C) and `close()` of this client
    /// between polls (every 50 ms at most): the exception a signal handler
    /// raised (KeyboardInterrupt) ends the wait and is raised here, a
    /// client closed meanwhile raises `Closed`.
    fn open_consumer(
        &self,
        py: Python<'_>,
        client: &Client,
        channel: &str,
        opts: ConsumerOptions,
    ) -> PyResult<Consumer> {
        if opts.wait_for_channel.is_none() {
            return py
                .detach(|| client.consumer_with(channel, opts))
                .map_err(open_err);
        }
        self.interruptibly(py, |interrupted| {
            client.consumer_interruptible(channel, opts, interrupted)
        })
    }

    /// Runs `open` (a wait for a channel) without the GIL, passing it a
    /// check that looks for signals (Ctrl-C) and `close()` of this client:
    /// the exception a signal handler raised (KeyboardInterrupt) ends the
    /// wait and is raised here, a client closed meanwhile raises `Closed`.
    fn interruptibly<T: Send>(
        &self,
        py: Python<'_>,
        open: impl FnOnce(&mut dyn FnMut() -> bool) -> Result<T, OpenError> + Send,
    ) -> PyResult<T> {
        let mut raised: Option<PyErr> = None;
        let r = py.detach(|| {
            let mut check = || {
                let signal = Python::attach(|py| py.check_signals());
                match signal {
                    Err(e) => {
                        raised = Some(e);
                        true
                    }
                    Ok(()) => self.closed(),
                }
            };
            open(&mut check)
        });
        match r {
            Ok(c) => Ok(c),
            Err(OpenError::Interrupted(_)) => Err(raised.unwrap_or_else(|| closed("client"))),
            Err(e) => Err(open_err(e)),
        }
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
        let client = py
            .detach(|| Client::connect_to(socket.as_deref(), &name))
            .map_err(connect_err)?;
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
    /// default: every pool), `mode` (`"broadcast"` or `"workqueue"`) and
    /// `history` (broadcast only: a subscriber that joins late first
    /// receives the last `history` tensors; default 0).
    #[pyo3(signature = (channel, *, pools = None, mode = None, create = false, history = 0))]
    fn producer(
        &self,
        py: Python<'_>,
        channel: &str,
        pools: Option<Vec<String>>,
        mode: Option<&str>,
        create: bool,
        history: u32,
    ) -> PyResult<PyProducer> {
        let client = self.client()?;
        let mut opts = ProducerOptions::default();
        if let Some(spec) = create_spec(create, pools, mode, history)? {
            opts = opts.create(spec);
        }
        let producer = py
            .detach(|| client.producer_with(channel, opts))
            .map_err(open_err)?;
        let (p, slot) = PyProducer::new(producer);
        self.adopt(&slot);
        Ok(p)
    }

    /// Subscribes to `channel`. `policy`: `"block"`, `"drop_oldest"`,
    /// `"drop_newest"` or `"latest"` (default: the channel's); `depth`: ring
    /// depth (default: the channel's); `wait_strategy`: `"spin"` (spin
    /// 50 µs, then sleep; default), `"busy"` (never sleep) or `"park"`
    /// (sleep at once).
    ///
    /// `wait`: when the channel does not exist yet, `True` waits for a
    /// producer to create it (forever; Ctrl-C interrupts), a number waits
    /// that many seconds and then raises `Timeout`; `False`, `None` or `0`
    /// (the default) raise `ChannelNotFound` at once. The subscription is
    /// registered while it waits, so it receives from the channel's first
    /// tensor on. (A string `wait=` is the wait strategy, as before
    /// `wait_strategy=`: deprecated.)
    ///
    /// `end_of_stream`: receives raise `EndOfStream` (iteration stops)
    /// once the channel's last producer closed cleanly and everything
    /// queued was received (default); False keeps waiting instead, for a
    /// service that outlives its producers.
    ///
    /// With `create=True` the channel is created if missing (`pools`,
    /// `mode`, `history` as for `producer()`).
    #[pyo3(signature = (channel, *, policy = None, depth = None, wait = None, wait_strategy = None, create = false, pools = None, mode = None, history = 0, end_of_stream = true))]
    #[allow(clippy::too_many_arguments)]
    fn consumer(
        &self,
        py: Python<'_>,
        channel: &str,
        policy: Option<&str>,
        depth: Option<u32>,
        wait: Option<&Bound<'_, PyAny>>,
        wait_strategy: Option<&str>,
        create: bool,
        pools: Option<Vec<String>>,
        mode: Option<&str>,
        history: u32,
        end_of_stream: bool,
    ) -> PyResult<PyConsumer> {
        let client = self.client()?;
        let mut opts = ConsumerOptions::default().end_of_stream(end_of_stream);
        if let Some(p) = policy {
            opts = opts.policy(parse_policy(p)?);
        }
        if let Some(d) = depth {
            opts = opts.depth(d);
        }
        if let Some(w) = wait_strategy {
            opts = opts.wait(parse_wait(w)?);
        }
        match parse_wait_arg(wait, true)? {
            WaitArg::No => {}
            WaitArg::Channel(d) => opts = opts.wait_for_channel(d),
            WaitArg::Strategy(_) if wait_strategy.is_some() => {
                return Err(PyValueError::new_err(
                    "wait_strategy= and a wait strategy in wait= given both; use wait_strategy=",
                ))
            }
            WaitArg::Strategy(w) => opts = opts.wait(w),
        }
        if let Some(spec) = create_spec(create, pools, mode, history)? {
            opts = opts.create(spec);
        }
        let consumer = self.open_consumer(py, &client, channel, opts)?;
        let (c, slot) = PyConsumer::new(consumer);
        self.adopt(&slot);
        Ok(c)
    }

    /// Opens a stage: an exclusive, writable subscription to the work-queue
    /// channel `input` (lossless) plus a producer on `output`. `recv_mut()`
    /// gives a writable tensor; `t.forward()` publishes the same slot on `output`.
    ///
    /// `wait` (True, or seconds) waits for `input` to be created, as for
    /// `consumer()`; `Timeout` when it is not in time. The wait releases
    /// the GIL and checks for signals like `consumer()`'s (Ctrl-C raises
    /// `KeyboardInterrupt`). `end_of_stream`: as for
    /// `consumer()` (`recv_mut()` raises `EndOfStream`).
    #[pyo3(signature = (input, output, *, depth = None, wait = None, end_of_stream = true))]
    fn stage(
        &self,
        py: Python<'_>,
        input: &str,
        output: &str,
        depth: Option<u32>,
        wait: Option<&Bound<'_, PyAny>>,
        end_of_stream: bool,
    ) -> PyResult<PyStage> {
        let client = self.client()?;
        let mut opts = ConsumerOptions::default()
            .policy(Policy::Block)
            .end_of_stream(end_of_stream);
        if let Some(d) = depth {
            opts = opts.depth(d);
        }
        if let WaitArg::Channel(d) = parse_wait_arg(wait, false)? {
            opts = opts.wait_for_channel(d);
        }
        let stage = if opts.wait_for_channel.is_none() {
            py.detach(|| client.stage_with(input, output, opts))
                .map_err(open_err)?
        } else {
            self.interruptibly(py, |interrupted| {
                client.stage_interruptible(input, output, opts, interrupted)
            })?
        };
        let (s, slot) = PyStage::new(StageHandle::new(stage, output, client), input);
        self.adopt(&slot);
        Ok(s)
    }

    /// Removes `channel`, a channel created at run time (`create=True`, or
    /// `tensorbus pub --create`), so that it no longer counts toward the
    /// broker's `limits.max_channels`; the tensors its history kept are
    /// released. Raises `ChannelNotFound` for an unknown name, `Busy` while
    /// any producer, consumer or stage (of any client) uses it, and
    /// `PermissionDenied` when the broker's config declares it.
    fn remove_channel(&self, py: Python<'_>, channel: &str) -> PyResult<()> {
        let client = self.client()?;
        py.detach(|| client.remove_channel(channel))
            .map_err(remove_err)
    }

    /// A statistics snapshot from the broker, as a dict (the JSON of
    /// `tensorbus stat --json`): pools (slots_free, loaned, in_flight),
    /// channels (subscribers with delivered/dropped/queued; `history` and
    /// `history_held`: the tensors kept for late subscribers, configured and
    /// held now; `ended`: the last producer closed; `pending`: not created
    /// yet, consumers wait for it) and clients.
    fn stat<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client()?;
        let report = py.detach(|| client.stat()).map_err(request_err)?;
        let text =
            serde_json::to_string(&report).map_err(|e| tb_err("ProtocolError", e.to_string()))?;
        py.import("json")?.call_method1("loads", (text,))
    }

    /// Closes the client and every producer, consumer and stage opened
    /// from it. Tensors still alive keep working until they are released;
    /// the connection to the broker closes with the last of them.
    fn close(&self, py: Python<'_>) {
        let (client, children) = {
            let mut st = lock(&self.state);
            (st.client.take(), std::mem::take(&mut st.children))
        };
        // Broker requests (detach, close): without the GIL.
        py.detach(|| {
            for child in children {
                if let Some(c) = child.upgrade() {
                    c.close();
                }
            }
            drop(client);
        });
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
            "tensorbus.Client(id={}, socket={:?}{})",
            self.id,
            self.socket,
            if self.closed() { ", closed" } else { "" }
        )
    }
}

/// The client name by default: the script's file name (else "python").
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
