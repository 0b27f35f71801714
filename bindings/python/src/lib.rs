//! # tensorbus for Python
//!
//! The native module `tensorbus._tensorbus`, re-exported by the pure-Python
//! package `tensorbus`. It wraps the Rust client library:
//!
//! * `Client`, `Producer`, `Consumer`, `Stage` and an embeddable `Broker`.
//! * `Tensor`: a loaned, received or staged slot. `numpy.asarray(t)` and
//!   `numpy.from_dlpack(t)` are views of the very bytes in shared memory.
//!
//! ## Lifetimes without dangling
//!
//! Rust views (`TensorMut<'p>`, `Tensor<'c>`, `StagedTensor<'s>`) borrow the
//! handle they came from. As in the C binding, a Python `Tensor` owns its view
//! with the lifetime erased to `'static`, and keeps the handle it borrows
//! alive by holding an `Arc` of it (declared after the view, so the view is
//! always dropped first). Closing a handle or a client only drops the Python
//! object's own reference: the Rust handle (and the shared-memory mappings
//! it keeps) goes away when its last tensor does.
//!
//! Every numpy array and DLPack capsule made from a tensor holds a strong
//! reference to it and counts as an *export*. `release()` refuses (with
//! `BufferError`) while exports live; the end of a `with` block defers the
//! release to the last export's end. So no Python code can make a view of
//! memory that is unmapped or handed to another tensor.

mod handles;
mod tensor;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;
use std::time::Duration;
use tensorbus::{DType, Mode, Policy};

/// Wraps a value so it may cross `Python::detach` (which needs `Send`).
///
/// Used for the erased-lifetime views and handle references: they are used
/// by the one thread that runs the closure while the GIL is released, and
/// the objects they point to are kept alive by `Arc`s held by the caller.
pub(crate) struct AssertSend<T>(pub T);

// SAFETY: see the type's documentation: the wrapped references point to
// process-wide memory (heap objects kept alive by the caller's `Arc`s and
// shared-memory mappings) and are used by one thread at a time, guarded by
// the handle's `busy` flag or lock.
unsafe impl<T> Send for AssertSend<T> {}

/// The Python module `tensorbus._errors`, where the exception classes live.
static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// A tensorbus exception of class `name` (see `tensorbus/_errors.py`).
///
/// Lazy: the exception object is made when Python raises it, not here, so
/// this may be called while a tensor's lock is held (making a Python object
/// there could run a collection that ends an export, which takes that lock).
pub(crate) fn tb_err(name: &str, msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    Python::attach(|py| {
        let cls = ERRORS
            .get_or_try_init(py, || py.import("tensorbus._errors").map(|m| m.unbind()))
            .and_then(|m| m.bind(py).getattr(name))
            .and_then(|c| c.cast_into::<pyo3::types::PyType>().map_err(PyErr::from));
        match cls {
            Ok(cls) => PyErr::from_type(cls, msg),
            Err(e) => e,
        }
    })
}

/// How long one blocking wait runs without the GIL before signals (Ctrl-C)
/// are checked again.
pub(crate) const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Converts a Python timeout in seconds (`None`: forever) to a duration.
pub(crate) fn timeout_of(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) if t == f64::INFINITY => Ok(None),
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds or None, not {t}"
        ))),
    }
}

/// The numpy-style name of a dtype (`"uint8"`, `"float32"`, `"bfloat16"`).
pub(crate) fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::Bool => "bool",
        DType::U8 => "uint8",
        DType::I8 => "int8",
        DType::U16 => "uint16",
        DType::I16 => "int16",
        DType::U32 => "uint32",
        DType::I32 => "int32",
        DType::U64 => "uint64",
        DType::I64 => "int64",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
        DType::F64 => "float64",
    }
}

/// Every accepted dtype name (numpy's names, short forms, type codes).
const DTYPE_NAMES: &[(&str, DType)] = &[
    ("bool", DType::Bool),
    ("bool_", DType::Bool),
    ("b1", DType::Bool),
    ("uint8", DType::U8),
    ("u8", DType::U8),
    ("u1", DType::U8),
    ("int8", DType::I8),
    ("i8", DType::I8),
    ("i1", DType::I8),
    ("uint16", DType::U16),
    ("u16", DType::U16),
    ("u2", DType::U16),
    ("int16", DType::I16),
    ("i16", DType::I16),
    ("i2", DType::I16),
    ("uint32", DType::U32),
    ("u32", DType::U32),
    ("u4", DType::U32),
    ("int32", DType::I32),
    ("i32", DType::I32),
    ("i4", DType::I32),
    ("uint64", DType::U64),
    ("u64", DType::U64),
    ("int64", DType::I64),
    ("i64", DType::I64),
    ("float16", DType::F16),
    ("f16", DType::F16),
    ("half", DType::F16),
    ("f2", DType::F16),
    ("bfloat16", DType::BF16),
    ("bf16", DType::BF16),
    ("float32", DType::F32),
    ("f32", DType::F32),
    ("single", DType::F32),
    ("f4", DType::F32),
    ("float64", DType::F64),
    ("f64", DType::F64),
    ("double", DType::F64),
    ("f8", DType::F64),
];

