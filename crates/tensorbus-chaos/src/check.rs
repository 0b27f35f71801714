//! The checks, run on the journals once every client has ended. The exact
//! definitions are in `docs/reliability.md` ("Chaos"); in short:
//!
//! * A producer incarnation's *confirmed* sequences are `0..published`
//!   (`publish()` returned); the one it was publishing when killed, if any,
//!   is *in doubt*: it may or may not have been delivered. Anything else
//!   carrying its id is a *phantom*.
//! * Broadcast subscribers (every one): a tensor seen twice, or after a
//!   later one of the same publisher, counts as duplicated; a phantom or a
//!   payload that does not verify counts as corrupt. `block` survivors
//!   must also have seen every confirmed sequence: each one missing is lost.
//! * Work queues: every confirmed sequence must be taken by exactly one
//!   worker (stage). Missing ones are lost, except one per worker killed
//!   inside a receive attempt before it could journal what it took;
//!   extra takes are duplicated.
//! * Pipeline output: every tensor a stage forwarded (`forward()` returned)
//!   must reach the `block` survivor exactly once; a tensor taken by a
//!   stage that was killed before its forward returned may or may not.

use crate::journal::{Entry, Journal, KIND_FWD, KIND_RECV, KIND_TOOK};
use crate::orchestrator::{Kind, ROLES};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

/// How a client incarnation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still running (only before the end).
    Running,
    /// We killed it with SIGKILL.
    Killed {
        /// It died inside a receive attempt before journaling its result.
        died_in_pop: bool,
    },
    /// It exited with status 0 after being asked to stop.
    Exited,
    /// It was still starting when the broker died and exited with an error
    /// (connecting and opening handles need a broker; `--kill-broker` only).
    NoBroker,
    /// Anything else: a non-zero status, a signal we did not send, a hang.
    Crashed(String),
}

/// One client incarnation.
#[derive(Clone, Debug)]
pub struct Record {
    /// Incarnation id (also the producer id in every tensor it published).
    pub inc: u32,
    /// Index into [`ROLES`].
    pub role: usize,
    /// Its journal file.
    pub journal: PathBuf,
    /// Its stderr file.
    pub stderr: PathBuf,
    /// How it ended.
    pub outcome: Outcome,
    /// Which broker it was a client of (0, then one more after each broker
    /// kill; `--kill-broker` only).
    pub epoch: u32,
}

/// The counters of the final line (but kills and leaks).
#[derive(Debug, Default)]
pub struct Report {
    /// Lost tensors.
    pub lost: u64,
    /// Duplicated (or reordered) deliveries.
    pub duplicated: u64,
    /// Corrupt deliveries.
    pub corrupt: u64,
    /// Crashed processes.
    pub crashed: u64,
    /// Lossy subscribers: received + counted drops that do not add up to
    /// what was published to them (see [`reconcile`]).
    pub unaccounted_drops: u64,
}

/// What one incarnation journaled.
struct Loaded {
    rec: Record,
    entries: Vec<Entry>,
    published: u64,
    publishing: Option<u64>,
    corrupt: u64,
    /// Out of order or repeated deliveries a crowd process found itself.
    duplicated: u64,
    not_exclusive: u64,
    stat: Option<(u64, u64)>,
    client: u32,
    /// Crowd: tensors received (and verified), most held at once.
    crowd: (u64, u64),
}

/// Whether a tensor `(inc, seq)` was published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    Confirmed,
    InDoubt,
    Phantom,
}

/// Producer incarnations of one channel: inc -> (confirmed count, in doubt).
struct Published(HashMap<u32, (u64, Option<u64>)>);

