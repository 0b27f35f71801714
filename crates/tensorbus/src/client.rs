//! The connection to the broker and the shared memory it hands out.

use crate::error::{ConnectError, ForkedChild, OpenError, RequestError, NO_ANSWER};
use crate::fork::Origin;
use crate::paths::socket_path;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tensorbus_core::control::Control;
use tensorbus_core::layout::{Layout, LAYOUT_VERSION};
use tensorbus_core::proto::{
    encode_frames, parse_frame, ErrorKind, PoolInfo, Request, Response, MAX_CHUNK, MAX_MESSAGE,
    MAX_REPLY,
};
use tensorbus_shm::{Access, Mapping, SeqpacketConn};

/// The request timeout from [`Client::REQUEST_TIMEOUT_ENV`], or the default.
fn timeout_from_env() -> Duration {
    std::env::var(Client::REQUEST_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(Client::DEFAULT_REQUEST_TIMEOUT)
}

/// A pool mapping a handle uses on its hot path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolRef {
    pub base: *mut u8,
    pub stride: u64,
    pub slot_size: u64,
}

// SAFETY: `base` points into a mapping owned by the client's `Inner`, which
// every handle keeps alive through an `Arc`; the pointer itself is just data.
unsafe impl Send for PoolRef {}
// SAFETY: as for `Send`: sharing a `&PoolRef` shares an address, and every
// access through it is argued by the guard that makes it (holder bits).
unsafe impl Sync for PoolRef {}

#[derive(Default)]
struct PoolMaps {
    ro: Option<Mapping>,
    rw: Option<Mapping>,
}

pub(crate) struct Inner {
    // Field order matters: `control` points into `_control_map`.
    pub control: Control,
    _control_map: Mapping,
    /// The process this client belongs to (fork semantics, see `fork.rs`);
    /// dropped before `conn`, whose socket it tracks.
    pub origin: Origin,
    conn: Mutex<Conn>,
    pub socket: PathBuf,
    pub client_id: u32,
    pub pools: Vec<PoolInfo>,
    maps: Mutex<Vec<PoolMaps>>,
    /// What this client hands a broker that takes over after its broker
    /// died (`reconnect.rs`).
    pub(crate) survivor: crate::reconnect::Survivor,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The process's last client stops the reconnect watcher.
        crate::reconnect::unwatch();
    }
}

impl Inner {
    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a request and waits for the answer and its fds.
    ///
    /// A reply whose descriptors could not be received (no free fd in this
    /// process) is an error, and a handle it opened is closed again first,
    /// so that nothing stays open at the broker.
    pub fn request(&self, req: &Request) -> Result<(Response, Vec<OwnedFd>), RequestError> {
        // A forked child sends nothing on the parent's connection (so
        // dropping an inherited handle closes nothing at the broker).
        self.origin.check_slow()?;
        let mut conn = self.conn();
        let reply = match conn.exchange(req, &[]) {
            // The broker died: if a new one adopted the bus (or does now),
            // ask it instead. What the dead one did with the request is
            // undone by the new one (an open it never answered is not
            // claimed, so it is closed).
            Err(ExchangeError::Unavailable(_))
                if crate::reconnect::reconnect(self, &mut conn).is_ok() =>
            {
                conn.exchange(req, &[])
            }
            other => other,
        }
        .map_err(|e| self.request_error(e, &conn))?;
        self.survivor.note(req, &reply.resp);
        let Some(lost) = reply.fds_lost else {
            return Ok((reply.resp, reply.fds));
        };
        drop(reply.fds);
        if let Some(handle) = opened_handle(&reply.resp) {
            // Waits for the answer: when this returns, the broker has closed it.
            let _ = conn.exchange(&Request::Close { handle }, &[]);
            self.survivor.forget(handle);
        }
        Err(fds_lost_error(&reply.resp, &lost))
    }

