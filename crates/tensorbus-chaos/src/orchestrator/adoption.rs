//! `--kill-broker`: one broker kill, and the new broker adopting the bus
//! (issue 16.2).
//!
//! The broker is killed with `kill -9`; control calls must then be refused
//! and the survivors keep receiving over the pools they have mapped; one
//! more client dies while no broker runs (nobody can repair after it until
//! a broker adopts the bus). Then a new broker starts on the same socket
//! path. Every live client reconnects on its own and hands it the bus; the
//! new broker checks their claims, reclaims after the clients that died,
//! and the run goes on as one bus: the same records, the same lossless
//! checks across every broker, no stranded slots.
//!
//! Checked after each adoption, counted in `adoption_failures`:
//! * the orchestrator's own client (a survivor) gets through to the new
//!   broker, on the same bus id;
//! * the new broker waits for nobody within 15 s (every client of the
//!   dead broker claimed its handles or was found dead);
//! * every live client process is listed by the new broker's `stat` as
//!   adopted (or exits: a process that was still connecting when the
//!   broker died is refused, as before);
//! * a fresh client subscribing to `bc` receives from a producer that
//!   started before the broker died (when one still runs).
//!
//! A failed adoption falls back to what `--kill-broker` did before
//! adoption existed (the epoch ends, its clients stop, what they left held
//! is stranded, new clients start on the new broker's bus), so the checks
//! of the tensors stay meaningful.

use super::{broker_cycle_end_epoch, BrokerHandle, BrokerStats, Run, ROLES};
use crate::journal::STATE_READY;
use crate::payload::{self, Rng};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tensorbus::error::RequestError;
use tensorbus::{Client, ConsumerOptions, Policy, TensorView};

/// What the adoptions came to, for the final line.
#[derive(Default)]
pub(super) struct AdoptStats {
    /// Clients the new brokers listed as adopted, summed over the restarts.
    pub adopted: u64,
    /// Adoptions that did not hold (see the module comment).
    pub failures: u64,
    /// Restarts after which a fresh client received from a producer that
    /// started before the broker died.
    pub fresh_received: u64,
    /// Restarts with no such producer left to check (both `bc` producers
    /// were killed in the outage window).
    pub fresh_skipped: u64,
    /// Handles of dead clients the new brokers reclaimed.
    pub reclaimed_handles: u64,
    /// Work items the dead brokers had in custody, released on adoption.
    pub custody_released: u64,
}

/// How a broker kill ended: the broker and client to go on with, and the
/// tensors stranded in a bus that was not adopted (fallback only).
pub(super) struct CycleEnd {
    pub broker: BrokerHandle,
    pub client: Client,
    pub stranded: Option<(u32, HashSet<(u32, u64)>)>,
}

