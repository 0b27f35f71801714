//! Closing handles and cleaning up after dead clients.
//!
//! The steps come from `tensorbus_core::reclaim`; this module orders them:
//! producers first (their in-flight publish is repaired from its intent
//! record), then subscribers (retired at once, their bits cleared once every
//! publish that might still deliver to them has finished).

use super::{Handle, HandleKind, Pending, State};
use std::sync::atomic::Ordering;
use tensorbus_core::reclaim;
use tensorbus_core::records::STATE_ACTIVE;
use tensorbus_core::wide::HolderId;
use tensorbus_core::Descriptor;
use tensorbus_shm::futex::FutexParker;

impl State {
    /// Closes (or reclaims) every handle of `client`: producers first.
    pub fn reclaim_client(&mut self, client: u32) {
        let mut mine: Vec<(u32, Handle)> = self
            .handles
            .iter()
            .filter(|(_, h)| h.client == client)
            .map(|(&id, &h)| (id, h))
            .collect();
        mine.sort_by_key(|(_, h)| matches!(h.kind, HandleKind::Subscriber { .. }));
        for (id, _) in mine {
            self.close_handle(id, false);
        }
    }

    /// Detaches a subscriber (see [`tensorbus_core::proto::Request::Detach`]):
    /// retired from its channel like a closed one, but its bit stays
    /// allocated (so the stray-bit sweep leaves it alone) and set on the
    /// slots of the tensors its client received, until the handle is closed.
    /// Returns false if `id` is not an open subscriber.
    pub(super) fn detach_handle(&mut self, id: u32) -> bool {
        let Some(h) = self.handles.get_mut(&id) else {
            return false;
        };
        let HandleKind::Subscriber { channel, sub } = h.kind else {
            return false;
        };
        h.kind = HandleKind::Detached;
        let id = h.id;
        self.mark_id(id);
        self.retire(channel, sub, id, true);
        true
    }

    /// Retires subscriber `sub` of `channel` (holder id `id`) and queues
    /// its clean-up for when in-flight publishes have settled.
    pub(super) fn retire(&mut self, channel: usize, sub: usize, id: HolderId, keep: bool) {
        reclaim::retire_subscriber(&self.control, channel, sub, &FutexParker);
        let mut snapshot = Vec::new();
        reclaim::intents(&self.control, channel, &mut snapshot);
        self.busy_subs.push((channel, sub));
        self.pending.push(Pending::Subscriber {
            channel,
            sub,
            id,
            snapshot,
            keep,
        });
        self.progress();
    }

    /// Closes one handle (graceful close and death take the same path;
    /// `clean`: the client asked, which is what lets the last producer's
    /// close end the stream).
    pub(super) fn close_handle(&mut self, id: u32, clean: bool) -> bool {
        let Some(h) = self.handles.remove(&id) else {
            return false;
        };
        self.mark_id(h.id);
        match h.kind {
            HandleKind::Detached => {
                // Retired already; now the holds of what it received end.
                reclaim::clear_holder_everywhere(&self.control, h.id);
                self.free_id(h.id);
                return true;
            }
            HandleKind::Producer { channel, row } => {
                reclaim::recover_producer(&self.control, channel, row);
                if let (Some(ch), Some(p)) = (
                    self.control.channel(channel),
                    self.control.producer(channel, row),
                ) {
                    let n = p.published.swap(0, Ordering::AcqRel);
                    ch.published.fetch_add(n, Ordering::Relaxed);
                }
                reclaim::clear_holder_everywhere(&self.control, h.id);
                self.free_id(h.id);
                self.producer_closed(channel, row, clean);
                self.busy_rows.push((channel, row));
                self.pending.push(Pending::Row { channel, row });
            }
            HandleKind::Subscriber { channel, sub } => {
                self.retire(channel, sub, h.id, false);
                return true;
            }
        }
        self.progress();
        true
    }

    /// Advances pending reclaims; returns whether any remain.
    pub fn progress(&mut self) -> bool {
        if !self.redispatch.is_empty() {
            self.redispatch_pending();
        }
        if self.channels.iter().flatten().any(|c| c.pending) {
            self.collect_pending_channels();
        }
        let pending = std::mem::take(&mut self.pending);
        for p in pending {
            match p {
                Pending::Subscriber {
                    channel,
                    sub,
                    id,
                    snapshot,
                    keep,
                } => {
                    if !reclaim::publishes_settled(&self.control, channel, &snapshot) {
                        self.pending.push(Pending::Subscriber {
                            channel,
                            sub,
                            id,
                            snapshot,
                            keep,
                        });
                        continue;
                    }
                    self.finish_subscriber(channel, sub, id, keep);
                }
                Pending::Row { channel, row } => {
                    if reclaim::row_drained(&self.control, channel, row) {
                        reclaim::free_row(&self.control, channel, row);
                        self.busy_rows.retain(|&x| x != (channel, row));
                    } else {
                        self.pending.push(Pending::Row { channel, row });
                    }
                }
            }
        }
        !self.pending.is_empty() || !self.redispatch.is_empty()
    }

