//! `tensorbus stat`: print a broker's pools, channels and clients.

use crate::broker::human_bytes;
use crate::table::Table;
use crate::{CliError, SocketArg};
use tensorbus::stat::StatReport;
use tensorbus::Client;

/// Arguments of `tensorbus stat`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    socket: SocketArg,
    /// Print the report as JSON (stable keys, for scripts).
    #[arg(long)]
    json: bool,
}

/// Connects, asks for a statistics snapshot and prints it.
pub fn run(args: Args) -> Result<(), CliError> {
    let client = Client::connect_to(args.socket.socket.as_deref(), "tensorbus-stat")?;
    let report = client.stat()?;
    // A closed stdout (`tensorbus stat | head -1`) ends the command quietly.
    if args.json {
        crate::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?))
    } else {
        crate::print_stdout(&render(
            &report,
            &client.socket_path().display().to_string(),
        ))
    }
}

/// One word for where a channel's stream is: `waiting` (consumers wait for
/// a producer to create it), `live` (a producer is open), `ended` (the last
/// producer closed cleanly), `idle` (no producer yet, or the last one died).
pub(crate) fn channel_state(c: &tensorbus::stat::ChannelStat) -> &'static str {
    if c.pending {
        "waiting"
    } else if c.producers > 0 {
        "live"
    } else if c.ended {
        "ended"
    } else {
        "idle"
    }
}

