//! Adopting the bus of a broker that died (issue 16.2).
//!
//! A surviving client hands the new broker the control segment and every
//! pool's descriptor ([`tensorbus_core::proto::Request::Adopt`]). The new
//! broker then, in this order:
//!
//! 1. lays the segment out from the layout its header records, and checks
//!    magic, version and size;
//! 2. compares its own config with the bus (limits, pools: names, sizes,
//!    slots, alignment, huge pages): any difference refuses the adoption,
//!    named;
//! 3. checks that each pool descriptor is the very memfd the registry names
//!    (device and inode) and of the recorded size, and reopens it
//!    read-write (consumers hand over read-only descriptors);
//! 4. reads the registry back: channels (validated names and pools, checked
//!    against their records' state), then one handle entry per holder id,
//!    each believed only if the record of the data path agrees (a
//!    producer's row or a subscriber's record is active and carries that
//!    very holder id);
//! 5. reconciles what the registry lags behind: an active record no entry
//!    owns is reclaimed like a death, a subscriber the dead broker was
//!    reclaiming is reclaimed again (each step is idempotent), a channel
//!    record no entry names is freed, the custody id is released;
//! 6. keeps the handles of every client of the dead broker until that
//!    client reconnects and claims them ([`State::claim`]) or its process
//!    is gone ([`State::reap_waiting`]): a live process that has not
//!    reconnected yet may still be reading its tensors.
//!
//! Holder ids that no believed entry takes are free, so the stray-bit
//! sweep clears whatever a dead handle or a forged entry left set.

use super::registry::{alive, spec_of, ChannelEntry, EntryKind, HandleEntry, PoolEntry};
use super::{Channel, Handle, HandleKind, Pool, State};
use crate::config::Config;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use tensorbus_core::control::{recorded_params, Control};
use tensorbus_core::layout::{Layout, LayoutParams, MAX_HOLDERS};
use tensorbus_core::proto::{AdoptionStat, ClaimKind, HandleClaim, PoolInfo};
use tensorbus_core::records::{POLICY_CODE_HISTORY, STATE_ACTIVE, STATE_FREE, STATE_PENDING};
use tensorbus_core::wide::HolderId;
use tensorbus_shm::{Access, Mapping, Memfd};

/// Why a bus could not be adopted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdoptError {
    /// The broker's config does not fit the running bus.
    #[error("the running bus does not fit this broker's config: {}; start the broker with the config the bus was created with (or stop every client to start a new bus)", .0.join("; "))]
    Incompatible(Vec<String>),
    /// What was handed over is not a bus this broker can adopt.
    #[error("{0}")]
    Invalid(String),
}

/// How this broker came to run the bus.
#[derive(Debug, Default)]
pub(crate) struct Adoption {
    pub stat: AdoptionStat,
    /// Clients of the dead broker that have not reconnected: id -> (pid,
    /// start time).
    pub waiting: HashMap<u32, (u32, u64)>,
    /// The largest client id the registry knows.
    pub max_client: u32,
}

fn invalid(m: impl Into<String>) -> AdoptError {
    AdoptError::Invalid(m.into())
}

/// The differences between the config's layout and the bus's.
fn layout_differences(bus: &LayoutParams, config: &LayoutParams) -> Vec<String> {
    let mut d = Vec::new();
    let mut cmp = |what: &str, b: u32, c: u32| {
        if b != c {
            d.push(format!(
                "{what} is {b} in the running bus, {c} in the config"
            ));
        }
    };
    cmp("limits.max_channels", bus.max_channels, config.max_channels);
    cmp(
        "limits.max_producers_per_channel",
        bus.max_producers,
        config.max_producers,
    );
    cmp(
        "limits.max_subscribers_per_channel",
        bus.max_subscribers,
        config.max_subscribers,
    );
    cmp(
        "limits.ring_capacity",
        bus.ring_capacity,
        config.ring_capacity,
    );
    cmp(
        "the number of pools",
        bus.pool_slots.len() as u32,
        config.pool_slots.len() as u32,
    );
    d
}

