//! What `tensorbus top` shows: its state (the last two stat reports, the
//! sorts, the focused pane, whether the broker is gone) and the rows of
//! each pane, computed from it. Nothing here touches the terminal.

pub use super::rows::{ChannelRow, ClientRow, PoolRow};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tensorbus::stat::{ChannelStat, StatReport};

/// One stat report and when it arrived.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The report.
    pub report: StatReport,
    /// When it arrived (rates divide by the time between two samples).
    pub at: Instant,
}

/// How the channels pane is sorted (`--sort`, the `s` key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelSort {
    /// Most dropped per second first (then most dropped in all).
    Drops,
    /// Worst subscriber 99th-percentile latency first.
    P99,
    /// Fullest subscriber ring first (most tensors queued).
    Depth,
    /// Most published per second first.
    Rate,
    /// By name.
    Name,
}

/// How the pools pane is sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolSort {
    /// Largest share of slots in use first.
    Occupancy,
    /// By name.
    Name,
}

/// How the clients pane is sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientSort {
    /// Most slots held first.
    Holds,
    /// Most open handles first.
    Handles,
    /// By name.
    Name,
}

/// The three panes, top to bottom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pane {
    /// Channels and their subscribers' queues and drops.
    Channels,
    /// Pools and their occupancy.
    Pools,
    /// Clients and the slots they hold.
    Clients,
}

impl ChannelSort {
    /// The label shown in the pane's title.
    pub fn label(self) -> &'static str {
        match self {
            ChannelSort::Drops => "drops",
            ChannelSort::P99 => "p99",
            ChannelSort::Depth => "depth",
            ChannelSort::Rate => "rate",
            ChannelSort::Name => "name",
        }
    }

    fn next(self) -> Self {
        match self {
            ChannelSort::Drops => ChannelSort::Depth,
            ChannelSort::P99 => ChannelSort::Drops,
            ChannelSort::Depth => ChannelSort::Rate,
            ChannelSort::Rate => ChannelSort::Name,
            ChannelSort::Name => ChannelSort::P99,
        }
    }
}

impl PoolSort {
    /// The label shown in the pane's title.
    pub fn label(self) -> &'static str {
        match self {
            PoolSort::Occupancy => "occupancy",
            PoolSort::Name => "name",
        }
    }

    fn next(self) -> Self {
        match self {
            PoolSort::Occupancy => PoolSort::Name,
            PoolSort::Name => PoolSort::Occupancy,
        }
    }
}

impl ClientSort {
    /// The label shown in the pane's title.
    pub fn label(self) -> &'static str {
        match self {
            ClientSort::Holds => "holds",
            ClientSort::Handles => "handles",
            ClientSort::Name => "name",
        }
    }

    fn next(self) -> Self {
        match self {
            ClientSort::Holds => ClientSort::Handles,
            ClientSort::Handles => ClientSort::Name,
            ClientSort::Name => ClientSort::Holds,
        }
    }
}

impl Pane {
    /// The pane below (wrapping around).
    pub fn next(self) -> Self {
        match self {
            Pane::Channels => Pane::Pools,
            Pane::Pools => Pane::Clients,
            Pane::Clients => Pane::Channels,
        }
    }

    /// The pane above (wrapping around).
    pub fn prev(self) -> Self {
        self.next().next()
    }
}

/// Everything a frame shows.
#[derive(Debug)]
pub struct State {
    /// The broker's socket, as shown in the header.
    pub socket: String,
    /// Time between refreshes.
    pub interval: Duration,
    /// Sort of the channels pane.
    pub channel_sort: ChannelSort,
    /// Sort of the pools pane.
    pub pool_sort: PoolSort,
    /// Sort of the clients pane.
    pub client_sort: ClientSort,
    /// The pane whose sort `s` changes.
    pub focus: Pane,
    prev: Option<Sample>,
    cur: Sample,
    /// Why the last refresh failed, while the broker is gone (the panes
    /// keep showing its last report).
    pub gone: Option<String>,
}

impl State {
    /// A state showing `cur`, with rates against `prev` when given.
    pub fn new(
        socket: String,
        interval: Duration,
        channel_sort: ChannelSort,
        prev: Option<Sample>,
        cur: Sample,
    ) -> State {
        let mut s = State {
            socket,
            interval,
            channel_sort,
            pool_sort: PoolSort::Occupancy,
            client_sort: ClientSort::Holds,
            focus: Pane::Channels,
            prev: None,
            cur: prev.unwrap_or_else(|| cur.clone()),
            gone: None,
        };
        s.update(cur);
        s
    }

    /// The report shown.
    pub fn report(&self) -> &StatReport {
        &self.cur.report
    }

    /// Shows a new report; rates are taken against the one before, unless
    /// that came from another broker process (a restarted broker).
    pub fn update(&mut self, sample: Sample) {
        let old = std::mem::replace(&mut self.cur, sample);
        self.prev = (old.report.broker_pid == self.cur.report.broker_pid && old.at < self.cur.at)
            .then_some(old);
        self.gone = None;
    }

