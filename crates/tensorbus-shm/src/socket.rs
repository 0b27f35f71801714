//! Unix `SOCK_SEQPACKET` sockets with descriptor passing and peer
//! credentials.
//!
//! Seqpacket sockets are connection-oriented like stream sockets but keep
//! message boundaries like datagrams: every [`SeqpacketConn::send`] arrives
//! as exactly one [`SeqpacketConn::recv`]. Messages may carry up to
//! [`MAX_FDS`] file descriptors (`SCM_RIGHTS`), which is how memfds travel
//! between processes, and the kernel tells each side who the other is
//! ([`SeqpacketConn::peer_cred`], `SO_PEERCRED`).
//!
//! All descriptors are created close-on-exec, including received ones
//! (`MSG_CMSG_CLOEXEC`). Calls that fail with `EINTR` are retried.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::time::Duration;

use crate::{cvt, cvt_r, invalid_input, with_context};

/// Maximum number of file descriptors in one message.
pub const MAX_FDS: usize = 32;

/// Size of one descriptor in an `SCM_RIGHTS` payload.
const FD_SIZE: usize = mem::size_of::<RawFd>();

/// `CMSG_SPACE(MAX_FDS * sizeof(int))` in bytes, rounded up to whole `u64`s
/// by [`CmsgBuf`].
// SAFETY: CMSG_SPACE is pure arithmetic on its argument.
const CMSG_BUF_LEN: usize =
    unsafe { libc::CMSG_SPACE((MAX_FDS * FD_SIZE) as libc::c_uint) } as usize;

/// A control-message buffer suitably aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF_LEN]);

/// Credentials of the process at the other end of a connection, as recorded
/// by the kernel when the connection was made (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCred {
    /// Process id of the peer (in the caller's pid namespace; 0 if the peer
    /// is in a namespace where it has no pid).
    pub pid: i32,
    /// Effective user id of the peer.
    pub uid: u32,
    /// Effective group id of the peer.
    pub gid: u32,
}

/// A listening Unix seqpacket socket bound to a filesystem path.
///
/// The socket file is not removed on drop; remove it (and remove a stale one
/// before binding) as the application sees fit.
///
/// ```
/// use tensorbus_shm::{SeqpacketConn, SeqpacketListener};
///
/// let path = std::env::temp_dir().join(format!("tb-doc-{}.sock", std::process::id()));
/// # let _ = std::fs::remove_file(&path);
/// let listener = SeqpacketListener::bind(&path)?;
/// let client = SeqpacketConn::connect(&path)?;
/// let server = listener.accept()?;
/// client.send(b"hello", &[])?;
/// let mut buf = [0u8; 16];
/// let mut fds = Vec::new();
/// assert_eq!(server.recv(&mut buf, &mut fds)?, 5);
/// std::fs::remove_file(&path)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct SeqpacketListener {
    fd: OwnedFd,
}

