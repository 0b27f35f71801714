//! The broker's TOML configuration. See `examples/tensorbus.toml` for a
//! commented example and the README for the reference.

use crate::names::validate_name;
use serde::{Deserialize, Deserializer};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tensorbus_core::layout::{Layout, LayoutParams};
use tensorbus_core::proto::ChannelSpec;
use tensorbus_core::ring::MAX_RING_CAPACITY;
use tensorbus_core::{Mode, Policy};

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/mistyped field: one line,
    /// `FIELD: what is wrong` (FIELD such as `pools[0].slot_size`, or
    /// `line L, column C` for a syntax error).
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// A byte count: an integer, or a string with a unit (`"64KiB"`, `"8MiB"`, `"1GiB"`, `"4096"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"8MiB"`-style strings.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a byte size (e.g. 4096, \"64KiB\", \"8MiB\")"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" | "KB" | "kB" => 1 << 10,
            "MiB" | "M" | "MB" => 1 << 20,
            "GiB" | "G" | "GB" => 1 << 30,
            u => {
                return Err(format!(
                    "unknown unit {u:?} in {s:?}; use B, KiB, MiB or GiB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} overflows"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte count: a non-negative integer or a string such as \"64KiB\" or \"8MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n).map(ByteSize).map_err(|_| {
                    E::custom(format!(
                        "{n} is negative; expected a byte count such as 4096 or \"8MiB\""
                    ))
                })
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ByteSize, E> {
                ByteSize::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Builds the one-line `FIELD: what is wrong` text of a TOML error: the
/// field is the dotted path of the key the error points at (for example
/// `pools[0].slot_size`), or the line and column where no key applies.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let Some(span) = e.span() else {
        return message;
    };
    let path = toml::de::DeTable::parse(text)
        .ok()
        .and_then(|root| find_key(root.get_ref(), span.start, String::new()));
    match path {
        Some(p) if !p.is_empty() => format!("{p}: {message}"),
        _ => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
    }
}

/// The dotted path of the deepest key whose name or value contains `pos`.
fn find_key(table: &toml::de::DeTable<'_>, pos: usize, prefix: String) -> Option<String> {
    let mut best = None;
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if key.span().contains(&pos) {
            return Some(path);
        }
        if let Some(inner) = find_in_value(value.get_ref(), pos, &path) {
            return Some(inner);
        }
        if value.span().contains(&pos) {
            best = Some(path);
        }
    }
    best
}

fn find_in_value(value: &toml::de::DeValue<'_>, pos: usize, path: &str) -> Option<String> {
    match value {
        toml::de::DeValue::Table(t) => find_key(t, pos, path.to_owned()),
        toml::de::DeValue::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
            let item = format!("{path}[{i}]");
            find_in_value(v.get_ref(), pos, &item)
                .or_else(|| v.span().contains(&pos).then_some(item))
        }),
        _ => None,
    }
}

/// `[broker]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// Socket path (overridden by `--socket`).
    pub socket: Option<PathBuf>,
    /// User ids allowed to connect; empty = the broker's own uid (and root).
    ///
    /// When this names another user, or `allowed_gids` is not empty, the
    /// broker makes the directories it creates 0711 and its socket 0666,
    /// and SO_PEERCRED admission decides who gets in; otherwise they are
    /// 0700 and 0600. Existing directories are never changed.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Group ids whose members may connect (in addition to `allowed_uids`);
    /// matched against the peer's effective gid.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// Where `tensorbus broker` serves its OpenMetrics / Prometheus
    /// endpoint (`HOST:PORT`, e.g. `"127.0.0.1:9464"`; overridden by
    /// `--metrics`); none when absent.
    #[serde(default)]
    pub metrics: Option<String>,
    /// When the broker replaces the stale socket of a broker that died,
    /// how long (milliseconds) it waits for a surviving client to hand over
    /// the running bus before it starts a new one (new clients wait that
    /// long at most for their welcome). 0: never adopt. Default 3000.
    #[serde(default = "default_adopt_wait_ms")]
    pub adopt_wait_ms: u64,
    /// A hold older than this (milliseconds) is listed as a possible leak
    /// by `tensorbus stat`, `top` and the metrics, with its holder. Default
    /// 5000.
    #[serde(default = "default_leak_threshold_ms")]
    pub leak_threshold_ms: u64,
    /// Every how many receives a consumer records the publish-to-receive
    /// latency in its shared-memory histogram (rounded up to a power of
    /// two; 1: every receive; 0: none). A record costs one clock read
    /// (~35 ns). Default 16.
    #[serde(default = "default_latency_sample_every")]
    pub latency_sample_every: u32,
}

