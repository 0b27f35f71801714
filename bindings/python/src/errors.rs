//! Python exceptions: the classes of `tensorbus/_errors.py`, and which of
//! them each Rust error (`tensorbus::error::*`) becomes.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyModule, PyType};
use tensorbus::error::{
    ConnectError, ForkedChild, LoanError, OpenError, PublishError, RecvError, RemoveChannelError,
    RequestError, ShapeError, TryRecvError,
};

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
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match cls {
            Ok(cls) => PyErr::from_type(cls, msg),
            Err(e) => e,
        }
    })
}

/// `Closed`: "this {what} is closed".
pub(crate) fn closed(what: &str) -> PyErr {
    tb_err("Closed", format!("this {what} is closed"))
}

/// The `ForkedChild` error of a handle used in a forked child.
pub(crate) fn forked_err(e: ForkedChild) -> PyErr {
    tb_err("ForkedChild", e.to_string())
}

/// A bad shape, dtype or user header.
pub(crate) fn shape_err(e: ShapeError) -> PyErr {
    tb_err("ShapeError", e.to_string())
}

/// The exception class of a failed control request.
fn request_class(e: &RequestError) -> &'static str {
    match e {
        RequestError::BrokerUnavailable { .. } => "BrokerUnavailable",
        RequestError::Protocol(_) => "ProtocolError",
        RequestError::Timeout { .. } => "Timeout",
        RequestError::NoFreeFd { .. } => "LimitReached",
        RequestError::ForkedChild(_) => "ForkedChild",
        _ => "TensorbusError",
    }
}

/// Connecting to a broker failed.
pub(crate) fn connect_err(e: ConnectError) -> PyErr {
    let name = match &e {
        ConnectError::BrokerUnavailable { .. } => "BrokerUnavailable",
        ConnectError::PermissionDenied { .. } => "PermissionDenied",
        ConnectError::Protocol(_) => "ProtocolError",
        _ => "TensorbusError",
    };
    tb_err(name, e.to_string())
}

/// A control request (stat, detach) failed.
pub(crate) fn request_err(e: RequestError) -> PyErr {
    tb_err(request_class(&e), e.to_string())
}

/// Opening a producer, consumer or stage failed.
pub(crate) fn open_err(e: OpenError) -> PyErr {
    let name = match &e {
        OpenError::ChannelNotFound { .. } => "ChannelNotFound",
        OpenError::InvalidName(_) | OpenError::InvalidArgument(_) => "InvalidArgument",
        OpenError::LimitReached(_) => "LimitReached",
        OpenError::PermissionDenied(_) => "PermissionDenied",
        OpenError::WaitTimeout { .. } => "Timeout",
        OpenError::Request(r) => request_class(r),
        _ => "TensorbusError",
    };
    tb_err(name, e.to_string())
}

/// `Client.remove_channel` failed: an unknown name is `ChannelNotFound`, a
/// channel still in use `Busy`, one the config declares `PermissionDenied`
/// (with the broker's reason; the C binding's TB_ERR_BUSY and
/// TB_ERR_PERMISSION_DENIED).
pub(crate) fn remove_err(e: RemoveChannelError) -> PyErr {
    let name = match &e {
        RemoveChannelError::NotFound { .. } => "ChannelNotFound",
        RemoveChannelError::InUse(_) => "Busy",
        RemoveChannelError::Declared(_) => "PermissionDenied",
        RemoveChannelError::Request(r) => request_class(r),
        _ => "TensorbusError",
    };
    tb_err(name, e.to_string())
}

/// `EndOfStream` of `channel`: its last producer closed cleanly and this
/// consumer (or stage) has received everything queued for it.
pub(crate) fn end_of_stream(channel: &str) -> PyErr {
    tb_err(
        "EndOfStream",
        format!("end of stream on {channel:?}: the channel's last producer closed and everything it published has been received"),
    )
}

/// A loan failed.
pub(crate) fn loan_err(e: LoanError) -> PyErr {
    let name = match &e {
        LoanError::PoolExhausted { .. } => "PoolExhausted",
        LoanError::TooLarge { .. } => "TooLarge",
        LoanError::Shape(_) => "ShapeError",
        LoanError::Timeout { .. } => "Timeout",
        LoanError::ForkedChild(_) => "ForkedChild",
        _ => "TensorbusError",
    };
    tb_err(name, e.to_string())
}

/// A blocking receive failed (a timeout is the caller's to report: it
/// knows the channel and the whole wait).
pub(crate) fn recv_err(e: RecvError) -> PyErr {
    let name = match &e {
        RecvError::Timeout(_) => "Timeout",
        RecvError::Corrupted(_) => "Corrupted",
        RecvError::Detached => "Closed",
        RecvError::EndOfStream => "EndOfStream",
        RecvError::ForkedChild(_) => "ForkedChild",
        _ => "TensorbusError",
    };
    tb_err(name, e.to_string())
}

/// A non-blocking receive failed (`Empty` is not an error: callers map it
/// to `None` before calling this; they report `EndOfStream` with the
/// channel's name, see [`end_of_stream`]).
pub(crate) fn try_recv_err(e: TryRecvError) -> PyErr {
    let name = match &e {
        TryRecvError::Corrupted(_) => "Corrupted",
        TryRecvError::EndOfStream => "EndOfStream",
        TryRecvError::ForkedChild(_) => "ForkedChild",
        _ => "TensorbusError",
    };
    tb_err(name, e.to_string())
}

/// A publish or forward failed.
pub(crate) fn publish_err(e: PublishError) -> PyErr {
    let name = match &e {
        PublishError::PoolNotAllowed { .. } | PublishError::ForeignClient => "InvalidArgument",
        PublishError::Shape(_) => "ShapeError",
        PublishError::ForkedChild(_) => "ForkedChild",
        _ => "TensorbusError",
    };
    tb_err(name, e.to_string())
}
