//! The rows of the three panes of `tensorbus top`, and their cells as text.

use super::model::ChannelSort;
use crate::broker::human_bytes;
use std::cmp::Ordering;
use std::time::Duration;
use tensorbus::stat::{ChannelStat, SubscriberStat};

/// A counter's increase per second, `None` without an earlier value or
/// when the counter went back (the channel was removed and created again).
fn rate(now: u64, before: Option<u64>, secs: Option<f64>) -> Option<f64> {
    let (before, secs) = (before?, secs?);
    Some(now.checked_sub(before)? as f64 / secs)
}

/// One line of the channels pane.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelRow {
    /// Channel name.
    pub name: String,
    /// `broadcast` / `workqueue` (`-` while pending).
    pub mode: String,
    /// `live`, `waiting`, `ended` or `idle` (as in `tensorbus stat`).
    pub state: &'static str,
    /// Tensors published in all.
    pub published: u64,
    /// Tensors published per second over the last refresh.
    pub pub_rate: Option<f64>,
    /// Subscribers.
    pub subscribers: usize,
    /// Queued tensors and ring depth of the subscriber with most queued.
    pub queued: Option<(u64, u32)>,
    /// Tensors the subscribers' policies dropped, summed.
    pub dropped: u64,
    /// Drops per second over the last refresh.
    pub drop_rate: Option<f64>,
    /// The worst subscriber's 99th-percentile publish-to-receive latency:
    /// of the samples since the previous report when there are any, else
    /// of all its samples; `None` (shown as `-`) without samples.
    pub p99: Option<Duration>,
}

/// The 99th percentile of subscriber `s`'s latency samples taken since
/// `prev` (the same subscriber in the previous report), or of all of them
/// when none were taken since.
fn recent_p99(s: &SubscriberStat, prev: Option<&SubscriberStat>) -> Option<Duration> {
    let l = s.latency.as_ref()?;
    l.quantile_since(prev.and_then(|p| p.latency.as_ref()), 0.99)
        .or_else(|| l.quantile_since(None, 0.99))
        .map(Duration::from_nanos)
}

impl ChannelRow {
    pub(super) fn new(
        c: &ChannelStat,
        before: Option<&ChannelStat>,
        secs: Option<f64>,
    ) -> ChannelRow {
        let dropped_of = |c: &ChannelStat| c.subscribers.iter().map(|s| s.dropped).sum::<u64>();
        let dropped = dropped_of(c);
        ChannelRow {
            name: c.name.clone(),
            mode: if c.pending {
                "-".into()
            } else {
                c.mode.to_string()
            },
            state: crate::stat::channel_state(c),
            published: c.published,
            pub_rate: rate(c.published, before.map(|b| b.published), secs),
            subscribers: c.subscribers.len(),
            queued: c
                .subscribers
                .iter()
                .map(|s| (s.queued, s.depth))
                .max_by_key(|&(q, d)| (q, std::cmp::Reverse(d))),
            dropped,
            drop_rate: rate(dropped, before.map(dropped_of), secs),
            p99: c
                .subscribers
                .iter()
                .filter_map(|s| {
                    let prev =
                        before.and_then(|b| b.subscribers.iter().find(|p| p.handle == s.handle));
                    recent_p99(s, prev)
                })
                .max(),
        }
    }

    pub(super) fn compare(&self, other: &ChannelRow, sort: ChannelSort) -> Ordering {
        let desc = |a: Option<f64>, b: Option<f64>| b.unwrap_or(0.0).total_cmp(&a.unwrap_or(0.0));
        let queued = |r: &ChannelRow| r.queued.map_or(0, |(q, _)| q);
        match sort {
            ChannelSort::Drops => desc(self.drop_rate, other.drop_rate)
                .then_with(|| other.dropped.cmp(&self.dropped))
                .then_with(|| queued(other).cmp(&queued(self))),
            ChannelSort::P99 => other.p99.cmp(&self.p99),
            ChannelSort::Depth => queued(other).cmp(&queued(self)),
            ChannelSort::Rate => desc(self.pub_rate, other.pub_rate)
                .then_with(|| other.published.cmp(&self.published)),
            ChannelSort::Name => Ordering::Equal,
        }
        .then_with(|| self.name.cmp(&other.name))
    }

