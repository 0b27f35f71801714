//! The copying baselines: the payload carried through a Unix domain stream
//! socket (a socketpair) or through a pair of pipes. The kernel copies every
//! byte twice (sender's buffer into the kernel, the kernel into the
//! receiver's buffer), whatever the variant: `touch` only spares the
//! user-space fill and checksum.

use crate::common::{
    check_reply, next_command, num, pattern, read_payload, say, write_payload, Peer, Result,
    Variant,
};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Which copying path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `socketpair(AF_UNIX, SOCK_STREAM)`.
    Uds,
    /// Two pipes (pipe buffers enlarged to 1 MiB where allowed).
    Pipe,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Uds => "uds",
            Kind::Pipe => "pipe",
        }
    }
}

/// Parent side.
pub struct Copying {
    tx: File,
    rx: File,
    send: Vec<u8>,
    recv: Vec<u8>,
    peer: Peer,
    next: u64,
}

fn pipe() -> Result<(File, File)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // Best effort: a 1 MiB pipe buffer (the default pipe-max-size) means
    // fewer wake-ups per large message.
    for fd in fds {
        // SAFETY: F_SETPIPE_SZ takes an int; failure is harmless.
        unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20) };
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Takes ownership of an inherited descriptor number.
fn inherited(s: &str) -> Result<File> {
    let fd: RawFd = num(s)?;
    // SAFETY: F_GETFD takes no argument and touches no memory of ours.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("inherited fd {fd}: {}", std::io::Error::last_os_error()).into());
    }
    // SAFETY: the descriptor is open and was passed to this process for this
    // use only; nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

impl Copying {
    /// The child's process id (for its context switches).
    pub fn pid(&self) -> u32 {
        self.peer.pid()
    }

    /// Creates the socketpair or pipes and spawns the echoing child.
    pub fn start(kind: Kind, max_size: usize) -> Result<Copying> {
        let (tx, rx, child_fds): (File, File, Vec<File>) = match kind {
            Kind::Uds => {
                let (a, b) = UnixStream::pair()?;
                let a: OwnedFd = a.into();
                let b: OwnedFd = b.into();
                let a = File::from(a);
                (a.try_clone()?, a, vec![File::from(b)])
            }
            Kind::Pipe => {
                let (down_r, down_w) = pipe()?;
                let (up_r, up_w) = pipe()?;
                (down_w, up_r, vec![down_r, up_w])
            }
        };
        let raw: Vec<RawFd> = child_fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut args = vec![kind.name().to_owned()];
        args.extend(raw.iter().map(|fd| fd.to_string()));
        let peer = Peer::spawn(kind.name(), &args, &raw)?;
        drop(child_fds); // the child has its copies; ours would keep EOF away
        Ok(Copying {
            tx,
            rx,
            send: vec![0; max_size],
            recv: vec![0; max_size],
            peer,
            next: 1,
        })
    }

    /// Runs `warm + count` round trips, recording the last `count`.
    pub fn block(
        &mut self,
        size: usize,
        variant: Variant,
        warm: usize,
        count: usize,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        if size > self.send.len() {
            return Err("copying: size above the buffer".into());
        }
        self.peer
            .send(&format!("pp {size} {} {}", variant.name(), warm + count))?;
        for i in 0..warm + count {
            let v = self.next;
            self.next += 1;
            let b = pattern(v);
            let t0 = Instant::now();
            write_payload(&mut self.send[..size], b, variant);
            self.tx.write_all(&self.send[..size])?;
            self.rx.read_exact(&mut self.recv[..size])?;
            check_reply(&self.recv[..size], variant, !b)?;
            let ns = t0.elapsed().as_nanos() as u64;
            if i >= warm {
                out.push(ns);
            }
        }
        self.peer.expect("done")
    }

    /// Ends the child.
    pub fn finish(self) -> Result<()> {
        drop(self.tx);
        self.peer.finish()
    }
}

/// Child: `uds FD` or `pipe RFD WFD`, plus the largest size.
pub fn child(kind: Kind, args: &[String]) -> Result<()> {
    let (mut rx, mut tx) = match (kind, args) {
        (Kind::Uds, [fd]) => {
            let f = inherited(fd)?;
            (f.try_clone()?, f)
        }
        (Kind::Pipe, [r, w]) => (inherited(r)?, inherited(w)?),
        _ => return Err(format!("{}: bad child arguments {args:?}", kind.name()).into()),
    };
    let mut recv: Vec<u8> = Vec::new();
    let mut send: Vec<u8> = Vec::new();
    say("ready")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(cmd) = next_command(&mut stdin)? {
        let [pp, size, variant, count] = cmd.as_slice() else {
            return Err(format!("{} child: bad command {cmd:?}", kind.name()).into());
        };
        if pp != "pp" {
            return Err(format!("{} child: bad command {cmd:?}", kind.name()).into());
        }
        let size: usize = num(size)?;
        let variant = Variant::parse(variant)?;
        if recv.len() < size {
            recv.resize(size, 0);
            send.resize(size, 0);
        }
        for _ in 0..num::<u64>(count)? {
            rx.read_exact(&mut recv[..size])?;
            let b = read_payload(&recv[..size], variant)?;
            write_payload(&mut send[..size], !b, variant);
            tx.write_all(&send[..size])?;
        }
        say("done")?;
    }
    Ok(())
}