impl Published {
    fn of(loaded: &[&Loaded], channel: &str) -> Published {
        Published(
            loaded
                .iter()
                .filter(|l| {
                    let r = &ROLES[l.rec.role];
                    r.kind == Kind::Producer && r.channel == channel
                })
                .map(|l| (l.rec.inc, (l.published, l.publishing)))
                .collect(),
        )
    }
    fn known(&self, inc: u32, seq: u64) -> Known {
        match self.0.get(&inc) {
            Some(&(n, _)) if seq < n => Known::Confirmed,
            Some(&(_, Some(d))) if seq == d => Known::InDoubt,
            _ => Known::Phantom,
        }
    }
    fn confirmed(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.0
            .iter()
            .flat_map(|(&inc, &(n, _))| (0..n).map(move |s| (inc, s)))
    }
    fn total(&self) -> u64 {
        self.0.values().map(|&(n, _)| n).sum()
    }
    fn in_doubt(&self) -> usize {
        self.0.values().filter(|(_, d)| d.is_some()).count()
    }
}

#[derive(Default)]
struct Counts {
    lost: u64,
    duplicated: u64,
    corrupt: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.corrupt += o.corrupt;
    }
}

/// Checks one broadcast subscription. `order` gives the stream an entry
/// belongs to and its position in it (publishing handle and its counter);
/// `known` classifies the tensor identity `(inc, seq)`. Returns the counts
/// and the set of identities seen.
fn check_subscriber(
    entries: &[Entry],
    known: &dyn Fn(u32, u64) -> Known,
    order: &dyn Fn(&Entry) -> (u64, u64),
) -> (Counts, HashSet<(u32, u64)>) {
    let mut c = Counts::default();
    let mut seen = HashSet::new();
    let mut last: HashMap<u64, u64> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind == KIND_RECV) {
        if !e.ok {
            c.corrupt += 1;
            continue;
        }
        if known(e.inc, e.seq) == Known::Phantom {
            c.corrupt += 1;
            continue;
        }
        if !seen.insert((e.inc, e.seq)) {
            c.duplicated += 1;
            continue;
        }
        let (stream, pos) = order(e);
        if let Some(&prev) = last.get(&stream) {
            if pos <= prev {
                c.duplicated += 1; // out of order
            }
        }
        let l = last.entry(stream).or_insert(pos);
        *l = (*l).max(pos);
    }
    (c, seen)
}

/// Checks a work queue: takes across all `takers` (entries of `kind`).
fn check_queue(
    name: &str,
    takers: &[&Loaded],
    kind: u8,
    published: &Published,
    stranded: &HashSet<(u32, u64)>,
) -> (Counts, HashMap<(u32, u64), u32>) {
    let mut c = Counts::default();
    let mut takes: HashMap<(u32, u64), u32> = HashMap::new();
    for l in takers {
        for e in l.entries.iter().filter(|e| e.kind == kind) {
            if !e.ok || published.known(e.inc, e.seq) == Known::Phantom {
                c.corrupt += 1;
                continue;
            }
            *takes.entry((e.inc, e.seq)).or_default() += 1;
        }
    }
    c.duplicated += takes
        .values()
        .map(|&n| u64::from(n.saturating_sub(1)))
        .sum::<u64>();
    let missing_all: Vec<(u32, u64)> = published
        .confirmed()
        .filter(|k| !takes.contains_key(k))
        .collect();
    // A broker that died before repairing a dead worker leaves that
    // worker's queue (and whatever the broker held in custody) stranded in
    // the orphaned bus: found there by identity, not lost.
    let (strand, missing_keys): (Vec<_>, Vec<_>) =
        missing_all.into_iter().partition(|k| stranded.contains(k));
    if !strand.is_empty() {
        eprintln!(
            "chaos: {name}: {} confirmed tensors stranded in the slots of a dead broker's bus (queued at, or held by, workers it never repaired)",
            strand.len()
        );
    }
    for (inc, seq) in missing_keys.iter().take(20) {
        let (n, d) = published.0[inc];
        eprintln!(
            "chaos: {name}: MISSING tensor inc {inc} seq {seq} (that producer incarnation confirmed 0..{n}, in doubt {d:?})"
        );
    }
    let missing = missing_keys.len() as u64;
    let excused = takers
        .iter()
        .filter(|l| l.rec.outcome == (Outcome::Killed { died_in_pop: true }))
        .count() as u64;
    c.lost = missing.saturating_sub(excused);
    eprintln!(
        "chaos: {name}: {} producer incarnations published {} (+{} in doubt); taken {} times by {} incarnations; missing {missing} ({excused} takers killed mid-receive excuse up to one each); duplicated {}; corrupt {}",
        published.0.len(),
        published.total(),
        published.in_doubt(),
        takes.values().map(|&n| u64::from(n)).sum::<u64>(),
        takers.len(),
        c.duplicated,
        c.corrupt
    );
    (c, takes)
}