/// One broker kill and adoption (see the module comment).
pub(super) fn cycle(
    run: &mut Run,
    broker: BrokerHandle,
    client: Client,
    rng: &mut Rng,
    b: &mut BrokerStats,
    a: &mut AdoptStats,
) -> Result<CycleEnd, String> {
    let bus_id = client
        .stat()
        .map_err(|e| format!("stat before the broker kill: {e}"))?
        .bus_id;
    // The `bc` producers running now: a fresh client must receive from
    // one of them after the adoption.
    let pre: HashSet<u32> = live_roles(run)
        .filter(|&(i, _)| ROLES[i].channel == "bc" && ROLES[i].kind == super::Kind::Producer)
        .map(|(_, inc)| inc)
        .collect();
    super::kill_broker_and_outage(run, broker, &client, rng, b);

    let nb = BrokerHandle::spawn(run, true)?;
    // The orchestrator's own client is a survivor: its request reconnects
    // it (and hands the bus over, if it is the first to get through).
    let deadline = Instant::now() + Duration::from_secs(15);
    let adopted = loop {
        run.reap();
        match client.stat() {
            Ok(s) => break Ok(s),
            Err(RequestError::BrokerUnavailable { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    let why = match &adopted {
        Err(e) => Some(format!(
            "the orchestrator's client did not get through: {e}"
        )),
        Ok(s) if s.bus_id != bus_id => Some(format!(
            "the new broker runs bus {:016x}, not the adopted {bus_id:016x}",
            s.bus_id
        )),
        Ok(s) if s.adoption.is_none() => Some("the new broker reports no adoption".into()),
        Ok(_) => None,
    };
    if let Some(why) = why {
        a.failures += 1;
        eprintln!(
            "chaos: ADOPTION broker kill {}: {why}; ending the epoch",
            b.kills
        );
        let (set, broker, client) = broker_cycle_end_epoch(run, nb, client, b)?;
        return Ok(CycleEnd {
            broker,
            client,
            stranded: Some((run.epoch - 1, set)),
        });
    }

    // Every client of the dead broker claims its handles or is found dead.
    let settled = loop {
        run.reap();
        let s = client.stat().map_err(|e| format!("stat: {e}"))?;
        let waiting = s.adoption.as_ref().map_or(0, |x| x.waiting_clients);
        if waiting == 0 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let ad = settled.adoption.clone().unwrap_or_default();
    if ad.waiting_clients > 0 {
        a.failures += 1;
        eprintln!(
            "chaos: ADOPTION broker kill {}: {} clients still not reconnected after 15 s",
            b.kills, ad.waiting_clients
        );
    }
    // Every live process is an adopted client, or exits (it was still
    // connecting when the broker died).
    let missing = loop {
        run.reap();
        let s = client.stat().map_err(|e| format!("stat: {e}"))?;
        let adopted_pids: HashSet<i32> = s
            .clients
            .iter()
            .filter(|c| c.adopted)
            .map(|c| c.pid)
            .collect();
        let missing: Vec<usize> = (0..ROLES.len())
            .filter(|&i| {
                run.live[i].as_ref().is_some_and(|p| {
                    p.journal.state() >= STATE_READY
                        && !adopted_pids.contains(&(p.child.id() as i32))
                })
            })
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !missing.is_empty() {
        a.failures += 1;
        let names: Vec<&str> = missing.iter().map(|&i| ROLES[i].name).collect();
        eprintln!(
            "chaos: ADOPTION broker kill {}: live clients not listed as adopted: {names:?}",
            b.kills
        );
    }
    a.adopted += u64::from(ad.adopted_clients);
    a.reclaimed_handles += u64::from(ad.reclaimed_handles);
    a.custody_released += u64::from(ad.custody_released);
    run.broker_dead = false;

    // A fresh client receives from a producer that predates the restart.
    let still: HashSet<u32> = live_roles(run).map(|(_, inc)| inc).collect();
    if pre.is_disjoint(&still) {
        a.fresh_skipped += 1;
    } else {
        match fresh_receives(run, &pre) {
            Ok(()) => a.fresh_received += 1,
            Err(e) => {
                a.failures += 1;
                eprintln!(
                    "chaos: ADOPTION broker kill {}: a fresh client: {e}",
                    b.kills
                );
            }
        }
    }
    eprintln!(
        "chaos: broker kill {}: adopted by the new broker: {} clients, {} handles of dead clients reclaimed, {} custody items released",
        b.kills, ad.adopted_clients, ad.reclaimed_handles, ad.custody_released
    );
    Ok(CycleEnd {
        broker: nb,
        client,
        stranded: None,
    })
}

/// `(role, incarnation)` of every live process.
fn live_roles(run: &Run) -> impl Iterator<Item = (usize, u32)> + '_ {
    run.live
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, run.records[p.as_ref()?.record].inc)))
}

/// Connects a new client, subscribes to `bc` and waits for a tensor of one
/// of the producers `pre`.
fn fresh_receives(run: &Run, pre: &HashSet<u32>) -> Result<(), String> {
    let fresh = Client::connect_to(Some(&run.socket), "chaos-fresh")
        .map_err(|e| format!("connect: {e}"))?;
    let c = fresh
        .consumer_with(
            "bc",
            ConsumerOptions::default()
                .policy(Policy::DropOldest)
                .end_of_stream(false),
        )
        .map_err(|e| format!("subscribe to bc: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(t) = c.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let (ok, _, inc) = payload::verify(t.user_header(), &t, 0);
        if !ok {
            return Err(format!("received a corrupt tensor of incarnation {inc}"));
        }
        if pre.contains(&inc) {
            return Ok(());
        }
    }
    Err("received nothing from a producer that started before the broker died in 10 s".into())
}
