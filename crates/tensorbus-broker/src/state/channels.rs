//! A channel's life: creation (from the config, at run time, or by a
//! producer completing a name that waiting consumers reserved), its history
//! of the latest tensors for late subscribers, end of stream when its last
//! producer closes cleanly, and removal.
//!
//! The history is a subscriber record that no consumer reads, owned by the
//! broker: producers deliver to it like to any `drop_oldest` subscriber of
//! depth `history` (its policy code [`POLICY_CODE_HISTORY`] makes them keep
//! it out of what a publish reports), so it holds the latest tensors of
//! every producer with its own holder bit, counted against the channel's
//! pools and reclaimed like any hold. When a producer closes, the broker
//! moves that producer's kept tensors into the record's row-0 ring (its
//! own), so they outlive the producer. A subscriber that joins is given the
//! newest of them (see [`State::deliver_history`]) in its row-0 ring before its open
//! is answered.

use super::{Channel, ChannelError, HandleKind, State};
use std::sync::atomic::Ordering;
use tensorbus_core::proto::ChannelSpec;
use tensorbus_core::publish::release_desc;
use tensorbus_core::records::{POLICY_CODE_HISTORY, STATE_ACTIVE, STATE_FREE, STATE_PENDING};
use tensorbus_core::subset::SubSet;
use tensorbus_core::wide::HolderId;
use tensorbus_core::{Descriptor, Mode};
use tensorbus_shm::futex::FutexParker;

/// Why a channel could not be removed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoveError {
    /// No such channel.
    #[error("unknown channel {channel:?}; known: {}", known.join(", "))]
    Unknown {
        /// The name asked for.
        channel: String,
        /// The channels there are.
        known: Vec<String>,
    },
    /// The broker config declares it.
    #[error(
        "channel {0:?} is declared in the broker config; remove it there and restart the broker"
    )]
    Declared(String),
    /// Handles are open on it (or still being reclaimed).
    #[error("channel {channel:?} is in use by {handles} handle(s) (producers, consumers, stages, or waiting consumers); close them first")]
    InUse {
        /// Channel name.
        channel: String,
        /// Open handles on it.
        handles: usize,
    },
}

impl State {
    /// The pool indices a spec may use, validated, smallest slot first.
    pub(super) fn spec_pools(&self, spec: &ChannelSpec) -> Result<Vec<u8>, ChannelError> {
        crate::names::validate_name(&spec.name).map_err(ChannelError::InvalidName)?;
        let mut pools = Vec::new();
        if spec.pools.is_empty() {
            pools.extend(0..self.pools.len() as u8);
        } else {
            for name in &spec.pools {
                let p = self
                    .pools
                    .iter()
                    .position(|p| &p.info.name == name)
                    .ok_or_else(|| ChannelError::UnknownPool {
                        channel: spec.name.clone(),
                        pool: name.clone(),
                        pools: self.pools.iter().map(|p| p.info.name.clone()).collect(),
                    })?;
                pools.push(p as u8);
            }
        }
        pools.sort_by_key(|&p| self.pools[usize::from(p)].info.slot_size);
        pools.dedup();
        let cap = self.control.layout().params.ring_capacity;
        if let Some(d) = spec.depth {
            if d == 0 || d > cap {
                return Err(ChannelError::Depth {
                    depth: d,
                    capacity: cap,
                });
            }
        }
        if spec.history > 0 && spec.mode != Mode::Broadcast {
            return Err(ChannelError::History {
                channel: spec.name.clone(),
                reason: "history works on broadcast channels only (a work queue hands each tensor to one worker)".into(),
            });
        }
        if spec.history > cap {
            return Err(ChannelError::History {
                channel: spec.name.clone(),
                reason: format!(
                    "history {} must be at most limits.ring_capacity ({cap})",
                    spec.history
                ),
            });
        }
        Ok(pools)
    }