    /// Notes that the broker did not answer (`why`).
    pub fn mark_gone(&mut self, why: String) {
        self.gone = Some(why);
        self.prev = None;
    }

    /// Cycles the sort of the focused pane.
    pub fn cycle_sort(&mut self) {
        match self.focus {
            Pane::Channels => self.channel_sort = self.channel_sort.next(),
            Pane::Pools => self.pool_sort = self.pool_sort.next(),
            Pane::Clients => self.client_sort = self.client_sort.next(),
        }
    }

    /// Seconds between the two reports rates are computed from, if any.
    pub fn rate_window(&self) -> Option<f64> {
        let prev = self.prev.as_ref()?;
        Some((self.cur.at - prev.at).as_secs_f64()).filter(|s| *s > 0.0)
    }

    /// The channels, sorted.
    pub fn channel_rows(&self) -> Vec<ChannelRow> {
        let before: HashMap<&str, &ChannelStat> = self
            .prev
            .iter()
            .flat_map(|p| &p.report.channels)
            .map(|c| (c.name.as_str(), c))
            .collect();
        let secs = self.rate_window();
        let mut rows: Vec<ChannelRow> = self
            .cur
            .report
            .channels
            .iter()
            .map(|c| ChannelRow::new(c, before.get(c.name.as_str()).copied(), secs))
            .collect();
        rows.sort_by(|a, b| a.compare(b, self.channel_sort));
        rows
    }

    /// The pools, sorted.
    pub fn pool_rows(&self) -> Vec<PoolRow> {
        let mut rows: Vec<PoolRow> = self
            .cur
            .report
            .pools
            .iter()
            .map(|p| PoolRow {
                name: p.name.clone(),
                slot_size: p.slot_size,
                total: p.slots_total,
                free: p.slots_free,
                loaned: p.loaned,
                in_flight: p.in_flight,
                high_water: p.high_water,
                refused: p.loans_refused,
                starving: p.starving,
            })
            .collect();
        rows.sort_by(|a, b| match self.pool_sort {
            PoolSort::Occupancy => b
                .occupancy()
                .total_cmp(&a.occupancy())
                .then_with(|| a.name.cmp(&b.name)),
            PoolSort::Name => a.name.cmp(&b.name),
        });
        rows
    }

