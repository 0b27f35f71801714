//! Messages between clients and the broker (JSON over a Unix seqpacket
//! socket; file descriptors travel alongside as SCM_RIGHTS). The control
//! path only: nothing here is on the data path.

use crate::layout::LayoutParams;
use crate::records::{Mode, Policy};
use serde::{Deserialize, Serialize};

/// Largest control message in bytes.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Options of a channel created at run time (or declared in the config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSpec {
    /// Channel name (`[A-Za-z0-9_./-]`, no `..`, at most 128 bytes).
    pub name: String,
    /// Pools the channel may loan from, by name; empty = every pool.
    #[serde(default)]
    pub pools: Vec<String>,
    /// Broadcast or work queue.
    #[serde(default)]
    pub mode: Mode,
    /// Default ring depth for subscribers that do not ask.
    #[serde(default)]
    pub depth: Option<u32>,
    /// Default policy for subscribers that do not ask.
    #[serde(default)]
    pub policy: Option<Policy>,
}

/// A pool as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Index in the pool table (the descriptor's pool field).
    pub index: u8,
    /// Name from the config.
    pub name: String,
    /// Payload bytes per slot.
    pub slot_size: u64,
    /// Distance between slot payloads (slot_size rounded up to the alignment).
    pub stride: u64,
    /// Number of slots.
    pub slots: u32,
    /// Payload alignment.
    pub alignment: u64,
    /// Bytes of the pool's memfd.
    pub bytes: u64,
}

/// A channel as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// Index of the channel's block in the control segment.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Broadcast or work queue.
    pub mode: Mode,
    /// Pools allowed, by index, smallest slot size first.
    pub pools: Vec<u8>,
}

/// A request from a client.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First message on a connection.
    Hello {
        /// Human-readable client name (shown by `stat`).
        name: String,
        /// Protocol/layout version the client speaks.
        version: u32,
    },
    /// Opens a producer handle on a channel.
    OpenProducer {
        /// Channel name.
        channel: String,
        /// Create the channel with these options if it does not exist.
        create: Option<ChannelSpec>,
    },
    /// Opens a subscriber on a channel.
    OpenConsumer {
        /// Channel name.
        channel: String,
        /// Policy (channel default if absent).
        policy: Option<Policy>,
        /// Ring depth (channel default if absent).
        depth: Option<u32>,
        /// Map the pools writable (stages).
        writable: bool,
        /// Create the channel with these options if it does not exist.
        create: Option<ChannelSpec>,
    },
    /// Closes a handle.
    Close {
        /// Handle id.
        handle: u32,
    },
    /// Ends a subscription's deliveries at once (it leaves its channel; its
    /// queued tensors are released, or re-dispatched on a work queue) but
    /// keeps the holds of the tensors its client already received, so that
    /// they stay valid until released. A later `Close` frees the handle.
    Detach {
        /// Handle id of a subscriber.
        handle: u32,
    },
    /// Asks for a statistics snapshot.
    Stat,
}

/// A reply from the broker.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    /// Admission; the control segment's fd comes with it.
    Welcome {
        /// This client's id.
        client_id: u32,
        /// The broker's process id.
        broker_pid: u32,
        /// Layout parameters of the control segment.
        layout: LayoutParams,
        /// The pool table.
        pools: Vec<PoolInfo>,
    },
    /// A producer handle; one fd per pool in `channel.pools` comes with it (read-write).
    Producer {
        /// Handle id.
        handle: u32,
        /// Holder bit number.
        bit: u32,
        /// Ring row.
        row: u32,
        /// The channel.
        channel: ChannelInfo,
    },
    /// A subscriber; one fd per pool in `channel.pools` comes with it.
    Consumer {
        /// Handle id.
        handle: u32,
        /// Holder bit number.
        bit: u32,
        /// Subscriber index.
        sub: u32,
        /// Policy in effect.
        policy: Policy,
        /// Depth in effect.
        depth: u32,
        /// The channel.
        channel: ChannelInfo,
    },
    /// Success without data.
    Ok,
    /// A statistics snapshot.
    Stat(StatReport),
    /// Failure.
    Error {
        /// Machine-readable kind.
        kind: ErrorKind,
        /// What went wrong and what to do about it.
        message: String,
    },
}

/// Failure kinds the broker reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such channel.
    UnknownChannel,
    /// A name broke the naming rules.
    InvalidName,
    /// An argument was out of range.
    InvalidArgument,
    /// A fixed limit (holders, channels, producers, subscribers) was reached.
    LimitReached,
    /// The peer is not allowed.
    PermissionDenied,
    /// Versions differ.
    VersionMismatch,
    /// Anything else.
    Internal,
}

/// Statistics snapshot (`tensorbus stat --json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatReport {
    /// Broker process id.
    pub broker_pid: u32,
    /// Pools.
    pub pools: Vec<PoolStat>,
    /// Channels.
    pub channels: Vec<ChannelStat>,
    /// Connected clients.
    pub clients: Vec<ClientStat>,
}

/// One pool in a [`StatReport`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStat {
    /// Name.
    pub name: String,
    /// Payload bytes per slot.
    pub slot_size: u64,
    /// Slots in the pool.
    pub slots_total: u32,
    /// Slots nobody holds.
    pub slots_free: u32,
    /// Slots held only by producer handles (loaned, not yet published).
    pub loaned: u32,
    /// Slots held by at least one subscriber (queued or being read).
    pub in_flight: u32,
}

/// One channel in a [`StatReport`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelStat {
    /// Name.
    pub name: String,
    /// Broadcast or work queue.
    pub mode: String,
    /// Tensors published.
    pub published: u64,
    /// Live producer handles.
    pub producers: u32,
    /// Subscribers.
    pub subscribers: Vec<SubscriberStat>,
}

/// One subscriber in a [`StatReport`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriberStat {
    /// Handle id.
    pub handle: u32,
    /// Owning client id.
    pub client: u32,
    /// Policy.
    pub policy: String,
    /// Ring depth.
    pub depth: u32,
    /// Tensors received.
    pub delivered: u64,
    /// Tensors dropped by its policy.
    pub dropped: u64,
    /// Entries waiting in its rings.
    pub queued: u64,
}

/// One client in a [`StatReport`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientStat {
    /// Client id.
    pub id: u32,
    /// Process id (from SO_PEERCRED).
    pub pid: i32,
    /// User id (from SO_PEERCRED).
    pub uid: u32,
    /// Name given at Hello.
    pub name: String,
    /// Open handles.
    pub handles: u32,
    /// Slots any of its handles holds.
    pub holds: u32,
}
