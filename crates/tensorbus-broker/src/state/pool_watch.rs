//! Per-pool occupancy high-water marks and starving size classes (issue
//! 17.1).
//!
//! Nothing on the data path counts held slots (a loan is one CAS on a slot
//! header), so occupancy is sampled: every sweep (100 ms) the broker counts
//! the held slots of every pool, at most [`SAMPLE_SLOTS`] headers per
//! sweep (a bus with more slots is sampled every few sweeps), and every
//! `stat` (and metrics scrape) counts them too. `high_water` is the most seen held at once in those
//! samples: a burst shorter than a sweep can be missed, which `stat` says.
//!
//! The producers count, in the control segment, loans of a size class that
//! found it full (`tensorbus_core::pool_counters`). A class *starves* when
//! those counts grew in the last [`STARVING_FOR`] while another pool had at
//! least half of its slots free: the sizes are configured wrong, not the
//! bus overloaded.

use super::State;
use std::time::{Duration, Instant};

/// Most slot headers one sweep reads for the occupancy sample.
const SAMPLE_SLOTS: usize = 65_536;
/// How long a class counts as starving after its counts last grew.
pub(super) const STARVING_FOR: Duration = Duration::from_secs(1);

/// What the broker remembers of each pool between samples.
#[derive(Default)]
pub(super) struct PoolWatch {
    pools: Vec<Watched>,
    /// Sweeps since the last occupancy sample.
    skipped: usize,
}

#[derive(Clone, Copy, Default)]
struct Watched {
    high_water: u32,
    /// `refused + spilled` at the last sample.
    ran_dry: u64,
    /// When `ran_dry` last grew.
    grew_at: Option<Instant>,
}

impl State {
    /// Held slots of `pool` now (one pass over its slot headers).
    pub(super) fn held_slots(&self, pool: usize) -> u32 {
        (0..self.control.slots(pool))
            .filter(|&i| self.control.slot(pool, i).is_some_and(|s| s.is_held()))
            .count() as u32
    }

    /// `refused + spilled` of `pool` now.
    fn ran_dry(&self, pool: usize) -> u64 {
        self.control.pool_counters(pool).map_or(0, |c| {
            let (r, s) = c.load();
            r.wrapping_add(s)
        })
    }

    /// One sweep's sample (see the module comment).
    pub(crate) fn watch_pools(&mut self) {
        let pools = self.control.pools();
        let total: usize = (0..pools).map(|p| self.control.slots(p)).sum();
        let every = total.div_ceil(SAMPLE_SLOTS).max(1);
        self.pool_watch.skipped += 1;
        let occupancy = self.pool_watch.skipped >= every;
        if occupancy {
            self.pool_watch.skipped = 0;
        }
        if occupancy {
            self.sample_occupancy();
        }
        let now = Instant::now();
        for p in 0..pools {
            let dry = self.ran_dry(p);
            let w = &mut self.pool_watch.pools;
            if w.len() <= p {
                w.resize(p + 1, Watched::default());
            }
            let w = &mut w[p];
            if dry != w.ran_dry {
                w.ran_dry = dry;
                w.grew_at = Some(now);
            }
        }
    }

    /// Counts every pool's held slots and raises the high-water marks.
    pub(crate) fn sample_occupancy(&mut self) {
        for p in 0..self.control.pools() {
            let held = self.held_slots(p);
            let w = &mut self.pool_watch.pools;
            if w.len() <= p {
                w.resize(p + 1, Watched::default());
            }
            w[p].high_water = w[p].high_water.max(held);
        }
    }

    /// `(high water, starving)` of `pool` for `stat`, given every pool's
    /// held slots now (`held`).
    pub(super) fn pool_watch_stat(&self, pool: usize, held: &[u32]) -> (u32, bool) {
        let w = self.pool_watch.pools.get(pool).copied().unwrap_or_default();
        let high_water = w.high_water.max(held.get(pool).copied().unwrap_or(0));
        let recently = w.grew_at.is_some_and(|t| t.elapsed() < STARVING_FOR)
            || self.ran_dry(pool) != w.ran_dry;
        let other_idle = (0..self.control.pools()).any(|q| {
            q != pool && {
                let slots = self.control.slots(q) as u32;
                let free = slots.saturating_sub(held.get(q).copied().unwrap_or(0));
                slots > 0 && free * 2 >= slots
            }
        });
        (high_water, recently && other_idle)
    }
}
