//! `Consumer::dropped` and `Consumer::received`: the subscriber's shared
//! counters, as `tensorbus stat` shows them, readable by the consumer.

use tensorbus::{ConsumerOptions, DType, Policy};

mod common;

const CONFIG: &str = r#"
    [[pools]]
    name = "p"
    slot_size = 4096
    slots = 16
    [[channels]]
    name = "c"
"#;

#[test]
fn lossy_consumers_count_what_they_missed() {
    let (_broker, client, _) = common::start("counters", "lossy", CONFIG);
    let opts = |p: Policy, d: u32| ConsumerOptions::default().policy(p).depth(d);
    let oldest = client
        .consumer_with("c", opts(Policy::DropOldest, 2))
        .unwrap();
    let newest = client
        .consumer_with("c", opts(Policy::DropNewest, 2))
        .unwrap();
    let latest = client.consumer_with("c", opts(Policy::Latest, 1)).unwrap();
    let block = client.consumer_with("c", opts(Policy::Block, 8)).unwrap();
    let producer = client.producer("c").unwrap();
    for i in 0..5u8 {
        let mut t = producer.loan(&[1], DType::U8).unwrap();
        t.as_mut_bytes()[0] = i;
        t.publish().unwrap();
    }
    // Five published, ring depth 2: drop_oldest keeps the last two, drop_newest the first two.
    assert_eq!(oldest.dropped(), 3);
    assert_eq!(newest.dropped(), 3);
    assert_eq!(latest.dropped(), 4);
    assert_eq!(block.dropped(), 0);
    assert_eq!(oldest.try_recv().unwrap()[0], 3);
    assert_eq!(newest.try_recv().unwrap()[0], 0);
    assert_eq!(latest.try_recv().unwrap()[0], 4);
    for c in [&oldest, &newest, &latest] {
        assert_eq!(c.received(), 1);
    }
    let mut seen = 0;
    while block.try_recv().is_ok() {
        seen += 1;
    }
    assert_eq!((seen, block.received(), block.dropped()), (5, 5, 0));
    // The counters are the ones `stat` reports.
    let stat = client.stat().unwrap();
    let subs = &stat
        .channels
        .iter()
        .find(|c| c.name == "c")
        .unwrap()
        .subscribers;
    let mut dropped: Vec<u64> = subs.iter().map(|s| s.dropped).collect();
    dropped.sort_unstable();
    assert_eq!(dropped, vec![0, 3, 3, 4]);
}
