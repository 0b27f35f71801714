//! Opening producers, consumers and stages.

use crate::client::{open_error, Client};
use crate::consumer::{Consumer, ConsumerCore, WaitStrategy};
use crate::error::{OpenError, RequestError};
use crate::producer::Producer;
use crate::stage::Stage;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use tensorbus_core::proto::{self, Request, Response};
use tensorbus_core::{Mode, Policy};

/// How to create a channel at run time when it does not exist yet
/// ([`ProducerOptions::create`], [`ConsumerOptions::create`]): its mode,
/// the pools it may loan from, and the defaults for its subscribers.
///
/// ```no_run
/// use tensorbus::{ChannelSpec, Mode, Policy, ProducerOptions};
/// # let client = tensorbus::Client::connect()?;
/// let spec = ChannelSpec::new(Mode::Broadcast).pools(&["frames"]).depth(4).policy(Policy::Latest);
/// let producer = client.producer_with("camera/raw", ProducerOptions::default().create(spec))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    mode: Mode,
    pools: Vec<String>,
    depth: Option<u32>,
    policy: Option<Policy>,
}

impl Default for ChannelSpec {
    fn default() -> Self {
        ChannelSpec::new(Mode::Broadcast)
    }
}

impl ChannelSpec {
    /// A channel of `mode` that may use every pool, with the broker's
    /// default depth and policy.
    pub fn new(mode: Mode) -> ChannelSpec {
        ChannelSpec {
            mode,
            pools: Vec::new(),
            depth: None,
            policy: None,
        }
    }
    /// The pools the channel may loan from, by name (empty: every pool).
    pub fn pools(mut self, pools: &[&str]) -> Self {
        self.pools = pools.iter().map(|s| s.to_string()).collect();
        self
    }
    /// The ring depth of subscribers that do not ask for one.
    pub fn depth(mut self, depth: u32) -> Self {
        self.depth = Some(depth);
        self
    }
    /// The policy of subscribers that do not ask for one.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }
    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The wire form, named `channel`.
    fn named(&self, channel: &str) -> proto::ChannelSpec {
        proto::ChannelSpec {
            name: channel.to_owned(),
            pools: self.pools.clone(),
            mode: self.mode,
            depth: self.depth,
            policy: self.policy,
        }
    }
}

/// Options for [`Client::producer_with`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ProducerOptions {
    /// Create the channel with this spec if it does not exist yet.
    pub create: Option<ChannelSpec>,
}

impl ProducerOptions {
    /// Creates the channel at run time if it is missing.
    pub fn create(mut self, spec: ChannelSpec) -> Self {
        self.create = Some(spec);
        self
    }
}

/// Options for [`Client::consumer_with`] and [`Client::stage_with`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Backpressure policy (channel default if `None`).
    pub policy: Option<Policy>,
    /// Ring depth (channel default if `None`).
    pub depth: Option<u32>,
    /// How `recv` waits.
    pub wait: WaitStrategy,
    /// Create the channel with this spec if it does not exist yet.
    pub create: Option<ChannelSpec>,
}

impl ConsumerOptions {
    /// Sets the policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }
    /// Sets the ring depth.
    pub fn depth(mut self, depth: u32) -> Self {
        self.depth = Some(depth);
        self
    }
    /// Sets the wait strategy.
    pub fn wait(mut self, wait: WaitStrategy) -> Self {
        self.wait = wait;
        self
    }
    /// Creates the channel at run time if it is missing.
    pub fn create(mut self, spec: ChannelSpec) -> Self {
        self.create = Some(spec);
        self
    }
}

impl Client {
    /// Opens a producer on an existing channel.
    pub fn producer(&self, channel: &str) -> Result<Producer, OpenError> {
        self.producer_with(channel, ProducerOptions::default())
    }

    /// Opens a producer with options (e.g. create the channel at run time).
    pub fn producer_with(
        &self,
        channel: &str,
        opts: ProducerOptions,
    ) -> Result<Producer, OpenError> {
        let req = Request::OpenProducer {
            channel: channel.to_owned(),
            create: opts.create.as_ref().map(|s| s.named(channel)),
        };
        let (resp, fds) = self.inner.request(&req)?;
        match resp {
            Response::Producer {
                handle,
                bit,
                row,
                channel: info,
            } => {
                let pools = match self.inner.map_pools(&info.pools, fds, true) {
                    Ok(p) => p,
                    Err(e) => {
                        self.inner.close_handle(handle);
                        return Err(e);
                    }
                };
                Ok(Producer::new(self, handle, bit, row, info, pools))
            }
            Response::Error { kind, message } => {
                Err(open_error(kind, message, channel, self.known_channels()))
            }
            other => Err(RequestError::Protocol(format!("unexpected reply {other:?}")).into()),
        }
    }

    /// Subscribes to a channel with its default policy and depth.
    pub fn consumer(&self, channel: &str) -> Result<Consumer, OpenError> {
        self.consumer_with(channel, ConsumerOptions::default())
    }

    /// Subscribes with options (policy, depth, wait strategy).
    pub fn consumer_with(
        &self,
        channel: &str,
        opts: ConsumerOptions,
    ) -> Result<Consumer, OpenError> {
        self.open_consumer(channel, opts, false)
    }

    fn open_consumer(
        &self,
        channel: &str,
        opts: ConsumerOptions,
        writable: bool,
    ) -> Result<Consumer, OpenError> {
        let req = Request::OpenConsumer {
            channel: channel.to_owned(),
            policy: opts.policy,
            depth: opts.depth,
            writable,
            create: opts.create.as_ref().map(|s| s.named(channel)),
        };
        let (resp, fds) = self.inner.request(&req)?;
        match resp {
            Response::Consumer {
                handle,
                bit,
                sub,
                policy,
                depth,
                channel: info,
            } => {
                let pools = match self.inner.map_pools(&info.pools, fds, writable) {
                    Ok(p) => p,
                    Err(e) => {
                        self.inner.close_handle(handle);
                        return Err(e);
                    }
                };
                let core = ConsumerCore {
                    inner: self.inner.clone(),
                    handle,
                    bit: 1u64 << (bit & 63),
                    sub: sub as usize,
                    channel: info,
                    policy,
                    depth,
                    pools,
                    cursor: AtomicUsize::new(0),
                    taking: AtomicBool::new(false),
                    detached: AtomicBool::new(false),
                    readiness: std::sync::OnceLock::new(),
                };
                Ok(Consumer::new(core, opts.wait))
            }
            Response::Error { kind, message } => {
                Err(open_error(kind, message, channel, self.known_channels()))
            }
            other => Err(RequestError::Protocol(format!("unexpected reply {other:?}")).into()),
        }
    }

    /// Opens a stage: an exclusive, writable subscription to the work-queue
    /// channel `input` (lossless `block` policy) plus a producer on `output`.
    pub fn stage(&self, input: &str, output: &str) -> Result<Stage, OpenError> {
        self.stage_with(
            input,
            output,
            ConsumerOptions::default().policy(Policy::Block),
        )
    }

    /// Opens a stage with explicit input options.
    pub fn stage_with(
        &self,
        input: &str,
        output: &str,
        opts: ConsumerOptions,
    ) -> Result<Stage, OpenError> {
        let input = self.open_consumer(input, opts, true)?;
        if input.core.channel.mode != Mode::Workqueue {
            return Err(OpenError::InvalidArgument(format!(
                "stage input {:?} is a broadcast channel; a stage changes slots in place, so its input must be a workqueue channel (each tensor goes to one worker)",
                input.core.channel.name
            )));
        }
        let output = self.producer(output)?;
        Ok(Stage::new(input, output))
    }
}