impl SeqpacketListener {
    /// Creates a seqpacket socket, binds it to `path` and listens with a
    /// backlog of 128.
    ///
    /// # Errors
    ///
    /// `InvalidInput` (naming the path) if `path` is empty, contains a NUL
    /// byte or is too long for `sun_path` (107 bytes); otherwise the OS
    /// error of `socket`, `bind` (e.g. `AddrInUse` if the path exists) or
    /// `listen`, with the path in the message.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let (addr, addr_len) = sockaddr_un(path)?;
        let fd = seqpacket_socket()?;
        // SAFETY: `addr` is a valid sockaddr_un of which the first `addr_len`
        // bytes are initialised; bind does not retain the pointer.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                addr_len,
            )
        })
        .map_err(|e| with_context(e, format!("cannot bind {}", path.display())))?;
        // SAFETY: listen has no memory-safety preconditions.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })
            .map_err(|e| with_context(e, format!("cannot listen on {}", path.display())))?;
        Ok(SeqpacketListener { fd })
    }

    /// Accepts one connection (`accept4` with `SOCK_CLOEXEC`).
    ///
    /// The accepted socket is blocking, whatever the listener's mode.
    ///
    /// # Errors
    ///
    /// The OS error of `accept4` (`WouldBlock` if the listener is
    /// non-blocking and no connection is pending).
    pub fn accept(&self) -> io::Result<SeqpacketConn> {
        let raw = cvt_r(|| {
            // SAFETY: null address pointers ask accept4 not to report the
            // peer address; the listener descriptor is open.
            unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    ptr::null_mut(),
                    ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            }
        })?;
        // SAFETY: accept4 just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(SeqpacketConn { fd })
    }

    /// Switches `O_NONBLOCK` on or off.
    ///
    /// # Errors
    ///
    /// The OS error of `fcntl`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        set_nonblocking(self.fd.as_fd(), nonblocking)
    }

    /// Returns the raw descriptor (still owned by `self`).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for SeqpacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for SeqpacketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<SeqpacketListener> for OwnedFd {
    fn from(l: SeqpacketListener) -> OwnedFd {
        l.fd
    }
}

/// Checks that `path` can be a socket address (not empty, no NUL byte, at
/// most 107 bytes), without touching the file system.
///
/// ```
/// use std::path::Path;
/// assert!(tensorbus_shm::socket::check_socket_path(Path::new("/tmp/b.sock")).is_ok());
/// let long = format!("/tmp/{}", "x".repeat(200));
/// assert!(tensorbus_shm::socket::check_socket_path(Path::new(&long)).is_err());
/// ```
///
/// # Errors
///
/// `InvalidInput` naming the path and what is wrong with it.
pub fn check_socket_path(path: &Path) -> io::Result<()> {
    sockaddr_un(path).map(|_| ())
}

/// The longest socket path, in bytes (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

impl SeqpacketConn {
    /// Connects to `path` without waiting: a listener whose backlog is full
    /// gives `WouldBlock` instead of blocking. The connection returned is
    /// blocking, like one from [`SeqpacketConn::connect`].
    ///
    /// Errors are the OS error of `connect` **unchanged** (no path in the
    /// message), so that `raw_os_error()` tells what is at the path:
    /// `ECONNREFUSED` for a socket file nobody listens on (stale),
    /// `EPROTOTYPE` for a socket of another type (stream, datagram),
    /// `EAGAIN` for a full backlog, `ENOENT`, `EACCES`, ...; `InvalidInput`
    /// for a bad path (with the path).
    ///
    /// # Errors
    ///
    /// As above.
    pub fn connect_nonblocking(path: &Path) -> io::Result<Self> {
        let (addr, addr_len) = sockaddr_un(path)?;
        let fd = seqpacket_socket()?;
        set_nonblocking(fd.as_fd(), true)?;
        // SAFETY: `addr` is a valid sockaddr_un of which the first `addr_len`
        // bytes are initialised; connect does not retain the pointer.
        cvt(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                addr_len,
            )
        })?;
        set_nonblocking(fd.as_fd(), false)?;
        Ok(SeqpacketConn { fd })
    }
}

/// A connected Unix seqpacket socket.
///
/// ```
/// use tensorbus_shm::{Access, Mapping, Memfd, SeqpacketConn};
///
/// let (a, b) = SeqpacketConn::pair()?;
/// let seg = Memfd::create("doc-seg", 4096, false)?;
/// a.send(b"segment", &[seg.as_fd()])?;
///
/// let mut buf = [0u8; 64];
/// let mut fds = Vec::new();
/// let n = b.recv(&mut buf, &mut fds)?;
/// assert_eq!(&buf[..n], b"segment");
/// assert_eq!(fds.len(), 1);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct SeqpacketConn {
    fd: OwnedFd,
}

