//! Status codes, the thread-local last error message, and the guard every
//! entry point runs in (no panic crosses the C boundary).

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tensorbus::error::{
    ConnectError, ForkedChild, LoanError, OpenError, PublishError, RecvError, RemoveChannelError,
    RequestError, TryRecvError,
};

/// What every call returns. `TB_OK` is 0; on any other value
/// `tb_last_error_message()` describes what went wrong on this thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum tb_status {
    /// Success.
    TB_OK = 0,
    /// Nothing arrived (or no slot became free, or the broker did not answer a request, or the channel a
    /// `tb_consumer_open_wait` / `wait_channel_ns` open waited for did not appear) in time; `timeout_ns == 0` polls.
    TB_ERR_TIMEOUT = 1,
    /// Every slot of every pool that fits is held.
    TB_ERR_POOL_EXHAUSTED = 2,
    /// The broker knows no channel of that name.
    TB_ERR_NO_CHANNEL = 3,
    /// Nothing listens at the socket, or the broker went away.
    TB_ERR_BROKER_UNAVAILABLE = 4,
    /// NULL, closed, released or wrong-kind handle, bad dtype/shape/option.
    TB_ERR_INVALID_ARGUMENT = 5,
    /// The client still has open handles (`tb_client_close`: producers,
    /// consumers and stages close while their tensors live), or the channel
    /// is in use (`tb_channel_remove`).
    TB_ERR_BUSY = 6,
    /// A received tensor's bytes are read-only (use `tb_tensor_const_data`).
    TB_ERR_READ_ONLY = 7,
    /// The tensor is larger than the channel's largest pool slot.
    TB_ERR_TOO_LARGE = 8,
    /// The broker refused this process or request (`tb_channel_remove`: the
    /// broker config declares the channel).
    TB_ERR_PERMISSION_DENIED = 9,
    /// A fixed broker limit (handles, channels, subscribers) was reached, or this process has no free file descriptor (EMFILE).
    TB_ERR_LIMIT_REACHED = 10,
    /// A queued descriptor or slot header was invalid (the message was skipped).
    TB_ERR_CORRUPTED = 11,
    /// A stage could not take the slot exclusively.
    TB_ERR_NOT_EXCLUSIVE = 12,
    /// The broker spoke another protocol version or sent garbage.
    TB_ERR_PROTOCOL = 13,
    /// An operating-system call (mmap) failed.
    TB_ERR_IO = 14,
    /// A bug in tensorbus (a caught panic); the message says where.
    TB_ERR_INTERNAL = 15,
    /// The handle was opened by another process before `fork()`: in a
    /// forked child inherited handles are inert (closing them leaves the
    /// parent's open); connect a new client in the child.
    TB_ERR_FORKED_CHILD = 16,
    /// End of stream (`tb_recv`, `tb_recv_mut`): the channel's last
    /// producer closed cleanly (not a crash) and everything queued for this
    /// consumer or stage has been received. Not an error: the stream is
    /// over. A producer that opens later starts a new stream (receives then
    /// find its tensors). Consumers opened with `TB_CONSUMER_NO_END_OF_STREAM`
    /// never see it (they keep returning `TB_ERR_TIMEOUT`).
    TB_END_OF_STREAM = 17,
}

pub use tb_status::*;

/// A failed call: its status and message.
#[derive(Debug)]
pub(crate) struct Error {
    pub status: tb_status,
    pub message: String,
}

/// The result of an entry point's body.
pub(crate) type Res<T = ()> = Result<T, Error>;

/// Builds an error.
pub(crate) fn err(status: tb_status, message: impl Into<String>) -> Error {
    Error {
        status,
        message: message.into(),
    }
}

/// Shorthand for `TB_ERR_INVALID_ARGUMENT`.
pub(crate) fn invalid(message: impl Into<String>) -> Error {
    err(TB_ERR_INVALID_ARGUMENT, message)
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Stores `message` as this thread's last error (interior NULs become spaces).
pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = c);
}

/// This thread's last error message (empty when none).
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|l| l.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// Runs an entry point's body: converts its error into a status and the
/// thread's last error, and a panic into `TB_ERR_INTERNAL`.
pub(crate) fn guard(body: impl FnOnce() -> Res) -> tb_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => TB_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "internal error (panic caught at the C boundary): {what}"
            ));
            TB_ERR_INTERNAL
        }
    }
}

impl From<ConnectError> for Error {
    fn from(e: ConnectError) -> Error {
        let status = match &e {
            ConnectError::BrokerUnavailable { .. } => TB_ERR_BROKER_UNAVAILABLE,
            ConnectError::PermissionDenied { .. } => TB_ERR_PERMISSION_DENIED,
            ConnectError::Map(_) => TB_ERR_IO,
            _ => TB_ERR_PROTOCOL,
        };
        err(status, e.to_string())
    }
}