/// The pool entries of the bus, compared with the config's pools.
fn pool_entries(ctl: &Control, config: &Config) -> Result<Vec<PoolEntry>, AdoptError> {
    let mut entries = Vec::new();
    let mut diffs = Vec::new();
    for (p, want) in config.pools.iter().enumerate() {
        let mut bytes = Vec::new();
        let entry = ctl
            .pool_entry(p)
            .filter(|e| e.read(&mut bytes))
            .and_then(|_| serde_json::from_slice::<PoolEntry>(&bytes).ok())
            .ok_or_else(|| invalid(format!("the registry has no valid entry for pool #{p}")))?;
        let mut cmp = |what: &str, bus: String, cfg: String| {
            if bus != cfg {
                diffs.push(format!(
                    "pool #{p} {what} is {bus} in the running bus, {cfg} in the config"
                ));
            }
        };
        cmp(
            "name",
            format!("{:?}", entry.name),
            format!("{:?}", want.name),
        );
        cmp(
            "slot_size",
            entry.slot_size.to_string(),
            want.slot_size.0.to_string(),
        );
        cmp("slots", entry.slots.to_string(), want.slots.to_string());
        cmp(
            "alignment",
            entry.alignment.to_string(),
            want.alignment.0.to_string(),
        );
        cmp(
            "hugetlb",
            entry.hugetlb.to_string(),
            want.hugetlb.to_string(),
        );
        entries.push(entry);
    }
    if diffs.is_empty() {
        Ok(entries)
    } else {
        Err(AdoptError::Incompatible(diffs))
    }
}

/// Checks a handed-over pool descriptor against its entry and returns the
/// pool (read-write and read-only descriptors of it).
fn adopt_pool(index: usize, e: &PoolEntry, fd: OwnedFd) -> Result<Pool, AdoptError> {
    let id = tensorbus_shm::fd_identity(fd.as_fd())
        .map_err(|err| invalid(format!("pool {:?}: fstat: {err}", e.name)))?;
    if id != (e.dev, e.ino) {
        return Err(invalid(format!(
            "the descriptor handed over for pool {:?} is not that pool's memory (another file)",
            e.name
        )));
    }
    let len = tensorbus_shm::fd_len(fd.as_fd())
        .map_err(|err| invalid(format!("pool {:?}: {err}", e.name)))?;
    if len as u64 != e.bytes {
        return Err(invalid(format!(
            "pool {:?} is {len} bytes, the registry says {}",
            e.name, e.bytes
        )));
    }
    let handed = Memfd::from_fd(fd);
    let memfd = Memfd::from_fd(handed.reopen_read_write().map_err(|err| {
        invalid(format!(
            "pool {:?}: cannot reopen it read-write: {err}",
            e.name
        ))
    })?);
    let read_only = memfd
        .reopen_read_only()
        .map_err(|err| invalid(format!("pool {:?}: {err}", e.name)))?;
    Ok(Pool {
        info: PoolInfo {
            index: index as u8,
            name: e.name.clone(),
            slot_size: e.slot_size,
            stride: e.stride,
            slots: e.slots,
            alignment: e.alignment,
            bytes: e.bytes,
        },
        memfd,
        read_only,
    })
}