    /// A free channel record index.
    fn free_channel_index(&self) -> Result<usize, ChannelError> {
        let max = self.control.layout().params.max_channels as usize;
        self.channels
            .iter()
            .position(Option::is_none)
            .or((self.channels.len() < max).then_some(self.channels.len()))
            .ok_or(ChannelError::TooMany { max })
    }

    /// Creates a channel from a spec (`declared`: from the broker config).
    pub(super) fn create_channel(
        &mut self,
        spec: ChannelSpec,
        declared: bool,
    ) -> Result<usize, ChannelError> {
        let pools = self.spec_pools(&spec)?;
        let index = self.free_channel_index()?;
        if index == self.channels.len() {
            self.channels.push(None);
        }
        self.channels[index] = Some(Channel {
            index,
            spec: ChannelSpec {
                history: 0,
                ..spec.clone()
            },
            pools: Vec::new(),
            declared,
            pending: true,
            producers: 0,
            history: None,
        });
        if let Err(e) = self.complete_channel(index, spec, pools) {
            self.channels[index] = None;
            return Err(e);
        }
        self.mark_channel(index);
        Ok(index)
    }

    /// Reserves `name` for consumers that wait for it: a channel record in
    /// [`STATE_PENDING`], without mode or pools, that a producer opening
    /// with a spec completes ([`State::complete_pending`]).
    pub(super) fn create_pending(&mut self, name: &str) -> Result<usize, ChannelError> {
        crate::names::validate_name(name).map_err(ChannelError::InvalidName)?;
        let index = self.free_channel_index()?;
        let rec = self
            .control
            .channel(index)
            .ok_or(ChannelError::TooMany { max: index })?;
        rec.ended.store(0, Ordering::Relaxed);
        rec.state.store(STATE_PENDING, Ordering::Release);
        if index == self.channels.len() {
            self.channels.push(None);
        }
        self.channels[index] = Some(Channel {
            index,
            spec: ChannelSpec {
                name: name.to_owned(),
                pools: Vec::new(),
                mode: Mode::Broadcast,
                depth: None,
                policy: None,
                history: 0,
            },
            pools: Vec::new(),
            declared: false,
            pending: true,
            producers: 0,
            history: None,
        });
        self.mark_channel(index);
        Ok(index)
    }

