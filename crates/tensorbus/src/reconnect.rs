//! Surviving a broker restart (issue 16.2).
//!
//! When the broker dies the data path goes on: producers and consumers
//! keep handing tensors through shared memory. What stops is the control
//! path (opens, closes, reclaim after deaths). A broker started on the
//! same socket adopts the running bus when a survivor hands it over:
//!
//! * each client keeps what it needs for that: the control segment's and
//!   every pool's descriptor (the Welcome carries them), its client id, the
//!   bus id, and a claim for every handle it holds ([`Survivor`]);
//! * one watcher thread per process ([`watch`]) notices a broker
//!   connection that hung up (`poll` with no events: `POLLHUP`), and
//!   reconnects with bounded exponential backoff (10 ms doubling to
//!   500 ms, for as long as the client lives);
//! * a request that finds the broker gone tries one reconnect itself
//!   first ([`reconnect`]), so a call made right after the new broker
//!   started goes through;
//! * the reconnect sends [`Request::Adopt`] with the descriptors; the new
//!   broker checks the claims against shared memory. Accepted: the client
//!   carries on with the same id and handles. Refused (the claims
//!   disagree, or the broker started a new bus, or its config does not fit
//!   the bus): the client stops trying; its handles keep working among the
//!   clients of the old bus, as they did before adoption existed.
//!
//! A forked child's inherited clients never reconnect (they are inert).

use crate::client::{Conn, ExchangeError, Inner};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tensorbus_core::layout::LAYOUT_VERSION;
use tensorbus_core::proto::{ClaimKind, ErrorKind, HandleClaim, Request, Response};
use tensorbus_shm::SeqpacketConn;

/// First and longest wait between two reconnect attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long one adoption request waits for the new broker's answer (it
/// may have to map and check the whole bus first).
const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the watcher looks at every client's connection.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

/// What a client keeps to hand its bus over to a new broker.
pub(crate) struct Survivor {
    name: String,
    bus_id: u64,
    /// The control segment, then every pool in pool order.
    fds: Vec<OwnedFd>,
    claims: Mutex<HashMap<u32, HandleClaim>>,
    /// The new broker refused this client's claims: stop trying.
    refused: AtomicBool,
    /// (next attempt, current backoff) while the broker is gone.
    retry: Mutex<Option<(Instant, Duration)>>,
}

