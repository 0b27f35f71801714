//! Pieces every contender shares: payload fill and checksum, the shared
//! control area (cache-line flag, done counter, stop flag, the limit's data
//! buffers), child processes and their line protocol, and waits that give up.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tensorbus_shm::{Access, Mapping, Memfd};

/// Errors of the harness: any error, printed as one line.
pub type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// How long one round (or one streamed message) may take before the run
/// declares a peer hung.
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the parent waits for a child's protocol line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a message does with its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The sender writes every byte; the receiver reads every byte and checks a checksum.
    Full,
    /// One byte written, one byte read: the transport alone.
    Touch,
}

impl Variant {
    /// Both variants, in report order.
    pub const ALL: [Variant; 2] = [Variant::Full, Variant::Touch];

    /// Name in the table and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Full => "full",
            Variant::Touch => "touch",
        }
    }

    /// Parses [`Variant::name`].
    pub fn parse(s: &str) -> Result<Variant> {
        match s {
            "full" => Ok(Variant::Full),
            "touch" => Ok(Variant::Touch),
            other => Err(format!("unknown variant {other:?}").into()),
        }
    }
}

/// The byte a message with sequence value `v` carries (never 0, so a
/// zero-filled fresh page never passes for a message).
pub fn pattern(v: u64) -> u8 {
    (v % 251) as u8 + 1
}

/// Writes a message's payload: every byte (`full`) or the first (`touch`).
#[inline]
pub fn write_payload(buf: &mut [u8], b: u8, variant: Variant) {
    match variant {
        Variant::Full => buf.fill(b),
        Variant::Touch => {
            if let Some(x) = buf.first_mut() {
                *x = b;
            }
        }
    }
}

/// Wrapping sum of the aligned little-endian u64 words of `buf` plus its
/// unaligned leading and trailing bytes (four accumulators, so it runs at
/// memory bandwidth in release builds and tolerably in debug ones).
#[inline]
pub fn checksum(buf: &[u8]) -> u64 {
    // SAFETY: every bit pattern is a valid u64; align_to only reinterprets
    // the aligned middle of the slice.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    let mut s = [0u64; 4];
    let mut quads = words.chunks_exact(4);
    for q in &mut quads {
        for (acc, w) in s.iter_mut().zip(q) {
            *acc = acc.wrapping_add(u64::from_le(*w));
        }
    }
    let mut total = s[0]
        .wrapping_add(s[1])
        .wrapping_add(s[2])
        .wrapping_add(s[3]);
    for w in quads.remainder() {
        total = total.wrapping_add(u64::from_le(*w));
    }
    // The unaligned ends: bytes at their position within a little-endian
    // word of the whole buffer would complicate things, so checksum them as
    // single bytes times the byte's weight in a word of equal bytes.
    for &b in head.iter().chain(tail) {
        total = total.wrapping_add(u64::from(b));
    }
    total
}

/// The checksum of `buf.len()` bytes all equal to `b` (as [`checksum`]
/// counts them: aligned words whole, unaligned ends byte by byte).
pub fn expected_checksum(buf: &[u8], b: u8) -> u64 {
    let misalign = buf.as_ptr().align_offset(8).min(buf.len());
    let words = (buf.len() - misalign) / 8;
    let ends = buf.len() - words * 8;
    let word = u64::from(b).wrapping_mul(0x0101_0101_0101_0101);
    (words as u64)
        .wrapping_mul(word)
        .wrapping_add(ends as u64 * u64::from(b))
}

/// Reads a message's payload: every byte with its checksum (`full`) or the
/// first byte (`touch`). Returns the message's pattern byte.
#[inline]
pub fn read_payload(buf: &[u8], variant: Variant) -> Result<u8> {
    let b = *buf.first().ok_or("empty payload")?;
    if variant == Variant::Full {
        let got = checksum(buf);
        let want = expected_checksum(buf, b);
        if got != want {
            return Err(format!(
                "checksum mismatch over {} bytes: {got:#x}, expected {want:#x}",
                buf.len()
            )
            .into());
        }
    }
    Ok(b)
}