impl State {
    /// Adopts the bus whose control segment and pools are `fds` (in that
    /// order), as a client of the dead broker handed them over.
    pub fn adopt(config: &Config, fds: Vec<OwnedFd>) -> Result<State, AdoptError> {
        let mut fds = fds.into_iter();
        let control_fd = Memfd::from_fd(
            fds.next()
                .ok_or_else(|| invalid("no control segment came with the claim"))?,
        );
        let control_fd = Memfd::from_fd(
            control_fd
                .reopen_read_write()
                .map_err(|e| invalid(format!("control segment: {e}")))?,
        );
        let size = control_fd
            .len()
            .map_err(|e| invalid(format!("control segment: {e}")))?;
        let map = Mapping::map(control_fd.as_fd(), size, Access::ReadWrite, 4096)
            .map_err(|e| invalid(format!("cannot map the control segment: {e}")))?;
        // SAFETY: `map` is a live, page-aligned mapping of `size` bytes.
        let (bytes, total) = unsafe { recorded_params(map.as_ptr(), map.len()) }
            .map_err(|e| invalid(e.to_string()))?;
        let params = LayoutParams::from_bytes(&bytes)
            .ok_or_else(|| invalid("the registry's layout record is malformed"))?;
        let layout = Layout::compute(&params).map_err(|e| invalid(e.to_string()))?;
        if total != layout.total as u64 || size < layout.total {
            return Err(invalid(format!(
                "the control segment is {size} bytes, its header says {total}, its layout needs {}",
                layout.total
            )));
        }
        let diffs = layout_differences(&params, &config.layout_params());
        if !diffs.is_empty() {
            return Err(AdoptError::Incompatible(diffs));
        }
        // SAFETY: `map` is a read-write mapping of at least `layout.total`
        // bytes, stored in the returned State and dropped after `control`
        // (field order of `State`).
        let control = unsafe { Control::from_raw(map.as_ptr(), map.len(), layout) }
            .map_err(|e| invalid(e.to_string()))?;
        if !control.header_ok() {
            return Err(invalid(
                "the control segment's header does not match its layout",
            ));
        }
        let entries = pool_entries(&control, config)?;
        let pool_fds: Vec<OwnedFd> = fds.collect();
        if pool_fds.len() != entries.len() {
            return Err(invalid(format!(
                "{} pool descriptors came with the claim; the bus has {} pools",
                pool_fds.len(),
                entries.len()
            )));
        }
        let mut pools = Vec::new();
        for (i, (e, fd)) in entries.iter().zip(pool_fds).enumerate() {
            pools.push(adopt_pool(i, e, fd)?);
        }
        let previous = control.header().broker_pid.load(Ordering::Relaxed);
        control
            .header()
            .broker_pid
            .store(std::process::id(), Ordering::Relaxed);
        let reg = control.registry_header();
        let adoptions = reg.adoptions.fetch_add(1, Ordering::Relaxed) + 1;
        let next_handle = reg.next_handle.load(Ordering::Relaxed).max(1);
        let next_client = reg.next_client.load(Ordering::Relaxed);
        let mut state = State {
            control,
            _control_map: map,
            control_fd,
            pools,
            channels: Vec::new(),
            handles: HashMap::new(),
            ids: super::HolderIds::new(config.limits.max_handles as usize),
            next_handle,
            pending: Vec::new(),
            busy_subs: Vec::new(),
            busy_rows: Vec::new(),
            broker_heads: HashMap::new(),
            redispatch: Vec::new(),
            sweep_cursor: (0, 0),
            dirty: super::registry::Dirty::default(),
            adoption: Some(Adoption {
                stat: AdoptionStat {
                    previous_broker_pid: previous,
                    adoptions,
                    ..AdoptionStat::default()
                },
                waiting: HashMap::new(),
                max_client: next_client.saturating_sub(1),
            }),
            held_since: super::leaks::HeldSince::default(),
            leak_threshold_ms: config.broker.leak_threshold_ms,
            latency_sample_every: config.broker.latency_sample_every,
            pool_watch: Default::default(),
        };
        let orphans = state.read_channels(config);
        state.read_handles();
        state.reconcile_records(orphans);
        state.release_custody();
        state.declare_config_channels(config)?;
        // Rewrite the whole registry from what was believed.
        for n in 0..MAX_HOLDERS {
            if let Some(id) = HolderId::new(n as u16) {
                state.mark_id(id);
            }
        }
        for c in 0..state.control.layout().params.max_channels as usize {
            state.mark_channel(c);
        }
        state.sync_registry();
        state.progress();
        Ok(state)
    }

    /// Reads the channel entries; returns the channel records in use that
    /// no (valid) entry names.
    fn read_channels(&mut self, config: &Config) -> Vec<usize> {
        let names: Vec<String> = self.pools.iter().map(|p| p.info.name.clone()).collect();
        let max = self.control.layout().params.max_channels as usize;
        let subs = self.control.layout().params.max_subscribers as usize;
        let mut orphans = Vec::new();
        for c in 0..max {
            let Some(rec) = self.control.channel(c) else {
                continue;
            };
            let state = rec.state.load(Ordering::Acquire);
            let mut bytes = Vec::new();
            let entry = self
                .control
                .channel_entry(c)
                .filter(|e| e.read(&mut bytes))
                .and_then(|_| serde_json::from_slice::<ChannelEntry>(&bytes).ok())
                .filter(|e| {
                    crate::names::validate_name(&e.name).is_ok()
                        && e.pools.iter().all(|&p| usize::from(p) < names.len())
                        && (!e.pools.is_empty() || e.pending)
                        && e.history_record.is_none_or(|(s, _)| (s as usize) < subs)
                        && state
                            == if e.pending {
                                STATE_PENDING
                            } else {
                                STATE_ACTIVE
                            }
                });
            let Some(e) = entry else {
                if state != STATE_FREE {
                    orphans.push(c);
                }
                continue;
            };
            if self
                .channels
                .iter()
                .flatten()
                .any(|ch| ch.spec.name == e.name)
            {
                eprintln!(
                    "tensorbus broker: adoption: channel {:?} is recorded twice; keeping the first",
                    e.name
                );
                orphans.push(c);
                continue;
            }
            let history = e.history_record.and_then(|(s, id)| {
                let id = HolderId::new(id)?;
                self.ids.take_adopted(id).then_some((s as usize, id))
            });
            while self.channels.len() <= c {
                self.channels.push(None);
            }
            self.channels[c] = Some(Channel {
                index: c,
                spec: spec_of(&e, &names),
                pools: e.pools.clone(),
                declared: e.declared && config.channels.iter().any(|d| d.name == e.name),
                pending: e.pending,
                producers: 0,
                history,
            });
        }
        // Only their records may hold anything: `reconcile_records`
        // reclaims those (no entry owns them) and then frees the records.
        orphans
    }

