//! `Broker`: a broker on a thread of this process.

use crate::errors::tb_err;
use crate::slot::lock;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::path::PathBuf;
use std::sync::Mutex;
use tensorbus::Client;
use tensorbus_broker::{Config, EmbeddedBroker};

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
            .unwrap_or_else(Client::default_socket_path);
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
