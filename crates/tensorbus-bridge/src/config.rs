//! The bridge's TOML config (documented in docs/bridge.md).

pub use crate::encoding::{Compression, Quantize};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tensorbus::{ChannelSpec, Mode, Policy};

/// The whole config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The client name the bridge shows under in `tensorbus stat`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Which broker to attach to.
    #[serde(default)]
    pub broker: BrokerSection,
    /// The Zenoh side.
    #[serde(default)]
    pub zenoh: ZenohSection,
    /// Local channels sent out to Zenoh.
    #[serde(default)]
    pub export: Vec<ExportRoute>,
    /// Zenoh key expressions written into local channels.
    #[serde(default)]
    pub import: Vec<ImportRoute>,
}

fn default_name() -> String {
    "tensorbus-bridge".into()
}

/// `[broker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// The broker's socket; absent: `$TENSORBUS_SOCKET` or the default path.
    pub socket: Option<PathBuf>,
}

/// `[zenoh]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZenohSection {
    /// `peer` (default), `client` or `router`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Endpoints to listen on, e.g. `tcp/0.0.0.0:7447`.
    #[serde(default)]
    pub listen: Vec<String>,
    /// Endpoints to connect to (retried until they answer, and again after
    /// a lost link), e.g. `tcp/10.0.0.2:7447`.
    #[serde(default)]
    pub connect: Vec<String>,
    /// Multicast scouting (off by default: peers are named explicitly).
    #[serde(default)]
    pub scouting: bool,
    /// Any other Zenoh setting, by its path in Zenoh's config, e.g.
    /// `{ "transport/link/tx/lease" = 2000 }` (applied last).
    #[serde(default)]
    pub settings: std::collections::BTreeMap<String, toml::Value>,
}

impl Default for ZenohSection {
    fn default() -> Self {
        ZenohSection {
            mode: default_mode(),
            listen: Vec::new(),
            connect: Vec::new(),
            scouting: false,
            settings: Default::default(),
        }
    }
}

fn default_mode() -> String {
    "peer".into()
}

/// How a route behaves when its far end is slower than its near end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutePolicy {
    /// Lossless: wait (export: the local producer is held back by the
    /// bridge's subscription; import: Zenoh's link is held back).
    #[default]
    Block,
    /// Keep the newest `depth`, drop (and count) the oldest.
    DropOldest,
    /// Keep only the newest one.
    Latest,
}

impl RoutePolicy {
    /// The local subscription policy it maps to.
    pub fn local(self) -> Policy {
        match self {
            RoutePolicy::Block => Policy::Block,
            RoutePolicy::DropOldest => Policy::DropOldest,
            RoutePolicy::Latest => Policy::Latest,
        }
    }

    /// The name in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            RoutePolicy::Block => "block",
            RoutePolicy::DropOldest => "drop_oldest",
            RoutePolicy::Latest => "latest",
        }
    }
}

/// `create = { ... }`: make the channel at start if it does not exist.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSpec {
    /// `broadcast` (default) or `workqueue`.
    #[serde(default)]
    pub mode: Mode,
    /// Pools the channel may loan from (empty: every pool of the broker).
    #[serde(default)]
    pub pools: Vec<String>,
    /// Default ring depth of its subscribers.
    pub depth: Option<u32>,
    /// Default policy of its subscribers.
    pub policy: Option<Policy>,
}

impl CreateSpec {
    /// The client library's channel spec.
    pub fn spec(&self) -> ChannelSpec {
        let pools: Vec<&str> = self.pools.iter().map(String::as_str).collect();
        let mut s = ChannelSpec::new(self.mode).pools(&pools);
        if let Some(d) = self.depth {
            s = s.depth(d);
        }
        if let Some(p) = self.policy {
            s = s.policy(p);
        }
        s
    }
}

/// `[[export]]`: a local channel published on a key expression.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRoute {
    /// The local channel.
    pub channel: String,
    /// The key expression; default `tensorbus/<channel>`.
    pub key: Option<String>,
    /// What happens when the far side (or the link) is slower.
    #[serde(default)]
    pub policy: RoutePolicy,
    /// Depth of the bridge's local subscription (default 8; `latest`: 1).
    pub depth: Option<u32>,
    /// Create the channel if it does not exist; absent: it must exist.
    pub create: Option<CreateSpec>,
    /// Quantize f32 tensors for a thin link (`none`, `int8`, `f16`); the
    /// far side gets f32 back. Other dtypes travel unchanged.
    #[serde(default)]
    pub quantize: Quantize,
    /// Compress payloads (`none`, `lz4`).
    #[serde(default)]
    pub compression: Compression,
}

/// `[[import]]`: a key expression written into a local channel.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRoute {
    /// The key expression subscribed to.
    pub key: String,
    /// The local channel; default: the key without a leading `tensorbus/`.
    pub channel: Option<String>,
    /// What happens when the local side is slower than the link.
    #[serde(default)]
    pub policy: RoutePolicy,
    /// Samples queued between Zenoh and the local channel (default 8;
    /// `latest`: 1).
    pub depth: Option<u32>,
    /// Create the channel if it does not exist; absent: it must exist.
    pub create: Option<CreateSpec>,
}

/// The key prefix of default keys.
pub const KEY_PREFIX: &str = "tensorbus/";

