//! The broker's memory: pools, the control segment, channels, handles.
//!
//! [`State`] keeps its fields to itself: the event loop (`server.rs`) asks
//! it to open, close, detach and reclaim handles, to make progress on
//! pending reclaims and to report stats, and the invariants that tie the
//! fields together (a holder bit is free or belongs to exactly one handle;
//! a record being reclaimed is not handed out) are kept here and in the
//! child modules [`open`], [`reclaim`] and [`stat`].

mod adopt;
mod channels;
mod ids;
mod leaks;
mod open;
mod pool_watch;
mod reclaim;
mod registry;
mod stat;

pub(crate) use adopt::{AdoptError, Adoption};
pub(crate) use channels::RemoveError;
pub(crate) use open::Role;

use crate::config::{Config, DEFAULT_DEPTH};
use std::collections::HashMap;
use std::os::fd::OwnedFd;

use ids::HolderIds;
pub use ids::MAX_HANDLES;
use tensorbus_core::control::Control;
use tensorbus_core::layout::{Layout, LayoutParams};
use tensorbus_core::proto::{ChannelInfo, ChannelSpec, PoolInfo};
use tensorbus_core::wide::{HolderId, HolderSnapshot};
use tensorbus_core::{Mode, Policy};
use tensorbus_shm::{Access, Mapping, Memfd};

/// Why [`State::new`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    /// The configuration cannot be laid out or names something that does
    /// not exist (a config that passed [`Config::validate`] never does).
    #[error("{0}")]
    Config(String),
    /// Shared memory could not be created or mapped.
    #[error("{0}")]
    Memory(#[from] std::io::Error),
}

/// Why a channel could not be created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelError {
    /// The name is not a valid channel name.
    #[error("{0}")]
    InvalidName(String),
    /// Every channel record of the control segment is in use.
    #[error("all {max} channels are in use; raise limits.max_channels in the broker config")]
    TooMany {
        /// limits.max_channels.
        max: usize,
    },
    /// The spec names a pool the broker does not have.
    #[error("channel {channel:?} asks for pool {pool:?}, which does not exist; pools: {}", pools.join(", "))]
    UnknownPool {
        /// Channel name.
        channel: String,
        /// The missing pool.
        pool: String,
        /// The pools there are.
        pools: Vec<String>,
    },
    /// The default depth is outside 1..=ring capacity.
    #[error("depth {depth} must be between 1 and the ring capacity {capacity}")]
    Depth {
        /// Requested depth.
        depth: u32,
        /// limits.ring_capacity.
        capacity: u32,
    },
    /// The history cannot be kept as asked.
    #[error("channel {channel:?}: {reason}")]
    History {
        /// Channel name.
        channel: String,
        /// Why.
        reason: String,
    },
    /// The history record needs a holder id and none is left.
    #[error(transparent)]
    Bits(#[from] BitsExhausted),
}

/// Every holder id the limit allows is handed out.
#[derive(Debug, thiserror::Error)]
#[error("all {limit} holder handles of this broker are in use ([limits] max_handles = {limit}; each producer, subscriber, stage half and channel history takes one); close unused handles or raise max_handles (at most {})", ids::MAX_HANDLES)]
pub(crate) struct BitsExhausted {
    /// The limit in force.
    pub(crate) limit: usize,
}

/// Refuses pools that could never be backed: memfds are sparse, so an
/// oversized pool would otherwise start fine and fail later, when touched,
/// with SIGBUS in some client.
fn check_memory(config: &Config) -> std::io::Result<()> {
    let Some(memory) = crate::machine_memory() else {
        return Ok(());
    };
    let mut total: u64 = 0;
    let mut largest = ("", 0u64);
    for p in &config.pools {
        let stride = p.slot_size.0.div_ceil(p.alignment.0) * p.alignment.0;
        let bytes = stride.saturating_mul(u64::from(p.slots));
        total = total.saturating_add(bytes);
        if bytes > largest.1 {
            largest = (&p.name, bytes);
        }
    }
    if total > memory {
        return Err(std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!(
                "the pools need {total} bytes but this machine has {memory} bytes of memory (RAM and swap); the largest, pool {:?}, needs {} bytes: lower its slots or slot_size",
                largest.0, largest.1
            ),
        ));
    }
    Ok(())
}