fn load(records: &[Record]) -> Result<Vec<Loaded>, String> {
    records
        .iter()
        .map(|rec| {
            let j = Journal::open(&rec.journal)
                .map_err(|e| format!("journal {}: {e}", rec.journal.display()))?;
            if j.overflowed() {
                return Err(format!(
                    "journal of {} (inc {}) overflowed; the checks would be incomplete",
                    ROLES[rec.role].name, rec.inc
                ));
            }
            Ok(Loaded {
                rec: rec.clone(),
                entries: j.entries(),
                published: j.published(),
                publishing: j.publishing(),
                corrupt: j.corrupt(),
                duplicated: j.duplicated(),
                not_exclusive: j.not_exclusive(),
                stat: j.stat(),
                client: j.client(),
                crowd: j.crowd(),
            })
        })
        .collect()
}

/// Runs every check on the journals of `records`, one broker epoch at a
/// time (`stranded[epoch]`: tensors `(inc, seq)` found held in the slots of
/// that epoch's bus after its broker died and all its clients exited).
pub fn check(
    records: &[Record],
    stranded: &HashMap<u32, HashSet<(u32, u64)>>,
) -> Result<Report, String> {
    let loaded = load(records)?;
    let mut epochs: Vec<u32> = loaded.iter().map(|l| l.rec.epoch).collect();
    epochs.sort_unstable();
    epochs.dedup();
    let none = HashSet::new();
    let mut report = Report::default();
    for epoch in epochs {
        let group: Vec<&Loaded> = loaded.iter().filter(|l| l.rec.epoch == epoch).collect();
        if epochs_differ(&loaded) {
            eprintln!("chaos: epoch {epoch} (broker {epoch}):");
        }
        let r = check_epoch(&group, stranded.get(&epoch).unwrap_or(&none));
        report.lost += r.lost;
        report.duplicated += r.duplicated;
        report.corrupt += r.corrupt;
        report.crashed += r.crashed;
        report.unaccounted_drops += r.unaccounted_drops;
    }
    Ok(report)
}

fn epochs_differ(loaded: &[Loaded]) -> bool {
    loaded.iter().any(|l| l.rec.epoch != loaded[0].rec.epoch)
}

