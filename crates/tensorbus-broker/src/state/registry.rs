//! Mirroring the broker's bookkeeping into the control segment's registry
//! (`tensorbus_core::registry`), so that a broker that takes over after
//! this one died can adopt the bus ([`super::adopt`]).
//!
//! What is written, and when:
//!
//! * the pool table and the layout, once, when the bus is created;
//! * a channel entry whenever a channel is created, completed or freed
//!   ([`State::mark_channel`]);
//! * a handle entry per holder id whenever the id is taken or freed, or its
//!   handle is opened, detached or closed ([`State::mark_id`]).
//!
//! Marks are cheap; [`State::sync_registry`] writes what was marked and is
//! called before every reply leaves the broker, so whatever a client has
//! been told is in the registry before the client can act on it. What the
//! registry lags behind (records activated, reclaims finished, after the
//! last sync) is what a death between two syncs can leave; the adopting
//! broker reconciles it with the records themselves (see `adopt.rs`).

use super::{HandleKind, Pending, State};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tensorbus_core::proto::ChannelSpec;
use tensorbus_core::wide::HolderId;
use tensorbus_core::{Mode, Policy};

/// A pool as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PoolEntry {
    pub name: String,
    pub slot_size: u64,
    pub stride: u64,
    pub slots: u32,
    pub alignment: u64,
    pub bytes: u64,
    pub hugetlb: bool,
    /// `st_dev` and `st_ino` of the pool's memfd: a descriptor handed over
    /// at adoption must be this very file.
    pub dev: u64,
    pub ino: u64,
}

/// A channel as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChannelEntry {
    pub name: String,
    pub mode: Mode,
    pub depth: Option<u32>,
    pub policy: Option<Policy>,
    pub history: u32,
    /// The spec named its pools (else: every pool).
    pub named_pools: bool,
    pub pools: Vec<u8>,
    pub declared: bool,
    pub pending: bool,
    /// The history record: (subscriber index, holder id).
    pub history_record: Option<(u32, u16)>,
}

/// What a holder id belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EntryKind {
    Producer,
    Subscriber,
    Detached,
}

/// A holder id's handle as the registry records it (short keys: an entry
/// has 192 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HandleEntry {
    /// Handle number.
    pub h: u32,
    /// Client id.
    pub c: u32,
    /// Client pid and its start time (clock ticks since boot, from
    /// /proc/PID/stat), so a reused pid is not taken for the client.
    pub pid: u32,
    pub st: u64,
    pub k: EntryKind,
    /// Channel record and producer row / subscriber index (0 for detached).
    pub ch: u32,
    pub i: u32,
    /// What the subscriber asked: policy, depth, writable.
    pub a: (Option<Policy>, Option<u32>, bool),
    /// Closed: the broker was reclaiming it (no client owns it any more).
    pub x: bool,
}

/// Start time of process `pid` (field 22 of /proc/PID/stat), if it exists.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process recorded as (`pid`, `start`) still runs.
pub(crate) fn alive(pid: u32, start: u64) -> bool {
    pid != 0 && start_time(pid) == Some(start)
}

/// Marks not written to the registry yet.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    ids: Vec<HolderId>,
    channels: Vec<usize>,
    /// Client id -> (pid, start time).
    pub clients: HashMap<u32, (u32, u64)>,
}

impl State {
    /// Marks holder id `id`'s entry for the next [`State::sync_registry`].
    pub(super) fn mark_id(&mut self, id: HolderId) {
        self.dirty.ids.push(id);
    }

    /// Marks channel `c`'s entry for the next [`State::sync_registry`].
    pub(super) fn mark_channel(&mut self, c: usize) {
        self.dirty.channels.push(c);
    }

    /// Records who client `client` is (at its Hello), for its handle entries.
    pub fn register_client(&mut self, client: u32, pid: u32) {
        let st = start_time(pid).unwrap_or(0);
        self.dirty.clients.insert(client, (pid, st));
    }

    /// Forgets a client that is gone.
    pub fn forget_client(&mut self, client: u32) {
        self.dirty.clients.remove(&client);
    }

