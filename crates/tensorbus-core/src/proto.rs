//! Messages between clients and the broker (JSON over a Unix seqpacket
//! socket; file descriptors travel alongside as SCM_RIGHTS). The control
//! path only: nothing here is on the data path.
//!
//! # Framing
//!
//! Every seqpacket message is one *frame*: a [`FRAME_HEADER`]-byte header
//! ([`FrameHeader`]: magic, request id, part number, part count) followed by
//! up to [`MAX_CHUNK`] bytes of JSON. A request is one frame whose id the
//! client picks (increasing per connection); its reply echoes that id and
//! may be split into any number of parts (a `stat` of thousands of
//! channels is larger than a socket buffer), sent back to back, in order;
//! the JSON of a reply is the concatenation of its parts. File descriptors
//! travel only with part 0. A client that gave up on a request (timeout)
//! recognises that request's late reply by its id and discards it.

use crate::layout::LayoutParams;
use crate::records::{Mode, Policy};
use serde::{Deserialize, Serialize};

/// Magic bytes that start every frame (`TB`, frame format `F`, version 1).
pub const FRAME_MAGIC: [u8; 4] = *b"TBF1";

/// Bytes of a frame header: magic (4), id (u64 LE), part (u32 LE), parts (u32 LE).
pub const FRAME_HEADER: usize = 20;

/// Most JSON bytes in one frame. Small enough that a frame always fits a
/// Unix socket's default send buffer (about 208 KiB), large enough that
/// ordinary replies are a single frame.
pub const MAX_CHUNK: usize = 48 * 1024;

/// Largest control message (one frame) in bytes: a receive buffer of this
/// size holds any frame.
pub const MAX_MESSAGE: usize = FRAME_HEADER + MAX_CHUNK;

/// Largest reassembled reply a client accepts (1 GiB), so that a corrupt
/// part count cannot make it allocate without bound.
pub const MAX_REPLY: usize = 1 << 30;

/// The header of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Request id (a reply carries its request's id).
    pub id: u64,
    /// Part number, from 0.
    pub part: u32,
    /// Number of parts of the whole message (at least 1).
    pub parts: u32,
}

/// Why a message is not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than a header, or the magic bytes differ (a peer speaking
    /// another protocol version, or not tensorbus at all).
    NotAFrame,
    /// `parts` is 0 or `part >= parts`, or the JSON part is empty or longer
    /// than [`MAX_CHUNK`].
    BadPart {
        /// Part number found.
        part: u32,
        /// Part count found.
        parts: u32,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::NotAFrame => write!(
                f,
                "not a tensorbus control frame (no {:?} header: another protocol version?)",
                std::str::from_utf8(&FRAME_MAGIC).unwrap_or("TBF1")
            ),
            FrameError::BadPart { part, parts } => {
                write!(f, "malformed frame: part {part} of {parts}")
            }
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameHeader {
    /// The header as bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER] {
        let mut h = [0u8; FRAME_HEADER];
        h[..4].copy_from_slice(&FRAME_MAGIC);
        h[4..12].copy_from_slice(&self.id.to_le_bytes());
        h[12..16].copy_from_slice(&self.part.to_le_bytes());
        h[16..20].copy_from_slice(&self.parts.to_le_bytes());
        h
    }
}

/// Splits a received message into its header and JSON part, checking the
/// magic and the part numbers.
pub fn parse_frame(msg: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
    if msg.len() < FRAME_HEADER || msg[..4] != FRAME_MAGIC {
        return Err(FrameError::NotAFrame);
    }
    let u32_at = |i: usize| u32::from_le_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&msg[4..12]);
    let h = FrameHeader {
        id: u64::from_le_bytes(id),
        part: u32_at(12),
        parts: u32_at(16),
    };
    let body = &msg[FRAME_HEADER..];
    if h.parts == 0 || h.part >= h.parts || body.is_empty() || body.len() > MAX_CHUNK {
        return Err(FrameError::BadPart {
            part: h.part,
            parts: h.parts,
        });
    }
    Ok((h, body))
}

