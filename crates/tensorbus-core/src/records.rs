//! Per-channel records in the control segment: the channel itself, its
//! producer handles and its subscribers.

use crate::event::EventCount;
use crate::subset::SUB_WORDS;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
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
/// Channel record state: the name is reserved by consumers that wait for
/// the channel ([`crate::proto::Request::OpenConsumer`] with `wait`); no
/// producer has created it yet, so it has no mode or pools.
pub const STATE_PENDING: u32 = 3;

/// Stored policy code of a channel's history record: a subscriber record
/// that no consumer reads, holding the channel's last `history` tensors
/// (producers treat it as `drop_oldest` with depth `history`, and do not
/// count it in what a publish delivered or dropped).
pub const POLICY_CODE_HISTORY: u32 = 4;

/// How a channel distributes tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
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
#[non_exhaustive]
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
    /// Subscriber indices that are active (producers deliver to these): a
    /// [`crate::subset::SubSet`] of [`SUB_WORDS`] words, of which a
    /// channel uses the first [`crate::layout::Layout::sub_words`].
    pub subscribers: [AtomicU64; SUB_WORDS],
    /// 1 once the channel's last producer closed cleanly (end of stream:
    /// a consumer that finds its rings empty then reports it), 0 while a
    /// producer is open or none ever closed. Written by the broker only
    /// (Release), read by consumers with Acquire: a consumer that reads 1
    /// sees every push the closed producers made, so an empty re-check
    /// afterwards means the stream really is drained. On the line of the
    /// masks every receive already reads.
    pub ended: AtomicU32,
    /// Subscriber indices that are history records (see
    /// [`POLICY_CODE_HISTORY`]): a broadcast publish keeps the tensor there
    /// instead of delivering it. Set by the broker before the record's bit
    /// joins `subscribers` (whose Release RMW publishes it to producers that
    /// load the mask with Acquire), cleared when the channel is removed.
    pub history_subs: [AtomicU64; SUB_WORDS],
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
    /// The handle's holder id ([`crate::wide::HolderId`]).
    pub holder_id: AtomicU32,
    /// `INTENT_VALID | descriptor` while a publish is in progress, else 0.
    pub intent: AtomicU64,
    /// The slot an extension-id loan is taking ([`loan_tag`]) between its
    /// CAS on word 0 and its extension bit, else 0 (rule 3 of
    /// [`crate::wide`]; the broker's stale-summary repair skips it).
    pub loan_intent: AtomicU64,
    /// Subscriber indices the in-progress publish delivers to (a
    /// [`crate::subset::SubSet`], first [`crate::layout::Layout::sub_words`]
    /// words in use).
    pub intent_receivers: [AtomicU64; SUB_WORDS],
    /// Tensors this handle published.
    pub published: AtomicU64,
}

/// Flag bit of [`ProducerRecord::intent`].
pub const INTENT_VALID: u64 = 1 << 63;

/// The [`ProducerRecord::loan_intent`] value naming slot `index` of `pool`
/// (never 0).
#[inline]
pub const fn loan_tag(pool: usize, index: usize) -> u64 {
    1 << 63 | ((pool as u64 & 0xFF) << 32) | (index as u64 & 0xFFFF_FFFF)
}

impl ProducerRecord {
    /// Whether the record is free for a new producer handle.
    ///
    /// Acquire: pairs with the Release store of [`STATE_FREE`] that ends a
    /// reclaim (`reclaim::free_row`), so everything the reclaim did to the
    /// row (intent cleared, rings drained) happens before the record is
    /// handed out again.
    pub fn is_free(&self) -> bool {
        self.state.load(Ordering::Acquire) == STATE_FREE
    }