    fn request_error(&self, e: ExchangeError, conn: &Conn) -> RequestError {
        match e {
            ExchangeError::Unavailable(reason) => RequestError::BrokerUnavailable {
                path: self.socket.clone(),
                reason,
            },
            ExchangeError::Protocol(m) => RequestError::Protocol(m),
            ExchangeError::Timeout => RequestError::Timeout {
                path: self.socket.clone(),
                timeout: conn.timeout,
            },
        }
    }

    /// Maps the pools that came with an open response (one fd per pool in
    /// `pools`, in order) and returns hot-path references.
    pub fn map_pools(
        &self,
        pools: &[u8],
        fds: Vec<OwnedFd>,
        writable: bool,
    ) -> Result<Vec<Option<PoolRef>>, OpenError> {
        if fds.len() != pools.len() {
            return Err(RequestError::Protocol(format!(
                "expected {} pool fds, got {}",
                pools.len(),
                fds.len()
            ))
            .into());
        }
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let mut refs = vec![None; self.pools.len()];
        for (&p, fd) in pools.iter().zip(fds) {
            let info = self
                .pools
                .get(usize::from(p))
                .ok_or_else(|| RequestError::Protocol(format!("unknown pool index {p}")))?;
            let entry = &mut maps[usize::from(p)];
            let need_rw = writable && entry.rw.is_none();
            let need_ro = !writable && entry.rw.is_none() && entry.ro.is_none();
            if need_rw || need_ro {
                let access = if writable {
                    Access::ReadWrite
                } else {
                    Access::ReadOnly
                };
                let align = usize::try_from(info.alignment).unwrap_or(4096).max(4096);
                let len = usize::try_from(info.bytes)
                    .map_err(|_| OpenError::Map(std::io::Error::other("pool too large")))?;
                let m = Mapping::map(std::os::fd::AsFd::as_fd(&fd), len, access, align)
                    .map_err(OpenError::Map)?;
                if writable {
                    entry.rw = Some(m);
                } else {
                    entry.ro = Some(m);
                }
            }
            let base = match (&entry.rw, &entry.ro) {
                (Some(m), _) => m.as_ptr(),
                (None, Some(m)) => m.as_ptr(),
                (None, None) => unreachable!("mapped above"),
            };
            refs[usize::from(p)] = Some(PoolRef {
                base,
                stride: info.stride,
                slot_size: info.slot_size,
            });
        }
        Ok(refs)
    }

    /// Closes a handle at the broker (best effort: a dead broker reclaims
    /// nothing anyway, and one that adopts the bus later closes the handles
    /// this client no longer claims).
    pub fn close_handle(&self, handle: u32) {
        let _ = self.request(&Request::Close { handle });
        self.survivor.forget(handle);
    }

    /// The connection if no request holds it now (the watcher of
    /// `reconnect.rs` does not wait behind a request).
    pub(crate) fn try_lock_conn(&self) -> Option<MutexGuard<'_, Conn>> {
        match self.conn.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// Why one request/response exchange failed.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// The socket failed or the broker closed it.
    Unavailable(String),
    /// The answer was not a response.
    Protocol(String),
    /// No (complete) answer within the request timeout.
    Timeout,
}

/// One complete reply.
pub(crate) struct Reply {
    pub(crate) resp: Response,
    /// Descriptors that came with part 0.
    pub(crate) fds: Vec<OwnedFd>,
    /// Why descriptors that came with it were lost (`EMFILE`, ...).
    pub(crate) fds_lost: Option<std::io::Error>,
}

/// The handle a reply opened, if any.
fn opened_handle(resp: &Response) -> Option<u32> {
    match resp {
        Response::Producer { handle, .. } | Response::Consumer { handle, .. } => Some(*handle),
        _ => None,
    }
}

/// The error for a reply whose descriptors could not be received.
fn fds_lost_error(resp: &Response, lost: &std::io::Error) -> RequestError {
    if !matches!(lost.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
        return RequestError::Protocol(format!(
            "the file descriptors of the broker's reply were lost: {lost}"
        ));
    }
    let what = match resp {
        Response::Producer { channel, .. } | Response::Consumer { channel, .. } => format!(
            "the pool descriptors of channel {:?} ({} pools)",
            channel.name,
            channel.pools.len()
        ),
        Response::Welcome { .. } => "the broker's control segment".to_owned(),
        _ => "the descriptors of the broker's reply".to_owned(),
    };
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which is valid and writable.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    };
    RequestError::NoFreeFd { what, limit }
}

