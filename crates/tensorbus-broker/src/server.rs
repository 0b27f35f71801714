//! The broker's event loop: admission, requests, liveness.

use crate::config::Config;
use crate::metrics::MetricsServer;
use crate::rendezvous::{self, Access, SocketFile};
use crate::state::{InitError, Role, State};
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tensorbus_core::layout::LAYOUT_VERSION;
use tensorbus_core::proto::{
    encode_frames, parse_frame, ErrorKind, Request, Response, MAX_MESSAGE,
};
use tensorbus_shm::{PeerCred, Ready, SeqpacketConn, SeqpacketListener};

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Another broker answers on the socket.
    #[error("a broker is already running at {0}; stop it first or use another --socket")]
    AlreadyRunning(PathBuf),
    /// Something other than a stale tensorbus socket is at the socket path
    /// (a file, directory, symbolic link, another program's live socket).
    #[error("refusing to use {path} as the broker socket: {what}; it is left as it is: remove it yourself if it is not needed, or use another --socket")]
    Occupied {
        /// Socket path.
        path: PathBuf,
        /// What is there.
        what: String,
    },
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Shared memory could not be created.
    #[error("cannot create shared memory: {0}")]
    Memory(#[source] std::io::Error),
    /// The configuration cannot be laid out, or a channel it declares
    /// names a pool that does not exist (a config that passed
    /// [`Config::validate`] never does this).
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// [`EmbeddedBroker::start`] could not start the broker's thread (or
    /// [`Broker::serve_metrics`] its metrics thread).
    #[error("cannot start the broker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The metrics endpoint could not listen at its address
    /// ([`crate::metrics::bind`]).
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address asked for (`--metrics`, `[broker] metrics`).
        addr: String,
        /// OS error (or why the address does not resolve).
        source: std::io::Error,
    },
}

impl From<InitError> for StartError {
    fn from(e: InitError) -> StartError {
        match e {
            InitError::Config(m) => StartError::Config(crate::ConfigError::Invalid(m)),
            InitError::Memory(e) => StartError::Memory(e),
        }
    }
}

/// How often the broker sweeps slot headers for stray holder bits, and how
/// many headers per sweep (a full pass over 1M slots takes ~6 s, costing
/// the broker well under 1 ms per sweep).
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
const SWEEP_SLOTS: usize = 16_384;

/// Output a client has not taken yet: replies wait here (in order, with
/// their descriptors) while its socket is full, and go out when poll says it
/// is writable. The broker never blocks on one client's socket.
///
/// A client that reads its replies has about one reply pending (a few more
/// right after it abandoned requests on a timeout). One that keeps sending
/// requests without reading is disconnected (and reclaimed, like a death)
/// when a new reply finds [`MAX_PENDING_REPLIES`] replies or more than
/// [`MAX_PENDING_OUTPUT`] bytes still waiting; a reply of any size is
/// accepted when nothing is waiting.
pub const MAX_PENDING_OUTPUT: usize = 16 << 20;

/// Replies that may wait for one client (see [`MAX_PENDING_OUTPUT`]).
pub const MAX_PENDING_REPLIES: usize = 1024;

/// How many recent opens per client [`Request::Cancel`] can still undo.
const RECENT_OPENS: usize = 32;

/// One frame waiting to be sent.
struct Outgoing {
    frame: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Part 0 of a reply.
    first: bool,
}

struct ClientConn {
    conn: SeqpacketConn,
    cred: PeerCred,
    name: String,
    admitted: bool,
    /// Frames not yet sent, oldest first.
    out: VecDeque<Outgoing>,
    /// Bytes in `out`.
    out_bytes: usize,
    /// Replies (first frames) in `out`.
    out_replies: usize,
    /// (request id, handle) of the latest successful opens, for Cancel.
    recent_opens: VecDeque<(u64, u32)>,
    /// Reconnected after a broker restart ([`Request::Adopt`]).
    adopted: bool,
}

