//! One error enum per operation, each with messages a user can act on.

use std::path::PathBuf;
use std::time::Duration;
pub use tensorbus_core::receive::Corruption;
pub use tensorbus_core::ShapeError;

/// A handle was used in a process forked after it was opened.
///
/// A forked child's inherited handles (clients, producers, consumers,
/// stages, loans, received and staged tensors) are inert: using them fails
/// with this error and dropping them does nothing to the parent's (see
/// [`crate::Client`]'s fork semantics). Open a new [`crate::Client`] in the
/// child instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("this handle was opened by process {pid} before fork(); a forked child's inherited handles are inert (using them fails, dropping them leaves the parent's untouched): open a new Client in the child")]
pub struct ForkedChild {
    /// The process that opened the handle (the parent, or an earlier ancestor).
    pub pid: u32,
}

/// Why [`crate::Client::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Nothing listens at the socket path, or nothing answered there as a
    /// broker. The message's advice depends on the case (a path too long
    /// for a socket address is not suggested again).
    #[error("{}", unavailable_message(path, reason))]
    BrokerUnavailable {
        /// Socket path tried.
        path: PathBuf,
        /// What the OS said.
        reason: String,
    },
    /// The broker refused this process.
    #[error("broker at {path} refused the connection: {message}")]
    PermissionDenied {
        /// Socket path.
        path: PathBuf,
        /// The broker's reason.
        message: String,
    },
    /// The broker speaks another protocol or layout version, or sent garbage.
    #[error("broker protocol error: {0}")]
    Protocol(String),
    /// Mapping the shared memory failed.
    #[error("could not map the broker's shared memory: {0}")]
    Map(#[source] std::io::Error),
}

/// Start of the `reason` of a [`ConnectError::BrokerUnavailable`] when a
/// program accepted the connection but did not answer the hello.
pub(crate) const NO_ANSWER: &str = "nothing answered as a tensorbus broker";

/// The text of [`ConnectError::BrokerUnavailable`].
fn unavailable_message(path: &std::path::Path, reason: &str) -> String {
    let shown = path.display();
    if path.as_os_str().len() > tensorbus_shm::socket::MAX_SOCKET_PATH {
        return format!(
            "broker unreachable at {shown}: {reason}. Use a socket path of at most {} bytes (--socket, TENSORBUS_SOCKET or [broker] socket), for example {}",
            tensorbus_shm::socket::MAX_SOCKET_PATH,
            crate::paths::short_default_socket().display()
        );
    }
    if reason.starts_with(NO_ANSWER) {
        return format!(
            "broker unreachable at {shown}: {reason}. Check that --socket / TENSORBUS_SOCKET names a tensorbus broker's socket, and that the broker is not stopped (SIGSTOP) or hung"
        );
    }
    format!(
        "broker unreachable at {shown}: {reason}. Start one with `tensorbus broker` (or `tensorbus broker --socket {shown}`), or point TENSORBUS_SOCKET at a running broker's socket"
    )
}

