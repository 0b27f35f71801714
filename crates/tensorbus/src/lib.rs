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
//! use tensorbus::{Client, DType, TensorView};
//!
//! let client = Client::connect()?;                       // $TENSORBUS_SOCKET or the default path
//! let camera = client.producer("camera/raw")?;
//! let inference = client.consumer("camera/raw")?;
//!
//! let mut frame = camera.loan(&[480, 640, 3], DType::U8)?;
//! frame.fill(0x10);
//! let published = frame.publish()?;                      // seq, timestamp, receivers
//!
//! let t = inference.recv()?;                             // the same bytes, read-only
//! assert_eq!(t.shape(), &[480, 640, 3]);
//! assert_eq!(t.seq(), published.seq);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## The whole API
//!
//! - [`Client`]: the connection to a broker. Opens [`Producer`]s,
//!   [`Consumer`]s and [`Stage`]s (with [`ProducerOptions`],
//!   [`ConsumerOptions`], [`ChannelSpec`] to create channels at run time),
//!   reports [`stat`] snapshots.
//! - Handles and what they hand out. Each handle is a cheap owner of shared
//!   state; what it hands out owns what it needs (no borrow of the handle),
//!   so tensors move between threads and may outlive their handle:
//!   - [`Producer::loan`] → [`TensorMut`] (write in place) →
//!     [`TensorMut::publish`] → [`Published`].
//!   - [`Consumer::recv`] → [`Tensor`] (read-only; dropping it releases the
//!     slot). [`Readiness`] for event loops, [`WaitStrategy`] for how
//!     `recv` waits.
//!   - [`Stage::recv_mut`] → [`StagedTensor`] (exclusive, writable) →
//!     [`StagedTensor::forward`] → [`Published`].
//! - [`TensorView`]: what all three tensor types let you read (shape,
//!   dtype, seq, user header, typed slices via [`Element`]), next to
//!   `Deref<Target = [u8]>`. [`SlotId`] says which slot it is.
//! - Describing tensors and channels: [`DType`], [`TensorMeta`] (custom
//!   strides), [`MAX_DIMS`], [`USER_HEADER_LEN`], [`Mode`], [`Policy`].
//! - [`error`]: one enum per operation ([`error::ConnectError`],
//!   [`error::OpenError`], [`error::LoanError`], [`error::PublishError`],
//!   [`error::RecvError`], [`error::TryRecvError`], ...). Every public enum
//!   and statistics struct is `#[non_exhaustive]`.
//!
//! After `fork()`, the child's inherited handles are inert: using them
//! fails with [`error::ForkedChild`], dropping them leaves the parent's
//! open (see [`Client`], "Fork").

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
mod reconnect;
mod stage;
pub mod stat;
mod turn;
mod view;

pub use client::Client;
pub use consumer::{Consumer, Tensor, WaitStrategy};
pub use element::Element;
pub use open::{ChannelSpec, ConsumerOptions, ProducerOptions};
pub use producer::{Producer, Published, TensorMut};
pub use readiness::Readiness;
pub use stage::{Stage, StagedTensor};
pub use tensorbus_core::{DType, Mode, Policy, TensorMeta, MAX_DIMS, USER_HEADER_LEN};
pub use view::{SlotId, TensorView};

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// Compile-time guarantees about threads: clients and handles may be
/// shared between threads; loans, received and staged tensors may move to
/// another thread (and be read from several).
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Client>();
    send_sync::<Producer>();
    send_sync::<Consumer>();
    send_sync::<Stage>();
    send_sync::<Readiness>();
    send_sync::<TensorMut>();
    send_sync::<Tensor>();
    send_sync::<StagedTensor>();
};
