//! Issue 14: random call sequences of producers and late subscribers on a
//! channel with history, checked against a model after every call: what
//! each consumer receives (the history it joined with, then everything
//! published while it was subscribed), when it sees end of stream, what a
//! publish reports, and that no slot leaks. Seeds: `TENSORBUS_RANDOM_SEED`
//! (one seed) or 1..=24; `TENSORBUS_RANDOM_CALLS` calls each (default 400).

use std::collections::VecDeque;
use std::time::Duration;
use tensorbus::error::TryRecvError;
use tensorbus::{Consumer, ConsumerOptions, DType, Producer, TensorView};

mod common;

const HISTORY: usize = 3;
const DEPTH: usize = 16;
const SLOTS: u32 = 256;
const CONFIG: &str = r#"
    [[pools]]
    name = "p"
    slot_size = 64
    slots = 256
    [[channels]]
    name = "m"
    history = 3
    depth = 16
"#;

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The model of one channel.
/// What one consumer must receive: the history it joined with first (the
/// broker's row comes first), then each producer's tensors in that
/// producer's order (rows of different producers interleave).
struct Expect {
    consumer: Consumer,
    history: VecDeque<u64>,
    live: Vec<(u64, VecDeque<u64>)>,
    eos: bool,
}

impl Expect {
    fn is_empty(&self) -> bool {
        self.history.is_empty() && self.live.iter().all(|(_, q)| q.is_empty())
    }
    fn len(&self) -> usize {
        self.history.len() + self.live.iter().map(|(_, q)| q.len()).sum::<usize>()
    }
    /// Takes `got` if it is what may come next.
    fn take(&mut self, got: u64) -> bool {
        if !self.history.is_empty() {
            return self.history.pop_front() == Some(got);
        }
        for (_, q) in &mut self.live {
            if q.front() == Some(&got) {
                q.pop_front();
                return true;
            }
        }
        false
    }
}

#[derive(Default)]
struct Model {
    /// Per open producer: its id and its last `HISTORY` values.
    producers: Vec<(Producer, u64, VecDeque<u64>)>,
    /// Kept from producers that closed (the broker's row of the history).
    closed: VecDeque<u64>,
    /// Per consumer: what it must receive.
    consumers: Vec<Expect>,
    /// The last producer closed (and none opened since).
    ended: bool,
    next: u64,
    next_producer: u64,
}

impl Model {
    fn kept(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .producers
            .iter()
            .flat_map(|(_, _, h)| h.iter().copied())
            .chain(self.closed.iter().copied())
            .collect();
        all.sort_unstable();
        all
    }
}

fn push_kept(q: &mut VecDeque<u64>, v: u64) {
    if q.len() == HISTORY {
        q.pop_front();
    }
    q.push_back(v);
}