    /// Records the next client id the server will hand out.
    pub fn record_next_client(&self, next: u32) {
        self.control
            .registry_header()
            .next_client
            .store(next, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes every marked entry. Entries that do not fit (a channel with
    /// a very long pool list) are left out with a warning: that channel
    /// then does not survive an adoption.
    pub fn sync_registry(&mut self) {
        if self.dirty.ids.is_empty() && self.dirty.channels.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.dirty.ids);
        for id in ids {
            let entry = self.handle_entry_of(id);
            if let Some(e) = self.control.handle_entry(id) {
                match entry {
                    None => e.clear(),
                    Some(h) => {
                        let bytes = serde_json::to_vec(&h).unwrap_or_default();
                        if e.write(&bytes).is_err() {
                            eprintln!("tensorbus broker: handle entry of holder id {} does not fit the registry", id.index());
                        }
                    }
                }
            }
        }
        let mut channels = std::mem::take(&mut self.dirty.channels);
        channels.sort_unstable();
        channels.dedup();
        for c in channels {
            let Some(e) = self.control.channel_entry(c) else {
                continue;
            };
            match self.channels.get(c).and_then(Option::as_ref) {
                None => e.clear(),
                Some(ch) => {
                    let entry = ChannelEntry {
                        name: ch.spec.name.clone(),
                        mode: ch.spec.mode,
                        depth: ch.spec.depth,
                        policy: ch.spec.policy,
                        history: ch.spec.history,
                        named_pools: !ch.spec.pools.is_empty(),
                        pools: ch.pools.clone(),
                        declared: ch.declared,
                        pending: ch.pending,
                        history_record: ch.history.map(|(s, id)| (s as u32, id.index())),
                    };
                    let bytes = serde_json::to_vec(&entry).unwrap_or_default();
                    if e.write(&bytes).is_err() {
                        eprintln!(
                            "tensorbus broker: channel {:?} does not fit the registry ({} bytes); it will not survive a broker restart",
                            ch.spec.name,
                            bytes.len()
                        );
                        e.clear();
                    }
                }
            }
        }
        self.control
            .registry_header()
            .next_handle
            .store(self.next_handle, std::sync::atomic::Ordering::Relaxed);
    }

    /// What holder id `id`'s entry says now (`None`: free, or not a handle's).
    fn handle_entry_of(&self, id: HolderId) -> Option<HandleEntry> {
        if !self.ids.is_taken(id) || id == self.ids.custody() {
            return None;
        }
        let client = |c: u32| self.dirty.clients.get(&c).copied().unwrap_or((0, 0));
        if let Some((&h, handle)) = self.handles.iter().find(|(_, h)| h.id == id) {
            let (k, ch, i) = match handle.kind {
                HandleKind::Producer { channel, row } => (EntryKind::Producer, channel, row),
                HandleKind::Subscriber { channel, sub } => (EntryKind::Subscriber, channel, sub),
                HandleKind::Detached => (EntryKind::Detached, 0, 0),
            };
            let (pid, st) = client(handle.client);
            return Some(HandleEntry {
                h,
                c: handle.client,
                pid,
                st,
                k,
                ch: ch as u32,
                i: i as u32,
                a: handle.asked,
                x: false,
            });
        }
        // Not a handle's: a closed subscriber being reclaimed (or a history
        // record, which its channel entry records).
        self.pending.iter().find_map(|p| match *p {
            Pending::Subscriber {
                channel,
                sub,
                id: pid_,
                keep,
                ..
            } if pid_ == id && !keep => Some(HandleEntry {
                h: 0,
                c: 0,
                pid: 0,
                st: 0,
                k: EntryKind::Subscriber,
                ch: channel as u32,
                i: sub as u32,
                a: (None, None, false),
                x: true,
            }),
            _ => None,
        })
    }

    /// The pool entry of pool `p` (at creation).
    pub(super) fn pool_entry(&self, p: usize, hugetlb: bool) -> Option<PoolEntry> {
        let pool = self.pools.get(p)?;
        let (dev, ino) =
            tensorbus_shm::fd_identity(std::os::fd::AsFd::as_fd(&pool.memfd)).unwrap_or((0, 0));
        Some(PoolEntry {
            name: pool.info.name.clone(),
            slot_size: pool.info.slot_size,
            stride: pool.info.stride,
            slots: pool.info.slots,
            alignment: pool.info.alignment,
            bytes: pool.info.bytes,
            hugetlb,
            dev,
            ino,
        })
    }

    /// Writes the registry header and pool table of a new bus.
    pub(super) fn init_registry(&mut self, hugetlb: &[bool]) {
        self.control.init_registry(random_bus_id());
        for p in 0..self.pools.len() {
            let entry = self.pool_entry(p, hugetlb.get(p).copied().unwrap_or(false));
            if let (Some(entry), Some(e)) = (entry, self.control.pool_entry(p)) {
                if e.write(&serde_json::to_vec(&entry).unwrap_or_default())
                    .is_err()
                {
                    eprintln!(
                        "tensorbus broker: pool {:?} does not fit the registry; this bus cannot be adopted after a broker restart",
                        entry.name
                    );
                }
            }
        }
    }

    /// This bus's id.
    pub fn bus_id(&self) -> u64 {
        self.control
            .registry_header()
            .bus_id
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A random, non-zero bus id.
fn random_bus_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`, which is
    // valid and writable.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let mut id = u64::from_le_bytes(b);
    if n != 8 {
        // No entropy source: the time and pid still tell buses apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        id = t ^ (u64::from(std::process::id()) << 32);
    }
    id.max(1)
}

/// The spec of a channel entry (its pool names come from `pool_names`).
pub(crate) fn spec_of(e: &ChannelEntry, pool_names: &[String]) -> ChannelSpec {
    ChannelSpec {
        name: e.name.clone(),
        pools: if e.named_pools {
            e.pools
                .iter()
                .filter_map(|&p| pool_names.get(usize::from(p)).cloned())
                .collect()
        } else {
            Vec::new()
        },
        mode: e.mode,
        depth: e.depth,
        policy: e.policy,
        history: e.history,
    }
}
