//! iceoryx2 contenders: publish-subscribe of `[u8]` slices loaned from the
//! publisher (`loan_slice_uninit`), received with a busy-poll loop or after an
//! event/listener wake-up; and the publishing side of streaming.
//!
//! Per payload size the parent creates three services (`ping`, `pong`,
//! `stream`, each `max_publishers = 1`, `max_subscribers = 1`, subscriber
//! buffers of 2 (ping-pong) or 8 (streaming)); the child opens them on
//! `open SIZE` and drops them on `close`, so only one size's shared memory
//! exists at a time. Two event services (`ev/ping`, `ev/pong`) live for the
//! whole run. Service names carry the parent's pid, so concurrent runs do not
//! collide, and every node and service is dropped (its files removed) before
//! the process exits.

use crate::common::{
    check_reply, next_command, num, pattern, read_payload, say, Peer, Result, Shared, Variant,
    ROUND_TIMEOUT,
};
use iceoryx2::port::listener::Listener;
use iceoryx2::port::notifier::Notifier;
use iceoryx2::port::publisher::Publisher;
use iceoryx2::port::subscriber::Subscriber;
use iceoryx2::prelude::*;
use iceoryx2::service::port_factory::{event, publish_subscribe};
use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;
use std::time::Instant;

type Pub = Publisher<ipc::Service, [u8], ()>;
type Sub = Subscriber<ipc::Service, [u8], ()>;
type PsFactory = publish_subscribe::PortFactory<ipc::Service, [u8], ()>;
type EvFactory = event::PortFactory<ipc::Service>;

/// Subscriber buffer of the ping-pong services.
const PP_BUFFER: usize = 2;
/// Subscriber buffer of the streaming service (8 messages in flight).
const STREAM_BUFFER: usize = 8;

fn quiet_logs() {
    set_log_level(LogLevel::Error);
}

fn node() -> Result<Node<ipc::Service>> {
    Ok(NodeBuilder::new()
        .signal_handling_mode(SignalHandlingMode::Disabled)
        .create::<ipc::Service>()?)
}

fn service_name(tag: &str, what: &str) -> Result<ServiceName> {
    let s = format!("tensorbus-bench/{tag}/{what}");
    Ok(ServiceName::new(&s)?)
}

fn pubsub(node: &Node<ipc::Service>, tag: &str, what: &str, buffer: usize) -> Result<PsFactory> {
    Ok(node
        .service_builder(&service_name(tag, what)?)
        .publish_subscribe::<[u8]>()
        .max_publishers(1)
        .max_subscribers(1)
        .max_nodes(2)
        .history_size(0)
        .subscriber_max_buffer_size(buffer)
        .subscriber_max_borrowed_samples(2)
        .open_or_create()?)
}

fn events(node: &Node<ipc::Service>, tag: &str, what: &str) -> Result<EvFactory> {
    Ok(node
        .service_builder(&service_name(tag, what)?)
        .event()
        .max_notifiers(1)
        .max_listeners(1)
        .max_nodes(2)
        .open_or_create()?)
}

fn publisher(f: &PsFactory, size: usize) -> Result<Pub> {
    Ok(f.publisher_builder()
        .initial_max_slice_len(size)
        .max_loaned_samples(2)
        .create()?)
}

fn subscriber(f: &PsFactory, buffer: usize) -> Result<Sub> {
    Ok(f.subscriber_builder().buffer_size(buffer).create()?)
}

/// Loans a `size`-byte slice, writes it per `variant` and sends it.
#[inline]
fn send(p: &Pub, size: usize, b: u8, variant: Variant) -> Result<()> {
    let mut s = p.loan_slice_uninit(size)?;
    let payload: &mut [MaybeUninit<u8>] = s.payload_mut();
    match variant {
        // SAFETY: `payload` is `size` writable bytes of our loaned sample.
        Variant::Full => unsafe {
            std::ptr::write_bytes(payload.as_mut_ptr().cast::<u8>(), b, payload.len())
        },
        Variant::Touch => {
            payload[0].write(b);
        }
    }
    // SAFETY: the sample lives in a shared-memory mapping whose pages the
    // kernel zero-filled and earlier messages wrote: every byte holds a
    // defined value (`touch` writes only the first on purpose; the receiver
    // reads only that one). u8 has no invalid bit patterns.
    let s = unsafe { s.assume_init() };
    s.send()?;
    Ok(())
}