    /// Activates this free record, row `row` of `channel`, for a producer
    /// handle with holder id `holder_id`: resets the publish state and the
    /// counter, marks the record [`STATE_ACTIVE`], and only then sets the
    /// row's bit in the channel's [`ChannelRecord::producer_rows`].
    ///
    /// Only the broker calls this, from its one thread, on a record that
    /// [`ProducerRecord::is_free`] and whose row it is not reclaiming. Every
    /// other writer of `producer_rows` is that same thread (row removal,
    /// the broker's own row 0), so the mask has one writer.
    pub fn activate(&self, channel: &ChannelRecord, row: usize, holder_id: u32) {
        // Relaxed: a free record has no concurrent reader that acts on these
        // fields. The producer process that will own it learns its row from
        // the broker's reply, which it reads after these stores (the socket
        // send and receive order them); the broker's own readers (repair,
        // settling, stats) run on this thread. Anyone else who looks
        // synchronises through the Release store and RMW below.
        self.holder_id.store(holder_id, Ordering::Relaxed);
        self.intent.store(0, Ordering::Relaxed);
        self.loan_intent.store(0, Ordering::Relaxed);
        for w in &self.intent_receivers {
            w.store(0, Ordering::Relaxed);
        }
        self.published.store(0, Ordering::Relaxed);
        // Release: a peer that reads ACTIVE with Acquire also reads the
        // reset fields above, never a previous owner's intent or count.
        self.state.store(STATE_ACTIVE, Ordering::Release);
        // Release: consumers load `producer_rows` with Acquire (receive.rs)
        // before they poll the row; one that sees the new bit therefore sees
        // the record active and reset (the ring entries themselves are
        // ordered by the ring's own cell protocol). No Acquire half is
        // needed: every other write to the mask comes from this thread.
        channel
            .producer_rows
            .fetch_or(1u64 << (row & 63), Ordering::Release);
    }
}

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

impl SubscriberRecord {
    /// Whether the record is free for a new subscriber.
    ///
    /// Acquire: pairs with the Release store of [`STATE_FREE`] that ends a
    /// reclaim (`reclaim::free_subscriber`), so the drained rings and cleared
    /// holder bits of the previous subscriber happen before the reuse.
    pub fn is_free(&self) -> bool {
        self.config.state.load(Ordering::Acquire) == STATE_FREE
    }

    /// Activates this free record, subscriber `sub` of `channel`, for a
    /// subscriber with holder id `holder_id`, `policy` and ring `depth`:
    /// writes the configuration, resets the counters and the waiter count,
    /// marks the record [`STATE_ACTIVE`], and only then sets bit `sub` in
    /// the channel's [`ChannelRecord::subscribers`] mask, which is what
    /// makes producers deliver to it.
    ///
    /// Only the broker calls this, from its one thread, on a record that
    /// [`SubscriberRecord::is_free`] and that it is not reclaiming.
    pub fn activate(
        &self,
        channel: &ChannelRecord,
        sub: usize,
        holder_id: u32,
        policy: Policy,
        depth: u32,
    ) {
        self.activate_code(channel, sub, holder_id, policy.code(), depth);
    }

    /// [`SubscriberRecord::activate`] with a raw policy code: a
    /// [`Policy::code`], or [`POLICY_CODE_HISTORY`] for a channel's history
    /// record (which the broker owns; no consumer reads it).
    pub fn activate_code(
        &self,
        channel: &ChannelRecord,
        sub: usize,
        holder_id: u32,
        policy_code: u32,
        depth: u32,
    ) {
        let config = &self.config;
        // Relaxed: no producer reads these before it has seen bit `sub` in
        // the mask, and the mask's Release RMW below publishes them to every
        // producer that does (publish.rs loads the mask with Acquire or
        // SeqCst and only then reads `holder_id`, `policy`, `depth` and
        // `state`). The consumer that owns the record learns its index from
        // the broker's reply, read after these stores.
        config.holder_id.store(holder_id, Ordering::Relaxed);
        config.policy.store(policy_code, Ordering::Relaxed);
        config.depth.store(depth, Ordering::Relaxed);
        // A previous owner that died between prepare_wait and cancel_wait
        // left its count behind; the new consumer starts with none. Relaxed
        // for the same reason: producers read it (`notify_needed`) only for
        // a subscriber whose bit they saw.
        config.data.waiters.store(0, Ordering::Relaxed);
        // Relaxed: `delivered` is written by the new consumer only (after the
        // reply); `dropped` is added to by producers only after they saw the
        // bit, so the Release below orders this reset before their adds.
        self.delivered.store(0, Ordering::Relaxed);
        self.dropped.store(0, Ordering::Relaxed);
        // Release (Relaxed would do, given the RMW below; Release keeps the
        // record self-describing): a producer that sees the bit reads
        // `state` with Acquire in its blocking loop and must read ACTIVE (or
        // a later DEAD), never the FREE of the previous owner.
        config.state.store(STATE_ACTIVE, Ordering::Release);
        // Release: the subscriber's configuration must be visible before its
        // bit appears in the mask. Producers load the mask with Acquire (or
        // SeqCst) in publish.rs and has_room; a load that reads this RMW, or
        // any later RMW of the mask (they continue its release sequence),
        // synchronises with it. SeqCst is not needed: the one Dekker pair on
        // the mask is retirement (clear the bit, then snapshot intents),
        // and a producer that misses a subscriber joining concurrently just
        // does not deliver to it, which is allowed.
        crate::subset::shared_insert(&channel.subscribers, sub, Ordering::Release);
    }
}