impl SeqpacketConn {
    /// Connects to a listener bound at `path`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a bad path (see [`SeqpacketListener::bind`]);
    /// otherwise the OS error of `socket` or `connect` (`NotFound`,
    /// `ConnectionRefused`, ...), with the path in the message.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let (addr, addr_len) = sockaddr_un(path)?;
        let fd = seqpacket_socket()?;
        // SAFETY: `addr` is a valid sockaddr_un of which the first `addr_len`
        // bytes are initialised; connect does not retain the pointer.
        cvt(unsafe {
            libc::connect(
                fd.as_raw_fd(),
                ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                addr_len,
            )
        })
        .map_err(|e| with_context(e, format!("cannot connect to {}", path.display())))?;
        Ok(SeqpacketConn { fd })
    }

    /// Returns a connected pair of sockets (`socketpair`), mostly for tests.
    ///
    /// # Errors
    ///
    /// The OS error of `socketpair`.
    pub fn pair() -> io::Result<(SeqpacketConn, SeqpacketConn)> {
        let mut fds = [-1 as RawFd; 2];
        // SAFETY: `fds` is a writable array of two ints, as socketpair
        // requires.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: socketpair succeeded, so both descriptors are open and
        // owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((SeqpacketConn { fd: a }, SeqpacketConn { fd: b }))
    }

    /// Sends `data` as one message, with `fds` attached as one `SCM_RIGHTS`
    /// control message when non-empty (`sendmsg` with `MSG_NOSIGNAL`, so a
    /// closed peer gives `BrokenPipe` instead of `SIGPIPE`).
    ///
    /// The descriptors are duplicated into the receiver; the caller keeps
    /// its own.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `data` is empty (an empty message would be
    /// indistinguishable from end-of-stream at the receiver) or more than
    /// [`MAX_FDS`] descriptors are given; otherwise the OS error of
    /// `sendmsg` (`BrokenPipe`, `WouldBlock` in non-blocking mode, `EMSGSIZE`
    /// if the message is larger than the socket buffer, ...). A partial send
    /// is reported as `WriteZero`, though the kernel sends seqpacket
    /// messages atomically.
    pub fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_flags(data, fds, libc::MSG_NOSIGNAL)
    }

    /// Like [`send`](Self::send) but never waits (`MSG_DONTWAIT`), whatever
    /// the socket's mode: fails with `WouldBlock` when the peer's queue is
    /// full. Nothing is sent in that case (seqpacket sends are atomic).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub fn try_send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_flags(data, fds, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
    }

    fn send_flags(
        &self,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
        flags: libc::c_int,
    ) -> io::Result<()> {
        if data.is_empty() {
            return Err(invalid_input("cannot send an empty seqpacket message"));
        }
        if fds.len() > MAX_FDS {
            return Err(invalid_input(format!(
                "cannot send {} descriptors in one message (max {MAX_FDS})",
                fds.len()
            )));
        }
        let mut iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        let mut cmsg_buf = CmsgBuf([0; CMSG_BUF_LEN]);
        // SAFETY: msghdr is plain old data for which all-zero bytes (null
        // pointers, zero lengths) are a valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let payload = fds.len() * FD_SIZE;
            // SAFETY: CMSG_SPACE is pure arithmetic.
            let space = unsafe { libc::CMSG_SPACE(payload as libc::c_uint) } as usize;
            msg.msg_control = cmsg_buf.0.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points to `space <= CMSG_BUF_LEN` writable,
            // 8-aligned bytes, enough for one cmsghdr plus `payload` bytes of
            // data (that is what CMSG_SPACE computes), so CMSG_FIRSTHDR is
            // non-null and every write below stays inside `cmsg_buf`.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload as libc::c_uint) as _;
                let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data_ptr.add(i).write_unaligned(fd.as_raw_fd());
                }
            }
        }
        let sent = loop {
            // SAFETY: `msg` points to `iov` (which points into `data`) and to
            // `cmsg_buf`, all alive and initialised for the call; sendmsg
            // only reads them.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, flags) };
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        if sent != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes of a seqpacket message", data.len()),
            ));
        }
        Ok(())
    }

    /// Receives one message into `buf`, appending every descriptor that came
    /// with it to `fds` (as close-on-exec [`OwnedFd`]s, so none can leak).
    ///
    /// Returns the message length, or 0 when the peer has closed the
    /// connection (or shut it down for writing).
    ///
    /// # Errors
    ///
    /// `InvalidData` if the message did not fit in `buf` (`MSG_TRUNC`; the
    /// rest of the message is lost). When descriptors were lost
    /// (`MSG_CTRUNC`), the error of [`recv_keeping_data`](Self::recv_keeping_data):
    /// `EMFILE`/`ENFILE` (raw OS error) when this process had no free
    /// descriptor to receive them, `InvalidData` when more than [`MAX_FDS`]
    /// were attached. Descriptors that did arrive are still appended to
    /// `fds` in those cases. Otherwise the OS error of `recvmsg`
    /// (`WouldBlock` in non-blocking mode or when the read timeout expires,
    /// ...).
    pub fn recv(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        let (n, lost) = self.recv_keeping_data(buf, fds)?;
        match lost {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Like [`recv`](Self::recv), but a message whose descriptors were
    /// lost (`MSG_CTRUNC`) still counts as received: returns its length and
    /// `Some(why the descriptors were lost)`, so that the caller can act on
    /// the message (for example give back what it describes). The kernel
    /// closes the descriptors that could not be installed.
    ///
    /// Why: `EMFILE` or `ENFILE` (as raw OS errors) when this process (or
    /// the system) had no free descriptor, which is checked right after the
    /// receive; `InvalidData` when more than [`MAX_FDS`] were attached.
    ///
    /// # Errors
    ///
    /// `InvalidData` if the message did not fit in `buf` (`MSG_TRUNC`);
    /// otherwise the OS error of `recvmsg`.
    pub fn recv_keeping_data(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
    ) -> io::Result<(usize, Option<io::Error>)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cmsg_buf = CmsgBuf([0; CMSG_BUF_LEN]);
        // SAFETY: msghdr is plain old data for which all-zero bytes are a
        // valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.0.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_BUF_LEN as _;

        let n = loop {
            // SAFETY: `msg` points to `iov` (covering exactly `buf`) and to
            // `cmsg_buf` (CMSG_BUF_LEN bytes), both writable and alive for
            // the call; recvmsg writes only within those bounds.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
            // Retrying: restore the lengths recvmsg may have touched.
            msg.msg_controllen = CMSG_BUF_LEN as _;
        };

        let before = fds.len();
        take_fds(&msg, fds);
        let arrived = fds.len() - before;

        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "seqpacket message truncated: larger than the {}-byte buffer",
                    buf.len()
                ),
            ));
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Ok((n, Some(self.why_fds_lost(arrived))));
        }
        Ok((n, None))
    }

    /// Explains a `MSG_CTRUNC` after `arrived` descriptors were installed.
    /// The control buffer holds [`MAX_FDS`], so fewer than that means the
    /// kernel could not install the rest: almost always because the
    /// descriptor table is full, which a probe (`F_DUPFD_CLOEXEC`) confirms.
    fn why_fds_lost(&self, arrived: usize) -> io::Error {
        if arrived >= MAX_FDS {
            return io::Error::new(
                io::ErrorKind::InvalidData,
                format!("control data truncated: more than {MAX_FDS} descriptors attached"),
            );
        }
        // SAFETY: F_DUPFD_CLOEXEC duplicates our open socket descriptor; the
        // result, if any, is owned below and closed at once.
        let probe = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if probe < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                return e;
            }
        } else {
            // SAFETY: fcntl just returned this descriptor; nobody else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(probe) });
        }
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "control data truncated: {arrived} descriptor(s) arrived, the others could not be installed in this process"
            ),
        )
    }

    /// Returns the credentials of the peer (`SO_PEERCRED`).
    ///
    /// # Errors
    ///
    /// The OS error of `getsockopt`.
    pub fn peer_cred(&self) -> io::Result<PeerCred> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is a writable ucred and `len` holds its size, so
        // getsockopt writes at most that many bytes.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                ptr::addr_of_mut!(cred).cast(),
                &mut len,
            )
        })?;
        Ok(PeerCred {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        })
    }

    /// Switches `O_NONBLOCK` on or off. In non-blocking mode `send` and
    /// `recv` fail with `WouldBlock` instead of waiting.
    ///
    /// # Errors
    ///
    /// The OS error of `fcntl`.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        set_nonblocking(self.fd.as_fd(), nonblocking)
    }

    /// Sets a timeout for blocking `recv` calls (`SO_RCVTIMEO`); `None`
    /// removes it. When it expires, `recv` fails with `WouldBlock`.
    /// Timeouts are rounded up to whole microseconds.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for `Some(Duration::ZERO)` (the kernel would read a
    /// zero timeout as "no timeout"); otherwise the OS error of
    /// `setsockopt`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_RCVTIMEO, timeout)
    }

    /// Sets a timeout for blocking `send` calls (`SO_SNDTIMEO`); `None`
    /// removes it. When it expires, `send` fails with `WouldBlock`.
    ///
    /// # Errors
    ///
    /// As [`set_read_timeout`](Self::set_read_timeout).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_timeout(libc::SO_SNDTIMEO, timeout)
    }

    fn set_timeout(&self, option: libc::c_int, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            Some(d) if d.is_zero() => {
                return Err(invalid_input("a zero socket timeout is not allowed"));
            }
            Some(d) => {
                let mut secs = libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX);
                // Round up so that a sub-microsecond timeout is not zero.
                let mut usecs = d.subsec_nanos().div_ceil(1000) as libc::suseconds_t;
                if usecs >= 1_000_000 {
                    secs = secs.saturating_add(1);
                    usecs = 0;
                }
                libc::timeval {
                    tv_sec: secs,
                    tv_usec: usecs,
                }
            }
        };
        // SAFETY: `tv` is a valid timeval and the length passed is its size;
        // setsockopt only reads it.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                ptr::addr_of!(tv).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }

    /// Duplicates the socket (`F_DUPFD_CLOEXEC`); both handles refer to the
    /// same connection.
    ///
    /// # Errors
    ///
    /// The OS error of `fcntl`.
    pub fn try_clone(&self) -> io::Result<SeqpacketConn> {
        Ok(SeqpacketConn {
            fd: self.fd.try_clone()?,
        })
    }

    /// Returns the raw descriptor (still owned by `self`).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for SeqpacketConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for SeqpacketConn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<SeqpacketConn> for OwnedFd {
    fn from(c: SeqpacketConn) -> OwnedFd {
        c.fd
    }
}

