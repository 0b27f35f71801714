//! The physical limit: a flag word (and, up to 56 bytes, the payload) in one
//! cache line of a shared memfd, bounced between two processes. Larger
//! payloads go through two plain shared buffers (one per direction) next to
//! the flag: the floor for any shared-memory transport of that many bytes.

use crate::common::{
    check_reply, next_command, num, pattern, read_payload, say, spin_until, write_payload, Peer,
    Result, Shared, Variant, INLINE_MAX, ROUND_TIMEOUT,
};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tensorbus_shm::futex;

/// Parent side.
pub struct Limit {
    shared: Rc<Shared>,
    peer: Peer,
    next: u64,
    /// Last value stored into the `futex-raw` ping word.
    fx_next: u32,
}

/// The payload bytes of direction `which` for `size`-byte messages.
///
/// # Safety
/// The caller must own that direction's buffer at this point of the
/// protocol (the peer does not touch it until the flag moves on), and
/// `size` must be at most `shared.buf_len`.
// The buffer is shared memory handed over by the flag protocol, not state of
// `Shared`: exclusivity comes from the protocol (the safety contract).
#[allow(clippy::mut_from_ref)]
unsafe fn buf(shared: &Shared, which: usize, size: usize) -> &mut [u8] {
    let inline = size <= INLINE_MAX;
    // SAFETY: the pointer lies in the shared mapping, which holds `size`
    // bytes there (inline: 56 bytes after the flag; else buf_len bytes);
    // exclusivity is the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(shared.data_ptr(which, inline), size) }
}

impl Limit {
    /// Spawns the echoing child.
    pub fn start(shared: Rc<Shared>, max_size: usize) -> Result<Limit> {
        let fd = shared.raw_fd();
        let args = vec!["limit".into(), fd.to_string(), max_size.to_string()];
        let peer = Peer::spawn("limit", &args, &[fd])?;
        Ok(Limit {
            shared,
            peer,
            next: 1,
            fx_next: 0,
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
        if size > self.shared.buf_len {
            return Err(format!("limit: size {size} above the buffer").into());
        }
        self.peer
            .send(&format!("pp {size} {} {}", variant.name(), warm + count))?;
        let flag = self.shared.flag();
        for i in 0..warm + count {
            let v = self.next;
            self.next += 1;
            let b = pattern(v);
            let t0 = Instant::now();
            // SAFETY: the child waits for the flag before touching buffer 0,
            // and size <= buf_len (checked above).
            write_payload(unsafe { buf(&self.shared, 0, size) }, b, variant);
            flag.store(2 * v - 1, Ordering::Release);
            spin_until("limit reply", || flag.load(Ordering::Acquire) == 2 * v)?;
            // SAFETY: the child wrote buffer 1 before moving the flag to 2v
            // and touches nothing until the next odd value.
            check_reply(unsafe { buf(&self.shared, 1, size) }, variant, !b)?;
            let ns = t0.elapsed().as_nanos() as u64;
            if i >= warm {
                out.push(ns);
            }
        }
        self.peer.expect("done")
    }

    /// `futex-raw`: runs `warm + count` round trips through the two futex
    /// words (both sides sleep), recording the last `count`.
    pub fn futex_block(
        &mut self,
        size: usize,
        variant: Variant,
        warm: usize,
        count: usize,
        out: &mut Vec<u64>,
    ) -> Result<()> {
        if size > self.shared.buf_len {
            return Err(format!("futex-raw: size {size} above the buffer").into());
        }
        self.peer
            .send(&format!("fx {size} {} {}", variant.name(), warm + count))?;
        let (ping, pong) = self.shared.futex_words();
        for i in 0..warm + count {
            self.fx_next = self.fx_next.wrapping_add(1).max(1);
            let n = self.fx_next;
            let b = pattern(u64::from(n));
            let t0 = Instant::now();
            // SAFETY: the child waits for the ping word before touching
            // buffer 0, and size <= buf_len (checked above).
            write_payload(unsafe { buf(&self.shared, 0, size) }, b, variant);
            ping.store(n, Ordering::Release);
            futex::wake(ping, 1);
            loop {
                let v = pong.load(Ordering::Acquire);
                if v == n {
                    break;
                }
                futex::wait(pong, v, Some(ROUND_TIMEOUT));
                if t0.elapsed() > ROUND_TIMEOUT {
                    return Err(format!("futex-raw: no reply within {ROUND_TIMEOUT:?}").into());
                }
            }
            // SAFETY: the child wrote buffer 1 before storing n into pong and
            // touches nothing until the next ping.
            check_reply(unsafe { buf(&self.shared, 1, size) }, variant, !b)?;
            let ns = t0.elapsed().as_nanos() as u64;
            if i >= warm {
                out.push(ns);
            }
        }
        self.peer.expect("done")
    }

    /// The child's process id (for its context switches).
    pub fn pid(&self) -> u32 {
        self.peer.pid()
    }

    /// Ends the child.
    pub fn finish(self) -> Result<()> {
        self.peer.finish()
    }
}

/// Child: `limit FD MAX_SIZE`.
pub fn child(args: &[String]) -> Result<()> {
    let [fd, max] = args else {
        return Err("usage: limit FD MAX_SIZE".into());
    };
    let shared = Shared::inherit(fd, max)?;
    let flag = shared.flag();
    let (ping, pong) = shared.futex_words();
    let mut last_ping = 0u32;
    say("ready")?;
    let mut stdin = std::io::stdin().lock();
    while let Some(cmd) = next_command(&mut stdin)? {
        let [what, size, variant, count] = cmd.as_slice() else {
            return Err(format!("limit child: bad command {cmd:?}").into());
        };
        if what != "pp" && what != "fx" {
            return Err(format!("limit child: bad command {cmd:?}").into());
        }
        let size: usize = num(size)?;
        let variant = Variant::parse(variant)?;
        if size > shared.buf_len {
            return Err("limit child: size above the buffer".into());
        }
        if what == "fx" {
            for _ in 0..num::<u64>(count)? {
                let start = Instant::now();
                let v = loop {
                    let v = ping.load(Ordering::Acquire);
                    if v != last_ping {
                        break v;
                    }
                    futex::wait(ping, last_ping, Some(ROUND_TIMEOUT));
                    if start.elapsed() > ROUND_TIMEOUT {
                        return Err("futex-raw child: no ping from the parent".into());
                    }
                };
                last_ping = v;
                // SAFETY: the parent wrote buffer 0 before storing v into ping
                // and waits for pong; size <= buf_len.
                let b = read_payload(unsafe { buf(&shared, 0, size) }, variant)?;
                // SAFETY: the parent reads buffer 1 only after pong moves.
                write_payload(unsafe { buf(&shared, 1, size) }, !b, variant);
                pong.store(v, Ordering::Release);
                futex::wake(pong, 1);
            }
            say("done")?;
            continue;
        }
        for _ in 0..num::<u64>(count)? {
            spin_until("limit ping", || flag.load(Ordering::Acquire) & 1 == 1)?;
            let odd = flag.load(Ordering::Acquire);
            // SAFETY: the parent wrote buffer 0 before the odd flag and waits
            // for the even one; size <= buf_len.
            let b = read_payload(unsafe { buf(&shared, 0, size) }, variant)?;
            // SAFETY: the parent reads buffer 1 only after the even flag.
            write_payload(unsafe { buf(&shared, 1, size) }, !b, variant);
            flag.store(odd + 1, Ordering::Release);
        }
        say("done")?;
    }
    Ok(())
}
