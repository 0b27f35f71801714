//! # tensorbus
//!
//! Zero-copy tensor IPC between processes on one host. A broker
//! (`tensorbus broker`) creates shared-memory pools of tensor slots;
//! producers loan a slot, write the tensor in place and publish; consumers
//! receive a read-only view of the very same bytes; stages change a slot in
//! place and forward it. Nothing on that path copies, allocates, or makes a
//! syscall unless a receiver is asleep.
//!
//! ```no_run
//! use tensorbus::{Client, DType};
//!
//! let client = Client::connect()?;                       // $TENSORBUS_SOCKET or the default path
//! let mut camera = client.producer("camera/raw")?;
//! let inference = client.consumer("camera/raw")?;
//!
//! let mut frame = camera.loan(&[480, 640, 3], DType::U8)?;
//! frame.fill(0x10);
//! frame.publish()?;
//!
//! let t = inference.recv()?;                             // the same bytes, read-only
//! assert_eq!(t.shape(), &[480, 640, 3]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Errors are one enum per operation ([`ConnectError`], [`OpenError`],
//! [`LoanError`], [`PublishError`], [`RecvError`], [`TryRecvError`]).
//!
//! After `fork()`, the child's inherited handles are inert: using them
//! fails with [`ForkedChild`], dropping them leaves the parent's open (see
//! [`Client`], "Fork").

#![deny(missing_docs)]

mod client;
mod consumer;
mod element;
pub mod error;
mod fork;
mod open;
mod paths;
mod producer;
mod readiness;
mod stage;

pub use client::{Client, DEFAULT_REQUEST_TIMEOUT, REQUEST_TIMEOUT_ENV};
pub use consumer::{Consumer, Tensor, WaitStrategy};
pub use element::Element;
pub use error::{
    ConnectError, Corruption, ForkedChild, LoanError, OpenError, PublishError, RecvError,
    RequestError, TryRecvError, TypeError,
};
pub use open::{ConsumerOptions, ProducerOptions};
pub use paths::{socket_path, SOCKET_ENV};
pub use producer::{Producer, Published, SlotId, TensorMut};
pub use readiness::Readiness;
pub use stage::{Stage, StagedTensor};
pub use tensorbus_core::proto::{
    ChannelSpec, ChannelStat, ClientStat, PoolInfo, PoolStat, StatReport, SubscriberStat,
};
pub use tensorbus_core::publish::PublishOutcome;
pub use tensorbus_core::{DType, Mode, Policy, ShapeError, TensorMeta, MAX_DIMS, USER_HEADER_LEN};

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// Compile-time guarantees about threads: a `Client` may be shared between
/// threads; producers, consumers and stages may move to another thread.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Client>();
    send::<Producer>();
    send::<Consumer>();
    send::<Stage>();
    send_sync::<Readiness>();
};
