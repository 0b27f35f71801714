//! Statistics snapshots.

use super::{HandleKind, State};
use std::sync::atomic::Ordering;
use tensorbus_core::proto::{
    ChannelStat, ClientStat, LatencyStat, PoolStat, StatReport, SubscriberStat,
};
use tensorbus_core::reclaim::count_held_by;
use tensorbus_core::wide::HolderSnapshot;
use tensorbus_core::{Mode, Policy};
use tensorbus_shm::PeerCred;

/// A histogram's snapshot for stat (`None` when it samples nothing).
fn latency_stat(h: &tensorbus_core::latency::LatencyHistogram) -> Option<LatencyStat> {
    use tensorbus_core::latency::{quantile, OFF};
    let mask = h.sample_mask.load(Ordering::Relaxed);
    if mask == OFF {
        return None;
    }
    let (buckets, samples, sum_ns) = h.snapshot();
    let q = |x| quantile(&buckets, x).unwrap_or(0);
    Some(LatencyStat {
        sample_every: mask.wrapping_add(1),
        samples,
        sum_ns,
        p50_ns: q(0.5),
        p99_ns: q(0.99),
        p999_ns: q(0.999),
        buckets: buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| (i as u32, n))
            .collect(),
    })
}

impl State {
    /// Builds a report from shared memory and the broker's registry, with
    /// `clients` (id, credentials, name, adopted) the admitted clients.
    pub fn stat_report<'a>(
        &self,
        clients: impl Iterator<Item = (u32, PeerCred, &'a str, bool)>,
    ) -> StatReport {
        let state = self;
        let ctl = &state.control;
        let mut sub_ids = state.subscriber_ids();
        for (_, id) in state.channels.iter().flatten().filter_map(|c| c.history) {
            sub_ids.insert(id);
        }
        let pools = state
            .pools
            .iter()
            .enumerate()
            .map(|(p, pool)| {
                let mut s = PoolStat {
                    name: pool.info.name.clone(),
                    slot_size: pool.info.slot_size,
                    slots_total: pool.info.slots,
                    ..PoolStat::default()
                };
                for i in 0..ctl.slots(p) {
                    let h = ctl
                        .slot(p, i)
                        .map(|x| x.holder_set().snapshot())
                        .unwrap_or_default();
                    if !h.is_held() {
                        s.slots_free += 1;
                    } else if h.intersects(&sub_ids) {
                        s.in_flight += 1;
                    } else {
                        s.loaned += 1;
                    }
                }
                if let Some(c) = ctl.pool_counters(p) {
                    (s.loans_refused, s.loans_spilled) = c.load();
                }
                s
            })
            .collect();
        let mut pools: Vec<PoolStat> = pools;
        let held: Vec<u32> = pools.iter().map(|s| s.slots_total - s.slots_free).collect();
        for (p, s) in pools.iter_mut().enumerate() {
            (s.high_water, s.starving) = state.pool_watch_stat(p, &held);
        }
        let channels = state
        .channels
        .iter()
        .flatten()
        .map(|c| {
            let rec = ctl.channel(c.index);
            let mut subscribers: Vec<SubscriberStat> = state
                .handles
                .iter()
                .filter_map(|(&id, h)| match h.kind {
                    HandleKind::Subscriber { channel, sub } if channel == c.index => {
                        let r = ctl.subscriber(channel, sub)?;
                        let queued = (0..ctl.layout().rows())
                            .filter_map(|row| ctl.ring(channel, row, sub))
                            .map(|ring| ring.len())
                            .sum();
                        Some(SubscriberStat {
                            handle: id,
                            client: h.client,
                            policy: Policy::from_code(r.config.policy.load(Ordering::Relaxed)).to_string(),
                            depth: r.config.depth.load(Ordering::Relaxed),
                            delivered: r.delivered.load(Ordering::Relaxed),
                            dropped: r.dropped.load(Ordering::Relaxed),
                            queued,
                            latency: ctl.latency(channel, sub).and_then(latency_stat),
                        })
                    }
                    _ => None,
                })
                .collect();
            subscribers.sort_by_key(|s| s.handle);
            ChannelStat {
                name: c.spec.name.clone(),
                mode: Mode::from_code(c.spec.mode.code()).to_string(),
                published: rec.map_or(0, |r| r.published.load(Ordering::Relaxed))
                    + state
                        .handles
                        .values()
                        .filter_map(|h| match h.kind {
                            HandleKind::Producer { channel, row } if channel == c.index => {
                                ctl.producer(channel, row)
                            }
                            _ => None,
                        })
                        .map(|p| p.published.load(Ordering::Relaxed))
                        .sum::<u64>(),
                producers: state
                    .handles
                    .values()
                    .filter(|h| matches!(h.kind, HandleKind::Producer { channel, .. } if channel == c.index))
                    .count() as u32,
                history: c.spec.history,
                history_held: state.history_held(c.index),
                ended: rec.is_some_and(|r| r.ended.load(Ordering::Acquire) != 0),
                pending: c.pending,
                subscribers,
            }
        })
        .collect();
        let clients: Vec<(u32, PeerCred, &str, bool)> = clients.collect();
        let names: std::collections::HashMap<u32, (String, i32)> = clients
            .iter()
            .map(|&(id, cred, name, _)| (id, (name.to_owned(), cred.pid)))
            .collect();
        let (leaks, leaks_total, oldest) = state.leaks(&names);
        let mut clients: Vec<ClientStat> = clients
            .into_iter()
            .map(|(id, cred, name, adopted)| {
                let mut mask = HolderSnapshot::default();
                for h in state.handles.values().filter(|h| h.client == id) {
                    mask.insert(h.id);
                }
                ClientStat {
                    id,
                    pid: cred.pid,
                    uid: cred.uid,
                    name: name.to_owned(),
                    handles: state.handles.values().filter(|h| h.client == id).count() as u32,
                    holds: if mask == HolderSnapshot::default() {
                        0
                    } else {
                        count_held_by(ctl, |s| s.intersects(&mask)) as u32
                    },
                    adopted,
                    oldest_hold_ms: oldest.get(&id).copied().unwrap_or(0),
                }
            })
            .collect();
        clients.sort_by_key(|c| c.id);
        StatReport {
            broker_pid: std::process::id(),
            pools,
            channels,
            clients,
            handles_open: state.ids.used() as u32,
            max_handles: state.ids.limit() as u32,
            bus_id: state.bus_id(),
            adoption: state.adoption_stat(),
            leak_threshold_ms: state.leak_threshold_ms,
            leaks,
            leaks_total,
        }
    }
}
