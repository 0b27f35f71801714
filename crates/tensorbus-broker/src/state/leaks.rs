//! Leak attribution (issue 17.2): holds older than `[broker]
//! leak_threshold_ms`, with who holds them and why.
//!
//! A hold's age is taken from the tensor's publish timestamp (the
//! producer's `CLOCK_MONOTONIC`, in the slot header) for a published
//! tensor, and from when the broker's sweep first saw the slot's current
//! generation held for a loan nobody published yet (precise to one sweep,
//! 100 ms on pools of up to 16k slots). A subscriber's hold is `queued`
//! while the tensor still waits in its rings (the consumer is behind) and
//! `received` once the application took it and has not released it (the
//! classic leak); a producer's is `loaned`. The broker's own holds (channel
//! histories, its custody of work items) are not leaks and are not listed.

use super::{HandleKind, State};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tensorbus_core::proto::LeakStat;
use tensorbus_core::wide::HolderId;
use tensorbus_core::Descriptor;

/// Most holds one report lists (the oldest first); the count of all is
/// always given.
pub(crate) const MAX_LISTED: usize = 256;

/// When the sweep first saw each held slot's generation: (pool, slot) ->
/// (generation, first seen).
#[derive(Debug, Default)]
pub(crate) struct HeldSince(HashMap<(usize, usize), (u32, Instant)>);

impl State {
    /// Notes when slots `range` of `pool` became held (called by the sweep).
    pub(super) fn track_held(&mut self, pool: usize, range: std::ops::Range<usize>) {
        let now = Instant::now();
        for i in range {
            let Some(slot) = self.control.slot(pool, i) else {
                continue;
            };
            if slot.is_held() {
                let generation = slot.generation.load(Ordering::Relaxed);
                let e = self
                    .held_since
                    .0
                    .entry((pool, i))
                    .or_insert((generation, now));
                if e.0 != generation {
                    *e = (generation, now);
                }
            } else {
                self.held_since.0.remove(&(pool, i));
            }
        }
    }

    /// The holds older than the threshold (oldest first, at most
    /// [`MAX_LISTED`]), how many there are in all, and per client the age
    /// of its oldest hold in milliseconds.
    pub(super) fn leaks(
        &self,
        names: &HashMap<u32, (String, i32)>,
    ) -> (Vec<LeakStat>, u32, HashMap<u32, u64>) {
        let ctl = &self.control;
        let now_ns = tensorbus_shm::monotonic_ns();
        let now = Instant::now();
        let by_id: HashMap<HolderId, (u32, &super::Handle)> =
            self.handles.iter().map(|(&n, h)| (h.id, (n, h))).collect();
        let mut out = Vec::new();
        let mut oldest: HashMap<u32, u64> = HashMap::new();
        let threshold = self.leak_threshold_ms;
        let mut ring = Vec::new();
        for p in 0..ctl.pools() {
            for i in 0..ctl.slots(p) {
                let Some(slot) = ctl.slot(p, i) else { continue };
                let set = slot.holder_set().snapshot();
                if !set.is_held() {
                    continue;
                }
                let holders: Vec<(u32, &super::Handle)> =
                    set.ids().filter_map(|id| by_id.get(&id).copied()).collect();
                if holders.is_empty() {
                    continue; // the broker's own (history, custody)
                }
                let loan = holders
                    .iter()
                    .all(|(_, h)| matches!(h.kind, HandleKind::Producer { .. }));
                let age_ms = if loan {
                    self.held_since
                        .0
                        .get(&(p, i))
                        .map_or(0, |&(_, t)| now.duration_since(t).as_millis() as u64)
                } else {
                    let ts = slot.timestamp_ns.load(Ordering::Relaxed);
                    now_ns.saturating_sub(ts) / 1_000_000
                };
                let generation = slot.generation.load(Ordering::Relaxed);
                for &(handle, h) in &holders {
                    let o = oldest.entry(h.client).or_insert(0);
                    *o = (*o).max(age_ms);
                    if age_ms < threshold {
                        continue;
                    }
                    let (kind, channel) = match h.kind {
                        HandleKind::Producer { channel, .. } => ("loaned", Some(channel)),
                        HandleKind::Subscriber { channel, sub } => {
                            let d = Descriptor::new(p as u8, i as u32, generation).pack();
                            let queued = (0..ctl.layout().rows()).any(|row| {
                                ctl.ring(channel, row, sub).is_some_and(|r| {
                                    r.peek_all(&mut ring);
                                    ring.contains(&d)
                                })
                            });
                            (if queued { "queued" } else { "received" }, Some(channel))
                        }
                        HandleKind::Detached => ("received", None),
                    };
                    let (name, pid) = names.get(&h.client).cloned().unwrap_or_default();
                    out.push(LeakStat {
                        client: h.client,
                        name,
                        pid,
                        handle,
                        channel: channel
                            .and_then(|c| self.channels.get(c).and_then(Option::as_ref))
                            .map(|c| c.spec.name.clone())
                            .unwrap_or_default(),
                        kind: kind.into(),
                        pool: self.pools[p].info.name.clone(),
                        slot: i as u32,
                        seq: slot.seq.load(Ordering::Relaxed),
                        age_ms,
                    });
                }
            }
        }
        out.sort_by_key(|l| std::cmp::Reverse(l.age_ms));
        let total = out.len() as u32;
        out.truncate(MAX_LISTED);
        (out, total, oldest)
    }
}