/// Walks the control messages of a completed `recvmsg` and wraps every
/// `SCM_RIGHTS` descriptor in an `OwnedFd`.
fn take_fds(msg: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    // SAFETY: after a successful recvmsg, `msg.msg_control` points to our
    // control buffer and `msg.msg_controllen` is the number of bytes the
    // kernel filled with well-formed cmsghdr records, so CMSG_FIRSTHDR /
    // CMSG_NXTHDR stay inside the buffer and return null at its end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points to a complete cmsghdr inside
        // the buffer (see above); read it unaligned to be safe.
        let hdr = unsafe { cmsg.read_unaligned() };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is pure arithmetic.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(header_len) / FD_SIZE;
            // SAFETY: the kernel wrote `cmsg_len - CMSG_LEN(0)` bytes of
            // descriptors right after the header, within the buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, so the read is within the payload; each
                // descriptor was just installed in our table by the kernel
                // and is owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(data.add(i).read_unaligned()) };
                fds.push(fd);
            }
        }
        // SAFETY: `msg` and `cmsg` satisfy CMSG_NXTHDR's requirements as
        // explained above.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
}

/// Creates an `AF_UNIX`, `SOCK_SEQPACKET | SOCK_CLOEXEC` socket.
fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory-safety preconditions.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Builds a `sockaddr_un` for a filesystem path.
fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.is_empty() {
        return Err(invalid_input("socket path is empty"));
    }
    if bytes.contains(&0) {
        return Err(invalid_input(format!(
            "socket path {} contains a NUL byte",
            path.display()
        )));
    }
    // One byte is needed for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(invalid_input(format!(
            "socket path {} is too long ({} bytes, at most {} allowed)",
            path.display(),
            bytes.len(),
            addr.sun_path.len() - 1
        )));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Sets or clears `O_NONBLOCK` on a descriptor.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument; the descriptor is open.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let new = if nonblocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: F_SETFL takes an int argument; the descriptor is open.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, new) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Access, Mapping, Memfd};
    use std::path::PathBuf;
    use std::time::Instant;

    fn sock_path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tb-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn pass_memfd_over_pair() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let seg = Memfd::create("tb-pass", 4096, false).unwrap();
        let w = Mapping::map(seg.as_fd(), 4096, Access::ReadWrite, 1).unwrap();
        // SAFETY: the mapping is 4096 bytes and writable.
        unsafe { w.as_ptr().add(100).write_volatile(0x5A) };

        let ro = seg.reopen_read_only().unwrap();
        a.send(b"seg", &[seg.as_fd(), ro.as_fd()]).unwrap();

        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = b.recv(&mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"seg");
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            // SAFETY: F_GETFD takes no argument; the descriptor is open.
            let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_ne!(fl & libc::FD_CLOEXEC, 0, "received fd must be cloexec");
        }
        let r = Mapping::map(fds[1].as_fd(), 4096, Access::ReadOnly, 1).unwrap();
        // SAFETY: the mapping is 4096 bytes long.
        assert_eq!(unsafe { r.as_ptr().add(100).read_volatile() }, 0x5A);
        // The read-only descriptor stays read-only across the socket.
        let e = Mapping::map(fds[1].as_fd(), 4096, Access::ReadWrite, 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        // The writable one allows writes that the other side sees.
        let w2 = Mapping::map(fds[0].as_fd(), 4096, Access::ReadWrite, 1).unwrap();
        // SAFETY: both mappings are 4096 bytes; `w2` is writable.
        unsafe {
            w2.as_ptr().write_volatile(9);
            assert_eq!(w.as_ptr().read_volatile(), 9);
        }
    }

    #[test]
    fn bind_connect_accept_and_peer_cred() {
        let path = sock_path("bca");
        let l = SeqpacketListener::bind(&path).unwrap();
        let c = SeqpacketConn::connect(&path).unwrap();
        let s = l.accept().unwrap();
        c.send(b"ping", &[]).unwrap();
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        assert_eq!(s.recv(&mut buf, &mut fds).unwrap(), 4);
        assert!(fds.is_empty());

        let cred = s.peer_cred().unwrap();
        // SAFETY: getpid/geteuid/getegid have no preconditions.
        let (pid, uid, gid) = unsafe { (libc::getpid(), libc::geteuid(), libc::getegid()) };
        assert_eq!(cred, PeerCred { pid, uid, gid });
        assert_eq!(c.peer_cred().unwrap().pid, pid);

        // Binding the same path again fails.
        let e = SeqpacketListener::bind(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn nonblocking_accept() {
        let path = sock_path("nb");
        let l = SeqpacketListener::bind(&path).unwrap();
        l.set_nonblocking(true).unwrap();
        assert_eq!(l.accept().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let _c = SeqpacketConn::connect(&path).unwrap();
        l.accept().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn connect_to_missing_path_names_it() {
        let path = sock_path("missing");
        let e = SeqpacketConn::connect(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    }

    #[test]
    fn too_long_path_is_invalid_input() {
        let path = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        let e = SeqpacketListener::bind(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("xxxx"), "{e}");
        let e = SeqpacketConn::connect(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Exactly 107 bytes is the longest allowed.
        let ok = format!("/tmp/{}", "y".repeat(102));
        assert_eq!(ok.len(), 107);
        assert!(sockaddr_un(Path::new(&ok)).is_ok());
        assert!(sockaddr_un(Path::new(&format!("{ok}z"))).is_err());
    }

    #[test]
    fn connect_nonblocking_tells_what_is_at_the_path() {
        let path = sock_path("probe");
        // Nothing there.
        let e = SeqpacketConn::connect_nonblocking(&path).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // A live seqpacket listener.
        let l = SeqpacketListener::bind(&path).unwrap();
        let c = SeqpacketConn::connect_nonblocking(&path).unwrap();
        let s = l.accept().unwrap();
        c.send(b"hi", &[]).unwrap();
        assert_eq!(s.recv(&mut [0u8; 4], &mut Vec::new()).unwrap(), 2);
        // A stale socket file: nobody listens any more.
        drop((l, s, c));
        let e = SeqpacketConn::connect_nonblocking(&path).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED));
        std::fs::remove_file(&path).unwrap();
        // A live stream socket of another program.
        let stream = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = SeqpacketConn::connect_nonblocking(&path).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPROTOTYPE));
        drop(stream);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(MAX_SOCKET_PATH, 107);
    }

    #[test]
    fn message_boundaries_are_kept() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        a.send(b"one", &[]).unwrap();
        a.send(b"two-two", &[]).unwrap();
        a.send(&[7u8; 1000], &[]).unwrap();
        let mut buf = [0u8; 2048];
        let mut fds = Vec::new();
        assert_eq!(b.recv(&mut buf, &mut fds).unwrap(), 3);
        assert_eq!(&buf[..3], b"one");
        assert_eq!(b.recv(&mut buf, &mut fds).unwrap(), 7);
        assert_eq!(&buf[..7], b"two-two");
        assert_eq!(b.recv(&mut buf, &mut fds).unwrap(), 1000);
    }

    #[test]
    fn closed_peer_returns_zero_and_send_is_broken_pipe() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        a.send(b"last", &[]).unwrap();
        drop(a);
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        assert_eq!(b.recv(&mut buf, &mut fds).unwrap(), 4);
        assert_eq!(b.recv(&mut buf, &mut fds).unwrap(), 0);
        assert_eq!(
            b.send(b"x", &[]).unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[test]
    fn truncation_is_invalid_data_and_fds_are_taken() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let seg = Memfd::create("tb-trunc", 4096, false).unwrap();
        a.send(b"0123456789", &[seg.as_fd()]).unwrap();
        let mut buf = [0u8; 4];
        let mut fds = Vec::new();
        let e = b.recv(&mut buf, &mut fds).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(fds.len(), 1);
        assert_eq!(crate::fd_len(fds[0].as_fd()).unwrap(), 4096);
    }

    #[test]
    fn too_many_fds_on_send_is_invalid_input() {
        let (a, _b) = SeqpacketConn::pair().unwrap();
        let seg = Memfd::create("tb-many", 0, false).unwrap();
        let fds = vec![seg.as_fd(); MAX_FDS + 1];
        let e = a.send(b"x", &fds).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Exactly MAX_FDS works.
        a.send(b"x", &fds[..MAX_FDS]).unwrap();
        let mut got = Vec::new();
        _b.recv(&mut [0u8; 1], &mut got).unwrap();
        assert_eq!(got.len(), MAX_FDS);
    }

    #[test]
    fn ctrunc_when_peer_sends_more_than_max_fds() {
        // Send 40 descriptors with a raw sendmsg, bypassing our limit.
        let (a, b) = SeqpacketConn::pair().unwrap();
        let seg = Memfd::create("tb-ctrunc", 0, false).unwrap();
        const N: usize = 40;
        send_raw_fds(&a, &[1u8], seg.as_raw_fd(), N);
        let mut fds = Vec::new();
        let e = b.recv(&mut [0u8; 4], &mut fds).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(fds.len() <= MAX_FDS && !fds.is_empty(), "{}", fds.len());
    }

    #[test]
    fn try_send_never_waits_and_write_timeout_expires() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let mut sent = 0usize;
        let err = loop {
            match a.try_send(&[1u8; 4096], &[]) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "the peer's queue never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        a.set_write_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let start = Instant::now();
        assert_eq!(
            a.send(&[1u8; 4096], &[]).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(start.elapsed() >= Duration::from_millis(15));
        // Everything that was accepted arrives, whole.
        let mut buf = [0u8; 8192];
        let mut fds = Vec::new();
        for _ in 0..sent {
            assert_eq!(b.recv(&mut buf, &mut fds).unwrap(), 4096);
        }
    }

    #[test]
    fn recv_keeping_data_returns_the_message_when_fds_are_lost() {
        // More than MAX_FDS attached: the data still comes back, with why
        // the descriptors were lost.
        let (a, b) = SeqpacketConn::pair().unwrap();
        let seg = Memfd::create("tb-keep", 0, false).unwrap();
        send_raw_fds(&a, b"data", seg.as_raw_fd(), 40);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let (n, lost) = b.recv_keeping_data(&mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"data");
        let lost = lost.expect("descriptors were lost");
        assert_eq!(lost.kind(), io::ErrorKind::InvalidData);
        assert!(lost.to_string().contains("more than 32"), "{lost}");
    }

    /// Sends `data` with `count` copies of `fd` through a raw sendmsg.
    fn send_raw_fds(a: &SeqpacketConn, data: &[u8], fd: RawFd, count: usize) {
        let payload = count * FD_SIZE;
        // SAFETY: pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(payload as libc::c_uint) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: data.len(),
        };
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds `space` bytes, enough for one
        // header and `count` descriptors; `msg` and its buffers outlive
        // sendmsg.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as libc::c_uint) as _;
            let d = libc::CMSG_DATA(c).cast::<RawFd>();
            for i in 0..count {
                d.add(i).write_unaligned(fd);
            }
            assert_eq!(libc::sendmsg(a.as_raw_fd(), &msg, 0), data.len() as isize);
        }
    }

    #[test]
    fn empty_send_is_rejected() {
        let (a, _b) = SeqpacketConn::pair().unwrap();
        assert_eq!(
            a.send(b"", &[]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn read_timeout_and_nonblocking() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let mut buf = [0u8; 4];
        let mut fds = Vec::new();
        b.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        let start = Instant::now();
        assert_eq!(
            b.recv(&mut buf, &mut fds).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(start.elapsed() >= Duration::from_millis(25));
        b.set_read_timeout(None).unwrap();
        assert_eq!(
            b.set_read_timeout(Some(Duration::ZERO)).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );

        b.set_nonblocking(true).unwrap();
        assert_eq!(
            b.recv(&mut buf, &mut fds).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        a.send(b"ok", &[]).unwrap();
        assert_eq!(b.recv(&mut buf, &mut fds).unwrap(), 2);
        b.set_nonblocking(false).unwrap();
    }

    #[test]
    fn try_clone_shares_connection() {
        let (a, b) = SeqpacketConn::pair().unwrap();
        let a2 = a.try_clone().unwrap();
        assert_ne!(a.as_raw_fd(), a2.as_raw_fd());
        drop(a);
        a2.send(b"via clone", &[]).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(b.recv(&mut buf, &mut Vec::new()).unwrap(), 9);
    }
}