/// A broker bound to its socket. Run it with [`Broker::run`], or use
/// [`EmbeddedBroker`] to run one on a thread of the current process.
pub struct Broker {
    listener: SeqpacketListener,
    socket: PathBuf,
    /// The socket file this broker created (removed at stop only if the
    /// path still is that file).
    socket_file: SocketFile,
    socket_removed: bool,
    state: State,
    clients: HashMap<u32, ClientConn>,
    next_client: u32,
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
    verbose: bool,
    /// Receive buffer, reused for every request.
    buf: Vec<u8>,
    /// The metrics endpoint's thread, when serving one.
    metrics: Option<MetricsServer>,
    /// The config (a bus handed over is checked against it).
    config: Config,
    /// Until when requests other than [`Request::Adopt`] wait: the broker
    /// replaced the stale socket of a broker that died, and survivors of
    /// that bus get the first word (see `adopt.rs`).
    adopt_until: Option<std::time::Instant>,
    /// Requests held back while `adopt_until` runs: (client, request id, request).
    deferred: VecDeque<(u32, u64, Request)>,
    /// A client was welcomed into the bus this broker created: a bus
    /// handed over later is refused (two buses cannot be merged).
    welcomed: bool,
}

impl Broker {
    /// Creates pools and the control segment and binds the socket.
    ///
    /// Only a stale tensorbus socket at `socket` is replaced; a file,
    /// directory, symbolic link or another program's live socket is
    /// refused ([`StartError::Occupied`]), a live broker too
    /// ([`StartError::AlreadyRunning`]). Missing directories are created
    /// (0700, or 0711 when the config admits other users); an existing
    /// directory is checked and never changed. The socket is 0600, or 0666
    /// when other users are admitted (SO_PEERCRED admission is then the
    /// gate). At stop, [`Broker::run`] removes the socket only if the path
    /// still is the socket this broker created.
    pub fn bind(config: &Config, socket: &Path) -> Result<Broker, StartError> {
        let sock_err = |source: std::io::Error| StartError::Socket {
            path: socket.to_path_buf(),
            source,
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let access = Access::new(me, &config.broker.allowed_uids, &config.broker.allowed_gids);
        tensorbus_shm::socket::check_socket_path(socket).map_err(sock_err)?;
        tensorbus_shm::prepare_socket_dir(rendezvous::socket_dir(socket), access.dir_mode)
            .map_err(sock_err)?;
        let stale = rendezvous::take_over(socket)?;
        let state = State::new(config)?;
        let adopt_until = (stale && config.broker.adopt_wait_ms > 0).then(|| {
            std::time::Instant::now() + Duration::from_millis(config.broker.adopt_wait_ms)
        });
        let listener = SeqpacketListener::bind(socket).map_err(sock_err)?;
        listener.set_nonblocking(true).map_err(sock_err)?;
        let socket_file = SocketFile::bound(socket, access.socket_mode).map_err(sock_err)?;
        if access.shared {
            rendezvous::warn_if_unreachable(socket, &config.broker.allowed_gids);
        }
        let mut allowed_uids = config.broker.allowed_uids.clone();
        if allowed_uids.is_empty() {
            allowed_uids = vec![me, 0];
        }
        Ok(Broker {
            listener,
            socket: socket.to_path_buf(),
            socket_file,
            socket_removed: false,
            state,
            clients: HashMap::new(),
            next_client: 1,
            allowed_uids,
            allowed_gids: config.broker.allowed_gids.clone(),
            verbose: false,
            buf: vec![0u8; MAX_MESSAGE],
            metrics: None,
            config: config.clone(),
            adopt_until,
            deferred: VecDeque::new(),
            welcomed: false,
        })
    }

    /// Logs admissions, deaths and reclaims to stderr.
    pub fn set_verbose(&mut self, verbose: bool) {
        self.verbose = verbose;
    }

    /// Serves the OpenMetrics / Prometheus endpoint (`GET /metrics`) on
    /// `listener` (from [`crate::metrics::bind`]) from a new thread, for as
    /// long as this broker lives; returns the address it listens at. The
    /// numbers are those of `tensorbus stat`, taken by [`Broker::run`]'s
    /// event loop at each scrape (see [`crate::metrics`]).
    pub fn serve_metrics(&mut self, listener: TcpListener) -> Result<SocketAddr, StartError> {
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Metrics {
                addr: "the metrics listener".into(),
                source,
            })?;
        self.metrics = Some(MetricsServer::start(listener)?);
        Ok(addr)
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether [`Broker::run`] removed the socket file when it stopped
    /// (false if the path had become another file, e.g. a newer broker's
    /// socket, which is left alone).
    pub fn socket_removed(&self) -> bool {
        self.socket_removed
    }

    /// Serves until `stop` becomes true, then removes the socket file if
    /// the path still is the socket this broker created.
    pub fn run(&mut self, stop: &AtomicBool) {
        let mut ids: Vec<u32> = Vec::new();
        let mut ready: Vec<Ready> = Vec::new();
        let mut last_sweep = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            ids.clear();
            ids.extend(self.clients.keys().copied());
            // Writability is watched only for clients with output pending.
            let mut fds: Vec<(BorrowedFd<'_>, bool)> = Vec::with_capacity(ids.len() + 1);
            fds.push((self.listener.as_fd(), false));
            for id in &ids {
                let c = &self.clients[id];
                fds.push((c.conn.as_fd(), !c.out.is_empty()));
            }
            ready.clear();
            ready.resize(fds.len(), Ready::default());
            // The idle tick bounds how long a stop request waits (SIGTERM
            // sets `stop` from another thread): well under 100 ms.
            let tick = if self.state.has_pending_work() { 2 } else { 50 };
            let n = tensorbus_shm::poll_ready(&fds, &mut ready, Some(Duration::from_millis(tick)));
            drop(fds);
            if let Ok(n) = n {
                if n > 0 {
                    if ready[0].read {
                        self.accept_all();
                    }
                    for (i, id) in ids.iter().enumerate() {
                        if ready[i + 1].write {
                            self.flush(*id);
                        }
                        if ready[i + 1].read {
                            self.serve(*id);
                        }
                    }
                }
            }
            if self
                .adopt_until
                .is_some_and(|t| std::time::Instant::now() >= t)
            {
                if self.verbose {
                    eprintln!("tensorbus broker: no client handed over the running bus; starting a new one");
                }
                self.close_adoption_window();
            }
            self.state.progress();
            // Scrapes waiting for a snapshot (at most one at a time).
            while let Some(reply) = self
                .metrics
                .as_ref()
                .and_then(|m| m.requests.try_recv().ok())
            {
                let _ = reply.send(self.stat());
            }
            if last_sweep.elapsed() >= SWEEP_INTERVAL {
                last_sweep = std::time::Instant::now();
                for c in self.state.reap_waiting() {
                    eprintln!("tensorbus broker: adoption: client {c} of the dead broker is gone; reclaimed its handles");
                }
                self.state.watch_pools();
                let freed = self.state.sweep_stray_bits(SWEEP_SLOTS);
                if freed > 0 && self.verbose {
                    eprintln!("tensorbus broker: freed {freed} slots held only by holder bits of no open handle (corrupted holder words)");
                }
            }
        }
        self.socket_removed = self.socket_file.remove_if_ours();
    }

    fn accept_all(&mut self) {
        while let Ok(conn) = self.listener.accept() {
            let cred = conn.peer_cred().unwrap_or(PeerCred {
                pid: 0,
                uid: u32::MAX,
                gid: u32::MAX,
            });
            let id = self.take_client_id();
            self.clients.insert(
                id,
                ClientConn {
                    conn,
                    cred,
                    name: String::new(),
                    admitted: false,
                    out: VecDeque::new(),
                    out_bytes: 0,
                    out_replies: 0,
                    recent_opens: VecDeque::new(),
                    adopted: false,
                },
            );
        }
    }

    /// A client id no connection and no client of an adopted bus has.
    fn take_client_id(&mut self) -> u32 {
        loop {
            let id = self.next_client;
            self.next_client = self.next_client.wrapping_add(1).max(1);
            if !self.clients.contains_key(&id) && !self.state.is_waiting(id) {
                self.state.record_next_client(self.next_client);
                return id;
            }
        }
    }

    /// Ends the adoption window: requests held back are handled now.
    fn close_adoption_window(&mut self) {
        self.adopt_until = None;
        while let Some((id, req_id, req)) = self.deferred.pop_front() {
            if self.clients.contains_key(&id) {
                let (resp, fds) = self.handle(id, req_id, req);
                self.reply(id, req_id, &resp, fds);
            }
        }
    }

    fn allowed(&self, cred: &PeerCred) -> bool {
        self.allowed_uids.contains(&cred.uid) || self.allowed_gids.contains(&cred.gid)
    }

    /// Reads one request of client `id`, handles it and queues the reply.
    fn serve(&mut self, id: u32) {
        let mut fds = Vec::new();
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let received = match c.conn.recv(&mut self.buf, &mut fds) {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        };
        let Some(n) = received else {
            self.drop_client(id);
            return;
        };
        let (req_id, parsed) = match parse_frame(&self.buf[..n]) {
            Ok((h, _)) if h.parts != 1 => (
                h.id,
                Err(format!(
                    "a request must be one frame, got part {} of {}",
                    h.part, h.parts
                )),
            ),
            Ok((h, body)) => (
                h.id,
                serde_json::from_slice::<Request>(body).map_err(|e| e.to_string()),
            ),
            Err(e) => (0, Err(e.to_string())),
        };
        let parsed = match parsed {
            Ok(Request::Adopt {
                name,
                version,
                client_id,
                bus_id,
                handles,
            }) => {
                let claim = Claim {
                    name,
                    version,
                    client_id,
                    bus_id,
                    handles,
                };
                let (to, resp) = self.adopt_request(id, claim, fds);
                self.reply(to, req_id, &resp, Vec::new());
                return;
            }
            Ok(req @ Request::Hello { .. }) if self.adopt_until.is_some() => {
                drop(fds);
                self.deferred.push_back((id, req_id, req));
                return;
            }
            other => {
                drop(fds);
                other
            }
        };
        let (resp, send_fds) = match parsed {
            Ok(req) => self.handle(id, req_id, req),
            Err(e) => (
                error(
                    ErrorKind::InvalidArgument,
                    format!("malformed request: {e}"),
                ),
                Vec::new(),
            ),
        };
        let refused = matches!(
            &resp,
            Response::Error {
                kind: ErrorKind::PermissionDenied,
                ..
            }
        ) && self.clients.get(&id).is_some_and(|c| !c.admitted);
        self.reply(id, req_id, &resp, send_fds);
        if refused {
            self.drop_client(id);
        }
    }

    /// Queues `resp` (split into frames of request `req_id`; `fds` go with
    /// the first) for client `id` and sends what its socket takes now. A
    /// client over its output bound ([`MAX_PENDING_OUTPUT`]) is disconnected
    /// instead.
    fn reply(&mut self, id: u32, req_id: u64, resp: &Response, fds: Vec<OwnedFd>) {
        // What the client is told is in the registry before it can act on
        // it (a broker that dies now leaves nothing the client knows of
        // unrecorded).
        self.state.sync_registry();
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if !c.out.is_empty()
            && (c.out_replies >= MAX_PENDING_REPLIES || c.out_bytes > MAX_PENDING_OUTPUT)
        {
            eprintln!(
                "tensorbus broker: client {id} ({}, pid {}) does not read its replies ({} replies, {} bytes waiting; limits {MAX_PENDING_REPLIES} replies, {MAX_PENDING_OUTPUT} bytes); disconnecting it and reclaiming its holds",
                c.name, c.cred.pid, c.out_replies, c.out_bytes
            );
            self.drop_client(id);
            return;
        }
        let json = serde_json::to_vec(resp).unwrap_or_else(|e| {
            serde_json::to_vec(&error(ErrorKind::Internal, e.to_string())).unwrap_or_default()
        });
        let mut fds = Some(fds);
        for frame in encode_frames(req_id, &json) {
            c.out_bytes += frame.len();
            let first = fds.is_some();
            c.out.push_back(Outgoing {
                frame,
                fds: fds.take().unwrap_or_default(),
                first,
            });
        }
        c.out_replies += 1;
        self.flush(id);
    }

    /// Sends client `id`'s pending frames until its socket is full; a
    /// client whose socket fails is dropped.
    fn flush(&mut self, id: u32) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut failed = false;
        while let Some(o) = c.out.front() {
            let borrowed: Vec<BorrowedFd<'_>> = o.fds.iter().map(|f| f.as_fd()).collect();
            match c.conn.try_send(&o.frame, &borrowed) {
                Ok(()) => {
                    c.out_bytes -= o.frame.len();
                    c.out_replies -= usize::from(o.first);
                    c.out.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.drop_client(id);
        }
    }

    fn drop_client(&mut self, id: u32) {
        if let Some(c) = self.clients.remove(&id) {
            if self.verbose && c.admitted {
                eprintln!(
                    "tensorbus broker: client {id} ({}, pid {}) disconnected; reclaiming its holds",
                    c.name, c.cred.pid
                );
            }
            self.state.reclaim_client(id);
            self.state.forget_client(id);
        }
    }

    /// Handles request `req_id` of client `id`, remembering what it opened
    /// (for [`Request::Cancel`]).
    fn handle(&mut self, id: u32, req_id: u64, req: Request) -> (Response, Vec<OwnedFd>) {
        let (resp, fds) = self.handle_request(id, req);
        if let Response::Producer { handle, .. } | Response::Consumer { handle, .. } = &resp {
            if let Some(c) = self.clients.get_mut(&id) {
                if c.recent_opens.len() == RECENT_OPENS {
                    c.recent_opens.pop_front();
                }
                c.recent_opens.push_back((req_id, *handle));
            }
        }
        (resp, fds)
    }

    fn handle_request(&mut self, id: u32, req: Request) -> (Response, Vec<OwnedFd>) {
        let admitted = self.clients.get(&id).is_some_and(|c| c.admitted);
        match req {
            Request::Hello { name, version } => {
                let Some(c) = self.clients.get(&id) else {
                    return (
                        error(ErrorKind::Internal, "unknown client".into()),
                        Vec::new(),
                    );
                };
                if !self.allowed(&c.cred) {
                    return (
                        error(
                            ErrorKind::PermissionDenied,
                            format!(
                                "uid {} is not allowed; add it to [broker] allowed_uids (or its group to allowed_gids) in the broker config",
                                c.cred.uid
                            ),
                        ),
                        Vec::new(),
                    );
                }
                if version != LAYOUT_VERSION {
                    return (
                        error(
                            ErrorKind::VersionMismatch,
                            format!("client speaks layout version {version}, broker {LAYOUT_VERSION}; use matching tensorbus versions"),
                        ),
                        Vec::new(),
                    );
                }
                let fd = match self.state.dup_control_fd() {
                    Ok(fd) => fd,
                    Err(e) => {
                        return (
                            error(
                                ErrorKind::Internal,
                                format!("cannot duplicate the control segment descriptor: {e}"),
                            ),
                            Vec::new(),
                        )
                    }
                };
                let pid = c.cred.pid.max(0) as u32;
                let pool_fds = match self.state.read_only_pool_fds() {
                    Ok(f) => f,
                    Err(e) => {
                        return (
                            error(
                                ErrorKind::Internal,
                                format!("cannot duplicate the pool descriptors: {e}"),
                            ),
                            Vec::new(),
                        )
                    }
                };
                self.welcomed = true;
                self.state.register_client(id, pid);
                if let Some(c) = self.clients.get_mut(&id) {
                    c.admitted = true;
                    c.name = name.chars().take(64).collect();
                    if self.verbose {
                        eprintln!(
                            "tensorbus broker: client {id} ({}, pid {}) connected",
                            c.name, c.cred.pid
                        );
                    }
                }
                (
                    Response::Welcome {
                        client_id: id,
                        broker_pid: std::process::id(),
                        layout: self.state.layout_params(),
                        pools: self.state.pool_infos(),
                    },
                    std::iter::once(fd).chain(pool_fds).collect(),
                )
            }
            _ if !admitted => (
                error(ErrorKind::PermissionDenied, "say hello first".into()),
                Vec::new(),
            ),
            Request::OpenProducer { channel, create } => {
                self.open(id, &channel, create, Role::Producer, false)
            }
            Request::OpenConsumer {
                channel,
                policy,
                depth,
                writable,
                create,
                wait,
            } => self.open(
                id,
                &channel,
                create,
                Role::Subscriber {
                    policy,
                    depth,
                    writable,
                },
                wait,
            ),
            Request::Ready { handle } => match self.state.ready(id, handle) {
                Ok(opened) => opened.into_reply(),
                Err(e) => (error(e.kind(), e.to_string()), Vec::new()),
            },
            Request::RemoveChannel { channel } => match self.state.remove_channel(&channel) {
                Ok(()) => {
                    if self.verbose {
                        eprintln!("tensorbus broker: channel {channel:?} removed");
                    }
                    (Response::Ok, Vec::new())
                }
                Err(e) => {
                    let kind = match e {
                        crate::state::RemoveError::Unknown { .. } => ErrorKind::UnknownChannel,
                        crate::state::RemoveError::InUse { .. } => ErrorKind::Busy,
                        crate::state::RemoveError::Declared(_) => ErrorKind::PermissionDenied,
                    };
                    (error(kind, e.to_string()), Vec::new())
                }
            },
            Request::Close { handle } => {
                if self.state.close_handle_of(id, handle) {
                    (Response::Ok, Vec::new())
                } else {
                    (
                        error(
                            ErrorKind::InvalidArgument,
                            format!("no open handle {handle}"),
                        ),
                        Vec::new(),
                    )
                }
            }
            Request::Detach { handle } => {
                if self.state.detach_handle_of(id, handle) {
                    (Response::Ok, Vec::new())
                } else {
                    (
                        error(
                            ErrorKind::InvalidArgument,
                            format!("no open subscriber handle {handle}"),
                        ),
                        Vec::new(),
                    )
                }
            }
            Request::Cancel { request } => {
                let handle = self.clients.get_mut(&id).and_then(|c| {
                    let i = c.recent_opens.iter().position(|&(r, _)| r == request)?;
                    c.recent_opens.remove(i).map(|(_, h)| h)
                });
                if let Some(handle) = handle {
                    self.state.cancel_handle_of(id, handle);
                }
                (Response::Ok, Vec::new())
            }
            Request::Stat => (Response::Stat(self.stat()), Vec::new()),
            Request::Adopt { .. } => (
                error(ErrorKind::Internal, "adopt is handled on its own".into()),
                Vec::new(),
            ),
        }
    }

    /// Opens a producer or subscriber handle (one path for both, in
    /// [`State::open`]).
    fn open(
        &mut self,
        client: u32,
        channel: &str,
        create: Option<tensorbus_core::proto::ChannelSpec>,
        role: Role,
        wait: bool,
    ) -> (Response, Vec<OwnedFd>) {
        match self.state.open(client, channel, create, role, wait) {
            Ok(opened) => opened.into_reply(),
            Err(e) => (error(e.kind(), e.to_string()), Vec::new()),
        }
    }

    fn stat(&mut self) -> tensorbus_core::proto::StatReport {
        // Every stat is an occupancy sample too (the high-water marks).
        self.state.sample_occupancy();
        self.state.stat_report(
            self.clients
                .iter()
                .filter(|(_, c)| c.admitted)
                .map(|(&id, c)| (id, c.cred, c.name.as_str(), c.adopted)),
        )
    }
}

/// What a [`Request::Adopt`] says.
struct Claim {
    name: String,
    version: u32,
    client_id: u32,
    bus_id: u64,
    handles: Vec<tensorbus_core::proto::HandleClaim>,
}

impl Broker {
    /// Handles a survivor's [`Request::Adopt`] on connection `id`: adopts
    /// the bus from its descriptors if this broker runs none yet, checks
    /// its claims, and gives the connection the client's old id. Returns
    /// the connection's id after that and the reply.
    fn adopt_request(&mut self, mut id: u32, claim: Claim, fds: Vec<OwnedFd>) -> (u32, Response) {
        let refuse = |m: String| error(ErrorKind::Refused, m);
        let Some(c) = self.clients.get(&id) else {
            return (id, error(ErrorKind::Internal, "unknown client".into()));
        };
        let cred = c.cred;
        if c.admitted {
            return (id, refuse("this connection is admitted already".into()));
        }
        if !self.allowed(&cred) {
            return (
                id,
                error(
                    ErrorKind::PermissionDenied,
                    format!("uid {} is not allowed; add it to [broker] allowed_uids (or its group to allowed_gids) in the broker config", cred.uid),
                ),
            );
        }
        if claim.version != LAYOUT_VERSION {
            return (
                id,
                error(
                    ErrorKind::VersionMismatch,
                    format!("client speaks layout version {}, broker {LAYOUT_VERSION}; use matching tensorbus versions", claim.version),
                ),
            );
        }
        let who = format!(
            "client {} ({}, pid {})",
            claim.client_id, claim.name, cred.pid
        );
        if !self.state.adopted() {
            if self.welcomed {
                return (id, refuse(format!("this broker started a new bus (bus id {:016x}) before any client of the old one reconnected; the old bus cannot join it: reconnect to the new bus", self.state.bus_id())));
            }
            match State::adopt(&self.config, fds) {
                Ok(state) => {
                    self.state = state;
                    let stat = self.state.adoption_stat().unwrap_or_default();
                    eprintln!(
                        "tensorbus broker: adopted the running bus (bus id {:016x}) of broker pid {}, handed over by {who}",
                        self.state.bus_id(),
                        stat.previous_broker_pid
                    );
                    id = self.renumber_connections(id);
                    self.adopt_until = None;
                    for c in self.state.reap_waiting() {
                        eprintln!("tensorbus broker: adoption: client {c} of the dead broker is gone; reclaimed its handles");
                    }
                }
                Err(e) => {
                    eprintln!("tensorbus broker: refusing to adopt the running bus handed over by {who}: {e}");
                    if matches!(e, crate::state::AdoptError::Incompatible(_)) {
                        // The config will not change: no survivor can hand it over.
                        self.close_adoption_window();
                    }
                    return (
                        id,
                        refuse(format!("the broker refuses to adopt the running bus: {e}")),
                    );
                }
            }
        } else if let Some(fd) = fds.first() {
            let same = tensorbus_shm::fd_identity(fd.as_fd()).ok() == self.state.control_identity();
            if !same {
                self.state.count_refused();
                eprintln!("tensorbus broker: refusing {who}: its control segment is not the adopted bus's");
                return (
                    id,
                    refuse(
                        "the control segment handed over is not the bus this broker adopted".into(),
                    ),
                );
            }
        }
        if claim.bus_id != self.state.bus_id() {
            self.state.count_refused();
            eprintln!(
                "tensorbus broker: refusing {who}: it belongs to bus {:016x}, this is {:016x}",
                claim.bus_id,
                self.state.bus_id()
            );
            return (
                id,
                refuse(format!(
                    "the client belongs to bus {:016x}; this broker runs bus {:016x}",
                    claim.bus_id,
                    self.state.bus_id()
                )),
            );
        }
        if self
            .clients
            .get(&claim.client_id)
            .is_some_and(|c| c.admitted)
        {
            self.state.count_refused();
            return (
                id,
                refuse(format!(
                    "client id {} is connected already",
                    claim.client_id
                )),
            );
        }
        let pid = cred.pid.max(0) as u32;
        if let Err(m) = self.state.claim(claim.client_id, pid, &claim.handles) {
            self.state.count_refused();
            eprintln!("tensorbus broker: adoption: refusing {who}: {m}");
            return (id, refuse(format!("claims refused: {m}")));
        }
        // The connection takes the client's old id (an unadmitted
        // connection that had that number gets another).
        if let Some(other) = self.clients.remove(&claim.client_id) {
            let n = self.take_client_id();
            self.clients.insert(n, other);
            for d in self.deferred.iter_mut().filter(|d| d.0 == claim.client_id) {
                d.0 = n;
            }
        }
        let Some(mut conn) = self.clients.remove(&id) else {
            return (
                id,
                error(ErrorKind::Internal, "the connection went away".into()),
            );
        };
        conn.admitted = true;
        conn.adopted = true;
        conn.name = claim.name.chars().take(64).collect();
        self.clients.insert(claim.client_id, conn);
        for d in self.deferred.iter_mut().filter(|d| d.0 == id) {
            d.0 = claim.client_id;
        }
        if self.verbose {
            eprintln!(
                "tensorbus broker: {who} reconnected; {} handles adopted",
                claim.handles.len()
            );
        }
        (
            claim.client_id,
            Response::Adopted {
                broker_pid: std::process::id(),
            },
        )
    }

    /// After an adoption: connections not admitted yet get ids above every
    /// client id of the adopted bus. Returns connection `id`'s new id.
    fn renumber_connections(&mut self, id: u32) -> u32 {
        self.next_client = self
            .next_client
            .max(self.state.max_adopted_client().saturating_add(1))
            .max(1);
        let old: Vec<u32> = self.clients.keys().copied().collect();
        let mut moved = HashMap::new();
        for id in old {
            if let Some(c) = self.clients.remove(&id) {
                moved.insert(id, c);
            }
        }
        let mut map = HashMap::new();
        for (id, c) in moved {
            let n = self.take_client_id();
            map.insert(id, n);
            self.clients.insert(n, c);
        }
        for d in self.deferred.iter_mut() {
            if let Some(&n) = map.get(&d.0) {
                d.0 = n;
            }
        }
        map.get(&id).copied().unwrap_or(id)
    }
}

fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

/// A broker running on a background thread of this process (tests, demo).
/// Dropping it stops the broker and removes its socket.
pub struct EmbeddedBroker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
}

impl EmbeddedBroker {
    /// Binds at `socket` and starts serving on a new thread. A thread that
    /// cannot be started is [`StartError::Thread`] (and the socket is
    /// removed again).
    pub fn start(config: &Config, socket: &Path) -> Result<EmbeddedBroker, StartError> {
        Self::start_on(
            config,
            socket,
            std::thread::Builder::new().name("tensorbus-broker".into()),
        )
    }