    /// Reads the handle entries that the records agree with.
    fn read_handles(&mut self) {
        let rows = self.control.layout().rows();
        let subs = self.control.layout().params.max_subscribers as usize;
        let mut closed = Vec::new();
        for n in 0..MAX_HOLDERS {
            let Some(id) = HolderId::new(n as u16) else {
                continue;
            };
            if id == self.ids.custody() {
                continue;
            }
            let mut bytes = Vec::new();
            let Some(e) = self
                .control
                .handle_entry(id)
                .filter(|e| e.read(&mut bytes))
                .and_then(|_| serde_json::from_slice::<HandleEntry>(&bytes).ok())
            else {
                continue;
            };
            let (c, i) = (e.ch as usize, e.i as usize);
            let live_channel = self
                .channels
                .get(c)
                .and_then(Option::as_ref)
                .is_some_and(|ch| !ch.pending || e.k == EntryKind::Subscriber);
            // A closed subscriber's record may be retired already (not yet
            // freed: a free record was reclaimed to the end).
            let holds = |state: u32, holder: u32| {
                holder == u32::from(id.index())
                    && (state == STATE_ACTIVE || (e.x && state != STATE_FREE))
            };
            let agrees = match e.k {
                EntryKind::Producer => {
                    live_channel
                        && (1..rows).contains(&i)
                        && !e.x
                        && self.control.producer(c, i).is_some_and(|p| {
                            holds(
                                p.state.load(Ordering::Acquire),
                                p.holder_id.load(Ordering::Relaxed),
                            )
                        })
                }
                EntryKind::Subscriber => {
                    live_channel
                        && i < subs
                        && self.control.subscriber(c, i).is_some_and(|r| {
                            holds(
                                r.config.state.load(Ordering::Acquire),
                                r.config.holder_id.load(Ordering::Relaxed),
                            ) && r.config.policy.load(Ordering::Relaxed) != POLICY_CODE_HISTORY
                        })
                }
                EntryKind::Detached => !e.x,
            };
            let duplicate = !e.x && (e.h == 0 || self.handles.contains_key(&e.h));
            if !agrees || duplicate || !self.ids.take_adopted(id) {
                eprintln!(
                    "tensorbus broker: adoption: the registry entry of holder id {n} ({:?} handle {} of client {}) disagrees with shared memory; not adopted",
                    e.k, e.h, e.c
                );
                continue;
            }
            if e.x {
                closed.push((c, i, id));
                continue;
            }
            let kind = match e.k {
                EntryKind::Producer => HandleKind::Producer { channel: c, row: i },
                EntryKind::Subscriber => HandleKind::Subscriber { channel: c, sub: i },
                EntryKind::Detached => HandleKind::Detached,
            };
            if let HandleKind::Producer { channel, .. } = kind {
                self.chan_mut(channel).producers += 1;
            }
            self.handles.insert(
                e.h,
                Handle {
                    client: e.c,
                    kind,
                    id,
                    asked: e.a,
                },
            );
            self.next_handle = self.next_handle.max(e.h.wrapping_add(1)).max(1);
            self.dirty.clients.insert(e.c, (e.pid, e.st));
            if let Some(a) = &mut self.adoption {
                a.waiting.insert(e.c, (e.pid, e.st));
                a.max_client = a.max_client.max(e.c);
            }
        }
        // Subscribers the dead broker was reclaiming: again, from the start.
        for (c, sub, id) in closed {
            self.busy_subs.retain(|&x| x != (c, sub));
            self.retire(c, sub, id, false);
        }
    }