/// Checks that a reply carries `want` (its pattern byte).
pub fn check_reply(buf: &[u8], variant: Variant, want: u8) -> Result<()> {
    let got = read_payload(buf, variant)?;
    if got != want {
        return Err(format!("reply carried byte {got:#x}, expected {want:#x}").into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Shared control area

/// Offset of the cache-line flag.
const FLAG_OFF: usize = 0;
/// Offset of the done counter.
const DONE_OFF: usize = 64;
/// Offset of the stop flag.
const STOP_OFF: usize = 128;
/// Offsets of the `futex-raw` contender's two futex words (ping, pong),
/// each on a cache line of its own.
const FUTEX_PING_OFF: usize = 192;
const FUTEX_PONG_OFF: usize = 256;
/// Offset of the limit's small inline payload (same line as the flag).
pub const INLINE_OFF: usize = 8;
/// Largest payload the limit carries inside the flag's cache line.
pub const INLINE_MAX: usize = 56;
/// Where the data buffers start.
const DATA_OFF: usize = 4096;

/// A memfd shared by the parent and every child: the limit's flag and data
/// buffers, the streaming done counter and stop flag.
pub struct Shared {
    memfd: Memfd,
    map: Mapping,
    /// Capacity of each of the two data buffers.
    pub buf_len: usize,
}

fn round_page(n: usize) -> usize {
    n.div_ceil(4096) * 4096
}

impl Shared {
    /// Creates the area for payloads up to `max_size` bytes.
    pub fn create(max_size: usize) -> Result<Shared> {
        let buf_len = round_page(max_size.max(64));
        let len = DATA_OFF + 2 * buf_len;
        let memfd = Memfd::create("tensorbus-bench", len, false)?;
        let map = Mapping::map(memfd.as_fd(), len, Access::ReadWrite, 1)?;
        Ok(Shared {
            memfd,
            map,
            buf_len,
        })
    }

    /// Maps an inherited descriptor (child side).
    pub fn inherit(fd: &str, max_size: &str) -> Result<Shared> {
        let fd: RawFd = fd.parse().map_err(|e| format!("shared fd {fd:?}: {e}"))?;
        let max_size: usize = max_size.parse()?;
        // SAFETY: F_GETFD takes no argument and touches no memory of ours.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("inherited fd {fd}: {}", std::io::Error::last_os_error()).into());
        }
        // SAFETY: the descriptor is open (checked above); the parent passed it
        // for this purpose and nothing else in this process owns it.
        let memfd = Memfd::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
        let buf_len = round_page(max_size.max(64));
        let len = DATA_OFF + 2 * buf_len;
        let map = Mapping::map(memfd.as_fd(), len, Access::ReadWrite, 1)?;
        Ok(Shared {
            memfd,
            map,
            buf_len,
        })
    }

    /// The descriptor number, for a child's arguments.
    pub fn raw_fd(&self) -> RawFd {
        self.memfd.as_fd().as_raw_fd()
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        // SAFETY: `off` is one of the fixed offsets below DATA_OFF, 8-aligned,
        // inside the page-aligned read-write mapping, which lives as long as
        // `self`; the word is only accessed atomically by every process.
        unsafe { &*self.map.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// The cache-line flag of the limit contender.
    pub fn flag(&self) -> &AtomicU64 {
        self.word(FLAG_OFF)
    }
    /// Messages consumed (streaming, fan-out, work queue).
    pub fn done(&self) -> &AtomicU64 {
        self.word(DONE_OFF)
    }
    /// Non-zero tells streaming children to stop.
    pub fn stop(&self) -> &AtomicU64 {
        self.word(STOP_OFF)
    }

    /// The `futex-raw` contender's words: `ping` (written by the parent)
    /// and `pong` (written by the child).
    pub fn futex_words(&self) -> (&AtomicU32, &AtomicU32) {
        let w = |off: usize| {
            // SAFETY: `off` is one of the two fixed offsets below DATA_OFF,
            // 4-aligned, inside the page-aligned read-write mapping, which
            // lives as long as `self`; every bit pattern is a valid u32 and
            // the word is only accessed atomically (and by futex(2), which
            // reads it atomically) by every process.
            unsafe { &*self.map.as_ptr().add(off).cast::<AtomicU32>() }
        };
        (w(FUTEX_PING_OFF), w(FUTEX_PONG_OFF))
    }

    /// Raw pointer to data buffer `which` (0: parent to child, 1: back), or
    /// to the inline bytes next to the flag when `inline`.
    pub fn data_ptr(&self, which: usize, inline: bool) -> *mut u8 {
        let off = if inline {
            INLINE_OFF
        } else {
            DATA_OFF + which * self.buf_len
        };
        // SAFETY: the offset lies inside the mapping (DATA_OFF + 2 * buf_len).
        unsafe { self.map.as_ptr().add(off) }
    }
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD takes no argument and touches no memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: F_SETFD takes an int argument and touches no memory of ours.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Children

/// Reads the next command line from stdin: `Ok(None)` at EOF.
pub fn next_command(stdin: &mut impl BufRead) -> Result<Option<Vec<String>>> {
    let mut line = String::new();
    if stdin.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.split_whitespace().map(str::to_owned).collect()))
}

/// Writes `text` to stdout (the report, the usage). A closed stdout
/// (`tensorbus bench | head -1`: EPIPE) is not an error: the output is
/// dropped and the run goes on (the `--json` file is still written) and
/// exits 0, where `print!` would panic with status 101.
pub fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("writing to stdout: {e}").into())
        }
        _ => Ok(()),
    }
}

/// Prints a protocol line to the parent.
pub fn say(what: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{what}")?;
    out.flush()?;
    Ok(())
}

