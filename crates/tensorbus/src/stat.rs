//! What [`crate::Client::stat`] and [`crate::Client::pools`] report: the
//! broker's pools, channels, subscribers and clients. These are the
//! library's own types (the wire format may change without breaking
//! them); they serialise to the JSON that `tensorbus stat --json` prints.

use serde::Serialize;
use tensorbus_core::proto;
use tensorbus_core::{Mode, Policy};

/// A statistics snapshot of the broker.
///
/// ```no_run
/// # let client = tensorbus::Client::connect()?;
/// let report = client.stat()?;
/// for c in &report.channels {
///     println!("{}: {} published, {} subscribers", c.name, c.published, c.subscribers.len());
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StatReport {
    /// Broker process id.
    pub broker_pid: u32,
    /// Pools.
    pub pools: Vec<PoolStat>,
    /// Channels.
    pub channels: Vec<ChannelStat>,
    /// Connected clients.
    pub clients: Vec<ClientStat>,
    /// Holder handles open now in the whole broker (producers, subscribers,
    /// stage halves and channel histories).
    pub handles_open: u32,
    /// The broker's `[limits] max_handles`: opens past it fail.
    pub max_handles: u32,
    /// This bus's id (kept when a restarted broker adopts the bus). JSON
    /// writes it as 16 hex digits (a string: a 64-bit number does not
    /// survive JavaScript's or jq's doubles).
    #[serde(serialize_with = "hex_id")]
    pub bus_id: u64,
    /// How this broker came to run the bus, if it adopted it from a broker
    /// that died (`None`: it created the bus).
    pub adoption: Option<AdoptionStat>,
    /// The broker's `[broker] leak_threshold_ms`.
    pub leak_threshold_ms: u64,
    /// Holds older than the threshold, oldest first (at most 256 listed):
    /// who holds which slot of which channel, and why.
    pub leaks: Vec<LeakStat>,
    /// How many holds are older than the threshold in all.
    pub leaks_total: u32,
}

/// A hold older than the broker's leak threshold ([`StatReport::leaks`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
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
    /// `loaned` (not yet published), `queued` (waiting in a subscriber's
    /// rings: the consumer is behind) or `received` (taken by the
    /// application and not released).
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

impl From<proto::LeakStat> for LeakStat {
    fn from(l: proto::LeakStat) -> Self {
        LeakStat {
            client: l.client,
            name: l.name,
            pid: l.pid,
            handle: l.handle,
            channel: l.channel,
            kind: l.kind,
            pool: l.pool,
            slot: l.slot,
            seq: l.seq,
            age_ms: l.age_ms,
        }
    }
}

fn hex_id<S: serde::Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{id:016x}"))
}

/// How a broker adopted the running bus ([`StatReport::adoption`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AdoptionStat {
    /// Process id of the broker that died.
    pub previous_broker_pid: u32,
    /// Times the bus was adopted (this one included).
    pub adoptions: u32,
    /// Clients that reconnected and whose claims held.
    pub adopted_clients: u32,
    /// Claims refused (they disagreed with shared memory, or named another bus).
    pub refused_clients: u32,
    /// Handles of dead clients (or handles no client claimed) reclaimed.
    pub reclaimed_handles: u32,
    /// Clients of the dead broker, still alive, not reconnected yet.
    pub waiting_clients: u32,
    /// Work items the dead broker held in custody, released.
    pub custody_released: u32,
}

impl From<proto::AdoptionStat> for AdoptionStat {
    fn from(a: proto::AdoptionStat) -> Self {
        AdoptionStat {
            previous_broker_pid: a.previous_broker_pid,
            adoptions: a.adoptions,
            adopted_clients: a.adopted_clients,
            refused_clients: a.refused_clients,
            reclaimed_handles: a.reclaimed_handles,
            waiting_clients: a.waiting_clients,
            custody_released: a.custody_released,
        }
    }
}

/// One pool in a [`StatReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
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
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ChannelStat {
    /// Name.
    pub name: String,
    /// Broadcast or work queue.
    pub mode: Mode,
    /// Tensors published.
    pub published: u64,
    /// Live producer handles.
    pub producers: u32,
    /// Tensors kept for late subscribers (the channel's history setting).
    pub history: u32,
    /// Tensors the history holds now.
    pub history_held: u32,
    /// The last producer closed cleanly: end of stream.
    pub ended: bool,
    /// No producer has created the channel yet; consumers wait for it.
    pub pending: bool,
    /// Subscribers.
    pub subscribers: Vec<SubscriberStat>,
}