    /// [`EmbeddedBroker::start`] with the thread made by `thread`.
    fn start_on(
        config: &Config,
        socket: &Path,
        thread: std::thread::Builder,
    ) -> Result<EmbeddedBroker, StartError> {
        Self::spawn(Broker::bind(config, socket)?, socket, thread)
    }

    /// Runs `broker` on the thread made by `thread`.
    fn spawn(
        mut broker: Broker,
        socket: &Path,
        thread: std::thread::Builder,
    ) -> Result<EmbeddedBroker, StartError> {
        broker.set_verbose(std::env::var_os("TENSORBUS_VERBOSE").is_some());
        let socket_file = broker.socket_file.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread.spawn(move || broker.run(&flag)).map_err(|e| {
            // The broker never ran: its socket must not outlive it.
            socket_file.remove_if_ours();
            StartError::Thread(e)
        })?;
        Ok(EmbeddedBroker {
            stop,
            thread: Some(thread),
            socket: socket.to_path_buf(),
        })
    }

    /// [`EmbeddedBroker::start`] serving the metrics endpoint at `addr`
    /// too (see [`Broker::serve_metrics`]); returns the broker and the
    /// address it serves metrics at (`addr` with port 0 picks a free port).
    pub fn start_with_metrics(
        config: &Config,
        socket: &Path,
        addr: &str,
    ) -> Result<(EmbeddedBroker, SocketAddr), StartError> {
        let listener = crate::metrics::bind(addr)?;
        let mut broker = Broker::bind(config, socket)?;
        let bound = match broker.serve_metrics(listener) {
            Ok(a) => a,
            Err(e) => {
                broker.socket_file.remove_if_ours();
                return Err(e);
            }
        };
        let embedded = Self::spawn(
            broker,
            socket,
            std::thread::Builder::new().name("tensorbus-broker".into()),
        )?;
        Ok((embedded, bound))
    }