fn default_latency_sample_every() -> u32 {
    16
}

fn default_leak_threshold_ms() -> u64 {
    5000
}

fn default_adopt_wait_ms() -> u64 {
    3000
}

impl Default for BrokerSection {
    fn default() -> BrokerSection {
        BrokerSection {
            socket: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            metrics: None,
            adopt_wait_ms: default_adopt_wait_ms(),
            leak_threshold_ms: default_leak_threshold_ms(),
            latency_sample_every: default_latency_sample_every(),
        }
    }
}

/// `[limits]` section: sizes of the fixed tables in the control segment.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Channels (declared plus created at run time).
    pub max_channels: u32,
    /// Producer handles per channel.
    pub max_producers_per_channel: u32,
    /// Subscribers per channel (at most 256).
    pub max_subscribers_per_channel: u32,
    /// Cells per ring: the largest depth a subscriber may ask for (power of two).
    pub ring_capacity: u32,
    /// Holder handles open at once in the whole broker: every producer,
    /// subscriber and stage half, and each channel's history record, takes
    /// one (at most [`crate::MAX_HANDLES`]).
    pub max_handles: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_channels: 32,
            max_producers_per_channel: 8,
            max_subscribers_per_channel: 16,
            ring_capacity: 64,
            max_handles: 1024,
        }
    }
}

/// One `[[pools]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name.
    pub name: String,
    /// Payload bytes per slot.
    pub slot_size: ByteSize,
    /// Number of slots.
    pub slots: u32,
    /// Payload alignment (power of two, 64 B to 2 MiB; default 4096).
    #[serde(default = "default_alignment")]
    pub alignment: ByteSize,
    /// Back the pool with 2 MiB huge pages (falls back to normal pages with a warning).
    #[serde(default)]
    pub hugetlb: bool,
}

impl PoolConfig {
    /// Bytes of this pool's memfd as the broker creates it: slots × slot
    /// size rounded up to the alignment, then to the page size (2 MiB huge
    /// pages for `hugetlb = true`).
    pub fn memfd_bytes(&self) -> u64 {
        let stride = self.slot_size.0.div_ceil(self.alignment.0) * self.alignment.0;
        let page = if self.hugetlb { crate::HUGE_PAGE } else { 4096 };
        stride.saturating_mul(u64::from(self.slots)).div_ceil(page) * page
    }
}

fn default_alignment() -> ByteSize {
    ByteSize(4096)
}