/// Receives the next sample, busy-polling (`listener == None`) or waiting on
/// the listener between attempts, and returns its pattern byte.
#[inline]
fn receive(
    sub: &Sub,
    listener: Option<&Listener<ipc::Service>>,
    variant: Variant,
) -> Result<(u8, usize)> {
    let mut spins = 0u32;
    let mut start: Option<Instant> = None;
    loop {
        if let Some(s) = sub.receive()? {
            let b = read_payload(s.payload(), variant)?;
            return Ok((b, s.payload().len()));
        }
        match listener {
            Some(l) => {
                l.timed_wait(|_| {}, ROUND_TIMEOUT)?;
            }
            None => std::hint::spin_loop(),
        }
        spins = spins.wrapping_add(1);
        if spins % 4096 == 0 || listener.is_some() {
            let s = *start.get_or_insert_with(Instant::now);
            if s.elapsed() > ROUND_TIMEOUT {
                return Err(format!("iceoryx2: no sample within {ROUND_TIMEOUT:?}").into());
            }
        }
    }
}

/// One size's services and the parent's ports.
struct SizePorts {
    size: usize,
    ping: Pub,
    pong: Sub,
    stream: Pub,
    _services: [PsFactory; 3],
}

/// Parent side.
pub struct Iox {
    node: Node<ipc::Service>,
    tag: String,
    notifier: Notifier<ipc::Service>,
    listener: Listener<ipc::Service>,
    _events: [EvFactory; 2],
    ports: Option<SizePorts>,
    peer: Peer,
    next: u64,
}

impl Iox {
    /// The child's process id (for its context switches).
    pub fn pid(&self) -> u32 {
        self.peer.pid()
    }

    /// Creates the node and event services and spawns the child.
    pub fn start(shared: &Shared) -> Result<Iox> {
        quiet_logs();
        let tag = format!("p{}", std::process::id());
        let node = node()?;
        let ev_ping = events(&node, &tag, "ev/ping")?;
        let ev_pong = events(&node, &tag, "ev/pong")?;
        let notifier = ev_ping.notifier_builder().create()?;
        let listener = ev_pong.listener_builder().create()?;
        let fd = shared.raw_fd();
        let args = vec![
            "iox".into(),
            tag.clone(),
            fd.to_string(),
            shared.buf_len.to_string(),
        ];
        let peer = Peer::spawn("iceoryx2", &args, &[fd])?;
        Ok(Iox {
            node,
            tag,
            notifier,
            listener,
            _events: [ev_ping, ev_pong],
            ports: None,
            peer,
            next: 1,
        })
    }

    /// Makes sure the services for `size` exist on both sides.
    pub fn open(&mut self, size: usize) -> Result<()> {
        if self.ports.as_ref().is_some_and(|p| p.size == size) {
            return Ok(());
        }
        self.close()?;
        let ping_s = pubsub(&self.node, &self.tag, &format!("ping/{size}"), PP_BUFFER)?;
        let pong_s = pubsub(&self.node, &self.tag, &format!("pong/{size}"), PP_BUFFER)?;
        let stream_s = pubsub(
            &self.node,
            &self.tag,
            &format!("stream/{size}"),
            STREAM_BUFFER,
        )?;
        let pong = subscriber(&pong_s, PP_BUFFER)?;
        self.peer.send(&format!("open {size}"))?;
        self.peer.expect("ok")?;
        let ping = publisher(&ping_s, size)?;
        let stream = publisher(&stream_s, size)?;
        self.ports = Some(SizePorts {
            size,
            ping,
            pong,
            stream,
            _services: [ping_s, pong_s, stream_s],
        });
        Ok(())
    }

    /// Drops the current size's services on both sides.
    pub fn close(&mut self) -> Result<()> {
        if self.ports.take().is_some() {
            self.peer.send("close")?;
            self.peer.expect("ok")?;
        }
        Ok(())
    }

    /// Runs `warm + count` round trips, busy-polling or with event wake-ups.
    pub fn block(
        &mut self,
        busy: bool,
        size: usize,
        variant: Variant,
        warm: usize,
        count: usize,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        self.open(size)?;
        let mode = if busy { "busy" } else { "event" };
        self.peer.send(&format!(
            "pp {size} {} {} {mode}",
            variant.name(),
            warm + count
        ))?;
        let ports = self.ports.as_ref().ok_or("iceoryx2 ports missing")?;
        let listener = (!busy).then_some(&self.listener);
        for i in 0..warm + count {
            let v = self.next;
            self.next += 1;
            let b = pattern(v);
            let t0 = Instant::now();
            send(&ports.ping, size, b, variant)?;
            if !busy {
                self.notifier.notify()?;
            }
            let (got, len) = receive(&ports.pong, listener, variant)?;
            let ns = t0.elapsed().as_nanos() as u64;
            if len != size {
                return Err(format!("iceoryx2 reply of {len} bytes, expected {size}").into());
            }
            check_reply(&[got], Variant::Touch, !b)?;
            if i >= warm {
                out.push(ns);
            }
        }
        self.peer.expect("done")
    }

