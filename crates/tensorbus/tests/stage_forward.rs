//! `StagedTensor::check_forward[_to]`: whether a forward would succeed,
//! without consuming the tensor (a failed forward releases the slot).

use tensorbus::error::PublishError;
use tensorbus::TensorView;
use tensorbus::{Client, DType};

mod common;

#[test]
fn check_forward_to_reports_without_consuming() {
    let (_broker, client, sock) = common::start(
        "fwd",
        "check",
        r#"
        [[pools]]
        name = "a"
        slot_size = 4096
        slots = 4
        [[pools]]
        name = "b"
        slot_size = 4096
        slots = 4
        [[channels]]
        name = "in"
        mode = "workqueue"
        pools = ["a"]
        [[channels]]
        name = "out"
        pools = ["a"]
        [[channels]]
        name = "other-pool"
        pools = ["b"]
        "#,
    );
    let stage = client.stage("in", "out").unwrap();
    let out = client.consumer("out").unwrap();
    let wrong = client.producer("other-pool").unwrap();
    let other_client = Client::connect_to(Some(&sock), "fwd2").unwrap();
    let foreign = other_client.producer("out").unwrap();
    let input = client.producer("in").unwrap();
    input.loan(&[4], DType::U8).unwrap().publish().unwrap();

    let t = stage.try_recv_mut().unwrap();
    assert!(t.check_forward().is_ok());
    assert!(matches!(
        t.check_forward_to(&wrong),
        Err(PublishError::PoolNotAllowed { ref pool, ref channel }) if pool == "a" && channel == "other-pool"
    ));
    assert!(matches!(
        t.check_forward_to(&foreign),
        Err(PublishError::ForeignClient)
    ));
    // still ours after the checks: forward it where it fits
    let p = t.forward().unwrap();
    assert_eq!(p.delivered, 1);
    assert_eq!(out.try_recv().unwrap().seq(), p.seq);

    // a forward that does not fit releases the slot (as documented)
    input.loan(&[4], DType::U8).unwrap().publish().unwrap();
    let t = stage.try_recv_mut().unwrap();
    assert!(t.forward_to(&wrong).is_err());
    let stat = client.stat().unwrap();
    let free: u32 = stat.pools.iter().map(|p| p.slots_free).sum();
    let total: u32 = stat.pools.iter().map(|p| p.slots_total).sum();
    assert_eq!(free, total);
}