    /// Drains a retired subscriber's rings (a work queue's untaken entries
    /// go to live workers) and frees its record; `keep` (detached): only
    /// the holds of the drained entries end, the bit stays allocated and set
    /// on the tensors its client received; else every hold of the bit ends.
    fn finish_subscriber(&mut self, channel: usize, sub: usize, id: HolderId, keep: bool) {
        let mut queued = Vec::new();
        reclaim::drain_subscriber(&self.control, channel, sub, |_, d| queued.push(d));
        let drained = if keep { queued.clone() } else { Vec::new() };
        if self.is_workqueue(channel) {
            // The dead worker's untaken entries pass into the broker's
            // custody (its own holder id, pinned while the dead one still
            // holds) before the dead id is cleared, so none is freed while
            // it waits for room at a live worker.
            let custody = self.ids.custody();
            for d in queued {
                let Some(slot) = self.control.slot(usize::from(d.pool), d.index as usize) else {
                    continue;
                };
                if d.matches_generation(slot.generation.load(Ordering::Acquire))
                    && slot.held_by(id)
                    && slot.holder_set().pin_if_held(custody)
                {
                    self.redispatch.push((channel, d));
                }
            }
        }
        if keep {
            for d in drained {
                if let Some(slot) = self.control.slot(usize::from(d.pool), d.index as usize) {
                    if d.matches_generation(slot.generation.load(Ordering::Acquire)) {
                        slot.release(id);
                    }
                }
            }
        } else {
            reclaim::clear_holder_everywhere(&self.control, id);
            self.free_id(id);
        }
        reclaim::free_subscriber(&self.control, channel, sub);
        self.busy_subs.retain(|&x| x != (channel, sub));
        self.redispatch_pending();
    }

    /// Moves work items in the broker's custody (a dead worker's untaken
    /// entries) to the least-loaded live worker, through the broker's own
    /// ring row (row 0). Items for which every live worker's ring is full
    /// stay in custody and are retried on the next tick; items of a channel
    /// with no live worker left are dropped, as a publish to no worker is.
    pub(crate) fn redispatch_pending(&mut self) {
        let items = std::mem::take(&mut self.redispatch);
        let custody = self.ids.custody();
        for (channel, d) in items {
            match self.try_dispatch(channel, d) {
                Dispatch::Done | Dispatch::NoWorker => {
                    if let Some(slot) = self.control.slot(usize::from(d.pool), d.index as usize) {
                        slot.release(custody);
                    }
                }
                Dispatch::Full => self.redispatch.push((channel, d)),
            }
        }
    }

    fn try_dispatch(&mut self, channel: usize, d: Descriptor) -> Dispatch {
        let ctl = &self.control;
        let (Some(slot), Some(ch)) = (
            ctl.slot(usize::from(d.pool), d.index as usize),
            ctl.channel(channel),
        ) else {
            return Dispatch::NoWorker;
        };
        let live = tensorbus_core::subset::SubSet::load(&ch.subscribers, Ordering::Acquire);
        // Least loaded live worker first.
        let mut order: Vec<(u64, usize)> = live
            .iter()
            .filter_map(|s| ctl.ring(channel, 0, s).map(|r| (r.len(), s)))
            .collect();
        if order.is_empty() {
            return Dispatch::NoWorker;
        }
        order.sort_unstable();
        for (_, s) in order {
            let Some(sub) = ctl.subscriber(channel, s) else {
                continue;
            };
            if sub.config.state.load(Ordering::Acquire) != STATE_ACTIVE {
                continue;
            }
            let Some(ring) = ctl.ring(channel, 0, s) else {
                continue;
            };
            // Set the survivor's id before it can see the entry (we hold
            // the slot in custody: rule 2 of `tensorbus_core::wide`).
            let Some(id) = ctl.subscriber_id(channel, s) else {
                continue;
            };
            slot.add_holders([id]);
            ch.producer_rows.fetch_or(1, Ordering::AcqRel);
            let head = self.broker_heads.entry((channel, s)).or_insert(0);
            if ring.push(ring.capacity(), d.pack(), head).is_ok() {
                sub.config.data.notify(&FutexParker);
                return Dispatch::Done;
            }
            slot.release(id);
        }
        Dispatch::Full
    }
}

/// What one re-dispatch attempt did.
enum Dispatch {
    /// Pushed to a live worker.
    Done,
    /// Every live worker's broker ring is full: retry later.
    Full,
    /// No live worker: dropped.
    NoWorker,
}
