//! # tensorbus-bridge
//!
//! Carries tensors between tensorbus channels and Eclipse Zenoh key
//! expressions, so that two hosts (each with its own broker) exchange
//! tensors: `[[export]]` routes send a local channel's tensors as Zenoh
//! samples, `[[import]]` routes write arriving samples into a local
//! channel's slots. Every sample carries the tensor's metadata in a
//! versioned attachment ([`wire`]); docs/bridge.md documents the config,
//! the wire format byte by byte and how many copies each direction makes.
//!
//! Zenoh is a dependency of this crate only: the core crates, the
//! `tensorbus` CLI and the demo do not build it.

#![deny(missing_docs)]

pub mod bridge;
pub mod config;
pub mod encoding;
pub mod wire;

pub use bridge::{Bridge, Direction, RouteSnapshot, RouteStats, StartError};
pub use config::{Config, ConfigError, ExportRoute, ImportRoute, RoutePolicy};