    /// The socket path clients connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml("[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 4\n").unwrap()
    }

    fn socket(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tb-server-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("broker.sock")
    }

    /// Issue 13.4: a broker thread that cannot be started is reported as
    /// that, not as "cannot create shared memory" (before: `StartError::Memory`),
    /// and the socket it bound is removed again. The thread asks for a
    /// 256 TiB stack, more than a process's address space, so the spawn fails.
    #[test]
    fn thread_spawn_failure_is_a_thread_error() {
        let path = socket("spawn");
        let huge = std::thread::Builder::new().stack_size(1 << 48);
        let err = match EmbeddedBroker::start_on(&config(), &path, huge) {
            Ok(_) => panic!(
                "precondition: a thread with a 256 TiB stack was expected not to start, and it did"
            ),
            Err(e) => e,
        };
        assert!(matches!(err, StartError::Thread(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("cannot start the broker thread"), "{msg}");
        assert!(!msg.contains("memory"), "{msg}");
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "the socket of a broker that never ran is left at {path:?}"
        );
        // Nothing is left that stops a broker from starting there now.
        drop(EmbeddedBroker::start(&config(), &path).unwrap());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Issue 17.4: an embedded broker serves the metrics endpoint too,
    /// and stops serving it when dropped.
    #[test]
    fn embedded_broker_serves_metrics() {
        use std::io::{Read, Write};
        let path = socket("metrics");
        let (b, addr) =
            EmbeddedBroker::start_with_metrics(&config(), &path, "127.0.0.1:0").unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.contains("\ntensorbus_pool_free_slots{pool=\"p\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("\ntensorbus_clients 0\n"), "{out}");
        drop(s);
        drop(b);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "metrics still served after the broker stopped"
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    /// Issue 13.4: a config that was not validated and declares a channel
    /// on a pool that does not exist is a config error naming the pool
    /// (before: `StartError::Memory`, "cannot create shared memory").
    #[test]
    fn channel_on_a_missing_pool_is_a_config_error() {
        let path = socket("config");
        let mut cfg = config();
        cfg.channels.push(crate::config::ChannelConfig {
            name: "cam".into(),
            pools: vec!["nope".into()],
            mode: tensorbus_core::Mode::Broadcast,
            depth: None,
            policy: None,
            history: 0,
        });
        let err = match Broker::bind(&cfg, &path) {
            Ok(_) => panic!("a channel on a missing pool was accepted"),
            Err(e) => e,
        };
        assert!(matches!(err, StartError::Config(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("invalid config"), "{msg}");
        assert!(msg.contains("\"nope\""), "{msg}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
