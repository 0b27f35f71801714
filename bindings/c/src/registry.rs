//! The registry of handle addresses: a pointer from C is dereferenced only
//! after the registry says it is a live handle of the expected kind, so a
//! NULL, stale, released or foreign pointer is an error, never a crash.
//!
//! Closed and released handles stay allocated (their contents dropped) in a
//! quarantine of the last [`QUARANTINE`] handles, so the allocator cannot hand
//! their address to a new handle meanwhile: using one of them again is
//! reported as "already closed" / "tensor already released". Tensor shells
//! leaving the quarantine are reused for new tensors, so the steady-state hot
//! path (loan, publish, recv, release) does not allocate.

use crate::status::{invalid, Res};
use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex, MutexGuard};

/// How many closed or released handles are remembered (and kept allocated).
pub(crate) const QUARANTINE: usize = 1024;

/// Which type a handle address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Client,
    Producer,
    Consumer,
    Stage,
    Tensor,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Client => "tb_client",
            Kind::Producer => "tb_producer",
            Kind::Consumer => "tb_consumer",
            Kind::Stage => "tb_stage",
            Kind::Tensor => "tb_tensor",
        }
    }
    fn gone(self) -> &'static str {
        match self {
            Kind::Tensor => {
                "tensor already released (published, forwarded or passed to tb_release)"
            }
            Kind::Client => "tb_client already closed",
            Kind::Producer => "tb_producer already closed",
            Kind::Consumer => "tb_consumer already closed",
            Kind::Stage => "tb_stage already closed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Live(Kind),
    Retired(Kind),
}

/// Frees a quarantined shell of `kind` at `addr`.
pub(crate) type Freer = fn(usize, Kind);

pub(crate) struct Registry {
    map: HashMap<usize, State>,
    quarantine: VecDeque<(usize, Kind)>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    Mutex::new(Registry {
        map: HashMap::with_capacity(2 * QUARANTINE),
        quarantine: VecDeque::with_capacity(QUARANTINE + 1),
    })
});

/// Locks the registry (a poisoned lock is still usable: its data stays consistent).
pub(crate) fn lock() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Checks that `addr` is a live handle of `kind`.
    pub fn check(&self, addr: usize, kind: Kind) -> Res {
        if addr == 0 {
            return Err(invalid(format!("{} handle is NULL", kind.name())));
        }
        match self.map.get(&addr) {
            Some(State::Live(k)) if *k == kind => Ok(()),
            Some(State::Retired(k)) if *k == kind => Err(invalid(kind.gone())),
            Some(State::Live(k) | State::Retired(k)) => Err(invalid(format!(
                "expected a {}, got a {} handle",
                kind.name(),
                k.name()
            ))),
            None => Err(invalid(format!(
                "{addr:#x} is not a live {} (never returned by tensorbus, or closed long ago)",
                kind.name()
            ))),
        }
    }

    /// Records a new live handle.
    pub fn insert(&mut self, addr: usize, kind: Kind) {
        self.map.insert(addr, State::Live(kind));
    }

    /// Marks a live handle closed/released; its shell stays allocated until it
    /// leaves the quarantine (then `freer` frees it).
    pub fn retire(&mut self, addr: usize, kind: Kind, freer: Freer) {
        self.map.insert(addr, State::Retired(kind));
        self.quarantine.push_back((addr, kind));
        if self.quarantine.len() > QUARANTINE {
            if let Some((old, k)) = self.quarantine.pop_front() {
                self.map.remove(&old);
                freer(old, k);
            }
        }
    }

    /// Takes the oldest quarantined tensor shell for reuse when the
    /// quarantine is full (so a reused address is at least `QUARANTINE`
    /// releases old).
    pub fn reuse_tensor_shell(&mut self) -> Option<usize> {
        if self.quarantine.len() < QUARANTINE {
            return None;
        }
        match self.quarantine.front() {
            Some(&(addr, Kind::Tensor)) => {
                self.quarantine.pop_front();
                self.map.remove(&addr);
                Some(addr)
            }
            _ => None,
        }
    }
}