impl ExportRoute {
    /// The key expression, defaulted.
    pub fn key(&self) -> String {
        self.key
            .clone()
            .unwrap_or_else(|| format!("{KEY_PREFIX}{}", self.channel))
    }
    /// The subscription depth, defaulted.
    pub fn depth(&self) -> u32 {
        route_depth(self.policy, self.depth)
    }
}

impl ImportRoute {
    /// The local channel, defaulted.
    pub fn channel(&self) -> String {
        self.channel.clone().unwrap_or_else(|| {
            self.key
                .strip_prefix(KEY_PREFIX)
                .unwrap_or(&self.key)
                .to_owned()
        })
    }
    /// The queue depth, defaulted.
    pub fn depth(&self) -> u32 {
        route_depth(self.policy, self.depth)
    }
}

fn route_depth(policy: RoutePolicy, depth: Option<u32>) -> u32 {
    match policy {
        RoutePolicy::Latest => 1,
        _ => depth.unwrap_or(8).max(1),
    }
}

/// A config that could not be read or makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or unknown or mistyped fields.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// Valid TOML that describes an impossible bridge.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Parses and checks a config.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text)?;
        c.check()?;
        Ok(c)
    }

    /// Checks what TOML cannot: modes, key expressions, one route per key,
    /// Zenoh settings Zenoh accepts.
    pub fn check(&self) -> Result<(), ConfigError> {
        crate::bridge::zenoh_config(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !matches!(self.zenoh.mode.as_str(), "peer" | "client" | "router") {
            return Err(ConfigError::Invalid(format!(
                "zenoh.mode {:?}: use peer, client or router",
                self.zenoh.mode
            )));
        }
        if self.export.is_empty() && self.import.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[export]] or [[import]] route: the bridge would do nothing".into(),
            ));
        }
        let mut keys = std::collections::HashSet::new();
        for e in &self.export {
            let key = e.key();
            check_key(&key)?;
            if key.contains('*') || key.contains('$') {
                return Err(ConfigError::Invalid(format!(
                    "export key {key:?} of channel {:?} has a wildcard: a sample needs one concrete key",
                    e.channel
                )));
            }
            if !keys.insert(("export", key.clone())) {
                return Err(ConfigError::Invalid(format!(
                    "two [[export]] routes publish key {key:?}"
                )));
            }
        }
        for i in &self.import {
            check_key(&i.key)?;
            if !keys.insert(("import", i.key.clone())) {
                return Err(ConfigError::Invalid(format!(
                    "two [[import]] routes subscribe key {:?}",
                    i.key
                )));
            }
        }
        Ok(())
    }
}

fn check_key(key: &str) -> Result<(), ConfigError> {
    zenoh::key_expr::KeyExpr::try_from(key.to_owned())
        .map(|_| ())
        .map_err(|e| ConfigError::Invalid(format!("key expression {key:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let c = Config::from_toml(
            r#"
            name = "edge"
            [broker]
            socket = "/tmp/x/broker.sock"
            [zenoh]
            listen = ["tcp/127.0.0.1:7447"]
            connect = ["tcp/127.0.0.1:7448"]
            settings = { "transport/link/tx/lease" = 2000 }
            [[export]]
            channel = "camera/raw"
            policy = "latest"
            [[export]]
            channel = "imu"
            key = "robot/imu"
            policy = "drop_oldest"
            depth = 4
            quantize = "int8"
            compression = "lz4"
            [[import]]
            key = "tensorbus/detections"
            create = { pools = ["small"], depth = 4, policy = "block" }
            "#,
        )
        .unwrap();
        assert_eq!(c.name, "edge");
        assert_eq!(c.export[0].key(), "tensorbus/camera/raw");
        assert_eq!(c.export[0].depth(), 1);
        assert_eq!(c.export[1].key(), "robot/imu");
        assert_eq!(c.export[1].depth(), 4);
        assert_eq!(c.export[1].quantize, Quantize::Int8);
        assert_eq!(c.export[1].compression, Compression::Lz4);
        assert_eq!(c.export[0].quantize, Quantize::None);
        assert_eq!(c.import[0].channel(), "detections");
        assert_eq!(c.import[0].policy, RoutePolicy::Block);
        assert!(c.import[0].create.is_some());
        assert!(!c.zenoh.scouting);
        crate::bridge::zenoh_config(&c).unwrap();
    }

    #[test]
    fn bad_configs_are_refused() {
        for (text, what) in [
            ("", "no route"),
            (
                "[[export]]\nchannel = \"a\"\npolicy = \"sometimes\"",
                "policy",
            ),
            ("[[export]]\nchannel = \"a\"\nkey = \"a/*\"", "wildcard"),
            ("[[import]]\nkey = \"a//b\"", "bad key"),
            ("[zenoh]\nmode = \"mesh\"\n[[import]]\nkey = \"a\"", "mode"),
            ("[[import]]\nkey = \"a\"\n[[import]]\nkey = \"a\"", "twice"),
            ("[[import]]\nkey = \"a\"\nchanel = \"b\"", "unknown field"),
            (
                "[[export]]\nchannel = \"a\"\nquantize = \"int4\"",
                "quantize",
            ),
            (
                "[[export]]\nchannel = \"a\"\ncompression = \"zip\"",
                "compression",
            ),
        ] {
            assert!(Config::from_toml(text).is_err(), "{what} was accepted");
        }
    }
}