/// The checks of one broker epoch (every client of one broker).
fn check_epoch(loaded: &[&Loaded], stranded: &HashSet<(u32, u64)>) -> Report {
    let mut total = Counts::default();
    let role = |l: &Loaded| &ROLES[l.rec.role];
    let of = |kind: Kind, channel: &str| -> Vec<&Loaded> {
        loaded
            .iter()
            .copied()
            .filter(|l| role(l).kind == kind && role(l).channel == channel)
            .collect()
    };

    // Library-reported corruption (and what a crowd process found in
    // process: payloads that did not verify, deliveries out of order) and
    // stage releases, wherever they happened. Crowd processes journal no
    // entries; none of the checks below looks at them (they select roles
    // by kind), so their lossy subscriptions cause no `lost` and no
    // `unaccounted_drops`.
    for l in loaded {
        total.corrupt += l.corrupt;
        total.duplicated += l.duplicated;
        if l.corrupt > 0 {
            let what = if role(l).kind == Kind::Crowd {
                "RecvError::Corrupted or payloads that did not verify"
            } else {
                "RecvError::Corrupted"
            };
            eprintln!(
                "chaos: CORRUPT {} (inc {}): {} {what}",
                role(l).name,
                l.rec.inc,
                l.corrupt
            );
        }
        if l.duplicated > 0 {
            eprintln!(
                "chaos: DUPLICATED {} (inc {}): {} deliveries repeated or out of order in its subscriptions",
                role(l).name,
                l.rec.inc,
                l.duplicated
            );
        }
        if l.not_exclusive > 0 {
            eprintln!(
                "chaos: {} (inc {}): {} tensors released after NotExclusive (they count as lost)",
                role(l).name,
                l.rec.inc,
                l.not_exclusive
            );
        }
    }

    // Broadcast channel: order and integrity everywhere, completeness at
    // the block survivors.
    let bc = Published::of(loaded, "bc");
    let known_bc = |inc, seq| bc.known(inc, seq);
    let by_producer = |e: &Entry| (u64::from(e.inc), e.seq);
    for l in of(Kind::Consumer, "bc") {
        let (c, seen) = check_subscriber(&l.entries, &known_bc, &by_producer);
        let mut c = c;
        if role(l).survivor && role(l).policy == Some("block") && l.rec.outcome == Outcome::Exited {
            c.lost = bc.confirmed().filter(|k| !seen.contains(k)).count() as u64;
            eprintln!(
                "chaos: bc: {} producer incarnations published {} (+{} in doubt); {} saw {} (lost {}, duplicated {}, corrupt {})",
                bc.0.len(),
                bc.total(),
                bc.in_doubt(),
                role(l).name,
                seen.len(),
                c.lost,
                c.duplicated,
                c.corrupt
            );
        }
        report_counts(l, &c);
        total.add(&c);
    }

    // Work queue.
    let wq = Published::of(loaded, "wq");
    let (c, _) = check_queue("wq", &of(Kind::Worker, "wq"), KIND_RECV, &wq, stranded);
    total.add(&c);

    // Pipeline input: the stages are the workers.
    let pin = Published::of(loaded, "pipe/in");
    let stages = of(Kind::Stage, "pipe/in");
    let (c, _) = check_queue("pipe/in", &stages, KIND_TOOK, &pin, stranded);
    total.add(&c);

    // Pipeline output: forwarded tensors must reach the block survivor.
    let mut forwarded: HashSet<(u32, u64)> = HashSet::new();
    let mut taken: HashSet<(u32, u64)> = HashSet::new();
    for l in &stages {
        for e in &l.entries {
            match e.kind {
                KIND_TOOK => {
                    taken.insert((e.inc, e.seq));
                }
                KIND_FWD => {
                    forwarded.insert((e.inc, e.seq));
                }
                _ => {}
            }
        }
    }
    let known_out = |inc, seq| {
        if forwarded.contains(&(inc, seq)) {
            Known::Confirmed
        } else if taken.contains(&(inc, seq)) {
            Known::InDoubt
        } else {
            Known::Phantom
        }
    };
    let by_stage = |e: &Entry| (u64::from(e.meta_producer), e.meta_seq);
    for l in of(Kind::Consumer, "pipe/out") {
        let (mut c, seen) = check_subscriber(&l.entries, &known_out, &by_stage);
        if role(l).survivor && role(l).policy == Some("block") && l.rec.outcome == Outcome::Exited {
            c.lost = forwarded.iter().filter(|k| !seen.contains(k)).count() as u64;
            eprintln!(
                "chaos: pipe/out: stages forwarded {} (+{} taken by stages killed before forwarding returned); {} saw {} (lost {}, duplicated {}, corrupt {})",
                forwarded.len(),
                taken.len() - taken.intersection(&forwarded).count(),
                role(l).name,
                seen.len(),
                c.lost,
                c.duplicated,
                c.corrupt
            );
        }
        report_counts(l, &c);
        total.add(&c);
    }

    // Lossy subscribers: what they received plus what producers counted as
    // dropped for them must add up to what was published to them.
    let bc_ends: HashMap<u64, End> = loaded
        .iter()
        .filter(|l| role(l).kind == Kind::Producer && role(l).channel == "bc")
        .map(|l| {
            (
                u64::from(l.rec.inc),
                End {
                    last: l.published.checked_sub(1),
                    in_doubt: l.publishing.is_some(),
                },
            )
        })
        .collect();
    let out_ends: HashMap<u64, End> = stages
        .iter()
        .map(|l| {
            let fwd = l.entries.iter().filter(|e| e.kind == KIND_FWD).count() as u64;
            let killed_holding = matches!(l.rec.outcome, Outcome::Killed { .. })
                && l.entries.last().is_some_and(|e| e.kind == KIND_TOOK);
            (
                u64::from(l.client),
                End {
                    last: fwd.checked_sub(1),
                    in_doubt: killed_holding,
                },
            )
        })
        .collect();
    let mut unaccounted_drops = 0;
    for (channel, ends, order) in [
        (
            "bc",
            &bc_ends,
            &by_producer as &dyn Fn(&Entry) -> (u64, u64),
        ),
        ("pipe/out", &out_ends, &by_stage),
    ] {
        for l in of(Kind::Consumer, channel) {
            let lossy = role(l).policy.is_some_and(|p| p != "block");
            let (Outcome::Exited, Some((delivered, dropped))) = (&l.rec.outcome, l.stat) else {
                continue;
            };
            if !lossy {
                if dropped != 0 {
                    eprintln!(
                        "chaos: drops: {} (inc {}): a block subscriber counted {dropped} drops",
                        role(l).name,
                        l.rec.inc
                    );
                    unaccounted_drops += dropped;
                }
                continue;
            }
            let r = reconcile(&l.entries, order, ends, delivered, dropped);
            eprintln!(
                "chaos: drops: {} (inc {}): received {} (broker's delivered {delivered}), dropped {dropped} = {} missed between receipts + {} after the last receipt + {} before the first (at most {}); {} publishers in doubt; unaccounted {}",
                role(l).name,
                l.rec.inc,
                r.received,
                r.gaps,
                r.tails,
                i128::from(dropped) - i128::from(r.gaps + r.tails),
                r.head_max,
                r.in_doubt,
                r.unaccounted
            );
            unaccounted_drops += r.unaccounted;
        }
    }

    let crowd: Vec<&Loaded> = loaded
        .iter()
        .copied()
        .filter(|l| role(l).kind == Kind::Crowd)
        .collect();
    if !crowd.is_empty() {
        let killed = crowd
            .iter()
            .filter(|l| matches!(l.rec.outcome, Outcome::Killed { .. }))
            .count();
        eprintln!(
            "chaos: crowd: {} incarnations ({killed} killed) received and verified {} tensors; at most {} held at once by one process; none journaled (lossy, not checked for completeness)",
            crowd.len(),
            crowd.iter().map(|l| l.crowd.0).sum::<u64>(),
            crowd.iter().map(|l| l.crowd.1).max().unwrap_or(0)
        );
    }

    let crashed = loaded
        .iter()
        .filter(|l| matches!(l.rec.outcome, Outcome::Crashed(_) | Outcome::Running))
        .count() as u64;
    for l in loaded {
        let survivor_gone = role(l).survivor && l.rec.outcome != Outcome::Exited;
        if survivor_gone {
            eprintln!(
                "chaos: survivor {} did not survive ({:?}); its completeness check was skipped",
                role(l).name,
                l.rec.outcome
            );
        }
    }
    Report {
        lost: total.lost,
        duplicated: total.duplicated,
        corrupt: total.corrupt,
        crashed,
        unaccounted_drops,
    }
}

