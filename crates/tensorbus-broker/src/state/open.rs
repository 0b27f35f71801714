//! Opening producer and subscriber handles: one path for both.
//!
//! Either kind goes through the same steps, in this order, and nothing is
//! taken before every check that can refuse has passed (or is given back
//! when a later step fails):
//!
//! 1. find the channel, or create it from the request's spec;
//! 2. settle the record's settings (a subscriber's depth and policy);
//! 3. choose a free record (a producer row, a subscriber index) that is
//!    not being reclaimed;
//! 4. take a holder id;
//! 5. duplicate the pool descriptors the client maps (read-only ones for a
//!    subscriber that does not write);
//! 6. activate the record in shared memory ([`ProducerRecord::activate`],
//!    [`SubscriberRecord::activate`], whose comments argue the orderings);
//! 7. register the handle.
//!
//! [`ProducerRecord::activate`]: tensorbus_core::records::ProducerRecord::activate
//! [`SubscriberRecord::activate`]: tensorbus_core::records::SubscriberRecord::activate

use super::{BitsExhausted, ChannelError, Handle, HandleKind, State};
use std::os::fd::OwnedFd;
use tensorbus_core::proto::{ChannelInfo, ChannelSpec, ErrorKind, Response};
use tensorbus_core::wide::HolderId;
use tensorbus_core::Policy;

/// What a client asks to open.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    /// A producer handle (a ring row of the channel).
    Producer,
    /// A subscriber (a subscriber record of the channel).
    Subscriber {
        /// Its policy; the channel's default if `None`.
        policy: Option<Policy>,
        /// Its ring depth; the channel's default if `None`.
        depth: Option<u32>,
        /// Whether it gets writable pool descriptors.
        writable: bool,
    },
}

/// The record an open takes, with its settled settings.
#[derive(Clone, Copy, Debug)]
enum Record {
    Producer {
        row: usize,
    },
    Subscriber {
        sub: usize,
        policy: Policy,
        depth: u32,
    },
}

/// Why an open was refused. Each maps to the wire [`ErrorKind`] the
/// client sees ([`OpenError::kind`]), with the message as its text.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The channel name is not valid.
    #[error("channel: {0}")]
    InvalidName(String),
    /// No such channel, and no spec to create it.
    #[error("unknown channel {channel:?}; known: {}", known.join(", "))]
    UnknownChannel {
        /// The name asked for.
        channel: String,
        /// The channels there are.
        known: Vec<String>,
    },
    /// The channel could not be created from the request's spec.
    #[error(transparent)]
    Create(#[from] ChannelError),
    /// The requested depth is outside 1..=ring capacity.
    #[error(
        "depth {depth} must be between 1 and the ring capacity {capacity} (limits.ring_capacity)"
    )]
    Depth {
        /// Requested depth.
        depth: u32,
        /// limits.ring_capacity.
        capacity: u32,
    },
    /// Every producer row of the channel is taken.
    #[error(
        "channel {channel:?} already has {max} producers; raise limits.max_producers_per_channel"
    )]
    TooManyProducers {
        /// Channel name.
        channel: String,
        /// limits.max_producers_per_channel.
        max: usize,
    },
    /// Every subscriber record of the channel is taken.
    #[error("channel {channel:?} already has {max} subscribers; raise limits.max_subscribers_per_channel")]
    TooManySubscribers {
        /// Channel name.
        channel: String,
        /// limits.max_subscribers_per_channel.
        max: usize,
    },
    /// Every holder id the limit allows is handed out.
    #[error(transparent)]
    Bits(#[from] BitsExhausted),
    /// Consumers wait for the channel, and this producer brought no spec
    /// to create it with.
    #[error("channel {0:?} does not exist yet (consumers are waiting for it); open the producer with a spec to create it (`tensorbus pub --create`, ProducerOptions::create)")]
    PendingNeedsSpec(String),
    /// Not a subscriber handle of this client.
    #[error("no open subscriber handle {0}")]
    NoSuchSubscriber(u32),
    /// A pool descriptor could not be duplicated for the client (the
    /// broker is out of file descriptors, typically).
    #[error("cannot duplicate the descriptor of pool {pool:?} for the client: {source}")]
    PoolFd {
        /// Pool name.
        pool: String,
        /// OS error.
        source: std::io::Error,
    },
}

