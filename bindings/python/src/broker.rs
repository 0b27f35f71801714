//! `Broker`: a broker on a thread of this process.

use crate::errors::tb_err;
use crate::slot::lock;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tensorbus::Client;
use tensorbus_broker::{Config, ConfigError, EmbeddedBroker};

/// A broker running on a thread of this process: handy for tests, demos
/// and single-process pipelines. Other processes connect to its socket as to
/// any broker. `config` is a broker config (see `examples/tensorbus.toml`;
/// default: the built-in pools): TOML text, or the path of a TOML file (a
/// str naming an existing file, or an `os.PathLike`); `config_file=` takes
/// a path only. `socket` is its socket path (default: `[broker] socket` of
/// the config, else `tensorbus.socket_path()`).
///
/// ```python
/// with tb.Broker("examples/tensorbus.toml", "/tmp/tb/broker.sock") as broker:
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

/// Where a broker's config comes from.
enum ConfigSource {
    /// TOML text.
    Text(String),
    /// A TOML file.
    File(PathBuf),
}

impl ConfigSource {
    /// Tells TOML text from a path: a str that names an existing file is a
    /// path; a str with a newline or `=`, that starts with a table header
    /// or a comment, or is blank, is TOML text; an `os.PathLike` is a path.
    /// Anything else is an error saying what was expected.
    fn of(config: &Bound<'_, PyAny>) -> PyResult<ConfigSource> {
        if let Ok(s) = config.cast::<PyString>() {
            let s = s.to_cow()?;
            if !s.contains('\n') && Path::new(&*s).is_file() {
                return Ok(ConfigSource::File(PathBuf::from(&*s)));
            }
            let t = s.trim_start();
            if s.contains('\n') || s.contains('=') || t.is_empty() || t.starts_with(['[', '#']) {
                return Ok(ConfigSource::Text(s.into_owned()));
            }
            return Err(PyValueError::new_err(format!(
                "expected TOML text or a path to a TOML file: no file named {s:?} exists, \
                 and it is not TOML text (no `=` or newline in it)"
            )));
        }
        match config.extract::<PathBuf>() {
            Ok(path) => Ok(ConfigSource::File(path)),
            Err(_) => Err(PyTypeError::new_err(format!(
                "expected TOML text or a path to a TOML file, not {}",
                config.get_type().name()?
            ))),
        }
    }

    /// Reads and checks the config; a file's errors name the file.
    fn load(&self) -> PyResult<Config> {
        match self {
            ConfigSource::Text(text) => Config::from_toml(text),
            ConfigSource::File(path) => Config::from_file(path).map_err(|e| match e {
                ConfigError::Read { .. } => e,
                other => ConfigError::Invalid(format!("{}: {other}", path.display())),
            }),
        }
        .map_err(|e| tb_err("InvalidArgument", e.to_string()))
    }
}

#[pymethods]
impl PyBroker {
    #[new]
    #[pyo3(signature = (config = None, socket = None, *, config_file = None))]
    fn new(
        py: Python<'_>,
        config: Option<&Bound<'_, PyAny>>,
        socket: Option<PathBuf>,
        config_file: Option<PathBuf>,
    ) -> PyResult<Self> {
        let source = match (config, config_file) {
            (Some(_), Some(_)) => {
                return Err(PyValueError::new_err(
                    "give either config (TOML text or a path) or config_file, not both",
                ))
            }
            (Some(c), None) => Some(ConfigSource::of(c)?),
            (None, Some(path)) => Some(ConfigSource::File(path)),
            (None, None) => None,
        };
        let cfg = match source {
            Some(source) => source.load()?,
            None => Config::default(),
        };
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