/// One pool's memory.
struct Pool {
    info: PoolInfo,
    memfd: Memfd,
    read_only: OwnedFd,
}

/// A channel the broker knows.
struct Channel {
    index: usize,
    spec: ChannelSpec,
    /// Pool indices, smallest slot first.
    pools: Vec<u8>,
    /// Declared in the broker config (never removed).
    declared: bool,
    /// Reserved by waiting consumers; no producer has created it yet.
    pending: bool,
    /// Open producer handles.
    producers: u32,
    /// The history record (subscriber index, holder bit), if `spec.history > 0`.
    history: Option<(usize, HolderId)>,
}

impl Channel {
    fn info(&self) -> ChannelInfo {
        ChannelInfo {
            index: self.index as u32,
            name: self.spec.name.clone(),
            mode: self.spec.mode,
            pools: self.pools.clone(),
            pending: self.pending,
        }
    }
    fn default_depth(&self, capacity: u32) -> u32 {
        self.spec.depth.unwrap_or(DEFAULT_DEPTH).clamp(1, capacity)
    }
    fn default_policy(&self) -> Policy {
        self.spec.policy.unwrap_or_default()
    }
}

/// What a handle is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandleKind {
    Producer {
        channel: usize,
        row: usize,
    },
    Subscriber {
        channel: usize,
        sub: usize,
    },
    /// A subscriber that left its channel ([`tensorbus_core::proto::Request::Detach`]):
    /// it keeps its holder id for the tensors its client still holds.
    Detached,
}

/// An open handle.
#[derive(Clone, Copy, Debug)]
struct Handle {
    client: u32,
    kind: HandleKind,
    id: HolderId,
    /// A subscriber's request: (policy, depth, writable) as asked (`None`:
    /// the channel's default, settled again when a pending channel is
    /// created).
    asked: (Option<Policy>, Option<u32>, bool),
}

/// Work the broker must finish later (waiting on live producers).
#[derive(Debug)]
enum Pending {
    /// A retired subscriber: waiting for in-flight publishes to settle.
    Subscriber {
        channel: usize,
        sub: usize,
        id: HolderId,
        snapshot: Vec<u64>,
        /// Detached, not closed: keep the holds of received tensors.
        keep: bool,
    },
    /// A closed or dead producer's row: waiting for its rings to drain.
    Row { channel: usize, row: usize },
}

/// Everything but the sockets. The fields are private to this module and
/// its children: the event loop goes through the methods.
pub(crate) struct State {
    // Field order: `control` points into `_control_map`.
    control: Control,
    _control_map: Mapping,
    control_fd: Memfd,
    pools: Vec<Pool>,
    /// Indexed by channel record; `None`: the record is free.
    channels: Vec<Option<Channel>>,
    handles: HashMap<u32, Handle>,
    /// Holder ids handed out and free (and the broker's custody id).
    ids: HolderIds,
    next_handle: u32,
    pending: Vec<Pending>,
    /// Subscriber records and rows that are being reclaimed (not reusable yet).
    busy_subs: Vec<(usize, usize)>,
    busy_rows: Vec<(usize, usize)>,
    /// The broker's private cached heads for its row-0 pushes.
    broker_heads: HashMap<(usize, usize), u64>,
    /// Work items in the broker's custody: (channel, descriptor).
    redispatch: Vec<(usize, tensorbus_core::Descriptor)>,
    /// Where the next sweep for stray holder bits starts: (pool, slot).
    sweep_cursor: (usize, usize),
    /// Registry entries to write, and who the clients are (`registry.rs`).
    dirty: registry::Dirty,
    /// How this broker came to run the bus, if it adopted it (`adopt.rs`).
    adoption: Option<Adoption>,
    /// When held slots were first seen held (`leaks.rs`).
    held_since: leaks::HeldSince,
    /// `[broker] leak_threshold_ms`.
    leak_threshold_ms: u64,
    /// `[broker] latency_sample_every`.
    latency_sample_every: u32,
    /// Occupancy high-water marks and starving classes (`pool_watch.rs`).
    pool_watch: pool_watch::PoolWatch,
}