impl From<RequestError> for Error {
    fn from(e: RequestError) -> Error {
        let status = match &e {
            RequestError::BrokerUnavailable { .. } => TB_ERR_BROKER_UNAVAILABLE,
            RequestError::Timeout { .. } => TB_ERR_TIMEOUT,
            RequestError::NoFreeFd { .. } => TB_ERR_LIMIT_REACHED,
            RequestError::ForkedChild(_) => TB_ERR_FORKED_CHILD,
            _ => TB_ERR_PROTOCOL,
        };
        err(status, e.to_string())
    }
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Error {
        let status = match &e {
            OpenError::ChannelNotFound { .. } => TB_ERR_NO_CHANNEL,
            OpenError::InvalidName(_) | OpenError::InvalidArgument(_) => TB_ERR_INVALID_ARGUMENT,
            OpenError::LimitReached(_) => TB_ERR_LIMIT_REACHED,
            OpenError::PermissionDenied(_) => TB_ERR_PERMISSION_DENIED,
            OpenError::Request(RequestError::BrokerUnavailable { .. }) => TB_ERR_BROKER_UNAVAILABLE,
            OpenError::Request(RequestError::Timeout { .. }) => TB_ERR_TIMEOUT,
            OpenError::Request(RequestError::NoFreeFd { .. }) => TB_ERR_LIMIT_REACHED,
            OpenError::Request(RequestError::ForkedChild(_)) => TB_ERR_FORKED_CHILD,
            OpenError::Map(_) => TB_ERR_IO,
            OpenError::WaitTimeout { .. } => TB_ERR_TIMEOUT,
            _ => TB_ERR_PROTOCOL,
        };
        err(status, e.to_string())
    }
}

impl From<LoanError> for Error {
    fn from(e: LoanError) -> Error {
        let status = match &e {
            LoanError::PoolExhausted { .. } => TB_ERR_POOL_EXHAUSTED,
            LoanError::TooLarge { .. } => TB_ERR_TOO_LARGE,
            LoanError::Timeout { .. } => TB_ERR_TIMEOUT,
            LoanError::ForkedChild(_) => TB_ERR_FORKED_CHILD,
            _ => TB_ERR_INVALID_ARGUMENT,
        };
        err(status, e.to_string())
    }
}

impl From<PublishError> for Error {
    fn from(e: PublishError) -> Error {
        let status = match &e {
            PublishError::ForkedChild(_) => TB_ERR_FORKED_CHILD,
            _ => TB_ERR_INVALID_ARGUMENT,
        };
        err(status, e.to_string())
    }
}

impl From<RecvError> for Error {
    fn from(e: RecvError) -> Error {
        let status = match &e {
            RecvError::Timeout(_) => TB_ERR_TIMEOUT,
            RecvError::NotExclusive(_) => TB_ERR_NOT_EXCLUSIVE,
            // Only closing detaches a consumer or stage, and a closed one is
            // refused by the registry first: a receive that sees it raced a
            // close (misuse).
            RecvError::Detached => TB_ERR_INVALID_ARGUMENT,
            RecvError::ForkedChild(_) => TB_ERR_FORKED_CHILD,
            RecvError::EndOfStream => TB_END_OF_STREAM,
            RecvError::Corrupted(_) => TB_ERR_CORRUPTED,
            _ => TB_ERR_INTERNAL,
        };
        err(status, e.to_string())
    }
}

impl From<ForkedChild> for Error {
    fn from(e: ForkedChild) -> Error {
        err(TB_ERR_FORKED_CHILD, e.to_string())
    }
}

impl From<TryRecvError> for Error {
    fn from(e: TryRecvError) -> Error {
        let status = match &e {
            TryRecvError::Empty => TB_ERR_TIMEOUT,
            TryRecvError::ForkedChild(_) => TB_ERR_FORKED_CHILD,
            TryRecvError::Corrupted(_) => TB_ERR_CORRUPTED,
            TryRecvError::NotExclusive(_) => TB_ERR_NOT_EXCLUSIVE,
            TryRecvError::EndOfStream => TB_END_OF_STREAM,
            _ => TB_ERR_INTERNAL,
        };
        err(status, e.to_string())
    }
}

impl From<RemoveChannelError> for Error {
    fn from(e: RemoveChannelError) -> Error {
        let message = e.to_string();
        let status = match e {
            RemoveChannelError::NotFound { .. } => TB_ERR_NO_CHANNEL,
            RemoveChannelError::InUse(_) => TB_ERR_BUSY,
            RemoveChannelError::Declared(_) => TB_ERR_PERMISSION_DENIED,
            RemoveChannelError::Request(r) => return Error::from(r),
            _ => TB_ERR_PROTOCOL,
        };
        err(status, message)
    }
}

/// A static, human-readable name for a status code.
pub(crate) fn status_name(code: i32) -> &'static std::ffi::CStr {
    match code {
        0 => c"TB_OK",
        1 => c"TB_ERR_TIMEOUT",
        2 => c"TB_ERR_POOL_EXHAUSTED",
        3 => c"TB_ERR_NO_CHANNEL",
        4 => c"TB_ERR_BROKER_UNAVAILABLE",
        5 => c"TB_ERR_INVALID_ARGUMENT",
        6 => c"TB_ERR_BUSY",
        7 => c"TB_ERR_READ_ONLY",
        8 => c"TB_ERR_TOO_LARGE",
        9 => c"TB_ERR_PERMISSION_DENIED",
        10 => c"TB_ERR_LIMIT_REACHED",
        11 => c"TB_ERR_CORRUPTED",
        12 => c"TB_ERR_NOT_EXCLUSIVE",
        13 => c"TB_ERR_PROTOCOL",
        14 => c"TB_ERR_IO",
        15 => c"TB_ERR_INTERNAL",
        16 => c"TB_ERR_FORKED_CHILD",
        17 => c"TB_END_OF_STREAM",
        _ => c"TB_ERR_UNKNOWN_STATUS",
    }
}