    /// The clients, sorted.
    pub fn client_rows(&self) -> Vec<ClientRow> {
        let mut rows: Vec<ClientRow> = self
            .cur
            .report
            .clients
            .iter()
            .map(|c| ClientRow {
                id: c.id,
                pid: c.pid,
                name: c.name.clone(),
                handles: c.handles,
                holds: c.holds,
                oldest_hold_ms: c.oldest_hold_ms,
                leaks: self
                    .cur
                    .report
                    .leaks
                    .iter()
                    .filter(|l| l.client == c.id)
                    .count() as u32,
            })
            .collect();
        rows.sort_by(|a, b| {
            match self.client_sort {
                ClientSort::Holds => b.holds.cmp(&a.holds),
                ClientSort::Handles => b.handles.cmp(&a.handles),
                ClientSort::Name => a.name.cmp(&b.name),
            }
            .then_with(|| a.id.cmp(&b.id))
        });
        rows
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tensorbus::stat::{ClientStat, PoolStat, SubscriberStat};

    fn sub(queued: u64, depth: u32, dropped: u64) -> SubscriberStat {
        let mut s = SubscriberStat::default();
        (s.queued, s.depth, s.dropped) = (queued, depth, dropped);
        s
    }

    fn channel(name: &str, published: u64, subs: Vec<SubscriberStat>) -> ChannelStat {
        let mut c = ChannelStat::default();
        (c.name, c.published, c.producers, c.subscribers) = (name.into(), published, 1, subs);
        c
    }

    /// A fixed report: channels `quiet`, `lossy` (drops), `busy` (fast, a
    /// full ring); pools `small` (half used) and `big`; three clients.
    pub(crate) fn report(scale: u64) -> StatReport {
        let mut r = StatReport::default();
        r.broker_pid = 42;
        r.channels = vec![
            channel("quiet", scale, vec![sub(0, 8, 0)]),
            channel(
                "lossy",
                10 * scale,
                vec![sub(1, 4, 3 * scale), sub(0, 4, 0)],
            ),
            channel("busy", 100 * scale, vec![sub(7, 8, scale)]),
        ];
        let pool = |name: &str, total, free| {
            let mut p = PoolStat::default();
            (p.name, p.slot_size, p.slots_total, p.slots_free) =
                (name.into(), 1 << 20, total, free);
            p
        };
        r.pools = vec![pool("big", 100, 90), pool("small", 10, 5)];
        let client = |id, name: &str, handles, holds| {
            let mut c = ClientStat::default();
            (c.id, c.pid, c.name, c.handles, c.holds) =
                (id, 1000 + id as i32, name.into(), handles, holds);
            c
        };
        r.clients = vec![
            client(1, "camera", 1, 2),
            client(2, "model", 3, 9),
            client(3, "logger", 5, 0),
        ];
        r
    }

    /// A state with rates: the report at scale 1, then at scale 2 one second later.
    pub(crate) fn state(sort: ChannelSort) -> State {
        let t0 = Instant::now();
        let first = Sample {
            report: report(1),
            at: t0,
        };
        let second = Sample {
            report: report(2),
            at: t0 + Duration::from_secs(1),
        };
        State::new(
            "sock".into(),
            Duration::from_millis(500),
            sort,
            Some(first),
            second,
        )
    }

    fn names(rows: &[ChannelRow]) -> Vec<&str> {
        rows.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn channels_sort_by_drops_depth_rate_and_name() {
        let mut s = state(ChannelSort::Drops);
        let rows = s.channel_rows();
        assert_eq!(names(&rows), ["lossy", "busy", "quiet"]);
        let lossy = &rows[0];
        assert_eq!(lossy.pub_rate, Some(10.0));
        assert_eq!((lossy.dropped, lossy.drop_rate), (6, Some(3.0)));
        assert_eq!(lossy.queued, Some((1, 4)));
        assert_eq!(lossy.p99, None);
        s.cycle_sort();
        assert_eq!(s.channel_sort, ChannelSort::Depth);
        assert_eq!(names(&s.channel_rows()), ["busy", "lossy", "quiet"]);
        s.cycle_sort();
        assert_eq!(names(&s.channel_rows()), ["busy", "lossy", "quiet"]);
        assert_eq!(s.channel_rows()[0].pub_rate, Some(100.0));
        s.cycle_sort();
        assert_eq!(names(&s.channel_rows()), ["busy", "lossy", "quiet"]);
        s.cycle_sort();
        assert_eq!(s.channel_sort, ChannelSort::P99);
        s.cycle_sort();
        assert_eq!(s.channel_sort, ChannelSort::Drops);
    }

    #[test]
    fn pools_sort_by_occupancy_and_clients_by_holds() {
        let mut s = state(ChannelSort::Name);
        let pools = s.pool_rows();
        assert_eq!(pools[0].name, "small");
        assert_eq!(pools[0].cells()[6], "50%");
        assert_eq!(pools[1].cells()[6], "10%");
        let clients: Vec<_> = s.client_rows().into_iter().map(|c| c.name).collect();
        assert_eq!(clients, ["model", "camera", "logger"]);
        s.focus = Pane::Clients;
        s.cycle_sort();
        let clients: Vec<_> = s.client_rows().into_iter().map(|c| c.name).collect();
        assert_eq!(clients, ["logger", "model", "camera"]);
        assert_eq!(
            s.channel_sort,
            ChannelSort::Name,
            "only the focused pane's sort changes"
        );
        s.focus = Pane::Pools;
        s.cycle_sort();
        assert_eq!(s.pool_rows()[0].name, "big");
    }

    #[test]
    fn rates_need_two_reports_of_the_same_broker_and_counters_that_grew() {
        let t0 = Instant::now();
        let mut s = State::new(
            "sock".into(),
            Duration::from_millis(500),
            ChannelSort::Drops,
            None,
            Sample {
                report: report(2),
                at: t0,
            },
        );
        assert!(s.channel_rows().iter().all(|r| r.pub_rate.is_none()));
        assert_eq!(s.channel_rows()[0].cells()[4], "-");
        // A counter that went back (the channel was created again): no rate.
        s.update(Sample {
            report: report(1),
            at: t0 + Duration::from_secs(1),
        });
        assert!(s.channel_rows().iter().all(|r| r.pub_rate.is_none()));
        // A restarted broker (another pid): no rates against the old one.
        let mut restarted = report(3);
        restarted.broker_pid = 43;
        s.update(Sample {
            report: restarted,
            at: t0 + Duration::from_secs(2),
        });
        assert_eq!(s.rate_window(), None);
        s.mark_gone("broken pipe".into());
        assert!(s.gone.is_some());
        assert_eq!(s.report().broker_pid, 43, "the last report stays shown");
    }

    #[test]
    fn cells_format_rates_queues_and_latency() {
        let mut row = state(ChannelSort::Drops).channel_rows().remove(0);
        assert_eq!(
            row.cells(),
            [
                "lossy",
                "broadcast",
                "live",
                "20",
                "10.0",
                "2",
                "1/4",
                "6",
                "3.0",
                "-"
            ]
        );
        row.p99 = Some(Duration::from_micros(1234));
        row.pub_rate = Some(12345.6);
        assert_eq!(row.cells()[4], "12346");
        assert_eq!(row.cells()[9], "1234.0us");
        row.p99 = Some(Duration::from_millis(25));
        assert_eq!(row.cells()[9], "25.0ms");
    }
}