impl OpenError {
    /// The wire error kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            OpenError::InvalidName(_) => ErrorKind::InvalidName,
            OpenError::UnknownChannel { .. } | OpenError::PendingNeedsSpec(_) => {
                ErrorKind::UnknownChannel
            }
            OpenError::NoSuchSubscriber(_) => ErrorKind::InvalidArgument,
            OpenError::Create(_) | OpenError::Depth { .. } => ErrorKind::InvalidArgument,
            OpenError::TooManyProducers { .. }
            | OpenError::TooManySubscribers { .. }
            | OpenError::Bits(_) => ErrorKind::LimitReached,
            OpenError::PoolFd { .. } => ErrorKind::Internal,
        }
    }
}

/// An opened handle: what the client is told, and the descriptors it gets.
pub(crate) struct Opened {
    pub(super) handle: u32,
    id: HolderId,
    record: Record,
    channel: ChannelInfo,
    fds: Vec<OwnedFd>,
}

impl Opened {
    /// The reply to the open request, with the pool descriptors to send.
    pub fn into_reply(self) -> (Response, Vec<OwnedFd>) {
        let Opened {
            handle,
            id,
            record,
            channel,
            fds,
        } = self;
        let bit = u32::from(id.index());
        let resp = match record {
            Record::Producer { row } => Response::Producer {
                handle,
                bit,
                row: row as u32,
                channel,
            },
            Record::Subscriber { sub, policy, depth } => Response::Consumer {
                handle,
                bit,
                sub: sub as u32,
                policy,
                depth,
                channel,
            },
        };
        (resp, fds)
    }
}

impl State {
    /// Opens a `role` handle on `channel` for `client` (creating the channel
    /// from `create` if it does not exist). On error nothing is taken.
    pub fn open(
        &mut self,
        client: u32,
        channel: &str,
        create: Option<ChannelSpec>,
        role: Role,
        wait: bool,
    ) -> Result<Opened, OpenError> {
        let waits = wait && matches!(role, Role::Subscriber { .. });
        let c = self.find_or_create(channel, create, waits)?;
        let (record, writable) = match role {
            Role::Producer => (
                Record::Producer {
                    row: self.free_row(c, channel)?,
                },
                true,
            ),
            Role::Subscriber {
                policy,
                depth,
                writable,
            } => {
                let capacity = self.control.layout().params.ring_capacity;
                let depth = match depth {
                    Some(d) if d == 0 || d > capacity => {
                        return Err(OpenError::Depth { depth: d, capacity })
                    }
                    Some(d) => d,
                    None => self.chan(c).default_depth(capacity),
                };
                let policy = policy.unwrap_or_else(|| self.chan(c).default_policy());
                // `latest` is depth 1 whatever was asked (publish treats it
                // so); say so in the reply and in stat.
                let depth = if policy == Policy::Latest { 1 } else { depth };
                let sub = self.free_sub(c, channel)?;
                (Record::Subscriber { sub, policy, depth }, writable)
            }
        };
        let id = self.alloc_id()?;
        let fds = match self.pool_fds(c, writable) {
            Ok(f) => f,
            Err(e) => {
                self.free_id(id);
                return Err(e);
            }
        };
        let kind = self.activate(c, record, id);
        let asked = match role {
            Role::Producer => (None, None, true),
            Role::Subscriber {
                policy,
                depth,
                writable,
            } => (policy, depth, writable),
        };
        match record {
            Record::Producer { .. } => self.producer_opened(c),
            Record::Subscriber { sub, policy, depth } => {
                self.deliver_history(c, sub, id, policy, depth);
            }
        }
        let handle = self.new_handle();
        self.handles.insert(
            handle,
            Handle {
                client,
                kind,
                id,
                asked,
            },
        );
        self.mark_id(id);
        Ok(Opened {
            handle,
            id,
            record,
            channel: self.chan(c).info(),
            fds,
        })
    }

    /// Answers [`tensorbus_core::proto::Request::Ready`] for subscriber
    /// `handle` of `client`: the subscription again, with its pool
    /// descriptors once its channel exists (still pending without).
    pub fn ready(&self, client: u32, handle: u32) -> Result<Opened, OpenError> {
        let Some(h) = self.handles.get(&handle).filter(|h| h.client == client) else {
            return Err(OpenError::NoSuchSubscriber(handle));
        };
        let HandleKind::Subscriber { channel: c, sub } = h.kind else {
            return Err(OpenError::NoSuchSubscriber(handle));
        };
        let ch = self.chan(c);
        let fds = if ch.pending {
            Vec::new()
        } else {
            self.pool_fds(c, h.asked.2)?
        };
        let r = self.control.subscriber(c, sub);
        let policy = r.map_or(tensorbus_core::Policy::Block, |r| {
            Policy::from_code(r.config.policy.load(std::sync::atomic::Ordering::Relaxed))
        });
        let depth = r.map_or(1, |r| {
            r.config.depth.load(std::sync::atomic::Ordering::Relaxed)
        });
        Ok(Opened {
            handle,
            id: h.id,
            record: Record::Subscriber { sub, policy, depth },
            channel: ch.info(),
            fds,
        })
    }

