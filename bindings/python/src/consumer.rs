//! `Consumer`: the reading end of a channel, and `_Readiness`, its
//! readiness fd for the asyncio helpers (`tensorbus/_aio.py`).
//!
//! `close()` ends the subscription at once (issue 11.2), whatever else
//! still refers to the consumer: a thread blocked in `recv()` (it then
//! raises `Closed`), an asyncio waiter kept by a reference cycle, a
//! readiness fd an event loop watches, received tensors (they stay valid
//! until released; the broker handle closes with the last of them).

use crate::convert::{next_slice, recv_timeout, timeout_of};
use crate::errors::{closed, recv_err, tb_err, try_recv_err};
use crate::slot::{ConsumerHandle, FinalCounts, Slot};
use crate::tensor::PyTensor;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyModule, PyTuple};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tensorbus::error::{RecvError, TryRecvError};
use tensorbus::Consumer;

/// The reading end of a channel: `recv()` returns read-only tensors;
/// iterating yields tensors until the end of the stream or until the
/// consumer is closed.
#[pyclass(frozen, weakref, module = "tensorbus", name = "Consumer")]
pub struct PyConsumer {
    slot: Arc<Slot<ConsumerHandle>>,
    /// A duplicate of the consumer's readiness eventfd, made on first use:
    /// it stays open (for an event loop that watches it) after the consumer
    /// is closed, and keeps one fd number for the consumer's life.
    efd: OnceLock<Arc<std::fs::File>>,
    /// The counters as `close()` left them.
    last: Arc<FinalCounts>,
    channel: String,
    policy: &'static str,
    depth: u32,
}

/// What one receive (or a wait) got.
enum Got {
    /// A tensor.
    Tensor(Py<PyTensor>),
    /// Nothing (queued now, or within the wait).
    Nothing,
    /// End of stream.
    Ended,
}

/// One non-blocking receive.
fn take(py: Python<'_>, c: &Consumer) -> PyResult<Got> {
    match c.try_recv() {
        Ok(t) => PyTensor::received(py, t).map(Got::Tensor),
        Err(TryRecvError::Empty) => Ok(Got::Nothing),
        Err(TryRecvError::EndOfStream) => Ok(Got::Ended),
        Err(e) => Err(try_recv_err(e)),
    }
}

/// One non-blocking receive as a Python tensor (`None`: nothing queued;
/// `EndOfStream` at the end of the stream).
fn try_take(py: Python<'_>, c: &Consumer) -> PyResult<Option<Py<PyTensor>>> {
    match take(py, c)? {
        Got::Tensor(t) => Ok(Some(t)),
        Got::Nothing => Ok(None),
        Got::Ended => Err(crate::errors::end_of_stream(c.channel())),
    }
}

impl PyConsumer {
    /// A counter: `live` of the open consumer, else its value at `close()`
    /// (`Closed` only where no close took it: a consumer closed in a
    /// process forked from the one that opened it, or read by one thread
    /// while another is closing it).
    fn count(&self, live: fn(&Consumer) -> u64, last: &AtomicU64) -> PyResult<u64> {
        match self.slot.get_open()? {
            Some(h) => Ok(live(&h.consumer)),
            None if self.last.taken.load(Ordering::Acquire) => Ok(last.load(Ordering::Relaxed)),
            None => Err(closed("consumer")),
        }
    }

    /// A Python consumer of `consumer`, and its slot (for the client to close).
    pub(crate) fn new(consumer: Consumer) -> (PyConsumer, Arc<Slot<ConsumerHandle>>) {
        let channel = consumer.channel().to_owned();
        let policy = crate::convert::policy_name(consumer.policy());
        let depth = consumer.depth();
        let last = Arc::new(FinalCounts::default());
        let slot = Slot::new(
            ConsumerHandle {
                consumer,
                aio: Default::default(),
                last: last.clone(),
            },
            "consumer",
        );
        let py = PyConsumer {
            slot: slot.clone(),
            last,
            efd: OnceLock::new(),
            channel,
            policy,
            depth,
        };
        (py, slot)
    }

