//! Per-channel records in the control segment: the channel itself, its
//! producer handles and its subscribers.

use crate::event::EventCount;
use crate::sync::{AtomicU32, AtomicU64};
use crate::CacheLine;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Record state: unused.
pub const STATE_FREE: u32 = 0;
/// Record state: in use by a live handle.
pub const STATE_ACTIVE: u32 = 1;
/// Record state: its owner died; the broker is reclaiming it.
pub const STATE_DEAD: u32 = 2;

/// How a channel distributes tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every subscriber receives every tensor.
    #[default]
    Broadcast,
    /// Each tensor goes to exactly one subscriber (least loaded, then round-robin).
    #[serde(alias = "work_queue")]
    Workqueue,
}

impl Mode {
    /// Stored code.
    pub const fn code(self) -> u32 {
        match self {
            Mode::Broadcast => 0,
            Mode::Workqueue => 1,
        }
    }
    /// Decodes a stored code (garbage reads as broadcast).
    pub const fn from_code(code: u32) -> Mode {
        if code == 1 {
            Mode::Workqueue
        } else {
            Mode::Broadcast
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Broadcast => "broadcast",
            Mode::Workqueue => "workqueue",
        })
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "broadcast" => Ok(Mode::Broadcast),
            "workqueue" | "work_queue" => Ok(Mode::Workqueue),
            _ => Err(format!("unknown mode {s:?}; use broadcast or workqueue")),
        }
    }
}

/// What a producer does when a subscriber's ring is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Lossless: the producer waits for room.
    #[default]
    Block,
    /// Real-time: the oldest queued tensor is released and counted as dropped.
    DropOldest,
    /// The new tensor is not delivered to this subscriber, counted as dropped.
    DropNewest,
    /// Depth 1, always the newest (drop_oldest with one cell).
    Latest,
}

impl Policy {
    /// Stored code.
    pub const fn code(self) -> u32 {
        match self {
            Policy::Block => 0,
            Policy::DropOldest => 1,
            Policy::DropNewest => 2,
            Policy::Latest => 3,
        }
    }
    /// Decodes a stored code (garbage reads as drop_newest, which never blocks).
    pub const fn from_code(code: u32) -> Policy {
        match code {
            0 => Policy::Block,
            1 => Policy::DropOldest,
            3 => Policy::Latest,
            _ => Policy::DropNewest,
        }
    }
    /// The name used in configs.
    pub const fn name(self) -> &'static str {
        match self {
            Policy::Block => "block",
            Policy::DropOldest => "drop_oldest",
            Policy::DropNewest => "drop_newest",
            Policy::Latest => "latest",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "block" => Ok(Policy::Block),
            "drop_oldest" => Ok(Policy::DropOldest),
            "drop_newest" => Ok(Policy::DropNewest),
            "latest" => Ok(Policy::Latest),
            _ => Err(format!(
                "unknown policy {s:?}; use block, drop_oldest, drop_newest or latest"
            )),
        }
    }
}

/// A channel's shared record.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ChannelRecord {
    /// [`STATE_FREE`] or [`STATE_ACTIVE`].
    pub state: AtomicU32,
    /// [`Mode::code`].
    pub mode: AtomicU32,
    /// Producer rows that may have entries (consumers poll these rows).
    pub producer_rows: AtomicU64,
    /// Subscriber indices that are active (producers deliver to these).
    pub subscribers: AtomicU64,
    /// Tensors published by producer handles that have closed (the broker
    /// adds each closing producer's count; live producers count on their own
    /// records, so publishing takes no shared lock-prefixed counter). On a
    /// line of its own, away from the masks every receive reads.
    pub published: CacheLine<AtomicU64>,
}

/// A producer handle's shared record.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ProducerRecord {
    /// [`STATE_FREE`], [`STATE_ACTIVE`] or [`STATE_DEAD`].
    pub state: AtomicU32,
    /// The handle's holder bit number.
    pub holder_bit: AtomicU32,
    /// `INTENT_VALID | descriptor` while a publish is in progress, else 0.
    pub intent: AtomicU64,
    /// Subscriber indices the in-progress publish delivers to.
    pub intent_receivers: AtomicU64,
    /// Tensors this handle published.
    pub published: AtomicU64,
}

/// Flag bit of [`ProducerRecord::intent`].
pub const INTENT_VALID: u64 = 1 << 63;

/// A subscriber's shared record.
#[repr(C)]
#[derive(Debug, Default)]
pub struct SubscriberRecord {
    /// Read by producers on every publish.
    pub config: CacheLine<SubscriberConfig>,
    /// Written by the consumer.
    pub delivered: CacheLine<AtomicU64>,
    /// Written by producers (drops under drop_oldest, drop_newest, latest).
    pub dropped: CacheLine<AtomicU64>,
}

/// The producer-read part of a subscriber record.
#[repr(C)]
#[derive(Debug, Default)]
pub struct SubscriberConfig {
    /// [`STATE_FREE`], [`STATE_ACTIVE`] or [`STATE_DEAD`].
    pub state: AtomicU32,
    /// The subscriber's holder bit number.
    pub holder_bit: AtomicU32,
    /// [`Policy::code`].
    pub policy: AtomicU32,
    /// Ring depth in use (1..=ring capacity).
    pub depth: AtomicU32,
    /// The consumer parks here when all its rings are empty.
    pub data: EventCount,
}