impl Survivor {
    pub(crate) fn new(name: &str, bus_id: u64, control: OwnedFd, pools: Vec<OwnedFd>) -> Survivor {
        Survivor {
            name: name.to_owned(),
            bus_id,
            fds: std::iter::once(control).chain(pools).collect(),
            claims: Mutex::new(HashMap::new()),
            refused: AtomicBool::new(false),
            retry: Mutex::new(None),
        }
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, HashMap<u32, HandleClaim>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a successful reply changed about this client's handles.
    pub(crate) fn note(&self, req: &Request, resp: &Response) {
        let claim = match *resp {
            Response::Producer {
                handle,
                bit,
                row,
                ref channel,
            } => Some(HandleClaim {
                handle,
                bit,
                kind: ClaimKind::Producer,
                channel: channel.index,
                index: row,
            }),
            Response::Consumer {
                handle,
                bit,
                sub,
                ref channel,
                ..
            } => Some(HandleClaim {
                handle,
                bit,
                kind: ClaimKind::Subscriber,
                channel: channel.index,
                index: sub,
            }),
            _ => None,
        };
        if let Some(c) = claim {
            self.claims().insert(c.handle, c);
            return;
        }
        match (req, resp) {
            (Request::Detach { handle }, Response::Ok) => {
                if let Some(c) = self.claims().get_mut(handle) {
                    *c = HandleClaim {
                        kind: ClaimKind::Detached,
                        channel: 0,
                        index: 0,
                        ..*c
                    };
                }
            }
            (Request::Close { handle }, _) => self.forget(*handle),
            _ => {}
        }
    }

    /// Forgets a handle this client closed (or gave up).
    pub(crate) fn forget(&self, handle: u32) {
        self.claims().remove(&handle);
    }

    /// Whether the new broker refused this client.
    pub(crate) fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Why a reconnect did not happen.
#[derive(Debug)]
pub(crate) enum ReconnectError {
    /// No broker listens yet (or the attempt is not due).
    NotYet,
    /// The new broker refused (for good).
    Refused,
}

/// One reconnect attempt for `inner`, whose connection `conn` is locked by
/// the caller: connects to the socket, hands the bus over and, accepted,
/// replaces the connection.
pub(crate) fn reconnect(inner: &Inner, conn: &mut Conn) -> Result<(), ReconnectError> {
    let s = &inner.survivor;
    if s.refused() || inner.origin.check_slow().is_err() {
        return Err(ReconnectError::Refused);
    }
    if !hung_up(conn) {
        // Alive after all (another thread reconnected first).
        return Ok(());
    }
    let sock = SeqpacketConn::connect(&inner.socket).map_err(|_| ReconnectError::NotYet)?;
    let mut fresh = Conn::new(sock, ADOPT_TIMEOUT);
    let req = Request::Adopt {
        name: s.name.clone(),
        version: LAYOUT_VERSION,
        client_id: inner.client_id,
        bus_id: s.bus_id,
        handles: s.claims().values().copied().collect(),
    };
    let fds: Vec<_> = s.fds.iter().map(|f| f.as_fd()).collect();
    match fresh.exchange(&req, &fds) {
        Ok(reply) => match reply.resp {
            Response::Adopted { .. } => {
                fresh.timeout = conn.timeout;
                // Track the new socket before the old one closes (fork.rs).
                inner.origin.retrack(fresh.sock.as_raw_fd());
                *conn = fresh;
                *s.retry.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(())
            }
            Response::Error {
                kind: ErrorKind::Refused | ErrorKind::VersionMismatch | ErrorKind::PermissionDenied,
                message,
            } => {
                if std::env::var_os("TENSORBUS_VERBOSE").is_some() {
                    eprintln!(
                        "tensorbus: the new broker refused client {}: {message}",
                        inner.client_id
                    );
                }
                s.refused.store(true, Ordering::Relaxed);
                Err(ReconnectError::Refused)
            }
            _ => Err(ReconnectError::NotYet),
        },
        Err(
            ExchangeError::Unavailable(_) | ExchangeError::Timeout | ExchangeError::Protocol(_),
        ) => Err(ReconnectError::NotYet),
    }
}

/// Whether the broker's end of `conn` hung up (`POLLHUP` needs no event).
fn hung_up(conn: &Conn) -> bool {
    let mut p = libc::pollfd {
        fd: conn.sock.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// The clients the watcher looks after, the process it runs in and its
/// thread.
///
/// The watcher lives while the process has a client: the last client's
/// drop stops and joins it ([`unwatch`]), so a process that closed every
/// client has no tensorbus thread left (valgrind finds nothing running at
/// exit). A forked child inherits this state but not the thread: the
/// parent's handle moves to `orphans` (never joined: there is no such
/// thread here; kept so its bookkeeping stays reachable) and the child's
/// first client of its own starts a watcher of the child's.
struct Watched {
    pid: u32,
    clients: Vec<Weak<Inner>>,
    thread: Option<JoinHandle<()>>,
    orphans: Vec<JoinHandle<()>>,
}

static WATCHED: Mutex<Watched> = Mutex::new(Watched {
    pid: 0,
    clients: Vec::new(),
    thread: None,
    orphans: Vec::new(),
});

fn watched() -> MutexGuard<'static, Watched> {
    WATCHED.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watched {
    /// Moves a watcher started by another process (before a fork) out of
    /// the way; true when this process runs a watcher of its own.
    fn mine(&mut self, me: u32) -> bool {
        if self.pid != me {
            if let Some(t) = self.thread.take() {
                self.orphans.push(t);
            }
            self.pid = 0;
        }
        self.pid == me && self.thread.is_some()
    }
}

/// Puts `inner` under the process's watcher (started on first use, and
/// again in a forked child that connects a client of its own).
pub(crate) fn watch(inner: &Arc<Inner>) {
    let mut w = watched();
    w.clients.retain(|c| c.strong_count() > 0);
    w.clients.push(Arc::downgrade(inner));
    let me = std::process::id();
    if !w.mine(me) {
        let started = std::thread::Builder::new()
            .name("tensorbus-watch".into())
            // A closure (not the fn item) so the thread's frames name this
            // function (the C tests' valgrind suppressions match on it).
            .spawn(move || watcher(me));
        if let Ok(t) = started {
            w.pid = me;
            w.thread = Some(t);
        }
    }
}

/// Called when a client's last reference drops: with no client left, stops
/// the watcher and waits for it (it wakes at once: it parks, not sleeps).
pub(crate) fn unwatch() {
    let mut w = watched();
    w.clients.retain(|c| c.strong_count() > 0);
    if !w.clients.is_empty() || !w.mine(std::process::id()) {
        return;
    }
    let Some(t) = w.thread.take() else { return };
    w.pid = 0;
    drop(w);
    if IN_WATCHER.get() {
        // The watcher itself dropped the last reference (it had upgraded
        // one when the user let go): it sees no client and returns.
        return;
    }
    t.thread().unpark();
    let _ = t.join();
}

thread_local! {
    /// Set on the watcher thread. (Not `thread::current()`: that allocates
    /// a handle for the calling thread, which valgrind then reports at exit
    /// in a C program whose main thread made it.)
    static IN_WATCHER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn watcher(me: u32) {
    IN_WATCHER.set(true);
    let myself = std::thread::current().id();
    loop {
        std::thread::park_timeout(WATCH_INTERVAL);
        let clients: Vec<Arc<Inner>> = {
            let mut w = watched();
            let still_mine =
                w.pid == me && w.thread.as_ref().map(|t| t.thread().id()) == Some(myself);
            if !still_mine {
                return; // stopped by `unwatch`
            }
            w.clients.retain(|c| c.strong_count() > 0);
            w.clients.iter().filter_map(Weak::upgrade).collect()
        };
        for inner in clients {
            look_after(&inner);
        }
    }
}

/// Reconnects `inner` if its broker hung up and an attempt is due.
fn look_after(inner: &Inner) {
    let s = &inner.survivor;
    if s.refused() || inner.origin.is_forked() {
        return;
    }
    let Some(mut conn) = inner.try_lock_conn() else {
        return; // a request is running: it reconnects itself if needed
    };
    if !hung_up(&conn) {
        return;
    }
    let now = Instant::now();
    let mut retry = s.retry.lock().unwrap_or_else(|p| p.into_inner());
    let (due, backoff) = retry.unwrap_or((now, BACKOFF_FIRST));
    if now < due {
        return;
    }
    drop(retry);
    if let Err(ReconnectError::NotYet) = reconnect(inner, &mut conn) {
        let next = (backoff * 2).min(BACKOFF_MAX);
        retry = s.retry.lock().unwrap_or_else(|p| p.into_inner());
        *retry = Some((Instant::now() + backoff, next));
    }
}