/// The client's end of the control connection: requests carry increasing
/// ids, replies are matched to them by id (see `tensorbus_core::proto`).
pub(crate) struct Conn {
    pub(crate) sock: SeqpacketConn,
    /// Id of the next request.
    next_id: u64,
    /// How long one request waits for its reply.
    pub(crate) timeout: Duration,
    /// Receive buffer for one frame.
    buf: Vec<u8>,
}

impl Conn {
    pub(crate) fn new(sock: SeqpacketConn, timeout: Duration) -> Conn {
        Conn {
            sock,
            next_id: 1,
            timeout,
            buf: vec![0u8; MAX_MESSAGE],
        }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Serializes `req` as the single frame of request `id`.
    fn frame(id: u64, req: &Request) -> Result<Vec<u8>, ExchangeError> {
        let json = serde_json::to_vec(req).map_err(|e| ExchangeError::Protocol(e.to_string()))?;
        if json.len() > MAX_CHUNK {
            return Err(ExchangeError::Protocol(format!(
                "request of {} bytes is larger than the {MAX_CHUNK} bytes a request may have",
                json.len()
            )));
        }
        Ok(encode_frames(id, &json).swap_remove(0))
    }

    /// Sends `req` without waiting for (or ever reading) its answer, which
    /// the next exchange discards as a reply of no current request.
    /// `wait = false` gives up at once if the broker's queue is full.
    fn send_and_forget(&mut self, req: &Request, wait: bool) {
        let id = self.take_id();
        if let Ok(frame) = Conn::frame(id, req) {
            let _ = if wait {
                self.sock.send(&frame, &[])
            } else {
                self.sock.try_send(&frame, &[])
            };
        }
    }

    /// Gives up on request `id`: asks the broker to undo what it opens for it.
    fn abandon(&mut self, id: u64) {
        self.send_and_forget(&Request::Cancel { request: id }, false);
    }

    /// Handles a frame of an earlier request (one that timed out, or a
    /// Close/Cancel sent without waiting): its descriptors are closed (by
    /// dropping `fds`), and a handle it opened is closed at the broker.
    fn discard_late(&mut self, handle: Option<u32>, fds: Vec<OwnedFd>) {
        drop(fds);
        if let Some(handle) = handle {
            self.send_and_forget(&Request::Close { handle }, true);
        }
    }

    /// Sends one request (with `fds`) and receives its (possibly
    /// multi-part) reply, discarding late replies of earlier requests on
    /// the way.
    pub(crate) fn exchange(
        &mut self,
        req: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<Reply, ExchangeError> {
        let id = self.take_id();
        let frame = Conn::frame(id, req)?;
        let deadline = Instant::now() + self.timeout;
        let _ = self.sock.set_write_timeout(Some(self.timeout));
        match self.sock.send(&frame, fds) {
            Ok(()) => {}
            // Nothing was sent (seqpacket sends are atomic): nothing to cancel.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(ExchangeError::Timeout)
            }
            Err(e) => return Err(ExchangeError::Unavailable(e.to_string())),
        }
        let mut json = Vec::new();
        let mut fds = Vec::new();
        let mut fds_lost = None;
        let mut parts = 0u32;
        let mut next = 0u32;
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.abandon(id);
                return Err(ExchangeError::Timeout);
            }
            let _ = self.sock.set_read_timeout(Some(deadline - now));
            let mut got = Vec::new();
            let (n, lost) = match self.sock.recv_keeping_data(&mut self.buf, &mut got) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.abandon(id);
                    return Err(ExchangeError::Timeout);
                }
                Err(e) => return Err(ExchangeError::Unavailable(e.to_string())),
            };
            if n == 0 {
                return Err(ExchangeError::Unavailable(
                    "the broker closed the connection".into(),
                ));
            }
            let (h, body) = parse_frame(&self.buf[..n])
                .map_err(|e| ExchangeError::Protocol(format!("bad reply: {e}")))?;
            if h.id != id {
                let handle = if h.part == 0 && h.parts == 1 {
                    serde_json::from_slice::<Response>(body)
                        .ok()
                        .as_ref()
                        .and_then(opened_handle)
                } else {
                    None
                };
                self.discard_late(handle, got);
                continue;
            }
            if h.part != next || (next > 0 && h.parts != parts) {
                return Err(ExchangeError::Protocol(format!(
                    "reply part {} of {} arrived, expected part {next}",
                    h.part, h.parts
                )));
            }
            if next == 0 {
                parts = h.parts;
                if (parts as usize).saturating_mul(MAX_CHUNK) > MAX_REPLY {
                    return Err(ExchangeError::Protocol(format!(
                        "reply of {parts} parts is larger than {MAX_REPLY} bytes"
                    )));
                }
                fds = got;
                fds_lost = lost;
            }
            json.extend_from_slice(body);
            next += 1;
            if next == parts {
                break;
            }
        }
        let resp = serde_json::from_slice(&json)
            .map_err(|e| ExchangeError::Protocol(format!("bad response: {e}")))?;
        Ok(Reply {
            resp,
            fds,
            fds_lost,
        })
    }
}