/// A latency bucket bound as text (`<2.0us`, `<1.5ms`, `>17s`).
pub fn latency_text(ns: u64) -> String {
    if ns == u64::MAX {
        return ">17s".into();
    }
    let (v, unit) = match ns {
        0..=999 => (ns as f64, "ns"),
        1_000..=999_999 => (ns as f64 / 1e3, "us"),
        1_000_000..=999_999_999 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    format!("<{v:.1}{unit}")
}

/// The human-readable report.
pub fn render(r: &StatReport, socket: &str) -> String {
    let mut out = format!(
        "broker pid {} at {socket}, bus {:016x}\n",
        r.broker_pid, r.bus_id
    );
    if let Some(a) = &r.adoption {
        out.push_str(&format!(
            "adopted from broker pid {} (adoption {}): {} clients reconnected, {} refused, {} still to reconnect; {} handles of dead clients reclaimed; {} custody items released\n",
            a.previous_broker_pid,
            a.adoptions,
            a.adopted_clients,
            a.refused_clients,
            a.waiting_clients,
            a.reclaimed_handles,
            a.custody_released
        ));
    }
    out.push('\n');

    out.push_str("pools\n");
    let mut t = Table::new(&[
        "name",
        "slot_size",
        "slots_total",
        "slots_free",
        "loaned",
        "in_flight",
        "high_water",
        "refused",
        "spilled",
    ]);
    for p in &r.pools {
        t.row(vec![
            p.name.clone(),
            human_bytes(p.slot_size),
            p.slots_total.to_string(),
            p.slots_free.to_string(),
            p.loaned.to_string(),
            p.in_flight.to_string(),
            p.high_water.to_string(),
            p.loans_refused.to_string(),
            if p.starving {
                format!("{} STARVING", p.loans_spilled)
            } else {
                p.loans_spilled.to_string()
            },
        ]);
    }
    out.push_str(&t.render(2));

    out.push_str("\nchannels\n");
    if r.channels.is_empty() {
        out.push_str("  (none)\n");
    }
    let mut t = Table::new(&[
        "name",
        "mode",
        "published",
        "producers",
        "subscribers",
        "history",
        "state",
    ]);
    for c in &r.channels {
        t.row(vec![
            c.name.clone(),
            if c.pending {
                "-".into()
            } else {
                c.mode.to_string()
            },
            c.published.to_string(),
            c.producers.to_string(),
            c.subscribers.len().to_string(),
            if c.history == 0 {
                "-".into()
            } else {
                format!("{}/{}", c.history_held, c.history)
            },
            channel_state(c).into(),
        ]);
    }
    if !r.channels.is_empty() {
        out.push_str(&t.render(2));
    }
    for c in r.channels.iter().filter(|c| !c.subscribers.is_empty()) {
        out.push_str(&format!("\n  subscribers of {}\n", c.name));
        let mut t = Table::new(&[
            "handle",
            "client",
            "policy",
            "depth",
            "delivered",
            "dropped",
            "queued",
            "p50",
            "p99",
            "p99.9",
        ]);
        for s in &c.subscribers {
            let q = |f: fn(&tensorbus::stat::LatencyStat) -> u64| {
                s.latency
                    .as_ref()
                    .filter(|l| l.samples > 0)
                    .map_or_else(|| "-".to_owned(), |l| latency_text(f(l)))
            };
            t.row(vec![
                s.handle.to_string(),
                s.client.to_string(),
                s.policy.to_string(),
                s.depth.to_string(),
                s.delivered.to_string(),
                s.dropped.to_string(),
                s.queued.to_string(),
                q(|l| l.p50_ns),
                q(|l| l.p99_ns),
                q(|l| l.p999_ns),
            ]);
        }
        out.push_str(&t.render(4));
    }

    out.push_str("\nclients\n");
    let mut t = Table::new(&[
        "id",
        "pid",
        "uid",
        "name",
        "handles",
        "holds",
        "oldest_hold",
        "adopted",
    ]);
    for c in &r.clients {
        t.row(vec![
            c.id.to_string(),
            c.pid.to_string(),
            c.uid.to_string(),
            c.name.clone(),
            c.handles.to_string(),
            c.holds.to_string(),
            if c.holds == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}s", c.oldest_hold_ms as f64 / 1000.0)
            },
            if c.adopted { "yes" } else { "no" }.to_owned(),
        ]);
    }
    out.push_str(&t.render(2));
    if r.leaks_total > 0 {
        out.push_str(&format!(
            "\nheld longer than {:.1}s ({} holds{})\n",
            r.leak_threshold_ms as f64 / 1000.0,
            r.leaks_total,
            if r.leaks.len() < r.leaks_total as usize {
                format!(", the {} oldest listed", r.leaks.len())
            } else {
                String::new()
            }
        ));
        let mut t = Table::new(&[
            "age", "client", "name", "pid", "channel", "handle", "kind", "pool", "slot", "seq",
        ]);
        for l in &r.leaks {
            t.row(vec![
                format!("{:.1}s", l.age_ms as f64 / 1000.0),
                l.client.to_string(),
                l.name.clone(),
                l.pid.to_string(),
                l.channel.clone(),
                l.handle.to_string(),
                l.kind.clone(),
                l.pool.clone(),
                l.slot.to_string(),
                l.seq.to_string(),
            ]);
        }
        out.push_str(&t.render(2));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorbus::stat::ChannelStat;

    fn channel(name: &str, f: impl FnOnce(&mut ChannelStat)) -> ChannelStat {
        let mut c = ChannelStat::default();
        c.name = name.into();
        f(&mut c);
        c
    }

    #[test]
    fn channels_show_their_history_and_the_state_of_their_stream() {
        let mut r = StatReport::default();
        r.channels = vec![
            channel("cam", |c| {
                (c.history, c.history_held, c.ended) = (3, 2, true);
            }),
            channel("later", |c| c.pending = true),
            channel("live", |c| c.producers = 1),
            channel("idle", |_| {}),
        ];
        let text = render(&r, "sock");
        let line = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no line for {name} in\n{text}"))
                .to_string()
        };
        assert!(line("cam").contains("2/3"), "{text}");
        assert!(line("cam").ends_with("ended"), "{text}");
        assert!(line("later").ends_with("waiting"), "{text}");
        assert!(line("live").ends_with("live"), "{text}");
        assert!(line("idle").ends_with("idle"), "{text}");
    }
}