    /// The column titles, in the order of [`ChannelRow::cells`].
    pub const HEADER: [&'static str; 10] = [
        "channel",
        "mode",
        "state",
        "published",
        "pub/s",
        "subs",
        "queued",
        "dropped",
        "drop/s",
        "p99",
    ];

    /// The cells of this row as text.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.mode.clone(),
            self.state.into(),
            self.published.to_string(),
            per_second(self.pub_rate),
            self.subscribers.to_string(),
            self.queued
                .map_or_else(|| "-".into(), |(q, d)| format!("{q}/{d}")),
            self.dropped.to_string(),
            per_second(self.drop_rate),
            self.p99.map_or_else(|| "-".into(), latency),
        ]
    }
}

/// A rate as text: one decimal below 100, `-` when unknown.
fn per_second(r: Option<f64>) -> String {
    match r {
        None => "-".into(),
        Some(r) if r < 100.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.0}"),
    }
}

/// A latency as text (µs below 10 ms, else ms).
fn latency(d: Duration) -> String {
    if d.as_secs() > 3600 {
        return ">17s".into(); // the overflow bucket has no bound
    }
    let us = d.as_secs_f64() * 1e6;
    if us < 10_000.0 {
        format!("{us:.1}us")
    } else {
        format!("{:.1}ms", us / 1e3)
    }
}

/// One line of the pools pane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolRow {
    /// Pool name.
    pub name: String,
    /// Payload bytes per slot.
    pub slot_size: u64,
    /// Slots in the pool.
    pub total: u32,
    /// Slots nobody holds.
    pub free: u32,
    /// Slots loaned to producers, not yet published.
    pub loaned: u32,
    /// Slots held by subscribers or a history.
    pub in_flight: u32,
    /// Most slots held at once (sampled by the broker).
    pub high_water: u32,
    /// Loans of this size class refused (every fitting pool full).
    pub refused: u64,
    /// This class runs dry while another pool sits idle.
    pub starving: bool,
}

impl PoolRow {
    /// The share of slots somebody holds, 0 ..= 1.
    pub fn occupancy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            f64::from(self.total.saturating_sub(self.free)) / f64::from(self.total)
        }
    }

    /// The column titles, in the order of [`PoolRow::cells`].
    pub const HEADER: [&'static str; 9] = [
        "pool",
        "slot_size",
        "slots",
        "free",
        "loaned",
        "in_flight",
        "used",
        "peak",
        "refused",
    ];

    /// The cells of this row as text.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            human_bytes(self.slot_size),
            self.total.to_string(),
            self.free.to_string(),
            self.loaned.to_string(),
            self.in_flight.to_string(),
            format!("{:.0}%", self.occupancy() * 100.0),
            self.high_water.to_string(),
            if self.starving {
                format!("{} starving", self.refused)
            } else {
                self.refused.to_string()
            },
        ]
    }
}

/// One line of the clients pane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientRow {
    /// Client id.
    pub id: u32,
    /// Process id.
    pub pid: i32,
    /// Name given at connect.
    pub name: String,
    /// Open handles.
    pub handles: u32,
    /// Slots its handles hold.
    pub holds: u32,
    /// Age of its oldest hold, milliseconds.
    pub oldest_hold_ms: u64,
    /// Its holds older than the broker's leak threshold.
    pub leaks: u32,
}

impl ClientRow {
    /// The column titles, in the order of [`ClientRow::cells`].
    pub const HEADER: [&'static str; 7] =
        ["id", "pid", "client", "handles", "holds", "oldest", "leaks"];

    /// The cells of this row as text.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.pid.to_string(),
            self.name.clone(),
            self.handles.to_string(),
            self.holds.to_string(),
            if self.holds == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}s", self.oldest_hold_ms as f64 / 1000.0)
            },
            self.leaks.to_string(),
        ]
    }
}
