//! Opening producers, consumers and stages.

use crate::client::{open_error, Client};
use crate::consumer::{Consumer, ConsumerCore, WaitStrategy};
use crate::error::{OpenError, RequestError};
use crate::producer::Producer;
use crate::stage::Stage;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};
use tensorbus_core::proto::{self, Request, Response};
use tensorbus_core::wide::HolderId;
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
    history: u32,
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
            history: 0,
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
    /// Keeps the latest `n` tensors for subscribers that join later: a late
    /// subscriber first receives them, oldest first (all `n`, or its newest
    /// `depth` under `drop_oldest` and the newest one under `latest`).
    /// The kept tensors hold slots of the channel's pools until newer ones
    /// replace them, also after their producer closed (iceoryx2 calls this
    /// history, ROS 2 transient-local durability). Broadcast channels only;
    /// at most the broker's `limits.ring_capacity`; 0 (the default) keeps
    /// nothing.
    ///
    /// ```no_run
    /// use tensorbus::{ChannelSpec, Mode, ProducerOptions};
    /// # let client = tensorbus::Client::connect()?;
    /// // A calibration tensor for whoever starts later.
    /// let spec = ChannelSpec::new(Mode::Broadcast).history(1);
    /// let calib = client.producer_with("camera/calibration", ProducerOptions::default().create(spec))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn history(mut self, n: u32) -> Self {
        self.history = n;
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
            history: self.history,
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
#[derive(Clone, Debug)]
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
    /// Wait this long for a channel that does not exist yet (`None`: fail
    /// at once with [`OpenError::ChannelNotFound`]).
    pub wait_for_channel: Option<Duration>,
    /// Report end of stream (the default: true).
    pub end_of_stream: bool,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            policy: None,
            depth: None,
            wait: WaitStrategy::default(),
            create: None,
            wait_for_channel: None,
            end_of_stream: true,
        }
    }
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
    /// Waits up to `timeout` ([`Duration::MAX`]: forever) for a channel
    /// that does not exist yet, instead of failing. The subscription is
    /// registered at once, so the producer that creates the channel
    /// delivers to it from its first tensor on; the open returns when the
    /// channel exists, or fails with [`OpenError::WaitTimeout`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tensorbus::ConsumerOptions;
    /// # let client = tensorbus::Client::connect()?;
    /// // Start the consumer first; `tensorbus pub --create` may come later.
    /// let frames = client.consumer_with("camera/raw",
    ///     ConsumerOptions::default().wait_for_channel(Duration::from_secs(30)))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_for_channel(mut self, timeout: Duration) -> Self {
        self.wait_for_channel = Some(timeout);
        self
    }
    /// Whether receives report end of stream ([`crate::error::RecvError::EndOfStream`]):
    /// once the channel's last producer closed cleanly (not a crash) and
    /// everything queued was received. On by default; a long-lived service
    /// that outlives its producers turns it off and keeps waiting.
    ///
    /// ```no_run
    /// use tensorbus::{error::RecvError, ConsumerOptions};
    /// # let client = tensorbus::Client::connect()?;
    /// let frames = client.consumer("camera/raw")?;
    /// loop {
    ///     match frames.recv() {
    ///         Ok(t) => println!("seq {}", tensorbus::TensorView::seq(&t)),
    ///         Err(RecvError::EndOfStream) => break,   // the camera closed
    ///         Err(e) => return Err(e.into()),
    ///     }
    /// }
    /// let service = client.consumer_with("camera/raw", ConsumerOptions::default().end_of_stream(false))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn end_of_stream(mut self, on: bool) -> Self {
        self.end_of_stream = on;
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
        self.open_consumer(channel, opts, false, || false)
    }

    /// Like [`Client::consumer_with`] with
    /// [`ConsumerOptions::wait_for_channel`], calling `interrupted` between
    /// polls for the channel (every 50 ms at most): when it returns true
    /// the wait ends with [`OpenError::Interrupted`] and the waiting
    /// subscription is closed. For callers that must react to signals while
    /// they wait (the Python binding checks for Ctrl-C here).
    pub fn consumer_interruptible(
        &self,
        channel: &str,
        opts: ConsumerOptions,
        interrupted: impl FnMut() -> bool,
    ) -> Result<Consumer, OpenError> {
        self.open_consumer(channel, opts, false, interrupted)
    }

    fn open_consumer(
        &self,
        channel: &str,
        opts: ConsumerOptions,
        writable: bool,
        mut interrupted: impl FnMut() -> bool,
    ) -> Result<Consumer, OpenError> {
        let req = Request::OpenConsumer {
            channel: channel.to_owned(),
            policy: opts.policy,
            depth: opts.depth,
            writable,
            create: opts.create.as_ref().map(|s| s.named(channel)),
            wait: opts.wait_for_channel.is_some(),
        };
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let (mut resp, mut fds) = self.inner.request(&req)?;
        // A waiting subscription: registered at the broker, the channel not
        // created yet. Ask again until it is (or the wait ends).
        while let Some(handle) = waiting_handle(&resp) {
            let limit = opts.wait_for_channel.unwrap_or(Duration::ZERO);
            let waited = started.elapsed();
            if waited >= limit {
                self.inner.close_handle(handle);
                return Err(OpenError::WaitTimeout {
                    channel: channel.to_owned(),
                    waited,
                });
            }
            if interrupted() {
                self.inner.close_handle(handle);
                return Err(OpenError::Interrupted(channel.to_owned()));
            }
            std::thread::sleep(pause.min(limit - waited));
            pause = (pause * 2).min(Duration::from_millis(50));
            match self.inner.request(&Request::Ready { handle }) {
                Ok(r) => (resp, fds) = r,
                Err(e) => {
                    self.inner.close_handle(handle);
                    return Err(e.into());
                }
            }
        }
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
                let sample_mask = self
                    .inner
                    .control
                    .latency(info.index as usize, sub as usize)
                    .map_or(tensorbus_core::latency::OFF, |h| {
                        h.sample_mask.load(std::sync::atomic::Ordering::Relaxed)
                    });
                let core = ConsumerCore {
                    sample_mask,
                    inner: self.inner.clone(),
                    handle,
                    id: HolderId::clamped(bit),
                    sub: sub as usize,
                    channel: info,
                    policy,
                    depth,
                    pools,
                    cursor: AtomicUsize::new(0),
                    taking: AtomicBool::new(false),
                    detached: AtomicBool::new(false),
                    readiness: std::sync::OnceLock::new(),
                    end_of_stream: opts.end_of_stream,
                };
                Ok(Consumer::new(core, opts.wait))
            }
            Response::Error { kind, message } => {
                Err(open_error(kind, message, channel, self.known_channels()))
            }
            other => Err(RequestError::Protocol(format!("unexpected reply {other:?}")).into()),
        }
    }

    /// Removes a channel that was created at run time (by a producer or
    /// consumer with create options, or `tensorbus pub --create`), so that
    /// it no longer counts toward the broker's `limits.max_channels`. The
    /// broker refuses while any producer, consumer, stage or waiting
    /// consumer uses it, and for channels its config declares; the tensors
    /// the channel's history kept are released.
    ///
    /// ```no_run
    /// # let client = tensorbus::Client::connect()?;
    /// client.remove_channel("scratch/debug")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn remove_channel(&self, channel: &str) -> Result<(), crate::error::RemoveChannelError> {
        use crate::error::RemoveChannelError;
        match self.inner.request(&Request::RemoveChannel {
            channel: channel.to_owned(),
        })? {
            (Response::Ok, _) => Ok(()),
            (
                Response::Error {
                    kind: proto::ErrorKind::UnknownChannel,
                    ..
                },
                _,
            ) => Err(RemoveChannelError::NotFound {
                channel: channel.to_owned(),
                known: self.known_channels(),
            }),
            (
                Response::Error {
                    kind: proto::ErrorKind::Busy,
                    message,
                },
                _,
            ) => Err(RemoveChannelError::InUse(message)),
            (
                Response::Error {
                    kind: proto::ErrorKind::PermissionDenied,
                    message,
                },
                _,
            ) => Err(RemoveChannelError::Declared(message)),
            (Response::Error { message, .. }, _) => {
                Err(RequestError::Protocol(format!("remove_channel: {message}")).into())
            }
            (other, _) => Err(RequestError::Protocol(format!("unexpected reply {other:?}")).into()),
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
        self.stage_interruptible(input, output, opts, || false)
    }

    /// [`Client::stage_with`] whose wait for its input channel
    /// ([`ConsumerOptions::wait_for_channel`]) calls `interrupted` between
    /// polls, like [`Client::consumer_interruptible`].
    pub fn stage_interruptible(
        &self,
        input: &str,
        output: &str,
        opts: ConsumerOptions,
        interrupted: impl FnMut() -> bool,
    ) -> Result<Stage, OpenError> {
        let input = self.open_consumer(input, opts, true, interrupted)?;
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

/// The handle of a waiting subscription whose channel does not exist yet
/// (a `Consumer` reply marked pending), if `resp` is one.
fn waiting_handle(resp: &Response) -> Option<u32> {
    match resp {
        Response::Consumer {
            handle, channel, ..
        } if channel.pending => Some(*handle),
        _ => None,
    }
}