    /// Creates the pending channel `c` from `spec` (a producer opened it
    /// with one): its waiting subscribers get the spec's default policy and
    /// depth where they asked for none (no producer has delivered to them
    /// yet, so the records may still change).
    pub(super) fn complete_pending(
        &mut self,
        c: usize,
        spec: ChannelSpec,
    ) -> Result<(), ChannelError> {
        let pools = self.spec_pools(&spec)?;
        self.complete_channel(c, spec, pools)?;
        let capacity = self.control.layout().params.ring_capacity;
        let ch = self.chan(c);
        let (policy, depth) = (ch.default_policy(), ch.default_depth(capacity));
        for h in self.handles.values() {
            if let HandleKind::Subscriber { channel, sub } = h.kind {
                if channel != c {
                    continue;
                }
                if let Some(r) = self.control.subscriber(c, sub) {
                    let policy = h.asked.0.unwrap_or(policy);
                    r.config.policy.store(policy.code(), Ordering::Relaxed);
                    let depth = match policy {
                        tensorbus_core::Policy::Latest => 1,
                        _ => h.asked.1.unwrap_or(depth),
                    };
                    r.config.depth.store(depth, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Fills channel `c` (pending, or just reserved) from a validated spec:
    /// mode, pools, the history record; then marks it active.
    fn complete_channel(
        &mut self,
        c: usize,
        spec: ChannelSpec,
        pools: Vec<u8>,
    ) -> Result<(), ChannelError> {
        let history = if spec.history > 0 {
            let sub = self
                .free_sub(c, &spec.name)
                .map_err(|e| ChannelError::History {
                    channel: spec.name.clone(),
                    reason: format!("no subscriber record left for its history: {e}"),
                })?;
            let id = self.alloc_id()?;
            Some((sub, id))
        } else {
            None
        };
        let max = self.control.layout().params.max_channels as usize;
        let rec = self
            .control
            .channel(c)
            .ok_or(ChannelError::TooMany { max })?;
        rec.mode.store(spec.mode.code(), Ordering::Relaxed);
        rec.ended.store(0, Ordering::Relaxed);
        if let Some((sub, id)) = history {
            if let Some(h) = self.control.latency(c, sub) {
                h.reset(0); // no consumer reads a history record
            }
            if let Some(r) = self.control.subscriber(c, sub) {
                // Before the record's bit joins the mask (activate_code's
                // Release RMW), so a producer that sees the bit sees this.
                SubSet::one(sub).store(&rec.history_subs, Ordering::Relaxed);
                r.activate_code(
                    rec,
                    sub,
                    u32::from(id.index()),
                    POLICY_CODE_HISTORY,
                    spec.history,
                );
            }
        } else {
            SubSet::EMPTY.store(&rec.history_subs, Ordering::Relaxed);
        }
        // Release: a client that sees ACTIVE (a waiting consumer polls with
        // Ready, on this thread's replies; stats) sees the mode.
        rec.state.store(STATE_ACTIVE, Ordering::Release);
        let ch = self.chan_mut(c);
        ch.spec = spec;
        ch.pools = pools;
        ch.pending = false;
        ch.history = history;
        self.mark_channel(c);
        Ok(())
    }

    /// Frees pending channels that no consumer waits for any more.
    pub(super) fn collect_pending_channels(&mut self) {
        let stale: Vec<usize> = self
            .channels
            .iter()
            .flatten()
            .filter(|c| c.pending)
            .map(|c| c.index)
            .filter(|&c| !self.channel_in_use(c))
            .collect();
        for c in stale {
            self.free_channel_record(c);
        }
    }

    /// Handles open on channel `c`, counting records still being reclaimed.
    fn handles_on(&self, c: usize) -> usize {
        let open =
            self.handles
                .values()
                .filter(|h| match h.kind {
                    HandleKind::Producer { channel, .. }
                    | HandleKind::Subscriber { channel, .. } => channel == c,
                    HandleKind::Detached => false,
                })
                .count();
        open + self.busy_rows.iter().filter(|&&(ch, _)| ch == c).count()
            + self.busy_subs.iter().filter(|&&(ch, _)| ch == c).count()
            + self.redispatch.iter().filter(|&&(ch, _)| ch == c).count()
    }

    fn channel_in_use(&self, c: usize) -> bool {
        self.handles_on(c) > 0
    }

    /// Removes a channel created at run time (see
    /// [`tensorbus_core::proto::Request::RemoveChannel`]).
    pub fn remove_channel(&mut self, name: &str) -> Result<(), RemoveError> {
        let Some(c) = self.channel_by_name(name) else {
            return Err(RemoveError::Unknown {
                channel: name.to_owned(),
                known: self.channel_names(),
            });
        };
        if self.chan(c).declared {
            return Err(RemoveError::Declared(name.to_owned()));
        }
        // Finish what closed handles left (drained rows, settled subscribers).
        self.progress();
        let handles = self.handles_on(c);
        if handles > 0 {
            return Err(RemoveError::InUse {
                channel: name.to_owned(),
                handles,
            });
        }
        self.free_channel_record(c);
        Ok(())
    }

    /// Releases what channel `c`'s history holds, frees its record and
    /// id, and frees the channel record. No handle is open on it.
    fn free_channel_record(&mut self, c: usize) {
        if let Some((sub, id)) = self.chan(c).history {
            tensorbus_core::reclaim::drain_subscriber(&self.control, c, sub, |_, d| {
                release_desc(&self.control, d, id);
            });
            tensorbus_core::reclaim::retire_subscriber(&self.control, c, sub, &FutexParker);
            tensorbus_core::reclaim::clear_holder_everywhere(&self.control, id);
            tensorbus_core::reclaim::free_subscriber(&self.control, c, sub);
            self.free_id(id);
        }
        if let Some(rec) = self.control.channel(c) {
            SubSet::EMPTY.store(&rec.subscribers, Ordering::Relaxed);
            rec.producer_rows.store(0, Ordering::Relaxed);
            rec.ended.store(0, Ordering::Relaxed);
            SubSet::EMPTY.store(&rec.history_subs, Ordering::Relaxed);
            rec.published.store(0, Ordering::Relaxed);
            rec.state.store(STATE_FREE, Ordering::Release);
        }
        self.broker_heads.retain(|&(ch, _), _| ch != c);
        self.channels[c] = None;
        self.mark_channel(c);
    }

    /// A producer opened on channel `c`: the stream is live again.
    pub(super) fn producer_opened(&mut self, c: usize) {
        self.chan_mut(c).producers += 1;
        if let Some(rec) = self.control.channel(c) {
            rec.ended.store(0, Ordering::Release);
        }
    }

    /// Producer `row` of channel `c` closed (`clean`: by its own request,
    /// not by death): its kept history moves to the broker's row, and the
    /// last clean close ends the stream and wakes the channel's waiting
    /// consumers so they see it.
    pub(super) fn producer_closed(&mut self, c: usize, row: usize, clean: bool) {
        self.move_history_of_row(c, row);
        let ch = self.chan_mut(c);
        ch.producers = ch.producers.saturating_sub(1);
        if ch.producers > 0 || !clean {
            return;
        }
        let ctl = &self.control;
        let Some(rec) = ctl.channel(c) else {
            return;
        };
        // Release: the consumer that reads 1 (Acquire) sees every push of
        // the producers that closed; their close requests reached this
        // thread after those pushes (socket send/receive order them).
        rec.ended.store(1, Ordering::Release);
        let subs = SubSet::load(&rec.subscribers, Ordering::Acquire);
        for s in subs.iter() {
            if let Some(r) = ctl.subscriber(c, s) {
                // notify wakes only parked consumers (its SeqCst fence pairs
                // with theirs): a consumer about to park re-checks `ended`.
                r.config.data.notify(&FutexParker);
            }
        }
    }

    /// Moves the tensors channel `c`'s history keeps from producer `row`
    /// (closed or dead, its in-flight publish repaired) into the history's
    /// row-0 ring, releasing the oldest there when it is full.
    fn move_history_of_row(&mut self, c: usize, row: usize) {
        let Some((sub, id)) = self.chan(c).history else {
            return;
        };
        let depth = u64::from(self.chan(c).spec.history);
        let ctl = &self.control;
        let (Some(src), Some(dst)) = (ctl.ring(c, row, sub), ctl.ring(c, 0, sub)) else {
            return;
        };
        let head = self.broker_heads.entry((c, sub)).or_insert(0);
        while let Some(bits) = src.pop() {
            loop {
                if dst.push(depth, bits, head).is_ok() {
                    break;
                }
                match dst.steal_oldest() {
                    Some(old) => {
                        release_desc(ctl, Descriptor::unpack(old), id);
                    }
                    None => {
                        release_desc(ctl, Descriptor::unpack(bits), id);
                        break;
                    }
                }
            }
        }
    }

    /// Gives subscriber `sub` (holder id `mine`, `policy`, ring `depth`) of
    /// channel `c`, activated a moment ago, the newest tensors the history
    /// keeps, oldest first, in its row-0 ring: all of them (they hold no
    /// slot beyond the history's own, and row 0 has the ring capacity,
    /// which bounds `history`), or the newest `depth` for a subscriber that
    /// asked for only the latest ones (`drop_oldest`, `latest`). A tensor that a
    /// publish already delivered to it (its bit is set) is skipped; one the
    /// history lets go meanwhile is not taken: the broker pins the slot with
    /// its custody id (only while someone holds it), checks the history's
    /// hold and then the generation, adds `mine` under the pin (rule 2 of
    /// `tensorbus_core::wide`) and drops the pin. Returns how many it got.
    pub(super) fn deliver_history(
        &mut self,
        c: usize,
        sub: usize,
        mine: HolderId,
        policy: tensorbus_core::Policy,
        depth: u32,
    ) -> usize {
        let Some((hsub, hid)) = self.chan(c).history else {
            return 0;
        };
        let n = self.chan(c).spec.history;
        let keep = match policy {
            tensorbus_core::Policy::DropOldest => n.min(depth),
            tensorbus_core::Policy::Latest => n.min(1),
            _ => n,
        } as usize;
        let custody = self.ids.custody();
        let ctl = &self.control;
        let mut raw = Vec::new();
        for row in 0..ctl.layout().rows() {
            if let Some(r) = ctl.ring(c, row, hsub) {
                r.peek_all(&mut raw);
            }
        }
        // (timestamp, seq, pool, index, generation)
        let mut found: Vec<(u64, u64, Descriptor, u32)> = raw
            .into_iter()
            .filter_map(|bits| {
                let d = Descriptor::unpack(bits);
                let slot = ctl.slot(usize::from(d.pool), d.index as usize)?;
                let generation = slot.generation.load(Ordering::Acquire);
                if !d.matches_generation(generation) || !slot.held_by(hid) {
                    return None;
                }
                Some((
                    slot.timestamp_ns.load(Ordering::Relaxed),
                    slot.seq.load(Ordering::Relaxed),
                    d,
                    generation,
                ))
            })
            .collect();
        found.sort_by_key(|&(ts, seq, d, _)| (ts, seq, d.pool, d.index));
        found.dedup_by_key(|&mut (_, _, d, _)| (d.pool, d.index));
        let start = found.len().saturating_sub(keep);
        let Some(ring) = ctl.ring(c, 0, sub) else {
            return 0;
        };
        let Some(rec) = ctl.channel(c) else {
            return 0;
        };
        let head = self.broker_heads.entry((c, sub)).or_insert(0);
        let mut given = 0;
        for &(_, _, d, generation) in &found[start..] {
            let Some(slot) = ctl.slot(usize::from(d.pool), d.index as usize) else {
                continue;
            };
            // Our id joins only while the history still holds the slot and
            // no publish gave it to us already; the pin keeps the slot from
            // being freed while we look and add.
            if !slot.holder_set().pin_if_held(custody) {
                continue;
            }
            // The history's hold before the generation: a hold read from a
            // publish after a re-loan synchronises with it, so the
            // generation read next is the new one (loom's
            // `history_join_versus_eviction` fails in the other order).
            let joined = slot.held_by(hid)
                && slot.generation.load(Ordering::Acquire) == generation
                && !slot.held_by(mine);
            if joined {
                slot.add_holders([mine]);
            }
            slot.release(custody);
            if !joined {
                // Let go by the history, or loaned again in between: not
                // the kept tensor (or ours already).
                continue;
            }
            // Row 0 joins the rows this subscriber polls (the broker is its
            // only writer of the mask besides activation and removal).
            rec.producer_rows.fetch_or(1, Ordering::AcqRel);
            if ring.push(ring.capacity(), d.pack(), head).is_err() {
                slot.release(mine);
                continue;
            }
            given += 1;
        }
        given
    }

    /// How many tensors channel `c`'s history holds now (for stats).
    pub(super) fn history_held(&self, c: usize) -> u32 {
        let Some((sub, _)) = self.chan(c).history else {
            return 0;
        };
        (0..self.control.layout().rows())
            .filter_map(|row| self.control.ring(c, row, sub))
            .map(|r| r.len() as u32)
            .sum()
    }
}
