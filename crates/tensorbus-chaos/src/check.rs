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
}

/// What one incarnation journaled.
struct Loaded {
    rec: Record,
    entries: Vec<Entry>,
    published: u64,
    publishing: Option<u64>,
    corrupt: u64,
    not_exclusive: u64,
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
    fn of(loaded: &[Loaded], channel: &str) -> Published {
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
    let missing_keys: Vec<(u32, u64)> = published
        .confirmed()
        .filter(|k| !takes.contains_key(k))
        .collect();
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
                not_exclusive: j.not_exclusive(),
            })
        })
        .collect()
}

/// Runs every check on the journals of `records`.
pub fn check(records: &[Record]) -> Result<Report, String> {
    let loaded = load(records)?;
    let mut total = Counts::default();
    let role = |l: &Loaded| &ROLES[l.rec.role];
    let of = |kind: Kind, channel: &str| -> Vec<&Loaded> {
        loaded
            .iter()
            .filter(|l| role(l).kind == kind && role(l).channel == channel)
            .collect()
    };

    // Library-reported corruption and stage releases, wherever they happened.
    for l in &loaded {
        total.corrupt += l.corrupt;
        if l.corrupt > 0 {
            eprintln!(
                "chaos: CORRUPT {} (inc {}): {} RecvError::Corrupted",
                role(l).name,
                l.rec.inc,
                l.corrupt
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
    let bc = Published::of(&loaded, "bc");
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
    let wq = Published::of(&loaded, "wq");
    let (c, _) = check_queue("wq", &of(Kind::Worker, "wq"), KIND_RECV, &wq);
    total.add(&c);

    // Pipeline input: the stages are the workers.
    let pin = Published::of(&loaded, "pipe/in");
    let stages = of(Kind::Stage, "pipe/in");
    let (c, _) = check_queue("pipe/in", &stages, KIND_TOOK, &pin);
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

    let crashed = loaded
        .iter()
        .filter(|l| matches!(l.rec.outcome, Outcome::Crashed(_) | Outcome::Running))
        .count() as u64;
    for l in &loaded {
        let survivor_gone = role(l).survivor && l.rec.outcome != Outcome::Exited;
        if survivor_gone {
            eprintln!(
                "chaos: survivor {} did not survive ({:?}); its completeness check was skipped",
                role(l).name,
                l.rec.outcome
            );
        }
    }
    Ok(Report {
        lost: total.lost,
        duplicated: total.duplicated,
        corrupt: total.corrupt,
        crashed,
    })
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
            },
            entries,
            published: 0,
            publishing: None,
            corrupt: 0,
            not_exclusive: 0,
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
        let (c, _) = check_queue("t", &[&a, &b], KIND_RECV, &p);
        assert_eq!((c.lost, c.duplicated, c.corrupt), (1, 0, 0));

        // The same, but the worker died mid-receive: one missing is excused.
        let a_pop = loaded(
            "wq/worker-1",
            10,
            Outcome::Killed { died_in_pop: true },
            a.entries.clone(),
        );
        let (c, _) = check_queue("t", &[&a_pop, &b], KIND_RECV, &p);
        assert_eq!(c.lost, 0);

        // A second take of (1, 0) and a phantom.
        let dup = loaded(
            "wq/worker-2",
            12,
            Outcome::Exited,
            vec![recv(1, 0), recv(2, 2), recv(2, 7)],
        );
        let (c, _) = check_queue("t", &[&a, &b, &dup], KIND_RECV, &p);
        assert_eq!((c.lost, c.duplicated, c.corrupt), (0, 1, 1));
    }
}