/// Parses a dtype given as a name (`"uint8"`, `"u8"`, `"float16"`,
/// `"bfloat16"`, ...), a numpy dtype or a numpy scalar type.
pub(crate) fn parse_dtype(obj: &Bound<'_, PyAny>) -> PyResult<DType> {
    // Fast path (every loan): a dict of the names, looked up by the
    // string's cached hash, and the index into `DTYPE_NAMES` it maps to.
    static NAMES: PyOnceLock<Py<pyo3::types::PyDict>> = PyOnceLock::new();
    let py = obj.py();
    let names = NAMES.get_or_try_init(py, || {
        let d = pyo3::types::PyDict::new(py);
        for (i, (name, _)) in DTYPE_NAMES.iter().enumerate() {
            d.set_item(name, i)?;
        }
        Ok::<_, PyErr>(d.unbind())
    })?;
    if obj.is_instance_of::<pyo3::types::PyString>() {
        if let Ok(Some(i)) = names.bind(py).get_item(obj) {
            if let Some(&(_, d)) = i.extract::<usize>().ok().and_then(|i| DTYPE_NAMES.get(i)) {
                return Ok(d);
            }
        }
    }
    let name: String = if let Ok(s) = obj.extract::<String>() {
        s
    } else if let Ok(n) = obj.getattr("name").and_then(|n| n.extract::<String>()) {
        n // numpy.dtype (and ml_dtypes' bfloat16 dtype)
    } else if let Ok(n) = obj.getattr("__name__").and_then(|n| n.extract::<String>()) {
        n // numpy.float32 and other scalar types
    } else {
        return Err(tb_err(
            "ShapeError",
            format!("cannot use {obj} as a dtype; give a name such as \"uint8\" or \"float32\""),
        ));
    };
    match DTYPE_NAMES.iter().find(|(n, _)| *n == name) {
        Some(&(_, d)) => Ok(d),
        None => Err(tb_err(
            "ShapeError",
            format!("unknown dtype {name:?}; tensorbus has bool, uint8, int8, uint16, int16, uint32, int32, uint64, int64, float16, bfloat16, float32, float64"),
        )),
    }
}

/// Parses a backpressure policy name.
pub(crate) fn parse_policy(s: &str) -> PyResult<Policy> {
    s.parse::<Policy>()
        .map_err(|e| tb_err("InvalidArgument", e))
}

/// Parses a channel mode name.
pub(crate) fn parse_mode(s: &str) -> PyResult<Mode> {
    match s {
        "broadcast" => Ok(Mode::Broadcast),
        "workqueue" | "work_queue" => Ok(Mode::Workqueue),
        other => Err(tb_err(
            "InvalidArgument",
            format!("unknown mode {other:?}; use \"broadcast\" or \"workqueue\""),
        )),
    }
}

/// The default broker socket path (`$TENSORBUS_SOCKET`, then
/// `$XDG_RUNTIME_DIR/tensorbus/broker.sock`, then `/tmp/tensorbus-$UID/broker.sock`).
#[pyfunction]
fn socket_path() -> std::path::PathBuf {
    tensorbus::socket_path(None)
}

/// The native part of the `tensorbus` package.
#[pymodule]
fn _tensorbus(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<handles::PyBroker>()?;
    m.add_class::<handles::PyClient>()?;
    m.add_class::<handles::PyProducer>()?;
    m.add_class::<handles::PyConsumer>()?;
    m.add_class::<handles::PyStage>()?;
    m.add_class::<tensor::PyTensor>()?;
    m.add_class::<tensor::Export>()?;
    m.add_class::<handles::PyReadiness>()?;
    m.add_class::<tensor::StructProbe>()?;
    m.add_function(wrap_pyfunction!(socket_path, m)?)?;
    m.add("MAX_DIMS", tensorbus::MAX_DIMS)?;
    m.add("USER_HEADER_LEN", tensorbus::USER_HEADER_LEN)?;
    let names: Vec<&str> = DType::ALL.iter().map(|&d| dtype_name(d)).collect();
    m.add("DTYPES", pyo3::types::PyTuple::new(m.py(), names)?)?;
    Ok(())
}