    /// Waits up to `timeout` (None: forever), in slices, checking signals
    /// (Ctrl-C) and `close()` between them.
    fn wait(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<Got> {
        let h = self.slot.get()?;
        // Fast path: a tensor is already queued; no clock, no GIL release.
        match take(py, &h.consumer)? {
            Got::Nothing => {}
            got => return Ok(got),
        }
        if timeout.is_some_and(|t| t.is_zero()) {
            return Ok(Got::Nothing);
        }
        let start = Instant::now();
        loop {
            let (left, slice) = next_slice(start, timeout);
            let got = if slice.is_zero() {
                return take(py, &h.consumer);
            } else {
                // `close()` from another thread detaches the consumer: this
                // wait then ends within one park slice (`Detached`).
                py.detach(|| h.consumer.recv_timeout(slice))
            };
            match got {
                Ok(t) => return PyTensor::received(py, t).map(Got::Tensor),
                Err(RecvError::Timeout(_)) if left.is_some_and(|l| l <= slice) => {
                    return Ok(Got::Nothing)
                }
                Err(RecvError::Timeout(_)) => {
                    py.check_signals()?;
                    if self.slot.is_closed() {
                        return Err(closed("consumer"));
                    }
                }
                Err(RecvError::EndOfStream) => return Ok(Got::Ended),
                Err(RecvError::Detached) => return Err(closed("consumer")),
                Err(e) => return Err(recv_err(e)),
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
        self.slot.is_closed()
    }

    /// Tensors producers dropped for this subscriber since it subscribed
    /// (drop_oldest, drop_newest, latest; always 0 under block): the
    /// counter `tensorbus stat` shows, one atomic load. After `close()`
    /// (of the consumer or its client): the final count, as of the close.
    #[getter]
    fn dropped(&self) -> PyResult<u64> {
        self.count(Consumer::dropped, &self.last.dropped)
    }

    /// Tensors this subscriber has received since it subscribed. After
    /// `close()`: the final count, as of the close.
    #[getter]
    fn received(&self) -> PyResult<u64> {
        self.count(Consumer::received, &self.last.received)
    }

    /// Waits for the next tensor (at most `timeout` seconds; None: forever)
    /// and returns a read-only `Tensor`. Raises `Timeout`, `EndOfStream`
    /// once the channel's last producer closed cleanly and everything
    /// queued was received (unless opened with `end_of_stream=False`), or
    /// `Closed` when the consumer is closed meanwhile (from another
    /// thread). The GIL is released while waiting and Ctrl-C interrupts
    /// the wait.
    #[pyo3(signature = (timeout = None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyTensor>> {
        let t = timeout_of(timeout)?;
        match self.wait(py, t)? {
            Got::Tensor(x) => Ok(x),
            Got::Nothing => Err(recv_timeout(&self.channel, t)),
            Got::Ended => Err(crate::errors::end_of_stream(&self.channel)),
        }
    }

    /// The next tensor if one is queued, else None (never waits); raises
    /// `EndOfStream` at the end of the stream (see `recv()`).
    fn try_recv(&self, py: Python<'_>) -> PyResult<Option<Py<PyTensor>>> {
        try_take(py, &self.slot.get()?.consumer)
    }

    /// `await consumer.recv_async(timeout=None)`: waits for the next tensor
    /// without blocking the event loop (asyncio; the consumer's readiness
    /// eventfd is watched with `loop.add_reader`). Raises `Timeout` after
    /// `timeout` seconds, `EndOfStream` at the end of the stream (see
    /// `recv()`) and `Closed` when the consumer is closed while waiting;
    /// cancelling the awaiting task loses no tensor.
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

    /// `async for t in consumer`: ends at the end of the stream or when
    /// the consumer is closed.
    fn __anext__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        aio(py)?.getattr("anext")?.call1((slf,))
    }

    /// The readiness fd helper of `recv_async` (internal).
    fn _readiness(&self) -> PyResult<PyReadiness> {
        let h = self.slot.get()?;
        let fd = match self.efd.get() {
            Some(fd) => fd.clone(),
            None => {
                let fd = h
                    .consumer
                    .readiness_fd()
                    .and_then(|fd| fd.try_clone_to_owned())
                    .map_err(|e| {
                        tb_err("TensorbusError", format!("cannot make a readiness fd: {e}"))
                    })?;
                self.efd
                    .get_or_init(|| Arc::new(std::fs::File::from(fd)))
                    .clone()
            }
        };
        h.aio.store(true, Ordering::Release);
        Ok(PyReadiness {
            slot: self.slot.clone(),
            fd,
        })
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// `for t in consumer`: the next tensor; stops at the end of the stream
    /// or when the consumer is closed.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyTensor>>> {
        if self.closed() {
            return Ok(None);
        }
        match self.wait(py, None) {
            Ok(Got::Tensor(t)) => Ok(Some(t)),
            // `Nothing` cannot come from an endless wait.
            Ok(Got::Ended | Got::Nothing) => Ok(None),
            Err(_) if self.closed() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Unsubscribes at once, whatever references to this consumer remain
    /// (a thread blocked in `recv()`, an `await` that timed out, a
    /// readiness fd an event loop watches): nothing more is delivered to it
    /// (a `block` producer no longer waits for it). Tensors received from
    /// it and still alive keep their slots until released.
    fn close(&self, py: Python<'_>) {
        // Broker requests (detach, close): without the GIL.
        py.detach(|| self.slot.close());
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
            "tensorbus.Consumer(channel={:?}, policy={:?}, depth={})",
            self.channel, self.policy, self.depth
        )
    }
}

/// Dropping the last reference to a Python consumer closes it (issue 11.2):
/// the subscription must not wait for the cycle collector to free an object
/// (a readiness fd, an `await` that timed out) that still refers to the slot.
impl Drop for PyConsumer {
    fn drop(&mut self) {
        self.slot.close();
    }
}

/// The asyncio helpers (`tensorbus/_aio.py`).
static AIO: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn aio(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    AIO.get_or_try_init(py, || py.import("tensorbus._aio").map(|m| m.unbind()))
        .map(|m| m.bind(py))
}

/// A consumer's readiness fd for the asyncio helpers (`tensorbus/_aio.py`).
/// It refers to the consumer's slot (not to the consumer itself), so an
/// event loop watching it never keeps a closed or dropped consumer
/// subscribed; its fd stays open as long as it lives.
#[pyclass(frozen, module = "tensorbus", name = "_Readiness")]
pub struct PyReadiness {
    slot: Arc<Slot<ConsumerHandle>>,
    /// A duplicate of the consumer's eventfd: it stays open (for the event
    /// loop that watches it) after the consumer is closed and dropped.
    fd: Arc<std::fs::File>,
}

impl PyReadiness {
    /// Runs `f` on the readiness of the open consumer (nothing once closed).
    fn readiness(&self, f: impl FnOnce(&tensorbus::Readiness)) -> PyResult<()> {
        let Some(h) = self.slot.get_open()? else {
            return Ok(());
        };
        h.consumer
            .readiness()
            .map(f)
            .map_err(|e| tb_err("TensorbusError", format!("readiness fd: {e}")))
    }
}

#[pymethods]
impl PyReadiness {
    /// The eventfd to watch for readability.
    fn fileno(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&*self.fd)
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
        self.slot.get_open()?; // ForkedChild in a forked child
                               // The eventfd is non-blocking (one file with the consumer's): a read
                               // resets its count, or fails with EAGAIN when nothing is pending.
        let _ = std::io::Read::read(&mut &*self.fd, &mut [0u8; 8]);
        Ok(())
    }

    /// Whether the consumer was closed.
    #[getter]
    fn closed(&self) -> bool {
        self.slot.is_closed()
    }

    /// The next tensor if one is queued, else None; `EndOfStream` at the
    /// end of the stream, `Closed` once the consumer is closed.
    fn try_recv(&self, py: Python<'_>) -> PyResult<Option<Py<PyTensor>>> {
        try_take(py, &self.slot.get()?.consumer)
    }
}