/// A running child (this executable with role arguments): its stdin
/// (commands) and stdout lines. Dropping it kills the child if still running.
pub struct Peer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Peer {
    /// Spawns `current_exe --child ARGS` with `inherit` descriptors made
    /// inheritable for this spawn only, and waits for its `ready` line.
    pub fn spawn(name: &str, args: &[String], inherit: &[RawFd]) -> Result<Peer> {
        let exe = std::env::current_exe()?;
        for &fd in inherit {
            set_cloexec(fd, false)?;
        }
        let spawned = Command::new(exe)
            .arg("--child")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        for &fd in inherit {
            set_cloexec(fd, true)?;
        }
        let mut child = spawned.map_err(|e| format!("spawning the {name} child: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, lines) = mpsc::channel();
        let mut peer = Peer {
            name: name.to_owned(),
            child,
            stdin,
            lines,
        };
        let stdout = stdout.ok_or("child has no stdout pipe")?;
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        peer.expect("ready")?;
        Ok(peer)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a command line.
    pub fn send(&mut self, cmd: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or("child stdin already closed")?;
        writeln!(stdin, "{cmd}").map_err(|e| format!("{}: writing {cmd:?}: {e}", self.name))?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the line `what`.
    pub fn expect(&mut self, what: &str) -> Result<()> {
        match self.lines.recv_timeout(LINE_TIMEOUT) {
            Ok(line) if line == what => Ok(()),
            Ok(line) => Err(format!("{} child: expected {what:?}, got {line:?}", self.name).into()),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("{} child: no {what:?} within {LINE_TIMEOUT:?}", self.name).into())
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = match self.child.wait() {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                Err(format!("{} child exited before {what:?} ({status})", self.name).into())
            }
        }
    }

    /// Closes stdin and waits (bounded) for a clean exit.
    pub fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("{} child: {status}", self.name).into())
                };
            }
            if Instant::now() >= deadline {
                return Err(format!("{} child did not exit; killing it", self.name).into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Context switches

/// Voluntary and involuntary context switches: a voluntary one per round
/// trip means that side slept (went through the futex or the kernel's
/// socket/pipe wait); involuntary ones are preemptions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Switches {
    /// Voluntary switches (the thread blocked).
    pub voluntary: u64,
    /// Involuntary switches (the thread was preempted).
    pub involuntary: u64,
}

impl Switches {
    /// `self - earlier`, saturating (counters only grow).
    pub fn since(self, earlier: Switches) -> Switches {
        Switches {
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
        }
    }

    /// Adds `other` to `self`.
    pub fn add(&mut self, other: Switches) {
        self.voluntary += other.voluntary;
        self.involuntary += other.involuntary;
    }

    /// Parses the `voluntary_ctxt_switches` / `nonvoluntary_ctxt_switches`
    /// lines of a `/proc/.../status` file.
    fn parse_status(text: &str) -> Option<Switches> {
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        Some(Switches {
            voluntary: field("voluntary_ctxt_switches:")?,
            involuntary: field("nonvoluntary_ctxt_switches:")?,
        })
    }

    /// The calling thread's switches (`getrusage(RUSAGE_THREAD)`).
    pub fn this_thread() -> Option<Switches> {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one `struct rusage` to the pointer, which
        // points at a (zeroed) value of exactly that type.
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: getrusage succeeded and filled the struct (and all-zero
        // bytes are a valid rusage anyway).
        let ru = unsafe { ru.assume_init() };
        Some(Switches {
            voluntary: u64::try_from(ru.ru_nvcsw).ok()?,
            involuntary: u64::try_from(ru.ru_nivcsw).ok()?,
        })
    }

    /// All threads of process `pid` together (`/proc/PID/task/*/status`).
    pub fn process(pid: u32) -> Option<Switches> {
        let mut sum = Switches::default();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            // A thread that exited meanwhile has no status any more: skip it.
            let Ok(status) = std::fs::read_to_string(task.ok()?.path().join("status")) else {
                continue;
            };
            sum.add(Switches::parse_status(&status)?);
        }
        Some(sum)
    }
}

/// Spins until `cond` holds, giving up after [`ROUND_TIMEOUT`].
#[inline]
pub fn spin_until(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let mut spins = 0u32;
    let mut start: Option<Instant> = None;
    while !cond() {
        std::hint::spin_loop();
        spins = spins.wrapping_add(1);
        if spins % 4096 == 0 {
            let s = *start.get_or_insert_with(Instant::now);
            if s.elapsed() > ROUND_TIMEOUT {
                return Err(format!("{what}: nothing within {ROUND_TIMEOUT:?}").into());
            }
        }
    }
    Ok(())
}

/// Parses `u64`/`usize` arguments.
pub fn num<T: std::str::FromStr>(s: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>()
        .map_err(|e| format!("{s:?} is not a number: {e}").into())
}
