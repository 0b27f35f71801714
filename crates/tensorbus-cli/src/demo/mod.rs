//! `tensorbus demo`: camera -> preprocess -> model, as three processes.
//!
//! * camera (`demo-camera`) loans `[1080, 1920, 3]` u8 frames on
//!   `camera/raw`, draws a moving test pattern straight into the shared slot
//!   and publishes, paced to `--fps`.
//! * preprocess (`demo-preprocess`) reads each frame in place, loans a
//!   `[1, 3, 640, 640]` f32 tensor on `model/input` and writes the resized,
//!   ImageNet-normalised NCHW tensor directly into it.
//! * consumer (`demo-consumer`) checks every tensor against values it
//!   recomputes from the frame index alone, measures camera-to-model latency
//!   on the shared CLOCK_MONOTONIC and prints a JSON summary line.
//!
//! The parent ([`run`]) starts an embedded broker on a private socket (or
//! uses `--socket`), supervises the children and prints one summary line.

pub mod camera;
pub mod consumer;
mod parent;
pub mod pattern;
pub mod preprocess;

use crate::CliError;
use std::path::PathBuf;
use std::time::Duration;
use tensorbus::{ChannelSpec, Client, ConsumerOptions, Mode, Policy, ProducerOptions};

pub use parent::run;

/// The camera's output channel.
pub const RAW: &str = "camera/raw";
/// The preprocessing stage's output channel.
pub const INPUT: &str = "model/input";
/// Ring depth of the demo's subscriptions.
pub const DEPTH: u32 = 4;
/// How long a role waits for its first tensor (the others are still starting).
pub const FIRST_WAIT: Duration = Duration::from_secs(30);
/// How long a role waits for each later tensor or a free slot.
pub const NEXT_WAIT: Duration = Duration::from_secs(10);

/// Arguments of `tensorbus demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Frames the camera publishes (at least 1).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub frames: u64,
    /// Camera frame rate, 0.001 to 1000000; 0 = as fast as the pipeline goes.
    #[arg(long, default_value_t = 30.0, value_parser = crate::parse_fps)]
    pub fps: f64,
    /// Use the broker at this socket (channels are created if missing)
    /// instead of starting a private one.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print only the final summary line.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Arguments of the hidden per-process roles.
#[derive(clap::Args, Debug, Clone)]
pub struct RoleArgs {
    /// Broker socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Frames in the run.
    #[arg(long)]
    pub frames: u64,
    /// Camera frame rate (0 = unpaced).
    #[arg(long, default_value_t = 0.0, value_parser = crate::parse_fps)]
    pub fps: f64,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The private broker's configuration: two pools sized for 1080p RGB frames
/// and 640x640 f32 model inputs, and the two lossless broadcast channels.
pub fn broker_config() -> tensorbus_broker::Config {
    tensorbus_broker::Config::from_toml(
        r#"
        [[pools]]
        name = "frames"      # 1920 x 1080 x 3 u8 = 6.2 MB
        slot_size = "8MiB"
        slots = 8
        [[pools]]
        name = "tensors"     # 1 x 3 x 640 x 640 f32 = 4.9 MB
        slot_size = "5MiB"
        slots = 8
        [[channels]]
        name = "camera/raw"
        pools = ["frames"]
        mode = "broadcast"
        policy = "block"
        depth = 4
        [[channels]]
        name = "model/input"
        pools = ["tensors"]
        mode = "broadcast"
        policy = "block"
        depth = 4
        "#,
    )
    .expect("the built-in demo config is valid")
}

/// Connects a role to the broker and makes it die with the parent.
pub fn connect(args: &RoleArgs, role: &str) -> Result<Client, CliError> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process; the
    // variadic argument is the signal number, as the call expects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    Ok(Client::connect_to(Some(&args.socket), role)?)
}

/// The spec a role creates `channel` with if the broker lacks it: lossless
/// broadcast, on `pool` if the broker has such a pool (else any pool).
fn spec(client: &Client, pool: &str) -> ChannelSpec {
    let has = client.pools().iter().any(|p| p.name == pool);
    let spec = ChannelSpec::new(Mode::Broadcast)
        .depth(DEPTH)
        .policy(Policy::Block);
    if has {
        spec.pools(&[pool])
    } else {
        spec
    }
}

/// Options for a demo producer (its channel is created on `pool` if missing).
pub fn producer_options(client: &Client, pool: &str) -> ProducerOptions {
    ProducerOptions::default().create(spec(client, pool))
}

/// Options for a demo subscriber: lossless, depth 4 (its channel is created
/// on `pool` if missing).
pub fn consumer_options(client: &Client, pool: &str) -> ConsumerOptions {
    ConsumerOptions::default()
        .end_of_stream(false)
        .create(spec(client, pool))
        .policy(Policy::Block)
        .depth(DEPTH)
}

/// The `p`-quantile (0..=1, nearest rank) of sorted values; 0 when empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid() {
        let c = broker_config();
        assert_eq!(c.pools.len(), 2);
        assert!(c.pools[0].slot_size.0 >= (pattern::W * pattern::H * 3) as u64);
        assert!(c.pools[1].slot_size.0 >= (pattern::PLANE * 3 * 4) as u64);
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