    /// Tells the child to consume the stream until the stop flag.
    pub fn stream_begin(&mut self, size: usize, variant: Variant) -> Result<()> {
        self.open(size)?;
        self.peer.send(&format!("st {}", variant.name()))
    }

    /// Publishes one streamed message.
    pub fn stream_send(&mut self, size: usize, variant: Variant) -> Result<()> {
        let b = pattern(self.next);
        self.next += 1;
        let ports = self.ports.as_ref().ok_or("iceoryx2 ports missing")?;
        send(&ports.stream, size, b, variant)
    }

    /// Waits for the child to stop consuming (the caller set the stop flag).
    pub fn stream_end(&mut self) -> Result<()> {
        self.peer.expect("done")
    }

    /// Ends the child, then drops every port, service and the node.
    pub fn finish(mut self) -> Result<()> {
        self.close()?;
        self.peer.finish()
    }
}

/// Removes iceoryx2's `/tmp/iceoryx2/{nodes,services}` and the directory
/// itself when they are empty (`remove_dir` refuses non-empty ones, so
/// other iceoryx2 applications are never disturbed).
pub fn remove_empty_dirs() {
    let root = std::path::Path::new("/tmp/iceoryx2");
    for sub in ["nodes", "services"] {
        let _ = std::fs::remove_dir(root.join(sub));
    }
    let _ = std::fs::remove_dir(root);
}

/// The child's ports for one size.
struct ChildPorts {
    ping: Sub,
    pong: Pub,
    stream: Sub,
    _services: [PsFactory; 3],
}

/// Child: `iox TAG FD MAX`.
pub fn child(args: &[String]) -> Result<()> {
    let [tag, fd, max] = args else {
        return Err("usage: iox TAG FD MAX".into());
    };
    quiet_logs();
    let shared = Shared::inherit(fd, max)?;
    let node = node()?;
    let ev_ping = events(&node, tag, "ev/ping")?;
    let ev_pong = events(&node, tag, "ev/pong")?;
    let listener = ev_ping.listener_builder().create()?;
    let notifier = ev_pong.notifier_builder().create()?;
    let mut ports: Option<ChildPorts> = None;
    say("ready")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(cmd) = next_command(&mut stdin)? {
        match cmd.as_slice() {
            [open, size] if open == "open" => {
                let size: usize = num(size)?;
                drop(ports.take());
                let ping_s = pubsub(&node, tag, &format!("ping/{size}"), PP_BUFFER)?;
                let pong_s = pubsub(&node, tag, &format!("pong/{size}"), PP_BUFFER)?;
                let stream_s = pubsub(&node, tag, &format!("stream/{size}"), STREAM_BUFFER)?;
                ports = Some(ChildPorts {
                    ping: subscriber(&ping_s, PP_BUFFER)?,
                    pong: publisher(&pong_s, size)?,
                    stream: subscriber(&stream_s, STREAM_BUFFER)?,
                    _services: [ping_s, pong_s, stream_s],
                });
                say("ok")?;
            }
            [close] if close == "close" => {
                ports = None;
                say("ok")?;
            }
            [pp, _size, variant, count, mode] if pp == "pp" => {
                let p = ports.as_ref().ok_or("iox child: pp before open")?;
                let variant = Variant::parse(variant)?;
                let event = mode == "event";
                let l = event.then_some(&listener);
                for _ in 0..num::<u64>(count)? {
                    let (b, len) = receive(&p.ping, l, variant)?;
                    send(&p.pong, len, !b, variant)?;
                    if event {
                        notifier.notify()?;
                    }
                }
                say("done")?;
            }
            [st, variant] if st == "st" => {
                let p = ports.as_ref().ok_or("iox child: st before open")?;
                let variant = Variant::parse(variant)?;
                loop {
                    if let Some(s) = p.stream.receive()? {
                        read_payload(s.payload(), variant)?;
                        drop(s);
                        shared.done().fetch_add(1, Ordering::AcqRel);
                        continue;
                    }
                    if shared.stop().load(Ordering::Acquire) != 0 {
                        break;
                    }
                    std::hint::spin_loop();
                }
                say("done")?;
            }
            other => return Err(format!("iox child: bad command {other:?}").into()),
        }
    }
    drop(ports);
    Ok(())
}