/// One subscriber in a [`ChannelStat`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SubscriberStat {
    /// Handle id.
    pub handle: u32,
    /// Owning client id.
    pub client: u32,
    /// Policy.
    pub policy: Policy,
    /// Ring depth.
    pub depth: u32,
    /// Tensors received.
    pub delivered: u64,
    /// Tensors dropped by its policy.
    pub dropped: u64,
    /// Entries waiting in its rings.
    pub queued: u64,
    /// Its publish-to-receive latency histogram, from shared memory
    /// (`None` when the broker's `latency_sample_every` is 0).
    pub latency: Option<LatencyStat>,
}

/// A subscriber's publish-to-receive latency: samples of every
/// `sample_every`-th receive, in log-linear buckets from 128 ns to ~17 s
/// (each at most 25 % wide).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LatencyStat {
    /// Every how many receives one is recorded.
    pub sample_every: u64,
    /// Samples recorded.
    pub samples: u64,
    /// Sum of the sampled latencies, nanoseconds.
    pub sum_ns: u64,
    /// Median latency: upper bound of its bucket, nanoseconds (0: no samples).
    pub p50_ns: u64,
    /// 99th percentile, as `p50_ns`.
    pub p99_ns: u64,
    /// 99.9th percentile, as `p50_ns`.
    pub p999_ns: u64,
    /// Non-empty buckets: (exclusive upper bound in nanoseconds, samples),
    /// in order; the last bucket's bound is `u64::MAX`.
    pub buckets: Vec<(u64, u64)>,
}

impl LatencyStat {
    /// The `q`-quantile (0..=1) of the samples taken since `prev` (an
    /// earlier snapshot of the same subscriber; `None`: all samples), as
    /// the upper bound of the bucket it falls in, in nanoseconds. `None`
    /// when no sample was taken since.
    ///
    /// ```
    /// # fn f(now: &tensorbus::stat::LatencyStat, before: &tensorbus::stat::LatencyStat) {
    /// if let Some(ns) = now.quantile_since(Some(before), 0.99) {
    ///     println!("p99 over the last interval: {} us", ns / 1000);
    /// }
    /// # }
    /// ```
    pub fn quantile_since(&self, prev: Option<&LatencyStat>, q: f64) -> Option<u64> {
        use tensorbus_core::latency::{quantile, upper_bound_ns, BUCKETS};
        let index = |ub: u64| (0..BUCKETS).find(|&i| upper_bound_ns(i) == ub);
        let mut counts = vec![0u64; BUCKETS];
        for &(ub, n) in &self.buckets {
            if let Some(i) = index(ub) {
                counts[i] += n;
            }
        }
        for &(ub, n) in prev.map_or(&[][..], |p| &p.buckets[..]) {
            if let Some(i) = index(ub) {
                counts[i] = counts[i].saturating_sub(n);
            }
        }
        quantile(&counts, q)
    }
}

impl From<proto::LatencyStat> for LatencyStat {
    fn from(l: proto::LatencyStat) -> Self {
        LatencyStat {
            sample_every: l.sample_every,
            samples: l.samples,
            sum_ns: l.sum_ns,
            p50_ns: l.p50_ns,
            p99_ns: l.p99_ns,
            p999_ns: l.p999_ns,
            buckets: l
                .buckets
                .into_iter()
                .map(|(i, n)| (tensorbus_core::latency::upper_bound_ns(i as usize), n))
                .collect(),
        }
    }
}

/// One client in a [`StatReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ClientStat {
    /// Client id.
    pub id: u32,
    /// Process id (from SO_PEERCRED).
    pub pid: i32,
    /// User id (from SO_PEERCRED).
    pub uid: u32,
    /// Name given at connect.
    pub name: String,
    /// Open handles.
    pub handles: u32,
    /// Slots any of its handles holds.
    pub holds: u32,
    /// Reconnected after a broker restart (its handles adopted).
    pub adopted: bool,
    /// Age of its oldest hold in milliseconds (0: it holds nothing).
    pub oldest_hold_ms: u64,
}