    /// Reclaims active records that no believed entry owns (a death
    /// between a record's activation and the registry's next write, or a
    /// reclaim the dead broker had not finished), then frees the channel
    /// records no entry names.
    fn reconcile_records(&mut self, orphans: Vec<usize>) {
        let rows = self.control.layout().rows();
        let subs = self.control.layout().params.max_subscribers as usize;
        let mut producer_owned = Vec::new();
        let mut sub_owned = Vec::new();
        for h in self.handles.values() {
            match h.kind {
                HandleKind::Producer { channel, row } => producer_owned.push((channel, row)),
                HandleKind::Subscriber { channel, sub } => sub_owned.push((channel, sub)),
                HandleKind::Detached => {}
            }
        }
        for ch in self.channels.iter().flatten() {
            if let Some((s, _)) = ch.history {
                sub_owned.push((ch.index, s));
            }
        }
        let max = self.control.layout().params.max_channels as usize;
        let mut reclaimed = 0u32;
        for c in 0..max {
            let used = self
                .control
                .channel(c)
                .is_some_and(|r| r.state.load(Ordering::Acquire) != STATE_FREE);
            if !used {
                continue;
            }
            for row in 1..rows {
                let Some(p) = self.control.producer(c, row) else {
                    continue;
                };
                if p.is_free() || producer_owned.contains(&(c, row)) {
                    continue;
                }
                let id = HolderId::clamped(p.holder_id.load(Ordering::Relaxed));
                tensorbus_core::reclaim::recover_producer(&self.control, c, row);
                if !self.ids.is_taken(id) {
                    tensorbus_core::reclaim::clear_holder_everywhere(&self.control, id);
                }
                self.busy_rows.push((c, row));
                self.pending.push(super::Pending::Row { channel: c, row });
                reclaimed += 1;
            }
            for sub in 0..subs {
                let Some(r) = self.control.subscriber(c, sub) else {
                    continue;
                };
                if r.is_free()
                    || sub_owned.contains(&(c, sub))
                    || self.busy_subs.contains(&(c, sub))
                {
                    continue;
                }
                let id = HolderId::clamped(r.config.holder_id.load(Ordering::Relaxed));
                if self.ids.is_taken(id) {
                    // Someone else's id: clear nothing of theirs.
                    tensorbus_core::reclaim::retire_subscriber(
                        &self.control,
                        c,
                        sub,
                        &tensorbus_shm::futex::FutexParker,
                    );
                    tensorbus_core::reclaim::drain_subscriber(&self.control, c, sub, |_, _| {});
                    tensorbus_core::reclaim::free_subscriber(&self.control, c, sub);
                } else {
                    self.ids.take_adopted(id);
                    self.retire(c, sub, id, false);
                }
                reclaimed += 1;
            }
        }
        for c in orphans {
            while self.channels.len() <= c {
                self.channels.push(None);
            }
            self.channels[c] = Some(Channel {
                index: c,
                spec: tensorbus_core::proto::ChannelSpec {
                    name: String::new(),
                    pools: Vec::new(),
                    mode: tensorbus_core::Mode::Broadcast,
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
            // Its records are being reclaimed above; the pending-channel
            // collector frees it once nothing is left on it.
        }
        if let Some(a) = &mut self.adoption {
            a.stat.reclaimed_handles += reclaimed;
        }
    }

    /// Releases the dead broker's custody holds (work items it was
    /// re-dispatching, pins it held mid-operation): the registry does not
    /// record which channel such an item was for.
    fn release_custody(&mut self) {
        let custody = self.ids.custody();
        let mut released = 0;
        for p in 0..self.control.pools() {
            for i in 0..self.control.slots(p) {
                if let Some(slot) = self.control.slot(p, i) {
                    if slot.held_by(custody) {
                        slot.release(custody);
                        released += 1;
                    }
                }
            }
        }
        if let Some(a) = &mut self.adoption {
            a.stat.custody_released = released;
        }
    }

    /// Creates the channels the config declares that the bus lacks; a
    /// declared channel the bus has with other settings is a difference.
    fn declare_config_channels(&mut self, config: &Config) -> Result<(), AdoptError> {
        let mut diffs = Vec::new();
        for spec in config.channel_specs() {
            match self.channel_by_name(&spec.name) {
                Some(c) => {
                    let ch = self.chan(c);
                    let wanted = self.spec_pools_for_adoption(&spec);
                    let same = ch.spec.mode == spec.mode
                        && ch.spec.depth == spec.depth
                        && ch.spec.policy == spec.policy
                        && ch.spec.history == spec.history
                        && wanted.as_deref() == Some(&ch.pools[..]);
                    if ch.pending {
                        continue;
                    }
                    if !same {
                        diffs.push(format!(
                            "channel {:?} is {:?} (pools {:?}) in the running bus, {:?} (pools {:?}) in the config",
                            spec.name,
                            (ch.spec.mode, ch.spec.depth, ch.spec.policy, ch.spec.history),
                            ch.pools,
                            (spec.mode, spec.depth, spec.policy, spec.history),
                            spec.pools
                        ));
                    }
                    self.chan_mut(c).declared = true;
                }
                None => {
                    self.create_channel(spec, true)
                        .map_err(|e| invalid(e.to_string()))?;
                }
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(AdoptError::Incompatible(diffs))
        }
    }

    /// The pool indices `spec` would get (for comparing declared channels).
    fn spec_pools_for_adoption(
        &self,
        spec: &tensorbus_core::proto::ChannelSpec,
    ) -> Option<Vec<u8>> {
        self.spec_pools(spec).ok()
    }

    /// Whether this broker adopted a bus.
    pub fn adopted(&self) -> bool {
        self.adoption.is_some()
    }

    /// How this broker adopted the bus, for stat.
    pub fn adoption_stat(&self) -> Option<AdoptionStat> {
        self.adoption.as_ref().map(|a| {
            let mut s = a.stat.clone();
            s.waiting_clients = a.waiting.len() as u32;
            s
        })
    }

    /// The largest client id of the adopted bus (the server hands out ids
    /// above it).
    pub fn max_adopted_client(&self) -> u32 {
        self.adoption.as_ref().map_or(0, |a| a.max_client)
    }

    /// Client `client` of the dead broker, now connected as process `pid`,
    /// claims `claims`. Accepted when the client is one that has not
    /// reconnected yet, the process is the one the registry recorded, and
    /// every claim names a handle of that client exactly as the registry
    /// and the records have it; its handles it does not claim are closed
    /// (it let go of them while no broker ran). A client the registry
    /// has no handle of is accepted with no claims (it opened nothing).
    pub fn claim(&mut self, client: u32, pid: u32, claims: &[HandleClaim]) -> Result<(), String> {
        let Some(a) = &self.adoption else {
            return Err("this broker did not adopt a running bus: it started a new one".into());
        };
        let waiting = a.waiting.get(&client).copied();
        match waiting {
            None if claims.is_empty() => {}
            None => {
                return Err(format!(
                    "client {client} has no handles in the adopted bus waiting for it (reconnected already, or reclaimed)"
                ))
            }
            Some((wpid, st)) => {
                if wpid != 0 && wpid != pid {
                    return Err(format!(
                        "client {client} was process {wpid}; this connection is process {pid}"
                    ));
                }
                if st != 0 && super::registry::start_time(pid).is_some_and(|now| now != st) {
                    return Err(format!(
                        "process {pid} is not the process client {client} was (its start time differs: the pid was reused)"
                    ));
                }
            }
        }
        for cl in claims {
            let Some(h) = self.handles.get(&cl.handle).filter(|h| h.client == client) else {
                return Err(format!(
                    "client {client} claims handle {}, which the registry does not have as its",
                    cl.handle
                ));
            };
            let (channel, index) = (cl.channel as usize, cl.index as usize);
            let same = u32::from(h.id.index()) == cl.bit
                && match (cl.kind, h.kind) {
                    (ClaimKind::Producer, HandleKind::Producer { channel: c, row }) => {
                        (c, row) == (channel, index)
                    }
                    (ClaimKind::Subscriber, HandleKind::Subscriber { channel: c, sub }) => {
                        (c, sub) == (channel, index)
                    }
                    (ClaimKind::Detached, HandleKind::Detached) => true,
                    _ => false,
                };
            if !same {
                return Err(format!(
                    "client {client} claims handle {} as {:?} (holder id {}, channel {}, index {}); shared memory has it as {:?} with holder id {}",
                    cl.handle, cl.kind, cl.bit, cl.channel, cl.index, h.kind, h.id.index()
                ));
            }
        }
        let unclaimed: Vec<u32> = self
            .handles
            .iter()
            .filter(|(hn, h)| h.client == client && !claims.iter().any(|c| c.handle == **hn))
            .map(|(&hn, _)| hn)
            .collect();
        for hn in &unclaimed {
            self.close_handle(*hn, false);
        }
        if let Some(a) = &mut self.adoption {
            a.waiting.remove(&client);
            a.stat.adopted_clients += 1;
            a.stat.reclaimed_handles += unclaimed.len() as u32;
        }
        self.register_client(client, pid);
        for cl in claims {
            if let Some(id) = HolderId::new(cl.bit as u16) {
                self.mark_id(id);
            }
        }
        Ok(())
    }

    /// Counts a refused claim (for stat).
    pub fn count_refused(&mut self) {
        if let Some(a) = &mut self.adoption {
            a.stat.refused_clients += 1;
        }
    }

    /// Reclaims the handles of clients of the dead broker whose process is
    /// gone; returns their ids.
    pub fn reap_waiting(&mut self) -> Vec<u32> {
        let Some(a) = &self.adoption else {
            return Vec::new();
        };
        let dead: Vec<u32> = a
            .waiting
            .iter()
            .filter(|(_, &(pid, st))| !alive(pid, st))
            .map(|(&c, _)| c)
            .collect();
        for &c in &dead {
            let n = self.handles.values().filter(|h| h.client == c).count() as u32;
            self.reclaim_client(c);
            self.forget_client(c);
            if let Some(a) = &mut self.adoption {
                a.waiting.remove(&c);
                a.stat.reclaimed_handles += n;
            }
        }
        dead
    }

    /// Whether `client` is a client of the dead broker that has not
    /// reconnected (its id is taken).
    pub fn is_waiting(&self, client: u32) -> bool {
        self.adoption
            .as_ref()
            .is_some_and(|a| a.waiting.contains_key(&client))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Role;
    use super::*;
    use tensorbus_core::proto::ChannelSpec;

    const CONFIG: &str = "[[pools]]\nname = \"a\"\nslot_size = 64\nslots = 8\n\
        [[pools]]\nname = \"b\"\nslot_size = 4096\nslots = 4\n\
        [[channels]]\nname = \"declared\"\n";

    fn config(toml: &str) -> Config {
        Config::from_toml(toml).unwrap()
    }

    /// What a survivor hands over: the control segment and every pool.
    fn handover(st: &State) -> Vec<OwnedFd> {
        let mut fds = vec![st.dup_control_fd().unwrap()];
        fds.extend(st.read_only_pool_fds().unwrap());
        fds
    }

    fn spec(name: &str) -> ChannelSpec {
        ChannelSpec {
            name: name.into(),
            pools: Vec::new(),
            mode: tensorbus_core::Mode::Broadcast,
            depth: None,
            policy: None,
            history: 2,
        }
    }

    fn sub() -> Role {
        Role::Subscriber {
            policy: None,
            depth: None,
            writable: false,
        }
    }

    fn claim_of(st: &State, handle: u32) -> HandleClaim {
        let h = st.handles[&handle];
        let (kind, channel, index) = match h.kind {
            HandleKind::Producer { channel, row } => (ClaimKind::Producer, channel, row),
            HandleKind::Subscriber { channel, sub } => (ClaimKind::Subscriber, channel, sub),
            HandleKind::Detached => (ClaimKind::Detached, 0, 0),
        };
        HandleClaim {
            handle,
            bit: u32::from(h.id.index()),
            kind,
            channel: channel as u32,
            index: index as u32,
        }
    }

    /// The registry round trip: channels (declared, run time, pending, with
    /// history), handles of every kind, next ids and the bus id come back;
    /// a client's exact claims are accepted, its unclaimed handle closed,
    /// and wrong claims refused naming what disagrees.
    #[test]
    fn a_bus_comes_back_from_shared_memory_and_claims_are_checked() {
        let cfg = config(CONFIG);
        let mut old = State::new(&cfg).unwrap();
        let me = std::process::id();
        old.register_client(7, me);
        old.register_client(9, me);
        let p = old
            .open(7, "cam", Some(spec("cam")), Role::Producer, false)
            .unwrap();
        let s = old.open(9, "cam", None, sub(), false).unwrap();
        let s2 = old.open(9, "cam", None, sub(), false).unwrap();
        let w = old.open(9, "later", None, sub(), true).unwrap();
        let d = old.open(9, "declared", None, sub(), false).unwrap();
        let (p, s, s2, w, d) = (p.handle, s.handle, s2.handle, w.handle, d.handle);
        assert!(old.detach_handle_of(9, d));
        old.sync_registry();
        let bus = old.bus_id();
        let claims7 = vec![claim_of(&old, p)];
        let claims9: Vec<HandleClaim> = [s, w, d].iter().map(|&h| claim_of(&old, h)).collect();
        let used = old.ids.used();

        let mut new = State::adopt(&cfg, handover(&old)).unwrap();
        assert_eq!(new.bus_id(), bus);
        assert_eq!(new.ids.used(), used);
        let names: Vec<String> = new.channel_names();
        for n in ["cam", "declared"] {
            assert!(names.contains(&n.to_string()), "{names:?}");
        }
        let later = new.channel_by_name("later").unwrap();
        assert!(new.chan(later).pending);
        let cam = new.channel_by_name("cam").unwrap();
        assert!(new.chan(cam).history.is_some());
        assert_eq!(new.chan(cam).producers, 1);
        assert!(new.chan(new.channel_by_name("declared").unwrap()).declared);
        assert!(new.next_handle > d);
        // Wrong claims: another client's handle, a wrong holder id, a
        // wrong kind; each refused with what disagrees.
        let mut wrong = claims7.clone();
        wrong[0].bit += 1;
        let e = new.claim(7, me, &wrong).unwrap_err();
        assert!(e.contains("holder id"), "{e}");
        let e = new.claim(7, me, &claims9).unwrap_err();
        assert!(e.contains("does not have as its"), "{e}");
        let e = new.claim(7, me + 1, &claims7).unwrap_err();
        assert!(e.contains("process"), "{e}");
        // Right claims: accepted; client 9's unclaimed subscriber `s2` is closed.
        new.claim(7, me, &claims7).unwrap();
        new.claim(9, me, &claims9).unwrap();
        assert!(!new.handles.contains_key(&s2));
        assert!(new.handles.contains_key(&s));
        assert!(!new.is_waiting(7) && !new.is_waiting(9));
        let e = new.claim(7, me, &claims7).unwrap_err();
        assert!(e.contains("no handles"), "{e}");
        assert_eq!(new.adoption_stat().unwrap().adopted_clients, 2);
        drop(old);
    }

    /// A config that does not fit the bus is refused with every difference
    /// named; pool descriptors that are not the bus's pools are refused.
    #[test]
    fn incompatible_configs_and_foreign_descriptors_are_refused() {
        let cfg = config(CONFIG);
        let old = State::new(&cfg).unwrap();
        let other = config(
            &CONFIG
                .replace("slots = 8", "slots = 16")
                .replace("slot_size = 4096", "slot_size = 8192"),
        );
        let e = match State::adopt(&other, handover(&old)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("adopted with another config"),
        };
        assert!(
            e.contains("pool #0 slots is 8 in the running bus, 16 in the config"),
            "{e}"
        );
        assert!(
            e.contains("pool #1 slot_size is 4096 in the running bus, 8192 in the config"),
            "{e}"
        );
        let mut fds = handover(&old);
        fds.swap(1, 2);
        let e = match State::adopt(&cfg, fds) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("adopted swapped pools"),
        };
        assert!(e.contains("not that pool's memory"), "{e}");
        let mut fds = handover(&old);
        fds.pop();
        assert!(State::adopt(&cfg, fds).is_err());
        let stranger = Memfd::create("stranger", 1 << 20, false).unwrap();
        let e = match State::adopt(&cfg, vec![stranger.into_fd()]) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("adopted a stranger"),
        };
        assert!(e.contains("magic") || e.contains("registry"), "{e}");
    }

    /// A registry entry that disagrees with the records (garbage, or a
    /// forged holder id) is not believed: its record is reclaimed instead,
    /// and every slot it held ends up free.
    #[test]
    fn entries_that_disagree_with_the_records_are_not_believed() {
        let cfg = config(CONFIG);
        let mut old = State::new(&cfg).unwrap();
        old.register_client(3, std::process::id());
        let p = old
            .open(3, "cam", Some(spec("cam")), Role::Producer, false)
            .unwrap();
        let s = old.open(3, "cam", None, sub(), false).unwrap();
        old.sync_registry();
        let sid = old.handles[&s.handle].id;
        // Garbage in the subscriber's entry, a forged id in the producer's.
        old.control
            .handle_entry(sid)
            .unwrap()
            .write(b"{not json")
            .unwrap();
        let pid_ = old.handles[&p.handle].id;
        let mut bytes = Vec::new();
        old.control.handle_entry(pid_).unwrap().read(&mut bytes);
        let mut e: HandleEntry = serde_json::from_slice(&bytes).unwrap();
        e.i += 1; // another row
        old.control
            .handle_entry(pid_)
            .unwrap()
            .write(&serde_json::to_vec(&e).unwrap())
            .unwrap();
        let mut new = State::adopt(&cfg, handover(&old)).unwrap();
        assert!(new.handles.is_empty(), "{:?}", new.handles);
        assert_eq!(new.adoption_stat().unwrap().reclaimed_handles, 2);
        for _ in 0..100 {
            if !new.progress() {
                break;
            }
        }
        let cam = new.channel_by_name("cam").unwrap();
        assert_eq!(new.chan(cam).producers, 0);
        // Only the history record's id stays taken.
        assert_eq!(new.ids.used(), 1);
    }

    /// Entries survive a writer that dies in the middle of a write: the
    /// reader sees the old version or the new one, whole.
    #[test]
    fn an_entry_is_one_whole_version() {
        let cfg = config(CONFIG);
        let st = State::new(&cfg).unwrap();
        let e = st.control.handle_entry(HolderId::new(5).unwrap()).unwrap();
        e.write(b"first").unwrap();
        e.write(b"second version").unwrap();
        let mut out = Vec::new();
        assert!(e.read(&mut out));
        assert_eq!(out, b"second version");
        assert!(e.write(&[0u8; 1000]).is_err(), "too long for an entry");
        out.clear();
        assert!(e.read(&mut out));
        assert_eq!(out, b"second version", "a refused write changes nothing");
        e.clear();
        assert!(!e.read(&mut Vec::new()));
    }
}