impl State {
    /// Creates the control segment and the pools of `config`, and the
    /// channels it declares.
    pub fn new(config: &Config) -> Result<State, InitError> {
        let layout = Layout::compute(&config.layout_params())
            .map_err(|e| InitError::Config(e.to_string()))?;
        let control_fd = Memfd::create("tensorbus-control", layout.total, false)?;
        let map = Mapping::map(control_fd.as_fd(), layout.total, Access::ReadWrite, 4096)?;
        // SAFETY: `map` is a fresh read-write mapping of `layout.total` bytes
        // stored in the same `State` and dropped after `control` (field order).
        let control = unsafe { Control::from_raw(map.as_ptr(), map.len(), layout) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        control.init_header(std::process::id());
        check_memory(config)?;
        let mut pools = Vec::new();
        for (i, p) in config.pools.iter().enumerate() {
            let align = p.alignment.0;
            let stride = p.slot_size.0.div_ceil(align) * align;
            let bytes = p.memfd_bytes();
            let name = format!("tensorbus-pool-{}", p.name);
            let len =
                usize::try_from(bytes).map_err(|_| std::io::Error::other("pool too large"))?;
            let memfd = if p.hugetlb {
                match Memfd::create(&name, len, true) {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!(
                            "tensorbus broker: pool {:?}: huge pages unavailable ({e}); using normal pages. Reserve them with `echo N > /proc/sys/vm/nr_hugepages`",
                            p.name
                        );
                        Memfd::create(&name, len, false)?
                    }
                }
            } else {
                Memfd::create(&name, len, false).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "pool {:?}: cannot create {bytes} bytes of shared memory: {e}",
                            p.name
                        ),
                    )
                })?
            };
            let read_only = memfd.reopen_read_only()?;
            pools.push(Pool {
                info: PoolInfo {
                    index: i as u8,
                    name: p.name.clone(),
                    slot_size: p.slot_size.0,
                    stride,
                    slots: p.slots,
                    alignment: align,
                    bytes,
                },
                memfd,
                read_only,
            });
        }
        let mut state = State {
            control,
            _control_map: map,
            control_fd,
            pools,
            channels: Vec::new(),
            handles: HashMap::new(),
            ids: HolderIds::new(config.limits.max_handles as usize),
            next_handle: 1,
            pending: Vec::new(),
            busy_subs: Vec::new(),
            busy_rows: Vec::new(),
            broker_heads: HashMap::new(),
            redispatch: Vec::new(),
            sweep_cursor: (0, 0),
            dirty: registry::Dirty::default(),
            adoption: None,
            held_since: leaks::HeldSince::default(),
            leak_threshold_ms: config.broker.leak_threshold_ms,
            latency_sample_every: config.broker.latency_sample_every,
            pool_watch: Default::default(),
        };
        let hugetlb: Vec<bool> = config.pools.iter().map(|p| p.hugetlb).collect();
        state.init_registry(&hugetlb);
        for spec in config.channel_specs() {
            state
                .create_channel(spec, true)
                .map_err(|e| InitError::Config(e.to_string()))?;
        }
        state.sync_registry();
        Ok(state)
    }

    /// Whether reclaims or re-dispatches are waiting (the event loop then
    /// ticks faster to finish them).
    pub fn has_pending_work(&self) -> bool {
        !self.pending.is_empty() || !self.redispatch.is_empty()
    }

    /// A new descriptor of the control segment, for a client's Welcome.
    pub fn dup_control_fd(&self) -> std::io::Result<OwnedFd> {
        self.control_fd.as_fd().try_clone_to_owned()
    }

    /// Read-only descriptors of every pool, in pool order (a client's
    /// Welcome carries them so that it can hand the bus over to a broker
    /// that takes over after this one died).
    pub fn read_only_pool_fds(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.pools.iter().map(|p| p.read_only.try_clone()).collect()
    }

    /// (`st_dev`, `st_ino`) of the control segment.
    pub fn control_identity(&self) -> Option<(u64, u64)> {
        tensorbus_shm::fd_identity(self.control_fd.as_fd()).ok()
    }

    /// The layout parameters of the control segment.
    pub fn layout_params(&self) -> LayoutParams {
        self.control.layout().params.clone()
    }

    /// What clients need to know about each pool.
    pub fn pool_infos(&self) -> Vec<PoolInfo> {
        self.pools.iter().map(|p| p.info.clone()).collect()
    }

    /// Whether `handle` is open and belongs to `client`.
    fn owns(&self, client: u32, handle: u32) -> bool {
        self.handles
            .get(&handle)
            .is_some_and(|h| h.client == client)
    }

    /// Closes `handle` of `client`; false (and nothing done) if `client`
    /// has no such open handle.
    pub fn close_handle_of(&mut self, client: u32, handle: u32) -> bool {
        self.owns(client, handle) && self.close_handle(handle, true)
    }

    /// Undoes an open `client` abandoned ([`tensorbus_core::proto::Request::Cancel`]):
    /// closed like a death, so it ends no stream.
    pub fn cancel_handle_of(&mut self, client: u32, handle: u32) -> bool {
        self.owns(client, handle) && self.close_handle(handle, false)
    }

    /// Detaches subscriber `handle` of `client`; false (and nothing done)
    /// if `client` has no such open subscriber handle.
    pub fn detach_handle_of(&mut self, client: u32, handle: u32) -> bool {
        self.owns(client, handle) && self.detach_handle(handle)
    }

    fn channel_by_name(&self, name: &str) -> Option<usize> {
        self.channels
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.spec.name == name))
    }

    fn channel_names(&self) -> Vec<String> {
        self.channels
            .iter()
            .flatten()
            .filter(|c| !c.pending)
            .map(|c| c.spec.name.clone())
            .collect()
    }

    /// Channel `c`, which the caller found (an index of a live channel).
    fn chan(&self, c: usize) -> &Channel {
        self.channels[c].as_ref().expect("a live channel index")
    }

    fn chan_mut(&mut self, c: usize) -> &mut Channel {
        self.channels[c].as_mut().expect("a live channel index")
    }

    /// Takes a free holder id.
    fn alloc_id(&mut self) -> Result<HolderId, BitsExhausted> {
        let id = self.ids.alloc()?;
        self.mark_id(id);
        Ok(id)
    }

    fn free_id(&mut self, id: HolderId) {
        self.ids.free(id);
        self.mark_id(id);
    }

    /// Clears holder bits that belong to no open handle from the next
    /// `budget` slot headers (round robin over every pool): bits the broker
    /// has not handed out, and its custody bit on slots that are not in its
    /// custody. Only a corrupted holder word carries such bits; without the
    /// sweep the slot would never be free again. Bits are handed out on this
    /// thread, so none becomes legitimate during a sweep. Returns how many
    /// slots it freed.
    pub fn sweep_stray_bits(&mut self, budget: usize) -> usize {
        let keep = self.ids.taken(false);
        let mut keep_custody = keep;
        keep_custody.insert(self.ids.custody());
        let redispatch = &self.redispatch;
        let ctl = &self.control;
        let pools = ctl.pools();
        let total: usize = (0..pools).map(|p| ctl.slots(p)).sum();
        let mut freed = 0;
        let mut swept = Vec::new();
        let mut left = budget.min(total);
        while left > 0 {
            let (pool, start) = self.sweep_cursor;
            let pool = pool % pools;
            let end = ctl.slots(pool).min(start.saturating_add(left));
            freed += tensorbus_core::reclaim::clear_stray_bits(ctl, pool, start..end, |index| {
                let in_custody = redispatch
                    .iter()
                    .any(|(_, d)| usize::from(d.pool) == pool && d.index as usize == index);
                if in_custody {
                    keep_custody
                } else {
                    keep
                }
            });
            swept.push((pool, start..end));
            left -= end.saturating_sub(start).max(1).min(left);
            self.sweep_cursor = if end >= ctl.slots(pool) {
                ((pool + 1) % pools, 0)
            } else {
                (pool, end)
            };
        }
        for (pool, range) in swept {
            self.track_held(pool, range);
        }
        freed
    }

    fn new_handle(&mut self) -> u32 {
        let h = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1).max(1);
        h
    }

    /// Holder ids that belong to subscribers (for stats).
    fn subscriber_ids(&self) -> HolderSnapshot {
        let mut s = HolderSnapshot::default();
        for h in self.handles.values() {
            if matches!(h.kind, HandleKind::Subscriber { .. }) {
                s.insert(h.id);
            }
        }
        s
    }

    fn is_workqueue(&self, channel: usize) -> bool {
        self.channels
            .get(channel)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.spec.mode == Mode::Workqueue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorbus_core::Descriptor;

    #[test]
    fn sweep_frees_stray_bits_and_keeps_open_ones_and_custody() {
        let config = Config::from_toml(
            "[[pools]]\nname = \"a\"\nslot_size = 64\nslots = 3\n\
             [[pools]]\nname = \"b\"\nslot_size = 64\nslots = 5\n",
        )
        .unwrap();
        let mut st = State::new(&config).unwrap();
        let open = st.alloc_id().unwrap();
        let open_ext = HolderId::new(300).unwrap();
        st.ids.free(open);
        // Take ids up to and including 300 so that 300 is an open one.
        let mut taken = Vec::new();
        while taken.last() != Some(&open_ext) {
            taken.push(st.alloc_id().unwrap());
        }
        let custody = st.ids.custody();
        let (stray, stray_ext) = (HolderId::new(14).unwrap(), HolderId::new(900).unwrap());
        st.ids.free(stray);
        let ids = |st: &State, p: usize, i: usize| -> Vec<HolderId> {
            st.control
                .slot(p, i)
                .unwrap()
                .holder_set()
                .snapshot()
                .ids()
                .collect()
        };
        let set = |st: &State, p: usize, i: usize, ids: &[HolderId]| {
            let slot = st.control.slot(p, i).unwrap();
            let intent = std::sync::atomic::AtomicU64::new(0);
            let first = HolderId::new(13).unwrap();
            slot.try_loan(first, &intent, 1).unwrap();
            slot.hand_over(first, ids.iter().copied());
        };
        set(&st, 0, 0, &[stray, stray_ext]); // stray only: freed
        set(&st, 0, 2, &[open, open_ext, stray_ext]); // open + stray: the open ids stay
        set(&st, 1, 1, &[custody]); // custody of nothing: freed
        set(&st, 1, 4, &[custody, stray]); // a real custody item: custody stays
        st.redispatch.push((0, Descriptor::new(1, 4, 0)));
        // Budgets smaller than the pools resume where the last sweep ended.
        let freed: usize = (0..4).map(|_| st.sweep_stray_bits(2)).sum();
        assert_eq!(freed, 2);
        assert_eq!(ids(&st, 0, 0), []);
        assert_eq!(ids(&st, 0, 2), [open, open_ext]);
        assert_eq!(ids(&st, 1, 1), []);
        assert_eq!(ids(&st, 1, 4), [custody]);
        // A budget larger than every pool sweeps each slot once.
        set(&st, 1, 0, &[stray_ext]);
        assert_eq!(st.sweep_stray_bits(1_000_000), 1);
    }
}
