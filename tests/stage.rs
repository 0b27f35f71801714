//! A stage process changes slots in place and forwards the very same slot.

mod common;
use common::*;

#[test]
fn stage_process_forwards_the_same_slot_modified_in_place() {
    const N: u64 = 200;
    let bus = Bus::start(
        "stage",
        &config(16, &[("s/raw", "workqueue"), ("s/cooked", "broadcast")]),
    );
    let n = N.to_string();
    let consumer = bus
        .spawn(
            "consumer",
            "consumer",
            &[
                "--channel",
                "s/cooked",
                "--policy",
                "block",
                "--verify",
                "plus1",
                "--count",
                &n,
            ],
        )
        .ready();
    let stage = bus
        .spawn(
            "stage",
            "stage",
            &["--input", "s/raw", "--output", "s/cooked"],
        )
        .ready();
    let loaned = slots(&bus.producer("s/raw", N, &["--report"]).finish(), "pub ");
    let got = finish_all_in_order(consumer, N);
    let forwarded = slots(&stage.finish(), "fwd ");
    assert_eq!(loaned.len() as u64, N);
    assert_eq!(forwarded.len() as u64, N);
    for m in msgs(&got) {
        assert_eq!(
            Some(&m.slot),
            loaned.get(&m.seq),
            "seq {}: consumer's slot differs from the one the producer loaned",
            m.seq
        );
        assert_eq!(
            Some(&m.slot),
            forwarded.get(&m.seq),
            "seq {}: stage slot",
            m.seq
        );
    }
    bus.assert_all_free();
}