/// A pool of the broker's pool table ([`crate::Client::pools`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PoolInfo {
    /// Index in the pool table ([`crate::SlotId::pool`]).
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
}

impl From<proto::StatReport> for StatReport {
    fn from(r: proto::StatReport) -> Self {
        StatReport {
            broker_pid: r.broker_pid,
            pools: r.pools.into_iter().map(PoolStat::from).collect(),
            channels: r.channels.into_iter().map(ChannelStat::from).collect(),
            clients: r.clients.into_iter().map(ClientStat::from).collect(),
            handles_open: r.handles_open,
            max_handles: r.max_handles,
            bus_id: r.bus_id,
            adoption: r.adoption.map(AdoptionStat::from),
            leak_threshold_ms: r.leak_threshold_ms,
            leaks: r.leaks.into_iter().map(LeakStat::from).collect(),
            leaks_total: r.leaks_total,
        }
    }
}

impl From<proto::PoolStat> for PoolStat {
    fn from(p: proto::PoolStat) -> Self {
        PoolStat {
            name: p.name,
            slot_size: p.slot_size,
            slots_total: p.slots_total,
            slots_free: p.slots_free,
            loaned: p.loaned,
            in_flight: p.in_flight,
            high_water: p.high_water,
            loans_refused: p.loans_refused,
            loans_spilled: p.loans_spilled,
            starving: p.starving,
        }
    }
}

impl From<proto::ChannelStat> for ChannelStat {
    fn from(c: proto::ChannelStat) -> Self {
        ChannelStat {
            // The broker writes `Mode`'s own names; an unknown one (a newer
            // broker) reads as the default rather than failing the report.
            mode: c.mode.parse().unwrap_or_default(),
            name: c.name,
            published: c.published,
            producers: c.producers,
            history: c.history,
            history_held: c.history_held,
            ended: c.ended,
            pending: c.pending,
            subscribers: c
                .subscribers
                .into_iter()
                .map(SubscriberStat::from)
                .collect(),
        }
    }
}

impl From<proto::SubscriberStat> for SubscriberStat {
    fn from(s: proto::SubscriberStat) -> Self {
        SubscriberStat {
            handle: s.handle,
            client: s.client,
            policy: s.policy.parse().unwrap_or_default(),
            depth: s.depth,
            delivered: s.delivered,
            dropped: s.dropped,
            queued: s.queued,
            latency: s.latency.map(LatencyStat::from),
        }
    }
}

impl From<proto::ClientStat> for ClientStat {
    fn from(c: proto::ClientStat) -> Self {
        ClientStat {
            id: c.id,
            pid: c.pid,
            uid: c.uid,
            name: c.name,
            handles: c.handles,
            holds: c.holds,
            adopted: c.adopted,
            oldest_hold_ms: c.oldest_hold_ms,
        }
    }
}

impl From<&proto::PoolInfo> for PoolInfo {
    fn from(p: &proto::PoolInfo) -> Self {
        PoolInfo {
            index: p.index,
            name: p.name.clone(),
            slot_size: p.slot_size,
            stride: p.stride,
            slots: p.slots,
            alignment: p.alignment,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON `tensorbus stat --json` prints keeps the wire's keys and
    /// values (scripts read it).
    #[test]
    fn json_matches_the_wire_report() {
        let wire = proto::StatReport {
            broker_pid: 7,
            channels: vec![proto::ChannelStat {
                name: "c".into(),
                mode: "workqueue".into(),
                subscribers: vec![proto::SubscriberStat {
                    policy: "drop_oldest".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let ours = StatReport::from(wire.clone());
        assert_eq!(ours.channels[0].mode, Mode::Workqueue);
        assert_eq!(ours.channels[0].subscribers[0].policy, Policy::DropOldest);
        // The JSON is the wire report's, except the bus id: a 16-digit hex
        // string there (a u64 above 2^53 would lose digits in jq or JavaScript).
        let mut expected = serde_json::to_value(&wire).unwrap();
        expected["bus_id"] = serde_json::Value::String(format!("{:016x}", wire.bus_id));
        assert_eq!(serde_json::to_value(&ours).unwrap(), expected);
    }
}
