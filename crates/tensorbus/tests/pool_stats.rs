//! Issue 17.1, per pool: occupancy high-water mark, loans refused for
//! exhaustion, and size classes that starve while another sits idle, in
//! the broker's `stat`.

mod common;

use std::time::{Duration, Instant};
use tensorbus::error::LoanError;
use tensorbus::{ChannelSpec, DType, Mode, ProducerOptions};

const CONFIG: &str = "[[pools]]\nname = \"small\"\nslot_size = 1024\nslots = 2\n\
                      [[pools]]\nname = \"big\"\nslot_size = 8192\nslots = 8\n";

fn pool<'a>(r: &'a tensorbus::stat::StatReport, name: &str) -> &'a tensorbus::stat::PoolStat {
    r.pools.iter().find(|p| p.name == name).unwrap()
}

#[test]
fn refused_and_spilled_loans_high_water_and_starving_classes() {
    let (_b, client, _) = common::start("pool-stats", "dry", CONFIG);
    let producer = client
        .producer_with(
            "cam",
            ProducerOptions::default().create(ChannelSpec::new(Mode::Broadcast)),
        )
        .unwrap();
    let r = client.stat().unwrap();
    let small = pool(&r, "small");
    assert_eq!((small.loans_refused, small.loans_spilled), (0, 0));
    assert_eq!(small.high_water, 0);
    assert!(!small.starving);

    // Two small tensors fill the small class; the third spills into big.
    let mut held: Vec<_> = (0..3)
        .map(|_| producer.loan(&[100], DType::U8).unwrap())
        .collect();
    let r = client.stat().unwrap();
    let (small, big) = (pool(&r, "small"), pool(&r, "big"));
    assert_eq!(small.loans_spilled, 1, "{small:?}");
    assert_eq!(small.loans_refused, 0);
    assert_eq!(small.high_water, 2);
    assert!(
        small.starving,
        "small runs dry while big is idle: {small:?}"
    );
    assert_eq!((big.loans_spilled, big.loans_refused), (0, 0));
    assert!(!big.starving);

    // Fill big too: the next small loan is refused (counted against small,
    // the tensor's class), and so is a big one (against big).
    for _ in 0..7 {
        held.push(producer.loan(&[100], DType::U8).unwrap());
    }
    assert!(matches!(
        producer.loan(&[100], DType::U8),
        Err(LoanError::PoolExhausted { .. })
    ));
    assert!(matches!(
        producer.loan_timeout(&[4000], DType::U8, Duration::from_millis(20)),
        Err(LoanError::Timeout { .. })
    ));
    let r = client.stat().unwrap();
    let (small, big) = (pool(&r, "small"), pool(&r, "big"));
    assert_eq!((small.loans_refused, small.loans_spilled), (1, 8));
    assert_eq!((big.loans_refused, big.loans_spilled), (1, 0));
    assert_eq!((small.high_water, big.high_water), (2, 8));
    assert!(!small.starving, "no pool is idle now: {small:?}");

    // Everything released: the high-water marks stay, the counts stay, and
    // once nothing ran dry for a second no class starves.
    held.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = client.stat().unwrap();
        if !pool(&r, "small").starving || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (small, big) = (pool(&r, "small"), pool(&r, "big"));
    assert!(!small.starving && !big.starving);
    assert_eq!((small.slots_free, big.slots_free), (2, 8));
    assert_eq!((small.high_water, big.high_water), (2, 8));
    assert_eq!((small.loans_refused, small.loans_spilled), (1, 8));
}