/// One `[[channels]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Channel name.
    pub name: String,
    /// Pools the channel may use (empty = all).
    #[serde(default)]
    pub pools: Vec<String>,
    /// broadcast or workqueue.
    #[serde(default)]
    pub mode: Mode,
    /// Default ring depth for subscribers.
    pub depth: Option<u32>,
    /// Default policy for subscribers.
    pub policy: Option<Policy>,
    /// How many of the latest tensors the channel keeps for subscribers
    /// that join later (0, the default: none). Broadcast channels only, at
    /// most limits.ring_capacity; the kept tensors hold slots of the
    /// channel's pools (up to `history` per open producer, plus `history`
    /// from producers that closed) and take one holder handle.
    #[serde(default)]
    pub history: u32,
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[broker]`.
    #[serde(default)]
    pub broker: BrokerSection,
    /// `[limits]`.
    #[serde(default)]
    pub limits: Limits,
    /// `[[pools]]`.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// `[[channels]]`.
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
}

/// Default ring depth when neither the subscriber nor the channel says.
pub const DEFAULT_DEPTH: u32 = 8;

impl Default for Config {
    /// Three pools (64 KiB × 64, 1 MiB × 32, 8 MiB × 16) and no channels
    /// (producers create them at run time).
    fn default() -> Self {
        let pool = |name: &str, size: u64, slots: u32| PoolConfig {
            name: name.into(),
            slot_size: ByteSize(size),
            slots,
            alignment: default_alignment(),
            hugetlb: false,
        };
        Config {
            broker: BrokerSection::default(),
            limits: Limits::default(),
            pools: vec![
                pool("small", 64 << 10, 64),
                pool("medium", 1 << 20, 32),
                pool("large", 8 << 20, 16),
            ],
            channels: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Parses and validates TOML text.
    ///
    /// ```
    /// let c = tensorbus_broker::Config::from_toml(r#"
    ///     [[pools]]
    ///     name = "frames"
    ///     slot_size = "8MiB"
    ///     slots = 8
    ///     [[channels]]
    ///     name = "camera/raw"
    ///     pools = ["frames"]
    /// "#).unwrap();
    /// assert_eq!(c.pools[0].slot_size.0, 8 << 20);
    /// ```
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let c: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse(describe_toml_error(text, &e)))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.pools.is_empty() {
            return bad("no [[pools]] configured; declare at least one pool".into());
        }
        let mut names = HashSet::new();
        for p in &self.pools {
            validate_name(&p.name).map_err(|e| ConfigError::Invalid(format!("pool: {e}")))?;
            if !names.insert(p.name.as_str()) {
                return bad(format!("pool {:?} is declared twice", p.name));
            }
            if p.slot_size.0 == 0 {
                return bad(format!("pool {:?}: slot_size must be positive", p.name));
            }
            if p.slots == 0 || p.slots as usize > tensorbus_core::MAX_SLOTS_PER_POOL {
                return bad(format!(
                    "pool {:?}: slots must be between 1 and {}",
                    p.name,
                    tensorbus_core::MAX_SLOTS_PER_POOL
                ));
            }
            let a = p.alignment.0;
            if !a.is_power_of_two() || !(64..=2 << 20).contains(&a) {
                return bad(format!(
                    "pool {:?}: alignment {a} must be a power of two between 64 and 2097152 (2 MiB)",
                    p.name
                ));
            }
            let stride = p.slot_size.0.div_ceil(a).checked_mul(a);
            let total = stride.and_then(|s| s.checked_mul(u64::from(p.slots)));
            if total.is_none_or(|t| t > 1 << 46) {
                return bad(format!("pool {:?}: slot_size × slots is too large", p.name));
            }
        }
        if self.pools.len() > 255 {
            return bad("at most 255 pools are supported".into());
        }
        Layout::compute(&self.layout_params()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.channels.len() > self.limits.max_channels as usize {
            return bad(format!(
                "{} channels declared but limits.max_channels is {}",
                self.channels.len(),
                self.limits.max_channels
            ));
        }
        let mut chans = HashSet::new();
        for c in &self.channels {
            validate_name(&c.name).map_err(|e| ConfigError::Invalid(format!("channel: {e}")))?;
            if !chans.insert(c.name.as_str()) {
                return bad(format!("channel {:?} is declared twice", c.name));
            }
            for p in &c.pools {
                if !names.contains(p.as_str()) {
                    return bad(format!(
                        "channel {:?} uses pool {p:?}, which is not declared; pools: {}",
                        c.name,
                        self.pools
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            if c.history > 0 && c.mode != Mode::Broadcast {
                return bad(format!(
                    "channel {:?}: history works on broadcast channels only (a work queue hands each tensor to one worker)",
                    c.name
                ));
            }
            if c.history > self.limits.ring_capacity {
                return bad(format!(
                    "channel {:?}: history {} must be at most limits.ring_capacity ({})",
                    c.name, c.history, self.limits.ring_capacity
                ));
            }
            if let Some(d) = c.depth {
                if d == 0 || d > self.limits.ring_capacity {
                    return bad(format!(
                        "channel {:?}: depth {d} must be between 1 and limits.ring_capacity ({})",
                        c.name, self.limits.ring_capacity
                    ));
                }
            }
        }
        if self.limits.max_handles == 0 || self.limits.max_handles as usize > crate::MAX_HANDLES {
            return bad(format!(
                "limits.max_handles must be between 1 and {}",
                crate::MAX_HANDLES
            ));
        }
        if self.limits.ring_capacity as usize > MAX_RING_CAPACITY {
            return bad(format!(
                "limits.ring_capacity must be at most {MAX_RING_CAPACITY}"
            ));
        }
        Ok(())
    }

    /// Layout parameters of the control segment this config implies.
    pub fn layout_params(&self) -> LayoutParams {
        LayoutParams {
            pool_slots: self.pools.iter().map(|p| p.slots).collect(),
            max_channels: self.limits.max_channels,
            max_producers: self.limits.max_producers_per_channel,
            max_subscribers: self.limits.max_subscribers_per_channel,
            ring_capacity: self.limits.ring_capacity,
        }
    }

    /// Channel declarations as run-time specs.
    pub fn channel_specs(&self) -> Vec<ChannelSpec> {
        self.channels
            .iter()
            .map(|c| ChannelSpec {
                name: c.name.clone(),
                pools: c.pools.clone(),
                mode: c.mode,
                depth: c.depth,
                policy: c.policy,
                history: c.history,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert_eq!(ByteSize::parse("64KiB").unwrap().0, 64 << 10);
        assert_eq!(ByteSize::parse("8MiB").unwrap().0, 8 << 20);
        assert!(ByteSize::parse("8 parsecs").is_err());
        assert!(ByteSize::parse("").is_err());
    }

    #[test]
    fn rejects_bad_configs() {
        let cases = [
            ("", "no [[pools]]"),
            ("[[pools]]\nname='a'\nslot_size=0\nslots=1", "positive"),
            ("[[pools]]\nname='a'\nslot_size=64\nslots=0", "slots"),
            ("[[pools]]\nname='a'\nslot_size=64\nslots=1\nalignment=100", "power of two"),
            ("[[pools]]\nname='a/../b'\nslot_size=64\nslots=1", "component"),
            ("[[pools]]\nname='a'\nslot_size=64\nslots=1\n[[pools]]\nname='a'\nslot_size=64\nslots=1", "twice"),
            ("[[pools]]\nname='a'\nslot_size=64\nslots=1\n[[channels]]\nname='c'\npools=['zz']", "not declared"),
            ("[[pools]]\nname='a'\nslot_size=64\nslots=1\n[[channels]]\nname='c'\ndepth=1000", "depth"),
            ("[[pools]]\nname='a'\nslot_size=64\nslots=1\n[[channels]]\nname='c'\nmode='fanout'", "unknown variant"),
            ("[[pools]]\nname='a'\nslot_size=64\nslots=1\nbogus=1", "unknown field"),
            ("[limits]\nring_capacity=12\n[[pools]]\nname='a'\nslot_size=64\nslots=1", "ring_capacity"),
        ];
        for (text, want) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    /// issue 12.11: TOML errors are one line naming the field; a negative or
    /// boolean byte size says what is expected (not "untagged enum Raw").
    #[test]
    fn toml_errors_are_one_line_naming_the_field() {
        let pool = "[[pools]]\nname='a'\nslot_size=64\nslots=1\n";
        let cases = [
            (
                "[[pools]]\nname='a'\nslot_size=-1\nslots=1".to_owned(),
                "invalid config: pools[0].slot_size: -1 is negative",
            ),
            (
                "[[pools]]\nname='a'\nslot_size=true\nslots=1".to_owned(),
                "invalid config: pools[0].slot_size: invalid type: boolean `true`, expected a byte count",
            ),
            (
                format!("{pool}[[pools]]\nname='b'\nslot_size='8 parsecs'\nslots=1"),
                "invalid config: pools[1].slot_size: unknown unit",
            ),
            (
                format!("{pool}bogus_field = 1"),
                "invalid config: pools[0].bogus_field: unknown field `bogus_field`",
            ),
            (
                format!("[limits]\nring_capacity = 'many'\n{pool}"),
                "invalid config: limits.ring_capacity: invalid type: string",
            ),
            (
                format!("[broker]\nallowed_uids = [1, -2]\n{pool}"),
                "invalid config: broker.allowed_uids",
            ),
            (
                format!("{pool}[[channels]]\nname='c'\nmode='fanout'"),
                "invalid config: channels[0].mode: unknown variant `fanout`",
            ),
            ("[[pools]]\nname='a'\nslots=1".to_owned(), "invalid config: pools[0]: missing field `slot_size`"),
            ("[[pools]\nname='a'".to_owned(), "invalid config: line 1, column"),
        ];
        for (text, want) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}:\n{err}");
            assert!(!err.contains('\n'), "{text:?}: not one line:\n{err}");
            assert!(!err.contains("untagged"), "{text:?}: {err}");
        }
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../examples/tensorbus.toml");
        let c = Config::from_toml(text).unwrap();
        assert!(!c.channels.is_empty());
        // issue 12.11: the example states the real handle limit (issue 16:
        // the default and the maximum of max_handles).
        assert_eq!(c.limits.max_handles, 1024);
        assert!(text.contains("at most 1039"), "{text}");
        assert_eq!(crate::MAX_HANDLES, 1039);
        assert!(!text.contains("63 per broker"), "{text}");
    }
}
