//! Python arguments to Rust values: timeouts, dtypes, shapes (`u32`
//! extents), policies, modes, wait strategies, waits for a channel and
//! channel specs.

use crate::errors::tb_err;
use pyo3::exceptions::{PyDeprecationWarning, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString, PyTuple};
use std::time::{Duration, Instant};
use tensorbus::{ChannelSpec, DType, Mode, Policy, WaitStrategy, MAX_DIMS};

/// How long one blocking wait runs without the GIL before signals (Ctrl-C)
/// and `close()` are checked again.
pub(crate) const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Converts a Python timeout in seconds (`None`: forever) to a duration.
/// A number of seconds too large for a `Duration` (about 585 billion
/// years) is forever.
pub(crate) fn timeout_of(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Duration::try_from_secs_f64(t).ok()),
        Some(t) if t == f64::INFINITY => Ok(None),
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds or None, not {t}"
        ))),
    }
}

/// The wait left before `timeout` (from `start`; None: forever) and the
/// slice to wait next (at most [`WAIT_SLICE`], so that signals and
/// `close()` are checked between slices).
#[inline]
pub(crate) fn next_slice(
    start: Instant,
    timeout: Option<Duration>,
) -> (Option<Duration>, Duration) {
    let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
    (left, left.map_or(WAIT_SLICE, |l| l.min(WAIT_SLICE)))
}