/// Splits `json` (a serialized request or reply, not empty) into the frames
/// of message `id`, each at most [`MAX_MESSAGE`] bytes.
pub fn encode_frames(id: u64, json: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = if json.is_empty() {
        vec![b"null".as_slice()]
    } else {
        json.chunks(MAX_CHUNK).collect()
    };
    let parts = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
    chunks
        .iter()
        .zip(0u32..)
        .map(|(chunk, part)| {
            let mut f = Vec::with_capacity(FRAME_HEADER + chunk.len());
            f.extend_from_slice(&FrameHeader { id, part, parts }.encode());
            f.extend_from_slice(chunk);
            f
        })
        .collect()
}

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
    /// How many of the latest tensors the channel keeps for subscribers
    /// that join later (0: none; broadcast channels only; at most the ring
    /// capacity).
    #[serde(default)]
    pub history: u32,
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
    /// No producer has created the channel yet: a waiting consumer's
    /// subscription is registered, but mode and pools are not known (and no
    /// pool descriptors came with the reply); ask again with
    /// [`Request::Ready`].
    #[serde(default)]
    pub pending: bool,
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
        /// If the channel does not exist, reserve its name and subscribe
        /// now (tensors published once a producer creates it are queued
        /// for this subscriber from the first one on); the reply's channel
        /// is then `pending`, and [`Request::Ready`] completes the open.
        #[serde(default)]
        wait: bool,
    },
    /// Completes the open of a waiting subscriber: replies
    /// [`Response::Consumer`] again, with the pool descriptors once the
    /// channel exists (still `pending` and without descriptors before).
    Ready {
        /// Handle id of the subscriber.
        handle: u32,
    },
    /// Removes a channel created at run time. Refused while any handle is
    /// open on it, while consumers wait for it, and for channels the broker
    /// config declares. The tensors its history kept are released.
    RemoveChannel {
        /// Channel name.
        channel: String,
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
    /// The client gave up waiting for request `request` (timeout): if that
    /// request opened a handle, close it again. Sent without waiting for
    /// the answer; a no-op for a request that opened nothing.
    Cancel {
        /// Id of the abandoned request.
        request: u64,
    },
    /// Asks for a statistics snapshot.
    Stat,
    /// First message of a client whose broker died, to the broker that
    /// took over the socket (issue 16.2): the control segment and the
    /// descriptor of every pool come with it (SCM_RIGHTS, in pool order),
    /// and the client says who it was and which handles it holds. The
    /// broker adopts the bus from the segment (if it has not yet), checks
    /// every claim against the segment's registry and records, and answers
    /// [`Response::Adopted`], or an [`ErrorKind::Refused`] error naming
    /// what disagrees.
    Adopt {
        /// Client name (as at Hello).
        name: String,
        /// Protocol/layout version the client speaks.
        version: u32,
        /// The client id the dead broker gave it.
        client_id: u32,
        /// The bus id it was welcomed into (the segment's registry header).
        bus_id: u64,
        /// Every handle it still holds.
        handles: Vec<HandleClaim>,
    },
}

/// A handle a client claims at [`Request::Adopt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleClaim {
    /// Handle id.
    pub handle: u32,
    /// Holder id.
    pub bit: u32,
    /// What it is.
    pub kind: ClaimKind,
    /// Channel record index.
    pub channel: u32,
    /// Producer row or subscriber index.
    pub index: u32,
}

/// The kind of a [`HandleClaim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimKind {
    /// A producer.
    Producer,
    /// A subscriber (consumer or a stage's input).
    Subscriber,
    /// A subscriber that left its channel and keeps its holds.
    Detached,
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
    /// [`Request::Adopt`] accepted: the client's handles are this
    /// broker's now.
    Adopted {
        /// The broker's process id.
        broker_pid: u32,
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
    /// The object is in use (a channel with open handles cannot be removed).
    Busy,
    /// An adoption claim was refused (it disagrees with shared memory, the
    /// bus is not the one this broker runs, or the broker's config does not
    /// fit the running bus); the client stops trying.
    Refused,
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
    /// Holder handles open now (producers, subscribers, stage halves and
    /// channel histories).
    #[serde(default)]
    pub handles_open: u32,
    /// The broker's `[limits] max_handles`.
    #[serde(default)]
    pub max_handles: u32,
    /// This bus's id (kept across adoptions).
    #[serde(default)]
    pub bus_id: u64,
    /// How this broker came to run the bus (`None`: it created it).
    #[serde(default)]
    pub adoption: Option<AdoptionStat>,
    /// The broker's `[broker] leak_threshold_ms`: holds older than this are
    /// listed in `leaks`.
    #[serde(default)]
    pub leak_threshold_ms: u64,
    /// Holds older than the threshold, oldest first (at most 256 listed).
    #[serde(default)]
    pub leaks: Vec<LeakStat>,
    /// How many holds are older than the threshold in all.
    #[serde(default)]
    pub leaks_total: u32,
}

/// A hold older than the leak threshold ([`StatReport::leaks`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LeakStat {
    /// Client id of the holder.
    pub client: u32,
    /// Its name.
    pub name: String,
    /// Its process id.
    pub pid: i32,
    /// The handle that holds.
    pub handle: u32,
    /// The channel of that handle (empty for a detached subscriber).
    pub channel: String,
    /// `loaned` (a producer's loan not yet published), `queued` (waiting in
    /// a subscriber's rings: the consumer is behind) or `received` (the
    /// application took it and has not released it).
    pub kind: String,
    /// Pool name.
    pub pool: String,
    /// Slot index in the pool.
    pub slot: u32,
    /// The tensor's sequence number.
    pub seq: u64,
    /// How long it has been held, in milliseconds.
    pub age_ms: u64,
}

