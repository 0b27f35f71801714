//! `tensorbus broker`: run a broker in the foreground.

use crate::{CliError, SocketArg};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tensorbus_broker::{Broker, Config, ConfigError};

/// Arguments of `tensorbus broker`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML configuration (pools, channels, limits); built-in defaults without it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArg,
    /// Log admissions, client deaths and reclaims to stderr.
    #[arg(long, short)]
    verbose: bool,
    /// Serve OpenMetrics / Prometheus metrics at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9464; overrides `[broker] metrics` in the config).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// Formats a byte count with a binary unit (`8MiB`, `64KiB`, `4096B`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if n >= size && n % size == 0 {
            return format!("{}{unit}", n / size);
        }
    }
    for (size, unit) in UNITS {
        if n >= size {
            return format!("{:.1}{unit}", n as f64 / size as f64);
        }
    }
    format!("{n}B")
}

/// Runs the broker until Ctrl-C or SIGTERM; the socket file is removed on
/// exit if it still is the one this broker created. Stopping prints one
/// line (`tensorbus broker: stopped (signal)`; with `--verbose`, whether
/// the socket was removed).
pub fn run(args: Args) -> Result<(), CliError> {
    let config = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| match e {
            ConfigError::Read { .. } => CliError(e.to_string()),
            _ => CliError(format!("{}: {e}", path.display())),
        })?,
        None => Config::default(),
    };
    let socket = args
        .socket
        .socket
        .clone()
        .or_else(|| config.broker.socket.clone())
        .unwrap_or_else(tensorbus::Client::default_socket_path);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .map_err(|e| CliError(format!("cannot install the signal handler: {e}")))?;
    // Bound before the broker so that a bad address fails before the socket exists.
    let metrics = match args.metrics.as_ref().or(config.broker.metrics.as_ref()) {
        Some(addr) => Some(tensorbus_broker::metrics::bind(addr)?),
        None => None,
    };
    let mut broker = Broker::bind(&config, &socket)?;
    broker.set_verbose(args.verbose);
    if let Some(listener) = metrics {
        let addr = broker.serve_metrics(listener)?;
        eprintln!("tensorbus broker: metrics at http://{addr}/metrics");
    }
    let pools: Vec<String> = config
        .pools
        .iter()
        .map(|p| format!("{} {} x {}", p.name, p.slots, human_bytes(p.slot_size.0)))
        .collect();
    let channels: Vec<&str> = config.channels.iter().map(|c| c.name.as_str()).collect();
    eprintln!(
        "tensorbus broker: listening on {} (pools: {}, channels: {})",
        socket.display(),
        pools.join(", "),
        if channels.is_empty() {
            "none declared, created at run time".to_owned()
        } else {
            channels.join(", ")
        }
    );
    broker.run(&stop);
    if !args.verbose {
        // One line, so that a terminal shows why the broker is gone.
        eprintln!("tensorbus broker: stopped (signal)");
    } else if broker.socket_removed() {
        eprintln!("tensorbus broker: stopped, removed {}", socket.display());
    } else {
        eprintln!(
            "tensorbus broker: stopped; {} is no longer this broker's socket (a newer broker's?), left in place",
            socket.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(8 << 20), "8MiB");
        assert_eq!(human_bytes(64 << 10), "64KiB");
        assert_eq!(human_bytes(100), "100B");
        assert_eq!(human_bytes(1536), "1.5KiB");
    }
}