/// Maps a broker error reply to an [`OpenError`].
pub(crate) fn open_error(
    kind: ErrorKind,
    message: String,
    channel: &str,
    known: Vec<String>,
) -> OpenError {
    match kind {
        ErrorKind::UnknownChannel => OpenError::ChannelNotFound {
            channel: channel.to_owned(),
            known,
        },
        ErrorKind::InvalidName => OpenError::InvalidName(message),
        ErrorKind::InvalidArgument => OpenError::InvalidArgument(message),
        ErrorKind::LimitReached => OpenError::LimitReached(message),
        ErrorKind::PermissionDenied => OpenError::PermissionDenied(message),
        ErrorKind::VersionMismatch | ErrorKind::Busy | ErrorKind::Refused | ErrorKind::Internal => {
            OpenError::Request(RequestError::Protocol(message))
        }
    }
}

/// A connection to a tensorbus broker: the entry point of the library.
///
/// Cheap to clone (all clones share one connection). Producers, consumers
/// and stages opened from it keep the shared memory mapped while they live.
///
/// ```no_run
/// use tensorbus::{Client, DType};
/// let client = Client::connect()?;
/// let mut producer = client.producer("camera/raw")?;
/// let mut frame = producer.loan(&[480, 640, 3], DType::U8)?;
/// frame.fill(0x80);                     // write the tensor in place
/// frame.publish()?;                     // consumers now see the same bytes
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Fork
///
/// A process forked after `connect` inherits the client and everything
/// opened from it, but they stay the parent's: in the child they are
/// *inert*. Using one fails with [`ForkedChild`] (inside
/// [`RequestError::ForkedChild`], [`crate::LoanError::ForkedChild`],
/// [`crate::PublishError::ForkedChild`], [`crate::RecvError::ForkedChild`],
/// [`crate::TryRecvError::ForkedChild`]; [`crate::Consumer::readiness`]
/// fails too and an inherited [`crate::Readiness`] does nothing), and
/// dropping one does nothing to the parent's: no close request reaches the
/// broker, no holder bit is released, no queued tensor is taken, no
/// sleeper is woken. The parent's handles keep working as if the child did
/// not exist, and the broker still reclaims the parent's handles the moment
/// the parent dies (the child's copy of the connection is replaced by
/// `/dev/null` at fork). The child connects a client of its own to use the
/// bus. The check costs one relaxed atomic load on the data path: no
/// syscall. It relies on libc's `fork()` (which runs `pthread_atfork`
/// handlers: `os.fork`, `multiprocessing`, `libc::fork`); the control
/// path also compares the pid.
///
/// ```no_run
/// # let client = tensorbus::Client::connect()?;
/// # let producer = client.producer("camera/raw")?;
/// // SAFETY: the child only drops inherited handles and makes a new client.
/// if unsafe { libc::fork() } == 0 {
///     assert!(client.fork_check().is_err());
///     drop(producer);                       // the parent's producer stays open
///     let mine = tensorbus::Client::connect()?;
///     let _consumer = mine.consumer("camera/raw")?;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.client_id)
            .field("socket", &self.inner.socket)
            .finish()
    }
}