/// How a publisher's stream ended, for [`reconcile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct End {
    /// Position of its last confirmed publish (`None`: none).
    last: Option<u64>,
    /// It was killed inside a publish (the next position is in doubt).
    in_doubt: bool,
}

/// The drop accounting of one lossy subscriber incarnation that drained
/// and exited (all publishers had stopped before it).
#[derive(Debug, Default, PartialEq, Eq)]
struct Recon {
    received: u64,
    /// Positions missed between two receipts from the same publisher.
    gaps: u64,
    /// Positions a publisher confirmed after the last receipt from it.
    tails: u64,
    /// Most drops there can have been before the first receipt from each
    /// publisher (its position), plus everything publishers the subscriber
    /// received nothing from published.
    head_max: u64,
    /// Publishers killed inside a publish.
    in_doubt: u64,
    unaccounted: u64,
}

/// Reconciles a lossy subscriber's receipts with its `dropped` counter.
/// Every publisher numbers its publishes 0, 1, 2, ...; once the subscriber
/// has received position `p` of a stream, every later publish of that
/// stream included it (it stayed subscribed until it exited, after every
/// publisher had stopped), so each later position it did not receive must
/// have been counted as dropped: `gaps + tails <= dropped`. Before its first
/// receipt from a stream it may or may not have been subscribed yet, so
/// `dropped <= gaps + tails + head_max`. A publisher killed inside a publish
/// loosens each bound by one: the tensor in doubt may have been counted,
/// and a drop_oldest steal may have happened without its count. Also
/// `delivered` (the library's count of successful receives) must equal the
/// receipts journaled. Anything outside these bounds is `unaccounted`.
fn reconcile(
    entries: &[Entry],
    order: &dyn Fn(&Entry) -> (u64, u64),
    ends: &HashMap<u64, End>,
    delivered: u64,
    dropped: u64,
) -> Recon {
    let mut r = Recon::default();
    let mut streams: HashMap<u64, (u64, u64, HashSet<u64>)> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind == KIND_RECV) {
        r.received += 1;
        let (stream, pos) = order(e);
        let s = streams.entry(stream).or_insert((pos, pos, HashSet::new()));
        s.0 = s.0.min(pos);
        s.1 = s.1.max(pos);
        s.2.insert(pos);
    }
    let mut doubt_lo = 0;
    for (stream, (first, last, seen)) in &streams {
        r.gaps += (last - first + 1) - seen.len() as u64;
        r.head_max += first;
        if let Some(end) = ends.get(stream) {
            if let Some(l) = end.last {
                r.tails += l.saturating_sub(*last);
            }
            doubt_lo += u64::from(end.in_doubt);
        }
    }
    for (stream, end) in ends {
        r.in_doubt += u64::from(end.in_doubt);
        if !streams.contains_key(stream) {
            r.head_max += end.last.map_or(0, |l| l + 1);
        }
    }
    let (lo, hi) = (r.gaps + r.tails, r.gaps + r.tails + r.head_max);
    r.unaccounted = r.received.abs_diff(delivered)
        + lo.saturating_sub(dropped + doubt_lo)
        + dropped.saturating_sub(hi + r.in_doubt);
    r
}