/// The producer-read part of a subscriber record.
#[repr(C)]
#[derive(Debug, Default)]
pub struct SubscriberConfig {
    /// [`STATE_FREE`], [`STATE_ACTIVE`] or [`STATE_DEAD`].
    pub state: AtomicU32,
    /// The subscriber's holder id ([`crate::wide::HolderId`]).
    pub holder_id: AtomicU32,
    /// [`Policy::code`].
    pub policy: AtomicU32,
    /// Ring depth in use (1..=ring capacity).
    pub depth: AtomicU32,
    /// The consumer parks here when all its rings are empty.
    pub data: EventCount,
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Issue 13.4: the activation orderings, checked. A peer that sees a
    //! record's bit in its channel's mask (the only way producers and
    //! consumers find records) sees the record configured and reset.

    use super::*;
    use loom::sync::Arc;

    /// A producer that sees a new subscriber's bit reads its configuration,
    /// not the previous owner's, and its drop count lands after the reset.
    #[test]
    fn subscriber_config_visible_before_its_bit() {
        loom::model(|| {
            let ch = Arc::new(ChannelRecord::default());
            let rec = Arc::new(SubscriberRecord::default());
            // The previous owner's leftovers.
            rec.config.holder_id.store(3, Ordering::Relaxed);
            rec.config.depth.store(9, Ordering::Relaxed);
            rec.config.data.waiters.store(1, Ordering::Relaxed);
            rec.dropped.store(5, Ordering::Relaxed);
            let (c2, r2) = (ch.clone(), rec.clone());
            let broker = loom::thread::spawn(move || {
                r2.activate(&c2, 2, 7, Policy::DropNewest, 4);
            });
            // The producer side, as in publish.rs.
            let saw = ch.subscribers[0].load(Ordering::Acquire) & (1 << 2) != 0;
            if saw {
                let c = &rec.config;
                assert_eq!(c.holder_id.load(Ordering::Relaxed), 7);
                assert_eq!(c.depth.load(Ordering::Relaxed), 4);
                assert_eq!(
                    Policy::from_code(c.policy.load(Ordering::Relaxed)),
                    Policy::DropNewest
                );
                assert_eq!(c.state.load(Ordering::Acquire), STATE_ACTIVE);
                assert_eq!(c.data.waiters.load(Ordering::Relaxed), 0);
                rec.dropped.fetch_add(1, Ordering::Relaxed);
            }
            broker.join().unwrap();
            assert_eq!(rec.dropped.load(Ordering::Relaxed), u64::from(saw));
        });
    }

    /// A consumer that sees a new producer row reads the record active and
    /// reset, never a previous owner's intent.
    #[test]
    fn producer_record_reset_before_its_row_bit() {
        loom::model(|| {
            let ch = Arc::new(ChannelRecord::default());
            let rec = Arc::new(ProducerRecord::default());
            rec.intent.store(INTENT_VALID | 42, Ordering::Relaxed);
            rec.published.store(8, Ordering::Relaxed);
            let (c2, r2) = (ch.clone(), rec.clone());
            let broker = loom::thread::spawn(move || r2.activate(&c2, 1, 11));
            if ch.producer_rows.load(Ordering::Acquire) & (1 << 1) != 0 {
                assert_eq!(rec.state.load(Ordering::Acquire), STATE_ACTIVE);
                assert_eq!(rec.holder_id.load(Ordering::Relaxed), 11);
                assert_eq!(rec.intent.load(Ordering::Relaxed), 0);
                assert_eq!(rec.published.load(Ordering::Relaxed), 0);
            }
            broker.join().unwrap();
        });
    }
}