    /// The index of channel `channel`, created from `create` if it does not
    /// exist yet.
    ///
    /// A channel that waiting consumers reserved (pending) is created by the
    /// first open that brings a spec; another waiting consumer joins it as
    /// it is; any other open is told it does not exist. With `wait`, a
    /// missing channel is reserved.
    fn find_or_create(
        &mut self,
        channel: &str,
        create: Option<ChannelSpec>,
        wait: bool,
    ) -> Result<usize, OpenError> {
        crate::names::validate_name(channel).map_err(OpenError::InvalidName)?;
        let named = |mut spec: ChannelSpec| {
            spec.name = channel.to_owned();
            spec
        };
        if let Some(c) = self.channel_by_name(channel) {
            if !self.chan(c).pending {
                return Ok(c);
            }
            return match create {
                Some(spec) => {
                    self.complete_pending(c, named(spec))?;
                    Ok(c)
                }
                None if wait => Ok(c),
                None => Err(OpenError::PendingNeedsSpec(channel.to_owned())),
            };
        }
        match create {
            Some(spec) => Ok(self.create_channel(named(spec), false)?),
            None if wait => Ok(self.create_pending(channel)?),
            None => Err(OpenError::UnknownChannel {
                channel: channel.to_owned(),
                known: self.channel_names(),
            }),
        }
    }

    /// A producer row of channel `c` that is free: not in the row mask, not
    /// being reclaimed, its record free. Row 0 is the broker's own.
    fn free_row(&self, c: usize, name: &str) -> Result<usize, OpenError> {
        let ctl = &self.control;
        let rows = ctl.layout().rows();
        let used = ctl.channel(c).map_or(u64::MAX, |ch| {
            ch.producer_rows.load(std::sync::atomic::Ordering::Acquire)
        });
        (1..rows)
            .find(|&r| {
                used & (1 << r) == 0
                    && !self.busy_rows.contains(&(c, r))
                    && ctl.producer(c, r).is_some_and(|p| p.is_free())
            })
            .ok_or_else(|| OpenError::TooManyProducers {
                channel: name.to_owned(),
                max: rows - 1,
            })
    }

    /// A subscriber record of channel `c` that is free and not being
    /// reclaimed.
    pub(super) fn free_sub(&self, c: usize, name: &str) -> Result<usize, OpenError> {
        let ctl = &self.control;
        let subs = ctl.layout().params.max_subscribers as usize;
        (0..subs)
            .find(|&s| {
                !self.busy_subs.contains(&(c, s))
                    && ctl.subscriber(c, s).is_some_and(|r| r.is_free())
            })
            .ok_or_else(|| OpenError::TooManySubscribers {
                channel: name.to_owned(),
                max: subs,
            })
    }

    /// New descriptors of channel `c`'s pools for a client: the writable
    /// memfds, or read-only reopenings.
    fn pool_fds(&self, c: usize, writable: bool) -> Result<Vec<OwnedFd>, OpenError> {
        self.chan(c)
            .pools
            .iter()
            .map(|&p| {
                let pool = &self.pools[usize::from(p)];
                if writable {
                    pool.memfd.as_fd().try_clone_to_owned()
                } else {
                    pool.read_only.try_clone()
                }
                .map_err(|source| OpenError::PoolFd {
                    pool: pool.info.name.clone(),
                    source,
                })
            })
            .collect()
    }

    /// Activates `record` of channel `c` in shared memory for holder `id`.
    fn activate(&self, c: usize, record: Record, id: HolderId) -> HandleKind {
        let bit = u32::from(id.index());
        let ctl = &self.control;
        // In range: `c` is a channel of this broker, and `free_row` /
        // `free_sub` found the record.
        let ch = ctl.channel(c).expect("channel index in range");
        match record {
            Record::Producer { row } => {
                ctl.producer(c, row)
                    .expect("row in range")
                    .activate(ch, row, bit);
                HandleKind::Producer { channel: c, row }
            }
            Record::Subscriber { sub, policy, depth } => {
                // Reset before the consumer learns of the record (the reply).
                if let Some(h) = ctl.latency(c, sub) {
                    h.reset(self.latency_sample_every);
                }
                ctl.subscriber(c, sub)
                    .expect("subscriber in range")
                    .activate(ch, sub, bit, policy, depth);
                HandleKind::Subscriber { channel: c, sub }
            }
        }
    }
}