fn report_counts(l: &Loaded, c: &Counts) {
    if c.lost + c.duplicated + c.corrupt > 0 {
        eprintln!(
            "chaos: {} (inc {}, {:?}): lost {} duplicated {} corrupt {}",
            ROLES[l.rec.role].name, l.rec.inc, l.rec.outcome, c.lost, c.duplicated, c.corrupt
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(inc: u32, seq: u64) -> Entry {
        Entry {
            kind: KIND_RECV,
            ok: true,
            inc,
            seq,
            meta_producer: inc,
            meta_seq: seq,
        }
    }

    fn published() -> Published {
        // inc 1: 0..5 confirmed, 5 in doubt; inc 2: 0..3 confirmed.
        Published([(1, (5, Some(5))), (2, (3, None))].into_iter().collect())
    }

    #[test]
    fn classifies_sequences() {
        let p = published();
        assert_eq!(p.known(1, 4), Known::Confirmed);
        assert_eq!(p.known(1, 5), Known::InDoubt);
        assert_eq!(p.known(1, 6), Known::Phantom);
        assert_eq!(p.known(2, 3), Known::Phantom);
        assert_eq!(p.known(9, 0), Known::Phantom);
        assert_eq!((p.total(), p.in_doubt()), (8, 1));
    }

    #[test]
    fn subscriber_counts_duplicates_disorder_phantoms_and_bad_payloads() {
        let p = published();
        let known = |i, s| p.known(i, s);
        let order = |e: &Entry| (u64::from(e.inc), e.seq);
        let clean: Vec<Entry> = [(1, 0), (2, 0), (1, 1), (1, 2), (2, 1), (1, 5)]
            .iter()
            .map(|&(i, s)| recv(i, s))
            .collect();
        let (c, seen) = check_subscriber(&clean, &known, &order);
        assert_eq!((c.lost, c.duplicated, c.corrupt), (0, 0, 0));
        assert_eq!(seen.len(), 6);

        let mut bad = clean.clone();
        bad.push(recv(1, 2)); // duplicate
        bad.push(recv(1, 3)); // after 5: out of order
        bad.push(recv(2, 2));
        bad.push(recv(2, 2)); // duplicate
        bad.push(recv(1, 4)); // after 5: out of order
        bad.push(recv(1, 7)); // phantom
        let mut broken = recv(2, 0);
        broken.ok = false;
        bad.push(broken);
        let (c, _) = check_subscriber(&bad, &known, &order);
        assert_eq!((c.duplicated, c.corrupt), (4, 2));
    }

    fn loaded(role: &str, inc: u32, outcome: Outcome, entries: Vec<Entry>) -> Loaded {
        Loaded {
            rec: Record {
                inc,
                role: ROLES.iter().position(|r| r.name == role).unwrap(),
                journal: PathBuf::new(),
                stderr: PathBuf::new(),
                outcome,
                epoch: 0,
            },
            entries,
            published: 0,
            publishing: None,
            corrupt: 0,
            duplicated: 0,
            not_exclusive: 0,
            stat: None,
            client: 0,
            crowd: (0, 0),
        }
    }

    #[test]
    fn queue_counts_missing_extra_takes_and_excuses() {
        let p = published();
        let a = loaded(
            "wq/worker-1",
            10,
            Outcome::Killed { died_in_pop: false },
            [(1, 0), (1, 1), (2, 0)]
                .iter()
                .map(|&(i, s)| recv(i, s))
                .collect(),
        );
        let b = loaded(
            "wq/worker-survivor",
            11,
            Outcome::Exited,
            [(1, 2), (1, 3), (1, 4), (2, 1), (1, 5)]
                .iter()
                .map(|&(i, s)| recv(i, s))
                .collect(),
        );
        // (2, 2) was never taken: lost.
        let none = HashSet::new();
        let (c, _) = check_queue("t", &[&a, &b], KIND_RECV, &p, &none);
        assert_eq!((c.lost, c.duplicated, c.corrupt), (1, 0, 0));
        // ... unless it was found stranded in a dead broker's bus.
        let stranded: HashSet<(u32, u64)> = [(2, 2)].into_iter().collect();
        let (c, _) = check_queue("t", &[&a, &b], KIND_RECV, &p, &stranded);
        assert_eq!(c.lost, 0);

        // The same, but the worker died mid-receive: one missing is excused.
        let a_pop = loaded(
            "wq/worker-1",
            10,
            Outcome::Killed { died_in_pop: true },
            a.entries.clone(),
        );
        let (c, _) = check_queue("t", &[&a_pop, &b], KIND_RECV, &p, &none);
        assert_eq!(c.lost, 0);

        // A second take of (1, 0) and a phantom.
        let dup = loaded(
            "wq/worker-2",
            12,
            Outcome::Exited,
            vec![recv(1, 0), recv(2, 2), recv(2, 7)],
        );
        let (c, _) = check_queue("t", &[&a, &b, &dup], KIND_RECV, &p, &none);
        assert_eq!((c.lost, c.duplicated, c.corrupt), (0, 1, 1));
    }

    #[test]
    fn crowd_counts_its_own_findings_and_nothing_else() {
        // A crowd journals no entries: its counts go to the report as they
        // are, and its lossy subscriptions make nothing lost or unaccounted
        // (a killed crowd is not a crash).
        let mut c = loaded("crowd/0", 20, Outcome::Exited, Vec::new());
        (c.corrupt, c.duplicated, c.crowd) = (2, 3, (1000, 64));
        let k = loaded(
            "crowd/1",
            21,
            Outcome::Killed { died_in_pop: false },
            Vec::new(),
        );
        let r = check_epoch(&[&c, &k], &HashSet::new());
        assert_eq!(
            (
                r.lost,
                r.duplicated,
                r.corrupt,
                r.crashed,
                r.unaccounted_drops
            ),
            (0, 3, 2, 0, 0)
        );
        let bad = loaded(
            "crowd/2",
            22,
            Outcome::Crashed("status 2".into()),
            Vec::new(),
        );
        assert_eq!(check_epoch(&[&bad], &HashSet::new()).crashed, 1);
    }

    #[test]
    fn reconcile_accounts_for_every_position() {
        let order = |e: &Entry| (u64::from(e.inc), e.seq);
        // Stream 1 published 0..=9 and stopped; the subscriber received
        // 2, 3, 6, 9: 2 before the first receipt at most, 4 in gaps, 0 after.
        // Stream 2 published 0..=4; received 1: 3 after the last receipt.
        // Stream 3 published 0..=2, nothing received (maybe before we
        // subscribed): up to 3 more.
        let got: Vec<Entry> = [(1, 2), (1, 3), (2, 1), (1, 6), (1, 9)]
            .iter()
            .map(|&(i, s)| recv(i, s))
            .collect();
        let end = |last| End {
            last: Some(last),
            in_doubt: false,
        };
        let ends: HashMap<u64, End> = [(1, end(9)), (2, end(4)), (3, end(2))].into();
        let r = reconcile(&got, &order, &ends, 5, 7);
        assert_eq!(
            (r.received, r.gaps, r.tails, r.head_max),
            (5, 4, 3, 2 + 1 + 3)
        );
        assert_eq!(r.unaccounted, 0, "7 = 4 + 3 exactly");
        assert_eq!(reconcile(&got, &order, &ends, 5, 13).unaccounted, 0);
        assert_eq!(
            reconcile(&got, &order, &ends, 5, 6).unaccounted,
            1,
            "one missed, uncounted"
        );
        assert_eq!(
            reconcile(&got, &order, &ends, 5, 14).unaccounted,
            1,
            "one counted too many"
        );
        assert_eq!(
            reconcile(&got, &order, &ends, 4, 7).unaccounted,
            1,
            "delivered != received"
        );
        // A publisher killed inside a publish loosens both bounds by one.
        let mut ends = ends;
        ends.insert(
            2,
            End {
                last: Some(4),
                in_doubt: true,
            },
        );
        assert_eq!(reconcile(&got, &order, &ends, 5, 6).unaccounted, 0);
        assert_eq!(reconcile(&got, &order, &ends, 5, 14).unaccounted, 0);
        assert_eq!(reconcile(&got, &order, &ends, 5, 5).unaccounted, 1);
    }
}
