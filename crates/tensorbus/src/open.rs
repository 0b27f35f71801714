//! Opening producers, consumers and stages.

use crate::client::{open_error, Client};
use crate::consumer::{Consumer, WaitStrategy};
use crate::error::{OpenError, RequestError};
use crate::producer::Producer;
use crate::stage::Stage;
use std::cell::Cell;
use tensorbus_core::proto::{ChannelSpec, Request, Response};
use tensorbus_core::{Mode, Policy};

/// Options for [`Client::producer_with`].
#[derive(Clone, Debug, Default)]
pub struct ProducerOptions {
    /// Create the channel with this spec if it does not exist yet.
    pub create: Option<ChannelSpec>,
}

impl ProducerOptions {
    /// Creates the channel at run time if missing, with `mode` and the
    /// given pools (empty = all pools).
    pub fn create(mut self, mode: Mode, pools: &[&str]) -> Self {
        self.create = Some(spec(mode, pools));
        self
    }

    /// Creates the channel at run time if missing, with every option of
    /// `spec` (its `name` is replaced by the channel being opened).
    pub fn create_with(mut self, spec: ChannelSpec) -> Self {
        self.create = Some(spec);
        self
    }
}

/// Options for [`Client::consumer_with`].
#[derive(Clone, Debug, Default)]
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
    /// Creates the channel at run time if missing.
    pub fn create(mut self, mode: Mode, pools: &[&str]) -> Self {
        self.create = Some(spec(mode, pools));
        self
    }

    /// Creates the channel at run time if missing, with every option of
    /// `spec` (its `name` is replaced by the channel being opened).
    pub fn create_with(mut self, spec: ChannelSpec) -> Self {
        self.create = Some(spec);
        self
    }
}

/// A channel spec with `mode` and `pools` and the broker's defaults otherwise.
fn spec(mode: Mode, pools: &[&str]) -> ChannelSpec {
    ChannelSpec {
        name: String::new(),
        pools: pools.iter().map(|s| s.to_string()).collect(),
        mode,
        depth: None,
        policy: None,
    }
}

fn named(spec: Option<ChannelSpec>, channel: &str) -> Option<ChannelSpec> {
    spec.map(|mut s| {
        s.name = channel.to_owned();
        s
    })
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
            create: named(opts.create, channel),
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
            create: named(opts.create, channel),
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
                Ok(Consumer {
                    inner: self.inner.clone(),
                    handle,
                    bit: 1u64 << (bit & 63),
                    sub: sub as usize,
                    channel: info,
                    policy,
                    depth,
                    pools,
                    cursor: Cell::new(0),
                    detached: Cell::new(false),
                    wait: opts.wait,
                    readiness: std::sync::OnceLock::new(),
                })
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
        if input.channel.mode != Mode::Workqueue {
            return Err(OpenError::InvalidArgument(format!(
                "stage input {:?} is a broadcast channel; a stage changes slots in place, so its input must be a workqueue channel (each tensor goes to one worker)",
                input.channel.name
            )));
        }
        let output = self.producer(output)?;
        Ok(Stage {
            input,
            output,
            held_back: None,
        })
    }
}