/// How a broker adopted the running bus ([`StatReport::adoption`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AdoptionStat {
    /// Process id of the broker that died.
    pub previous_broker_pid: u32,
    /// Times the bus was adopted (this one included).
    pub adoptions: u32,
    /// Clients that reconnected and whose claims held.
    pub adopted_clients: u32,
    /// Claims refused (and logged): they disagreed with shared memory.
    pub refused_clients: u32,
    /// Handles of clients that died, or never claimed them, reclaimed.
    pub reclaimed_handles: u32,
    /// Clients of the dead broker still alive that have not reconnected
    /// yet (their handles are kept until they do or die).
    pub waiting_clients: u32,
    /// Work items that were in the dead broker's custody (waiting for room
    /// at a live worker) and were released: the registry does not record
    /// their channel.
    pub custody_released: u32,
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
    /// Most slots held at once since the broker started (sampled by the
    /// broker every 100 ms and at every `stat`).
    pub high_water: u32,
    /// Loans refused because every pool that fits was full (counted
    /// against the smallest pool that fits: the tensor's size class).
    pub loans_refused: u64,
    /// Loans of this size class served by a larger pool because this one
    /// was full.
    pub loans_spilled: u64,
    /// This size class starves while another sits idle: its refused or
    /// spilled count grew in the last second while another pool had at
    /// least half of its slots free.
    pub starving: bool,
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
    /// Tensors kept for late subscribers (the channel's `history`).
    #[serde(default)]
    pub history: u32,
    /// Tensors the history holds now.
    #[serde(default)]
    pub history_held: u32,
    /// The channel's last producer closed cleanly (end of stream).
    #[serde(default)]
    pub ended: bool,
    /// Declared by no producer yet: consumers wait for it.
    #[serde(default)]
    pub pending: bool,
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
    /// Its publish-to-receive latency histogram (`None`: sampling is off).
    #[serde(default)]
    pub latency: Option<LatencyStat>,
}

/// A subscriber's latency histogram ([`crate::latency`]), as a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStat {
    /// Every how many receives one is recorded.
    pub sample_every: u64,
    /// Samples recorded.
    pub samples: u64,
    /// Sum of the sampled latencies, nanoseconds.
    pub sum_ns: u64,
    /// Median, 99th and 99.9th percentile: the upper bound of the bucket
    /// each falls in, nanoseconds (0 without samples).
    pub p50_ns: u64,
    /// See `p50_ns`.
    pub p99_ns: u64,
    /// See `p50_ns`.
    pub p999_ns: u64,
    /// Non-empty buckets: (bucket index, samples), in bucket order (see
    /// [`crate::latency::upper_bound_ns`]).
    pub buckets: Vec<(u32, u64)>,
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
    /// Reconnected after a broker restart (its handles adopted).
    #[serde(default)]
    pub adopted: bool,
    /// Age of its oldest hold in milliseconds (0: it holds nothing).
    #[serde(default)]
    pub oldest_hold_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_large_payloads() {
        let small = encode_frames(7, b"{\"op\":\"ok\"}");
        assert_eq!(small.len(), 1);
        let (h, body) = parse_frame(&small[0]).unwrap();
        assert_eq!(
            h,
            FrameHeader {
                id: 7,
                part: 0,
                parts: 1
            }
        );
        assert_eq!(body, b"{\"op\":\"ok\"}");

        let big: Vec<u8> = (0..MAX_CHUNK * 2 + 5).map(|i| (i % 251) as u8).collect();
        let frames = encode_frames(u64::MAX, &big);
        assert_eq!(frames.len(), 3);
        let mut joined = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            assert!(f.len() <= MAX_MESSAGE);
            let (h, body) = parse_frame(f).unwrap();
            assert_eq!((h.id, h.part, h.parts), (u64::MAX, i as u32, 3));
            joined.extend_from_slice(body);
        }
        assert_eq!(joined, big);
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(
            parse_frame(b"{\"op\":\"stat\"}"),
            Err(FrameError::NotAFrame)
        );
        assert_eq!(parse_frame(b"TBF1"), Err(FrameError::NotAFrame));
        let mut f = encode_frames(1, b"x").remove(0);
        f[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(parse_frame(&f), Err(FrameError::BadPart { .. })));
        let header_only = FrameHeader {
            id: 1,
            part: 0,
            parts: 1,
        }
        .encode();
        assert!(matches!(
            parse_frame(&header_only),
            Err(FrameError::BadPart { .. })
        ));
    }
}