fn run(seed: u64, calls: usize) {
    let (_b, client, _) = common::start("ljmodel", &seed.to_string(), CONFIG);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut m = Model::default();
    for step in 0..calls {
        let ctx = format!("seed {seed} step {step}");
        match rng.below(10) {
            0 if m.producers.len() < 3 => {
                // A closed producer's row stays taken until every consumer
                // drained its ring there: rows can run out meanwhile.
                let p = match client.producer("m") {
                    Ok(p) => p,
                    Err(tensorbus::error::OpenError::LimitReached(_)) => continue,
                    Err(e) => panic!("{ctx}: {e}"),
                };
                m.next_producer += 1;
                m.producers.push((p, m.next_producer, VecDeque::new()));
                m.ended = false;
            }
            1 if !m.producers.is_empty() => {
                let (p, _, kept) = m.producers.remove(rng.below(m.producers.len()));
                drop(p);
                for v in kept {
                    push_kept(&mut m.closed, v);
                }
                m.ended = m.producers.is_empty();
            }
            2..=4 if !m.producers.is_empty() => {
                // Only when no consumer's ring is full (block would wait).
                // (A consumer's rings: its row-0 ring holds its history, each
                // producer's ring at most DEPTH; the model counts per consumer
                // conservatively.)
                if m.consumers.iter().any(|e| e.len() >= DEPTH) {
                    continue;
                }
                let k = rng.below(m.producers.len());
                let v = m.next;
                m.next += 1;
                let (p, id, kept) = &mut m.producers[k];
                let id = *id;
                let mut t = p.loan(&[8], DType::U8).unwrap();
                t.as_mut_bytes().copy_from_slice(&v.to_le_bytes());
                let published = t.publish().unwrap();
                push_kept(kept, v);
                assert_eq!(published.delivered as usize, m.consumers.len(), "{ctx}");
                assert_eq!(published.dropped, 0, "{ctx}");
                for e in &mut m.consumers {
                    match e.live.iter_mut().find(|(p, _)| *p == id) {
                        Some((_, q)) => q.push_back(v),
                        None => e.live.push((id, VecDeque::from([v]))),
                    }
                }
            }
            5 if m.consumers.len() < 3 => {
                let eos = rng.below(4) != 0;
                let c = client
                    .consumer_with("m", ConsumerOptions::default().end_of_stream(eos))
                    .unwrap();
                let kept = m.kept();
                let start = kept.len().saturating_sub(HISTORY);
                if std::env::var_os("TENSORBUS_MODEL_TRACE").is_some() {
                    eprintln!("{ctx}: join expects {:?} of {kept:?}", &kept[start..]);
                }
                m.consumers.push(Expect {
                    consumer: c,
                    history: kept[start..].iter().copied().collect(),
                    live: Vec::new(),
                    eos,
                });
            }
            6 if !m.consumers.is_empty() => {
                let e = m.consumers.remove(rng.below(m.consumers.len()));
                drop(e);
            }
            _ if !m.consumers.is_empty() => {
                let k = rng.below(m.consumers.len());
                let ended = m.ended;
                let e = &mut m.consumers[k];
                match e.consumer.try_recv() {
                    Ok(t) => {
                        let got = u64::from_le_bytes(t[..8].try_into().unwrap());
                        if std::env::var_os("TENSORBUS_MODEL_TRACE").is_some() {
                            eprintln!("{ctx}: consumer {k} got {got}");
                        }
                        assert!(e.take(got), "{ctx}: got {got}, not what may come next");
                    }
                    Err(TryRecvError::EndOfStream) => {
                        assert!(
                            e.is_empty(),
                            "{ctx}: end of stream before {} queued",
                            e.len()
                        );
                        assert!(ended && e.eos, "{ctx}: end of stream while not ended");
                    }
                    Err(TryRecvError::Empty) => {
                        assert!(e.is_empty(), "{ctx}: empty with {} queued", e.len());
                        assert!(!(ended && e.eos), "{ctx}: no end of stream although ended");
                    }
                    Err(err) => panic!("{ctx}: {err}"),
                }
            }
            _ => {}
        }
    }
    // Everything queued arrives, each producer's in order; the history
    // came in timestamp order.
    for e in &mut m.consumers {
        let mut last_ts = 0;
        let in_history = e.history.len();
        for i in 0..e.len() {
            let t = e.consumer.recv_timeout(Duration::from_secs(5)).unwrap();
            let got = u64::from_le_bytes(t[..8].try_into().unwrap());
            assert!(e.take(got), "seed {seed}: got {got} at the end");
            if i < in_history {
                assert!(t.timestamp_ns() >= last_ts);
                last_ts = t.timestamp_ns();
            }
        }
    }
    let held = m.producers.iter().map(|(_, _, h)| h.len()).sum::<usize>() + m.closed.len();
    let stat = client.stat().unwrap();
    let ch = stat.channels.iter().find(|c| c.name == "m").unwrap();
    assert_eq!(ch.history_held as usize, held, "seed {seed}: history holds");
    // Closing the producers moves what they kept to the broker's row (at
    // most HISTORY in all).
    let mut closed = std::mem::take(&mut m.closed);
    for (_, _, kept) in &m.producers {
        for &v in kept {
            push_kept(&mut closed, v);
        }
    }
    let held = closed.len();
    drop(m);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let free = client.stat().unwrap().pools[0].slots_free;
        if free as usize == SLOTS as usize - held {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "seed {seed}: {free} free, {held} kept"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn random_producers_and_late_subscribers_match_the_model() {
    let calls = std::env::var("TENSORBUS_RANDOM_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    match std::env::var("TENSORBUS_RANDOM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => run(seed, calls),
        None => {
            for seed in 1..=24 {
                run(seed, calls);
            }
        }
    }
}