impl Client {
    /// Environment variable that overrides the default socket path.
    pub const SOCKET_ENV: &'static str = crate::paths::SOCKET_ENV;

    /// How long a control request waits for the broker's answer unless
    /// [`Client::REQUEST_TIMEOUT_ENV`] or [`Client::set_request_timeout`]
    /// says otherwise.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// Environment variable read at connect: the control request timeout in
    /// milliseconds (a positive integer; anything else is ignored and
    /// [`Client::DEFAULT_REQUEST_TIMEOUT`] applies).
    pub const REQUEST_TIMEOUT_ENV: &'static str = "TENSORBUS_REQUEST_TIMEOUT_MS";

    /// The socket path [`Client::connect`] uses: `$TENSORBUS_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/tensorbus/broker.sock`, else
    /// `/tmp/tensorbus-$UID/broker.sock`.
    ///
    /// ```
    /// println!("connecting to {}", tensorbus::Client::default_socket_path().display());
    /// ```
    pub fn default_socket_path() -> PathBuf {
        socket_path(None)
    }

    /// Connects to the broker at the default socket path (see
    /// [`Client::default_socket_path`])
    /// with the process name as client name.
    pub fn connect() -> Result<Client, ConnectError> {
        let name = std::env::args()
            .next()
            .and_then(|a| {
                Path::new(&a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "client".into());
        Client::connect_to(None, &name)
    }

    /// Connects to the broker at `socket` (or the default path) as `name`.
    pub fn connect_to(socket: Option<&Path>, name: &str) -> Result<Client, ConnectError> {
        let path = socket_path(socket);
        let conn = SeqpacketConn::connect(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let uid = unsafe { libc::geteuid() };
                ConnectError::PermissionDenied {
                    path: path.clone(),
                    message: format!(
                        "{e}: the file permissions of the socket (or of its directory) keep uid {uid} out; \
                         the broker's [broker] allowed_uids (or allowed_gids) must admit this user, \
                         and the broker then opens its socket to other users"
                    ),
                }
            } else {
                ConnectError::BrokerUnavailable {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            }
        })?;
        let mut conn = Conn::new(conn, timeout_from_env());
        let hello = Request::Hello {
            name: name.to_owned(),
            version: LAYOUT_VERSION,
        };
        let reply = conn.exchange(&hello, &[]).map_err(|e| match e {
            ExchangeError::Unavailable(reason) => ConnectError::BrokerUnavailable {
                path: path.clone(),
                reason,
            },
            ExchangeError::Protocol(m) => ConnectError::Protocol(m),
            ExchangeError::Timeout => ConnectError::BrokerUnavailable {
                path: path.clone(),
                reason: format!(
                    "{NO_ANSWER} at {} within {:?} (a program accepted the connection but sent no reply)",
                    path.display(),
                    conn.timeout
                ),
            },
        })?;
        if let Some(lost) = &reply.fds_lost {
            return Err(ConnectError::Map(std::io::Error::other(
                fds_lost_error(&reply.resp, lost).to_string(),
            )));
        }
        let (resp, fds) = (reply.resp, reply.fds);
        let (client_id, layout, pools) = match resp {
            Response::Welcome {
                client_id,
                layout,
                pools,
                ..
            } => (client_id, layout, pools),
            Response::Error {
                kind: ErrorKind::PermissionDenied,
                message,
            } => return Err(ConnectError::PermissionDenied { path, message }),
            Response::Error { message, .. } => return Err(ConnectError::Protocol(message)),
            other => {
                return Err(ConnectError::Protocol(format!(
                    "unexpected reply {other:?}"
                )))
            }
        };
        let layout = Layout::compute(&layout).map_err(|e| ConnectError::Protocol(e.to_string()))?;
        let mut fds = fds.into_iter();
        let fd = fds.next().ok_or_else(|| {
            ConnectError::Protocol("welcome came without the control segment".into())
        })?;
        let pool_fds: Vec<OwnedFd> = fds.collect();
        let map = Mapping::map(
            std::os::fd::AsFd::as_fd(&fd),
            layout.total,
            Access::ReadWrite,
            4096,
        )
        .map_err(ConnectError::Map)?;
        // SAFETY: `map` is a read-write mapping of `layout.total` bytes that
        // is stored next to `control` in `Inner` and dropped after it (field
        // order), so it outlives every reference `control` hands out.
        let control = unsafe { Control::from_raw(map.as_ptr(), map.len(), layout) }
            .map_err(|e| ConnectError::Protocol(e.to_string()))?;
        if !control.header_ok() {
            return Err(ConnectError::Protocol(
                "control segment header does not match (version mismatch or corruption)".into(),
            ));
        }
        let maps = (0..pools.len()).map(|_| PoolMaps::default()).collect();
        let bus_id = control
            .registry_header()
            .bus_id
            .load(std::sync::atomic::Ordering::Relaxed);
        let survivor = crate::reconnect::Survivor::new(name, bus_id, fd, pool_fds);
        let client = Client {
            inner: Arc::new(Inner {
                control,
                _control_map: map,
                origin: Origin::here(conn.sock.as_raw_fd()),
                conn: Mutex::new(conn),
                socket: path,
                client_id,
                pools,
                maps: Mutex::new(maps),
                survivor,
            }),
        };
        crate::reconnect::watch(&client.inner);
        Ok(client)
    }

    /// This client's id (shown by `tensorbus stat`, stored as `producer` in
    /// every tensor it publishes).
    pub fn id(&self) -> u32 {
        self.inner.client_id
    }

    /// `Err(ForkedChild)` in a process forked after this client connected:
    /// the client and every handle opened from it are inert here (see
    /// [Fork](#fork)). One relaxed load, no syscall.
    pub fn fork_check(&self) -> Result<(), ForkedChild> {
        self.inner.origin.check()
    }

    /// The broker's socket path.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    /// How long each control request (open, close, stat) waits for the
    /// broker's answer.
    pub fn request_timeout(&self) -> Duration {
        self.inner.conn().timeout
    }

    /// Sets how long each control request of this client (and its clones)
    /// waits for the broker's answer; zero is taken as 1 ms. The default is
    /// [`Client::DEFAULT_REQUEST_TIMEOUT`], or [`Client::REQUEST_TIMEOUT_ENV`] when set at
    /// connect. A request that times out fails with
    /// [`RequestError::Timeout`]; the broker undoes what it opens for it and
    /// the client discards its late reply.
    pub fn set_request_timeout(&self, timeout: Duration) {
        self.inner.conn().timeout = timeout.max(Duration::from_millis(1));
    }

    /// The broker's pool table.
    pub fn pools(&self) -> Vec<crate::stat::PoolInfo> {
        self.inner.pools.iter().map(Into::into).collect()
    }

    /// A statistics snapshot from the broker.
    pub fn stat(&self) -> Result<crate::stat::StatReport, RequestError> {
        match self.inner.request(&Request::Stat)?.0 {
            Response::Stat(s) => Ok(s.into()),
            Response::Error { message, .. } => Err(RequestError::Protocol(message)),
            other => Err(RequestError::Protocol(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    /// Names of the channels the broker knows (for error messages).
    pub(crate) fn known_channels(&self) -> Vec<String> {
        self.stat()
            .map(|s| {
                s.channels
                    .into_iter()
                    .filter(|c| !c.pending)
                    .map(|c| c.name)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensorbus_core::proto::ChannelInfo;
    use tensorbus_core::proto::StatReport;
    use tensorbus_core::{Mode, Policy};

    /// Reads one single-frame request from the fake broker's end.
    fn read_request(sock: &SeqpacketConn) -> (u64, Request) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = sock.recv(&mut buf, &mut Vec::new()).unwrap();
        let (h, body) = parse_frame(&buf[..n]).unwrap();
        (h.id, serde_json::from_slice(body).unwrap())
    }

    fn send_reply(
        sock: &SeqpacketConn,
        id: u64,
        resp: &Response,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) {
        let frames = encode_frames(id, &serde_json::to_vec(resp).unwrap());
        for (i, f) in frames.iter().enumerate() {
            sock.send(f, if i == 0 { fds } else { &[] }).unwrap();
        }
    }

    /// Issue 12.5: a request that timed out is cancelled at once; its late
    /// reply is discarded (its descriptors closed) and a handle it opened
    /// is closed, so the next request gets its own reply. Before the fix
    /// the next request returned the late reply ("unexpected reply
    /// Consumer{...}") and the handle stayed open.
    #[test]
    fn late_replies_are_discarded_and_what_they_opened_is_closed() {
        let (client_end, broker_end) = SeqpacketConn::pair().unwrap();
        let mut conn = Conn::new(client_end, Duration::from_millis(50));
        let open = Request::OpenConsumer {
            channel: "x".into(),
            policy: None,
            depth: None,
            writable: false,
            create: None,
            wait: false,
        };
        assert!(matches!(
            conn.exchange(&open, &[]),
            Err(ExchangeError::Timeout)
        ));
        let (open_id, _) = read_request(&broker_end);
        let (_, cancel) = read_request(&broker_end);
        assert!(
            matches!(cancel, Request::Cancel { request } if request == open_id),
            "{cancel:?}"
        );

        let fake = std::thread::spawn(move || {
            let (stat_id, stat) = read_request(&broker_end);
            assert!(matches!(stat, Request::Stat));
            // The late reply of the open (with a pool fd), in two parts to
            // show that multi-part late replies are skipped whole...
            let late = Response::Consumer {
                handle: 77,
                bit: 3,
                sub: 0,
                policy: Policy::Block,
                depth: 8,
                channel: ChannelInfo {
                    index: 0,
                    name: "x".into(),
                    mode: Mode::Broadcast,
                    pools: vec![0],
                    pending: false,
                },
            };
            let pool = tensorbus_shm::Memfd::create("tb-late", 4096, false).unwrap();
            send_reply(&broker_end, open_id, &late, &[pool.as_fd()]);
            send_reply(
                &broker_end,
                open_id + 1,
                &Response::Error {
                    kind: ErrorKind::Internal,
                    message: "y".repeat(MAX_CHUNK * 2),
                },
                &[],
            );
            // ...then the stat's own reply, in three parts.
            let mut report = StatReport {
                broker_pid: 42,
                ..StatReport::default()
            };
            report.clients.push(tensorbus_core::proto::ClientStat {
                name: "z".repeat(MAX_CHUNK * 2),
                ..Default::default()
            });
            send_reply(&broker_end, stat_id, &Response::Stat(report), &[]);
            // The client closes the late reply's handle.
            let (_, close) = read_request(&broker_end);
            assert!(matches!(close, Request::Close { handle: 77 }), "{close:?}");
        });
        conn.timeout = Duration::from_secs(10);
        let reply = conn
            .exchange(&Request::Stat, &[])
            .expect("the stat's own reply");
        match reply.resp {
            Response::Stat(s) => {
                assert_eq!(s.broker_pid, 42);
                assert_eq!(s.clients[0].name.len(), MAX_CHUNK * 2);
            }
            other => panic!("got {other:?}"),
        }
        assert!(reply.fds.is_empty());
        fake.join().unwrap();
    }
}
