//! The connection to the broker and the shared memory it hands out.

use crate::error::{ConnectError, ForkedChild, OpenError, RequestError};
use crate::fork::Origin;
use crate::paths::socket_path;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tensorbus_core::control::Control;
use tensorbus_core::layout::{Layout, LAYOUT_VERSION};
use tensorbus_core::proto::{ErrorKind, PoolInfo, Request, Response, StatReport, MAX_MESSAGE};
use tensorbus_shm::{Access, Mapping, SeqpacketConn};

/// How long a control request waits for the broker's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    conn: Mutex<SeqpacketConn>,
    pub socket: PathBuf,
    pub client_id: u32,
    pub pools: Vec<PoolInfo>,
    maps: Mutex<Vec<PoolMaps>>,
}

impl Inner {
    /// Sends a request and waits for the answer and its fds.
    pub fn request(&self, req: &Request) -> Result<(Response, Vec<OwnedFd>), RequestError> {
        // A forked child sends nothing on the parent's connection (so
        // dropping an inherited handle closes nothing at the broker).
        self.origin.check_slow()?;
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        exchange(&conn, req).map_err(|e| match e {
            ExchangeError::Unavailable(reason) => RequestError::BrokerUnavailable {
                path: self.socket.clone(),
                reason,
            },
            ExchangeError::Protocol(m) => RequestError::Protocol(m),
        })
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

    /// Closes a handle at the broker (best effort: a dead broker reclaims nothing anyway).
    pub fn close_handle(&self, handle: u32) {
        let _ = self.request(&Request::Close { handle });
    }
}

/// Why one request/response exchange failed.
enum ExchangeError {
    /// The socket failed or the broker closed it.
    Unavailable(String),
    /// The answer was not a response.
    Protocol(String),
}

/// Sends one request and receives its response and file descriptors.
fn exchange(
    conn: &SeqpacketConn,
    req: &Request,
) -> Result<(Response, Vec<OwnedFd>), ExchangeError> {
    let bytes = serde_json::to_vec(req).map_err(|e| ExchangeError::Protocol(e.to_string()))?;
    conn.send(&bytes, &[])
        .map_err(|e| ExchangeError::Unavailable(e.to_string()))?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    let n = conn
        .recv(&mut buf, &mut fds)
        .map_err(|e| ExchangeError::Unavailable(e.to_string()))?;
    if n == 0 {
        return Err(ExchangeError::Unavailable(
            "the broker closed the connection".into(),
        ));
    }
    let resp = serde_json::from_slice(&buf[..n])
        .map_err(|e| ExchangeError::Protocol(format!("bad response: {e}")))?;
    Ok((resp, fds))
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
        ErrorKind::VersionMismatch | ErrorKind::Internal => {
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
    /// Connects to the broker at the default socket path (see [`socket_path`])
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
        let conn = SeqpacketConn::connect(&path).map_err(|e| ConnectError::BrokerUnavailable {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
        let hello = Request::Hello {
            name: name.to_owned(),
            version: LAYOUT_VERSION,
        };
        let (resp, fds) = exchange(&conn, &hello).map_err(|e| match e {
            ExchangeError::Unavailable(reason) => ConnectError::BrokerUnavailable {
                path: path.clone(),
                reason,
            },
            ExchangeError::Protocol(m) => ConnectError::Protocol(m),
        })?;
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
        let fd = fds.into_iter().next().ok_or_else(|| {
            ConnectError::Protocol("welcome came without the control segment".into())
        })?;
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
        Ok(Client {
            inner: Arc::new(Inner {
                control,
                _control_map: map,
                origin: Origin::here(conn.as_raw_fd()),
                conn: Mutex::new(conn),
                socket: path,
                client_id,
                pools,
                maps: Mutex::new(maps),
            }),
        })
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

    /// The broker's pool table.
    pub fn pools(&self) -> &[PoolInfo] {
        &self.inner.pools
    }

    /// A statistics snapshot from the broker.
    pub fn stat(&self) -> Result<StatReport, RequestError> {
        match self.inner.request(&Request::Stat)?.0 {
            Response::Stat(s) => Ok(s),
            Response::Error { message, .. } => Err(RequestError::Protocol(message)),
            other => Err(RequestError::Protocol(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    /// Names of the channels the broker knows (for error messages).
    pub(crate) fn known_channels(&self) -> Vec<String> {
        self.stat()
            .map(|s| s.channels.into_iter().map(|c| c.name).collect())
            .unwrap_or_default()
    }
}
