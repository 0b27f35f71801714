//! tensorbus contenders: ping-pong (busy-poll and futex waits) through an
//! embedded broker, and the publishing side of streaming, fan-out and work
//! queues (whose consumers are `tbsub` children).

use crate::common::{
    check_reply, next_command, num, pattern, read_payload, say, write_payload, Peer, Result,
    Shared, Variant, ROUND_TIMEOUT,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tensorbus::{Client, ConsumerOptions, DType, Policy, Producer, WaitStrategy};
use tensorbus_broker::{Config, EmbeddedBroker};

/// Slots per pool: enough for 8 messages in flight, the producer's next loan
/// and the consumers' holds (work queue: 4 workers).
fn slots_for(size: usize) -> u32 {
    if size <= 16 << 20 {
        16
    } else {
        12
    }
}

/// The broker config: one pool per size class (slot size = the payload size
/// rounded up to a page), the ping-pong, streaming, fan-out and work-queue
/// channels; `latency_sample_every` sets `[broker] latency_sample_every`
/// (`None`: the broker's default).
pub fn broker_config(sizes: &[usize], latency_sample_every: Option<u32>) -> Result<Config> {
    let mut classes: Vec<usize> = sizes
        .iter()
        .map(|s| s.max(&1).div_ceil(4096) * 4096)
        .collect();
    classes.sort_unstable();
    classes.dedup();
    let mut toml = String::new();
    if let Some(n) = latency_sample_every {
        toml += &format!("[broker]\nlatency_sample_every = {n}\n");
    }
    toml += "[limits]\nmax_channels = 32\nmax_subscribers_per_channel = 16\nring_capacity = 64\n";
    for c in &classes {
        toml += &format!(
            "[[pools]]\nname = \"p{c}\"\nslot_size = {c}\nslots = {}\n",
            slots_for(*c)
        );
    }
    let mut chan = |name: &str, mode: &str| {
        toml += &format!(
            "[[channels]]\nname = \"{name}\"\nmode = \"{mode}\"\npolicy = \"block\"\ndepth = 8\n"
        );
    };
    chan("ping", "broadcast");
    chan("pong", "broadcast");
    chan("stream", "broadcast");
    for n in [1, 2, 4, 8] {
        chan(&format!("fanout/{n}"), "broadcast");
    }
    for n in 1..=4 {
        chan(&format!("work/{n}"), "workqueue");
    }
    // Last, so the other channels keep their records (and addresses).
    chan("placeholder", "broadcast");
    Ok(Config::from_toml(&toml)?)
}

/// The embedded broker and the parent's client.
pub struct Tb {
    /// Broker socket path.
    pub socket: PathBuf,
    /// The parent's client.
    pub client: Client,
    /// Consumers holding the direct holder ids (`--extension-ids`).
    _placeholders: Vec<tensorbus::Consumer>,
    _broker: EmbeddedBroker,
    dir: PathBuf,
}

impl Tb {
    /// Starts the broker in a fresh private directory. With
    /// `extension_ids`, the parent then takes every direct holder id with
    /// placeholder consumers, so the contenders' handles get extension ids.
    /// `latency_sample_every`: see [`broker_config`].
    pub fn start(
        sizes: &[usize],
        extension_ids: bool,
        latency_sample_every: Option<u32>,
    ) -> Result<Tb> {
        let dir = std::env::temp_dir().join(format!("tb-bench-{}", std::process::id()));
        let socket = dir.join("broker.sock");
        let broker = EmbeddedBroker::start(&broker_config(sizes, latency_sample_every)?, &socket)?;
        let client = Client::connect_to(Some(broker.socket()), "bench-parent")?;
        let mut placeholders = Vec::new();
        if extension_ids {
            let direct = usize::from(tensorbus_core::wide::DIRECT_BITS) - 1;
            for _ in 0..direct {
                placeholders.push(client.consumer("placeholder")?);
            }
        }
        Ok(Tb {
            socket: broker.socket().to_path_buf(),
            client,
            _placeholders: placeholders,
            _broker: broker,
            dir,
        })
    }

    /// Touches every page of every slot once (loans them all, writes a byte
    /// per page), so later runs do not pay first-touch page allocation.
    pub fn prefault(&self, sizes: &[usize]) -> Result<()> {
        let p = self.client.producer("stream")?;
        for &size in sizes {
            // Hold every slot that fits at once (loans of one producer may
            // be in flight together), then give them all back.
            let mut held = Vec::with_capacity(slots_for(size) as usize);
            for _ in 0..slots_for(size) {
                let Ok(mut t) = p.loan_bytes(size) else { break };
                for i in (0..t.len()).step_by(4096) {
                    t[i] = 0;
                }
                held.push(t);
            }
        }
        Ok(())
    }
}

impl Drop for Tb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_arg(p: &Path) -> Result<String> {
    Ok(p.to_str()
        .ok_or_else(|| format!("socket path {p:?} is not UTF-8"))?
        .to_owned())
}

/// Parent side of the ping-pong.
pub struct TbPing {
    ping: Producer,
    pong: tensorbus::Consumer,
    peer: Peer,
    next: u64,
}

impl TbPing {
    /// The child's process id (for its context switches).
    pub fn pid(&self) -> u32 {
        self.peer.pid()
    }

    /// Opens `ping` (producer) and `pong` (consumer) and spawns the echo child.
    pub fn start(tb: &Tb) -> Result<TbPing> {
        let ping = tb.client.producer("ping")?;
        let pong = tb.client.consumer_with(
            "pong",
            ConsumerOptions::default()
                .end_of_stream(false)
                .policy(Policy::Block)
                .depth(8)
                .wait(WaitStrategy::BusyPoll),
        )?;
        let peer = Peer::spawn("tensorbus", &["tb".into(), path_arg(&tb.socket)?], &[])?;
        Ok(TbPing {
            ping,
            pong,
            peer,
            next: 1,
        })
    }

    /// Runs `warm + count` round trips with both sides waiting `busy`
    /// (busy-poll) or not (futex), recording the last `count`.
    pub fn block(
        &mut self,
        busy: bool,
        size: usize,
        variant: Variant,
        warm: usize,
        count: usize,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        let mode = if busy { "busy" } else { "park" };
        self.pong.set_wait_strategy(strategy(mode)?);
        self.peer.send(&format!(
            "pp {size} {} {} {mode}",
            variant.name(),
            warm + count
        ))?;
        for i in 0..warm + count {
            let v = self.next;
            self.next += 1;
            let b = pattern(v);
            let t0 = Instant::now();
            let mut t = self.ping.loan_bytes(size)?;
            write_payload(&mut t, b, variant);
            t.publish()?;
            let r = self.pong.recv_timeout(ROUND_TIMEOUT)?;
            check_reply(&r, variant, !b)?;
            drop(r);
            let ns = t0.elapsed().as_nanos() as u64;
            if i >= warm {
                out.push(ns);
            }
        }
        self.peer.expect("done")
    }

    /// Ends the child.
    pub fn finish(self) -> Result<()> {
        self.peer.finish()
    }
}

fn strategy(mode: &str) -> Result<WaitStrategy> {
    match mode {
        "busy" => Ok(WaitStrategy::BusyPoll),
        "park" => Ok(WaitStrategy::Park),
        "default" => Ok(WaitStrategy::default()),
        other => Err(format!("unknown wait mode {other:?}").into()),
    }
}

/// Child: `tb SOCKET`: echoes `ping` onto `pong`.
pub fn child_ping(args: &[String]) -> Result<()> {
    let [socket] = args else {
        return Err("usage: tb SOCKET".into());
    };
    let client = Client::connect_to(Some(Path::new(socket)), "bench-tb-echo")?;
    let mut ping = client.consumer_with(
        "ping",
        ConsumerOptions::default()
            .end_of_stream(false)
            .policy(Policy::Block)
            .depth(8)
            .wait(WaitStrategy::BusyPoll),
    )?;
    let pong = client.producer("pong")?;
    say("ready")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(cmd) = next_command(&mut stdin)? {
        let [pp, _size, variant, count, mode] = cmd.as_slice() else {
            return Err(format!("tb child: bad command {cmd:?}").into());
        };
        if pp != "pp" {
            return Err(format!("tb child: bad command {cmd:?}").into());
        }
        let variant = Variant::parse(variant)?;
        ping.set_wait_strategy(strategy(mode)?);
        for _ in 0..num::<u64>(count)? {
            let t = ping.recv_timeout(ROUND_TIMEOUT)?;
            let size = t.len();
            let b = read_payload(&t, variant)?;
            drop(t);
            let mut r = pong.loan_bytes(size)?;
            write_payload(&mut r, !b, variant);
            r.publish()?;
        }
        say("done")?;
    }
    Ok(())
}

/// Parent side of streaming, fan-out and work queues: a producer on
/// `channel` and `n` consumer children that count what they consumed in the
/// shared done counter.
pub struct TbFan {
    producer: Producer,
    peers: Vec<Peer>,
    next: u64,
}

impl TbFan {
    /// Spawns `n` consumers of `channel` waiting with `mode`
    /// (`busy`, `park`, `default`), then opens the producer.
    pub fn start(tb: &Tb, shared: &Shared, channel: &str, n: usize, mode: &str) -> Result<TbFan> {
        let fd = shared.raw_fd();
        let mut peers = Vec::with_capacity(n);
        for _ in 0..n {
            let args = vec![
                "tbsub".into(),
                path_arg(&tb.socket)?,
                channel.to_owned(),
                mode.to_owned(),
                fd.to_string(),
                shared.buf_len.to_string(),
            ];
            peers.push(Peer::spawn(&format!("tensorbus {channel}"), &args, &[fd])?);
        }
        let producer = tb.client.producer(channel)?;
        Ok(TbFan {
            producer,
            peers,
            next: 1,
        })
    }

    /// Tells the consumers to consume until the stop flag.
    pub fn begin(&mut self, variant: Variant) -> Result<()> {
        for p in &mut self.peers {
            p.send(&format!("st {}", variant.name()))?;
        }
        Ok(())
    }

    /// Publishes one message.
    pub fn send(&mut self, size: usize, variant: Variant) -> Result<()> {
        let b = pattern(self.next);
        self.next += 1;
        let mut t = self
            .producer
            .loan_timeout(&[size as u32], DType::U8, ROUND_TIMEOUT)?;
        write_payload(&mut t, b, variant);
        t.publish()?;
        Ok(())
    }

    /// Waits for every consumer to stop (the caller set the stop flag).
    pub fn end(&mut self) -> Result<()> {
        for p in &mut self.peers {
            p.expect("done")?;
        }
        Ok(())
    }

    /// Ends the children.
    pub fn finish(self) -> Result<()> {
        drop(self.producer);
        for p in self.peers {
            p.finish()?;
        }
        Ok(())
    }
}

/// Child: `tbsub SOCKET CHANNEL MODE FD MAX`: consumes until the stop flag,
/// counting each consumed message in the done counter.
pub fn child_sub(args: &[String]) -> Result<()> {
    let [socket, channel, mode, fd, max] = args else {
        return Err("usage: tbsub SOCKET CHANNEL MODE FD MAX".into());
    };
    let shared = Shared::inherit(fd, max)?;
    let client = Client::connect_to(Some(Path::new(socket)), "bench-tb-sub")?;
    let consumer = client.consumer_with(
        channel,
        ConsumerOptions::default()
            .end_of_stream(false)
            .policy(Policy::Block)
            .depth(8)
            .wait(strategy(mode)?),
    )?;
    say("ready")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(cmd) = next_command(&mut stdin)? {
        let [st, variant] = cmd.as_slice() else {
            return Err(format!("tbsub child: bad command {cmd:?}").into());
        };
        if st != "st" {
            return Err(format!("tbsub child: bad command {cmd:?}").into());
        }
        let variant = Variant::parse(variant)?;
        loop {
            match consumer.recv_timeout(Duration::from_millis(2)) {
                Ok(t) => {
                    read_payload(&t, variant)?;
                    drop(t);
                    shared.done().fetch_add(1, Ordering::AcqRel);
                }
                Err(tensorbus::error::RecvError::Timeout(_)) => {
                    if shared.stop().load(Ordering::Acquire) != 0 {
                        break;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        say("done")?;
    }
    Ok(())
}