/// The `Timeout` of a receive that got nothing on `channel` within `timeout`.
pub(crate) fn recv_timeout(channel: &str, timeout: Option<Duration>) -> PyErr {
    tb_err(
        "Timeout",
        format!(
            "no tensor arrived on {:?} within {:?}",
            channel,
            timeout.unwrap_or_default()
        ),
    )
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
        // A dtype added to the crate later: its short name.
        other => other.name(),
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
    static NAMES: PyOnceLock<Py<PyDict>> = PyOnceLock::new();
    let py = obj.py();
    let names = NAMES.get_or_try_init(py, || {
        let d = PyDict::new(py);
        for (i, (name, _)) in DTYPE_NAMES.iter().enumerate() {
            d.set_item(name, i)?;
        }
        Ok::<_, PyErr>(d.unbind())
    })?;
    if obj.is_instance_of::<PyString>() {
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

/// A parsed shape: up to `MAX_DIMS` extents inline (no allocation),
/// more in a `Vec` (which the loan then refuses with a clear message).
pub(crate) enum Shape {
    Inline([u32; MAX_DIMS], usize),
    Long(Vec<u32>),
}

impl Shape {
    /// The extents.
    pub(crate) fn as_slice(&self) -> &[u32] {
        match self {
            Shape::Inline(a, n) => &a[..*n],
            Shape::Long(v) => v,
        }
    }
}

/// One extent (axis `axis` of `shape`): a Python int in `0..=u32::MAX`,
/// else a `ShapeError` that says which bound it broke.
fn extent(x: &Bound<'_, PyAny>, axis: usize, shape: &Bound<'_, PyAny>) -> PyResult<u32> {
    if let Ok(n) = x.extract::<u32>() {
        return Ok(n);
    }
    let msg = if !x.is_instance_of::<PyInt>() {
        format!("shape must be an int or a tuple of non-negative ints, not {shape}")
    } else if x.lt(0)? {
        format!("extent {x} of axis {axis} is negative; extents are non-negative ints")
    } else {
        format!(
            "extent {x} of axis {axis} exceeds the per-axis limit of {}",
            u32::MAX
        )
    };
    Err(tb_err("ShapeError", msg))
}

/// Parses a shape: an int or a sequence of ints (a tuple first: the common case).
pub(crate) fn parse_shape(obj: &Bound<'_, PyAny>) -> PyResult<Shape> {
    if let Ok(t) = obj.cast::<PyTuple>() {
        if t.len() <= MAX_DIMS {
            let mut a = [0u32; MAX_DIMS];
            for (axis, (slot, x)) in a.iter_mut().zip(t.iter()).enumerate() {
                *slot = extent(&x, axis, obj)?;
            }
            return Ok(Shape::Inline(a, t.len()));
        }
    } else if obj.is_instance_of::<PyInt>() || obj.extract::<u32>().is_ok() {
        // An int (or a numpy integer): one dimension.
        let mut a = [0u32; MAX_DIMS];
        a[0] = extent(obj, 0, obj)?;
        return Ok(Shape::Inline(a, 1));
    }
    let items = obj
        .try_iter()
        .map_err(|_| {
            tb_err(
                "ShapeError",
                format!("shape must be an int or a tuple of non-negative ints, not {obj}"),
            )
        })?
        .enumerate()
        .map(|(axis, x)| extent(&x?, axis, obj))
        .collect::<PyResult<Vec<u32>>>()?;
    if items.len() <= MAX_DIMS {
        let mut a = [0u32; MAX_DIMS];
        a[..items.len()].copy_from_slice(&items);
        return Ok(Shape::Inline(a, items.len()));
    }
    Ok(Shape::Long(items))
}

/// Parses a backpressure policy name.
pub(crate) fn parse_policy(s: &str) -> PyResult<Policy> {
    s.parse::<Policy>()
        .map_err(|e| tb_err("InvalidArgument", e))
}

/// The Python name of a policy.
pub(crate) fn policy_name(p: Policy) -> &'static str {
    p.name()
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

/// Parses a wait strategy name.
pub(crate) fn parse_wait(s: &str) -> PyResult<WaitStrategy> {
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

/// What a `wait=` argument asks for (see [`parse_wait_arg`]).
pub(crate) enum WaitArg {
    /// Fail at once when the channel does not exist (None, False, 0).
    No,
    /// Wait this long for the channel (`Duration::MAX`: forever).
    Channel(Duration),
    /// The wait strategy, given the old way (`wait="park"`).
    Strategy(WaitStrategy),
}

/// Parses `wait=` of `consumer()` and `stage()`: True waits for the channel
/// forever, a number of seconds that long (inf: forever), False, None or 0
/// not at all. With `strategy_ok`, a string is the wait strategy (the
/// keyword's meaning before `wait_strategy=`; a `DeprecationWarning`).
pub(crate) fn parse_wait_arg(
    wait: Option<&Bound<'_, PyAny>>,
    strategy_ok: bool,
) -> PyResult<WaitArg> {
    let Some(w) = wait else {
        return Ok(WaitArg::No);
    };
    if w.is_none() {
        return Ok(WaitArg::No);
    }
    if let Ok(b) = w.cast::<PyBool>() {
        return Ok(if b.is_true() {
            WaitArg::Channel(Duration::MAX)
        } else {
            WaitArg::No
        });
    }
    if strategy_ok {
        if let Ok(s) = w.cast::<PyString>() {
            PyErr::warn(
                w.py(),
                &w.py().get_type::<PyDeprecationWarning>(),
                c"consumer(wait=\"spin\" | \"busy\" | \"park\") is deprecated: pass the wait strategy as wait_strategy=; wait= is now whether to wait for the channel (True or seconds)",
                1,
            )?;
            return parse_wait(&s.to_cow()?).map(WaitArg::Strategy);
        }
    }
    if w.is_instance_of::<PyInt>() || w.is_instance_of::<PyFloat>() {
        let t: f64 = w.extract()?;
        if t.is_nan() || t < 0.0 {
            return Err(PyValueError::new_err(format!(
                "wait must be True, False, None or a non-negative number of seconds, not {t}"
            )));
        }
        return Ok(match Duration::try_from_secs_f64(t) {
            Ok(d) if d.is_zero() => WaitArg::No,
            Ok(d) => WaitArg::Channel(d),
            Err(_) => WaitArg::Channel(Duration::MAX), // inf, or too long to tell apart
        });
    }
    Err(PyTypeError::new_err(format!(
        "wait must be True, False, None or a number of seconds{}, not {}",
        if strategy_ok {
            " (the wait strategy is wait_strategy=)"
        } else {
            ""
        },
        w.repr()?
    )))
}

/// The channel spec for run-time creation (`create=True`, from `pools`,
/// `mode` and `history`), None without `create`; `pools`, `mode` or a
/// `history` without it are a `ValueError`.
pub(crate) fn create_spec(
    create: bool,
    pools: Option<Vec<String>>,
    mode: Option<&str>,
    history: u32,
) -> PyResult<Option<ChannelSpec>> {
    if !create {
        if pools.is_some() || mode.is_some() || history != 0 {
            return Err(PyValueError::new_err(
                "pools, mode and history only apply with create=True",
            ));
        }
        return Ok(None);
    }
    let mode = mode.map(parse_mode).transpose()?.unwrap_or_default();
    let pools = pools.unwrap_or_default();
    let names: Vec<&str> = pools.iter().map(String::as_str).collect();
    Ok(Some(ChannelSpec::new(mode).pools(&names).history(history)))
}
