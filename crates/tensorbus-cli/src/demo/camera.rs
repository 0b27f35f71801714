//! Demo role `camera`: draws 1080p RGB frames straight into loaned slots.

use super::pattern::{row_shift, stripe_row, C, H, W};
use super::{connect, producer_options, RoleArgs, NEXT_WAIT, RAW};
use crate::{fail, CliError};
use std::time::{Duration, Instant};
use tensorbus::{Client, DType};
use tensorbus_shm::monotonic_ns;

/// How long the camera waits for its downstream subscribers to appear.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes `--frames` frames on `camera/raw`, paced to `--fps`.
pub fn run(args: RoleArgs) -> Result<(), CliError> {
    let client = connect(&args, "demo-camera")?;
    let producer = client.producer_with(RAW, producer_options(&client, "frames"))?;
    wait_for_subscribers(&client)?;
    let row = stripe_row();
    let period_ns = if args.fps > 0.0 {
        (1e9 / args.fps) as u64
    } else {
        0
    };
    let start = monotonic_ns();
    for i in 0..args.frames {
        let due = start + i * period_ns;
        let now = monotonic_ns();
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        let mut frame =
            producer.loan_timeout(&[H as u32, W as u32, C as u32], DType::U8, NEXT_WAIT)?;
        for (y, dst) in frame.chunks_exact_mut(W * C).enumerate() {
            let s = row_shift(y, i) * C;
            dst.copy_from_slice(&row[s..s + W * C]);
        }
        frame.set_user_header(&i.to_le_bytes())?;
        frame.publish()?;
    }
    Ok(())
}

/// Waits until `camera/raw` and `model/input` both have a subscriber, so no
/// frame is published to nobody.
fn wait_for_subscribers(client: &Client) -> Result<(), CliError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let report = client.stat()?;
        let subscribed = |name: &str| {
            report
                .channels
                .iter()
                .any(|c| c.name == name && !c.subscribers.is_empty())
        };
        if subscribed(RAW) && subscribed(super::INPUT) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return fail(format!(
                "no subscribers on {RAW} and {} after {READY_TIMEOUT:?}; did the other demo processes start?",
                super::INPUT
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
