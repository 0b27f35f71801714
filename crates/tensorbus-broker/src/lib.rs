//! # tensorbus-broker
//!
//! The broker creates the shared memory (one sealed memfd per pool plus the
//! control segment), admits clients over a Unix seqpacket socket (checking
//! SO_PEERCRED), hands out pool file descriptors (read-only ones to
//! consumers), and when a client's socket closes (exit, crash, kill -9) it
//! releases every hold of that client from shared memory alone. It is never
//! on the data path.
//!
//! ```no_run
//! use tensorbus_broker::{Config, EmbeddedBroker};
//! let broker = EmbeddedBroker::start(&Config::default(), "/tmp/tb-doc/broker.sock".as_ref())?;
//! let client = tensorbus::Client::connect_to(Some(broker.socket()), "doc")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod config;
mod memory;
pub mod metrics;
mod names;
mod rendezvous;
mod server;
mod state;

pub use config::{Config, ConfigError};
pub use memory::{machine_memory, HUGE_PAGE};
pub use names::{validate_name, MAX_NAME_LEN};
pub use server::{Broker, EmbeddedBroker, StartError, MAX_PENDING_OUTPUT, MAX_PENDING_REPLIES};
pub use state::MAX_HANDLES;