/// Why a control request (open, close, stat) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The broker went away (control requests need it; data keeps flowing on mapped pools).
    #[error("broker at {path} is unavailable: {reason}. Tensors on already-open channels keep flowing; restart the broker with `tensorbus broker` to open new handles")]
    BrokerUnavailable {
        /// Socket path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The broker sent something unexpected.
    #[error("broker protocol error: {0}")]
    Protocol(String),
    /// The broker did not answer in time (it is stopped, e.g. SIGSTOP, or
    /// overloaded). The request is abandoned: the broker is asked to undo
    /// whatever it opens for it, and its late reply is discarded, so the
    /// client stays usable.
    #[error("broker at {path} did not answer within {timeout:?} (is it stopped or overloaded?); the request was abandoned and anything it opens is closed again. Retry, or raise the timeout (Client::set_request_timeout or TENSORBUS_REQUEST_TIMEOUT_MS)")]
    Timeout {
        /// Socket path.
        path: PathBuf,
        /// How long the request waited.
        timeout: Duration,
    },
    /// This process had no free file descriptor to receive the ones the
    /// reply carried (EMFILE). Whatever the reply opened was closed again.
    #[error("no free file descriptor in this process (EMFILE) to receive {what}: raise `ulimit -n` (RLIMIT_NOFILE is {limit}) or close unused descriptors; nothing was left open at the broker")]
    NoFreeFd {
        /// What the descriptors were (e.g. the pools of channel "x").
        what: String,
        /// The soft RLIMIT_NOFILE of this process.
        limit: u64,
    },
    /// The client was connected by another process, before a fork: the
    /// request was not sent.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

/// Why opening a producer, consumer or stage failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// No channel of that name; `known` lists the existing ones.
    #[error("unknown channel {channel:?}; known channels: [{}]. Declare it in the broker config or open a producer with create options", known.join(", "))]
    ChannelNotFound {
        /// Name asked for.
        channel: String,
        /// Channels that exist.
        known: Vec<String>,
    },
    /// A name broke the naming rules.
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// An option was out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A fixed limit (`[limits] max_handles` holder handles per broker, producers or subscribers per channel, channels) was reached.
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// The broker does not allow this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A control request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Mapping a pool failed.
    #[error("could not map pool: {0}")]
    Map(#[source] std::io::Error),
    /// [`crate::ConsumerOptions::wait_for_channel`]: no producer created
    /// the channel in time (the subscription that waited is closed).
    #[error("channel {channel:?} did not appear within {waited:?}: no producer created it (a producer opened with create options, or `tensorbus pub --create`, makes it)")]
    WaitTimeout {
        /// Name waited for.
        channel: String,
        /// How long it waited.
        waited: Duration,
    },
    /// [`crate::Client::consumer_interruptible`]: the caller's check asked
    /// to stop waiting for the channel (the subscription is closed).
    #[error("stopped waiting for channel {0:?}")]
    Interrupted(String),
}

/// Why [`crate::Client::remove_channel`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoveChannelError {
    /// No channel of that name.
    #[error("unknown channel {channel:?}; known channels: [{}]", known.join(", "))]
    NotFound {
        /// Name asked for.
        channel: String,
        /// Channels that exist.
        known: Vec<String>,
    },
    /// The channel is in use (open producers, consumers, stages, waiting
    /// consumers, or handles still being reclaimed): close them first.
    #[error("{0}")]
    InUse(String),
    /// The broker config declares the channel: it lives as long as the
    /// broker (remove it from the config and restart the broker).
    #[error("{0}")]
    Declared(String),
    /// A control request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// Why a loan failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoanError {
    /// Every slot of every pool that fits is held.
    #[error("pool {pool:?} exhausted: all {slots} slots are held ({holders}). Release received tensors sooner, add slots to the pool, or use loan_timeout to wait; `tensorbus stat` shows who holds what")]
    PoolExhausted {
        /// The smallest pool that fits.
        pool: String,
        /// Its slots.
        slots: u32,
        /// Who holds them, by holder handle.
        holders: String,
    },
    /// The tensor is larger than any pool the channel may use.
    #[error("tensor of {nbytes} bytes does not fit channel {channel:?}: its largest pool slot holds {largest} bytes. Add a larger pool to the channel in the broker config")]
    TooLarge {
        /// Bytes asked for.
        nbytes: u64,
        /// Largest slot.
        largest: u64,
        /// Channel.
        channel: String,
    },
    /// The shape or dtype is not acceptable.
    #[error("bad shape: {0}")]
    Shape(#[from] ShapeError),
    /// No slot became free in time.
    #[error("no slot of channel {channel:?} became free within {timeout:?}")]
    Timeout {
        /// Channel.
        channel: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The producer was opened by another process, before a fork: nothing
    /// was loaned.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

/// Why a publish or forward failed. The tensor is released (except after
/// [`PublishError::ForkedChild`]: the slot is the parent's, left as it is).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The slot's pool is not one the target channel may use.
    #[error("cannot forward a slot of pool {pool:?} to channel {channel:?}, which does not use that pool; add it to the channel's pools")]
    PoolNotAllowed {
        /// Pool of the slot.
        pool: String,
        /// Target channel.
        channel: String,
    },
    /// Bad metadata (e.g. a user header that is too long).
    #[error("bad metadata: {0}")]
    Shape(#[from] ShapeError),
    /// A stage forwarded to a producer of another `Client`.
    #[error("forward_to needs a producer opened from the same Client as the stage")]
    ForeignClient,
    /// The tensor was loaned (or received) by another process, before a
    /// fork: nothing was published and the slot was left to that process.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

/// Why [`crate::Consumer::try_recv`] returned nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TryRecvError {
    /// Nothing is queued.
    #[error("no tensor queued")]
    Empty,
    /// A queued descriptor or its slot header was invalid (the message is skipped).
    #[error("corrupted descriptor: {0}")]
    Corrupted(#[from] Corruption),
    /// The consumer was opened by another process, before a fork: nothing
    /// was taken from its queue.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
    /// A stage's tensor was still shared after the given wait (upstream has
    /// not let go of it): nothing is lost, the stage keeps the tensor and
    /// the next receive tries it again first.
    #[error("slot is still shared after {0:?}; the stage keeps the tensor and the next recv_mut tries it again")]
    NotExclusive(Duration),
    /// End of stream: the channel's last producer closed cleanly and
    /// everything queued for this consumer has been received. A producer
    /// that opens later starts a new stream (receives then find its
    /// tensors). Opt out with [`crate::ConsumerOptions::end_of_stream`].
    #[error("end of stream: the channel's last producer closed and everything it published has been received")]
    EndOfStream,
}

/// Why [`crate::Consumer::recv`] or `recv_timeout` returned nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// Nothing arrived in time.
    #[error("no tensor arrived within {0:?}")]
    Timeout(Duration),
    /// A queued descriptor or its slot header was invalid (the message is skipped).
    #[error("corrupted descriptor: {0}")]
    Corrupted(#[from] Corruption),
    /// A stage could not get exclusive hold of the slot in time: nothing is
    /// lost, the stage keeps the tensor and the next receive tries it again
    /// first.
    #[error("slot is still shared after {0:?}; the stage keeps the tensor and the next recv_mut tries it again")]
    NotExclusive(Duration),
    /// The consumer was detached ([`crate::Consumer::detach`]): it receives
    /// nothing more.
    #[error("this consumer was detached from its channel: it receives nothing more")]
    Detached,
    /// End of stream (see [`TryRecvError::EndOfStream`]).
    #[error("end of stream: the channel's last producer closed and everything it published has been received")]
    EndOfStream,
    /// The consumer or stage was opened by another process, before a fork:
    /// nothing was taken from its queue.
    #[error(transparent)]
    ForkedChild(#[from] ForkedChild),
}

/// Why a typed view could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TypeError {
    /// The tensor's dtype is another one.
    #[error("tensor has dtype {actual}, not {requested}")]
    WrongDType {
        /// dtype of the tensor.
        actual: tensorbus_core::DType,
        /// dtype asked for.
        requested: tensorbus_core::DType,
    },
    /// The view would not be contiguous or aligned.
    #[error("tensor is not contiguous and aligned for a typed slice")]
    NotContiguous,
}
