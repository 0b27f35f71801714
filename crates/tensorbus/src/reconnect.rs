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
//! * one watcher thread per process ([`watch`]) sleeps in `poll` on every
//!   client's broker connection (no events: `POLLHUP` needs none) and an
//!   eventfd that wakes it when a client joins or the last one leaves, so
//!   it does not wake at all while the broker lives; on a hang-up it
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
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
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
/// How soon the watcher looks again at a connection a request held.
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

/// Wakes the watcher out of its `poll` (an eventfd; `(pid, fd)`: a forked
/// child makes its own, so it never consumes a wake meant for its parent).
static WAKE: Mutex<Option<(u32, OwnedFd)>> = Mutex::new(None);

/// The process's wake eventfd (made on first use), as a raw fd for `poll`.
fn wake_fd() -> Option<std::os::fd::RawFd> {
    let mut w = WAKE.lock().unwrap_or_else(|p| p.into_inner());
    let me = std::process::id();
    if w.as_ref().is_none_or(|(pid, _)| *pid != me) {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new
        // descriptor that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        *w = Some((me, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    w.as_ref().map(|(_, fd)| fd.as_raw_fd())
}

/// Wakes the watcher (a client joined, or the watcher must stop).
fn wake() {
    if let Some(fd) = wake_fd() {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd; a full
        // counter (EAGAIN) already means "wake up".
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

/// Empties the wake eventfd after a wake.
fn drain_wake(fd: std::os::fd::RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64 from our non-blocking
    // eventfd; EAGAIN (nothing to read) is fine.
    unsafe { libc::read(fd, (&raw mut v).cast(), 8) };
}

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
    if w.mine(me) {
        // The running watcher polls the new client's socket too.
        drop(w);
        wake();
        return;
    }
    register_fork_handlers();
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

/// Called when a client's last reference drops: with no client left, stops
/// the watcher and waits for it (the wake eventfd gets it out of `poll`).
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
        // one when the user let go): it sees no client and returns on its
        // own right after, detached.
        return;
    }
    wake();
    let _ = t.join();
}

thread_local! {
    /// Set on the watcher thread. (Not `thread::current()`: that allocates
    /// a handle for the calling thread, which valgrind then reports at exit
    /// in a C program whose main thread made it.)
    static IN_WATCHER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Fork safety. A fork copies every lock as it is at that moment, and the
/// child has no watcher to release what the watcher held: a child that then
/// connects a client of its own (which takes [`WATCHED`], [`WAKE`], a
/// connection's or a survivor's mutex) would wait forever. So the watcher
/// holds this gate whenever it may hold any of them (everything but its
/// `poll`), and a fork waits for the gate in a `pthread_atfork` prepare
/// handler, then both sides open it again. The watcher never blocks long
/// inside the gate, except for one reconnect attempt while a new broker
/// adopts the bus (at most [`ADOPT_TIMEOUT`]).
static FORK_GATE: AtomicBool = AtomicBool::new(false);

/// The gate, held (see [`FORK_GATE`]).
struct ForkGate;

impl ForkGate {
    fn enter() -> ForkGate {
        close_fork_gate();
        ForkGate
    }
}

impl Drop for ForkGate {
    fn drop(&mut self) {
        open_fork_gate();
    }
}

/// Waits for the gate and closes it. Acquire: what the watcher did before
/// it opened the gate (locks released) happens before the fork.
fn close_fork_gate() {
    while FORK_GATE
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
}

/// Release: pairs with the Acquire of the next closer.
fn open_fork_gate() {
    FORK_GATE.store(false, Ordering::Release);
}

extern "C" fn fork_prepare() {
    close_fork_gate();
}

extern "C" fn fork_done() {
    open_fork_gate();
}

/// Registers the fork handlers once per process (before the first watcher).
fn register_fork_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are plain `extern "C"` functions that only
        // touch an atomic; registering them has no other precondition.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_done), Some(fork_done)) };
    });
}

fn watcher(me: u32) {
    IN_WATCHER.set(true);
    let myself = std::thread::current().id();
    let still_mine =
        |w: &Watched| w.pid == me && w.thread.as_ref().map(|t| t.thread().id()) == Some(myself);
    loop {
        let gate = ForkGate::enter();
        let clients: Vec<Arc<Inner>> = {
            let mut w = watched();
            if !still_mine(&w) {
                return; // stopped by `unwatch`
            }
            w.clients.retain(|c| c.strong_count() > 0);
            w.clients.iter().filter_map(Weak::upgrade).collect()
        };
        for inner in &clients {
            look_after(inner);
        }
        // Sleep until a connection hangs up, a client joins or leaves, or
        // the next reconnect attempt is due: no wake-ups while the broker
        // is alive (this thread would otherwise preempt spinning receivers).
        let (mut fds, timeout) = poll_set(&clients);
        drop(clients); // a user's close must not wait for this thread
        if !still_mine(&watched()) {
            return; // that drop was the last client's (`unwatch` ran here)
        }
        let wake = wake_fd();
        if let Some(fd) = wake {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = timeout.map_or(MAX_SLEEP_MS, |t| {
            (t.as_millis() as libc::c_int).clamp(1, MAX_SLEEP_MS)
        });
        // Asleep, this thread holds no lock: a fork may go on.
        drop(gate);
        // SAFETY: `fds` is a live, correctly sized array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n > 0 {
            if let (Some(fd), Some(p)) = (wake, fds.last()) {
                if p.revents & libc::POLLIN != 0 {
                    drain_wake(fd);
                }
            }
        }
    }
}

/// Longest sleep of the watcher: bounds how late it notices a hang-up on a
/// socket it could not add to its poll set (a request held the connection)
/// or one replaced under it.
const MAX_SLEEP_MS: libc::c_int = 1000;

/// The sockets to watch for a hang-up (those of live connections), and how
/// long to sleep at most: until the next reconnect attempt is due, or
/// [`WATCH_INTERVAL`] while a request holds a connection.
fn poll_set(clients: &[Arc<Inner>]) -> (Vec<libc::pollfd>, Option<Duration>) {
    let mut fds = Vec::with_capacity(clients.len() + 1);
    let mut timeout: Option<Duration> = None;
    let mut at_most = |d: Duration| timeout = Some(timeout.map_or(d, |t| t.min(d)));
    let now = Instant::now();
    for inner in clients {
        let s = &inner.survivor;
        if s.refused() || inner.origin.is_forked() {
            continue;
        }
        if let Some((due, _)) = *s.retry.lock().unwrap_or_else(|p| p.into_inner()) {
            at_most(due.saturating_duration_since(now));
            continue; // its socket stays hung up: poll would return at once
        }
        match inner.try_lock_conn() {
            Some(conn) => fds.push(libc::pollfd {
                fd: conn.sock.as_raw_fd(),
                events: 0, // POLLHUP and POLLERR need no event
                revents: 0,
            }),
            None => at_most(WATCH_INTERVAL), // a request is running
        }
    }
    (fds, timeout)
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
