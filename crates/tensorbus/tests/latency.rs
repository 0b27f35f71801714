//! Issue 17.1: publish-to-receive latency histograms in shared memory,
//! written by each consumer on its receive path and reported by the
//! broker's stat (`SubscriberStat::latency`).

mod common;

use std::time::Duration;
use tensorbus::{ChannelSpec, DType, Mode, ProducerOptions};

fn config(sample_every: u32) -> String {
    format!(
        "[broker]\nlatency_sample_every = {sample_every}\n\
         [[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 16\n"
    )
}

/// Publishes `n` tensors and receives them; the last one waits `delay`
/// between its publish and its receive.
fn run(sample_every: u32, n: u32, delay: Duration) -> tensorbus::stat::SubscriberStat {
    let (_b, client, _) = common::start(
        "latency",
        &format!("every{sample_every}"),
        &config(sample_every),
    );
    let producer = client
        .producer_with(
            "cam",
            ProducerOptions::default().create(ChannelSpec::new(Mode::Broadcast)),
        )
        .unwrap();
    let consumer = client.consumer("cam").unwrap();
    for i in 0..n {
        let mut t = producer.loan(&[8], DType::U8).unwrap();
        t.fill(i as u8);
        t.publish().unwrap();
        if i + 1 == n {
            std::thread::sleep(delay);
        }
        assert_eq!(consumer.recv().unwrap()[0], i as u8);
    }
    let s = client.stat().unwrap();
    s.channels[0].subscribers[0].clone()
}

#[test]
fn every_receive_is_recorded_with_every_one_sampled() {
    let delay = Duration::from_millis(20);
    let s = run(1, 100, delay);
    let l = s.latency.expect("sampling is on");
    assert_eq!((l.sample_every, l.samples), (1, 100));
    assert_eq!(l.buckets.iter().map(|&(_, n)| n).sum::<u64>(), 100);
    assert!(
        l.p50_ns > 0 && l.p50_ns <= l.p99_ns && l.p99_ns <= l.p999_ns,
        "{l:?}"
    );
    // The delayed tensor waited at least `delay`: the highest non-empty
    // bucket ends above it, and the sum includes it.
    let (top, _) = *l.buckets.last().unwrap();
    assert!(top > delay.as_nanos() as u64, "{l:?}");
    assert!(l.sum_ns >= delay.as_nanos() as u64, "{l:?}");
    // All samples, and the samples since a snapshot (none: `None`).
    assert_eq!(l.quantile_since(None, 1.0), Some(top));
    assert_eq!(l.quantile_since(Some(&l), 0.99), None);
}

#[test]
fn sampling_records_every_nth_receive_and_zero_turns_it_off() {
    let s = run(4, 100, Duration::ZERO);
    let l = s.latency.expect("sampling is on");
    assert_eq!((l.sample_every, l.samples), (4, 25));
    let s = run(6, 64, Duration::ZERO);
    assert_eq!(s.latency.map(|l| (l.sample_every, l.samples)), Some((8, 8)));
    let s = run(0, 10, Duration::ZERO);
    assert_eq!(s.delivered, 10);
    assert!(s.latency.is_none(), "{s:?}");
}
