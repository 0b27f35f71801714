//! `tensorbus pub` and `tensorbus sub`: shell pipes into and out of a channel.
//!
//! `pub` reads raw fixed-size frames from stdin straight into loaned slots
//! (one `read` loop per frame into the shared-memory bytes, no intermediate
//! buffer) and publishes them; `sub` writes every received tensor's bytes to
//! stdout. Together they connect tensorbus to GStreamer (`fdsink fd=1`),
//! ffmpeg (`-f rawvideo -`) and any other tool that speaks raw bytes.

use crate::{fail, CliError, SocketArg};
use std::fs::File;
use std::io::{self, BufWriter, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus::error::{OpenError, RecvError, TryRecvError};
use tensorbus::{
    ChannelSpec, Client, ConsumerOptions, DType, Mode, Policy, Producer, ProducerOptions,
};

/// How long `--wait-subscribers` waits for the subscribers to appear.
const WAIT_SUBSCRIBERS_LIMIT: Duration = Duration::from_secs(10);
/// How long `pub` waits for a free slot: in practice forever (backpressure).
const LOAN_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// How often `sub` wakes up to look at Ctrl-C and its idle timeout.
const RECV_SLICE: Duration = Duration::from_millis(100);

/// What `pub --help` says after the flags.
const PUB_AFTER_HELP: &str = "\
Input: raw frames of exactly product(--shape) x itemsize(--dtype) bytes each, back to back.
End of input: at EOF on a frame boundary pub prints `pub: frames=N bytes=B` and exits 0.
If stdin ends inside a frame, that truncated last frame is dropped (never published): pub
prints its summary and an error saying how many bytes were missing, and exits 1.
Ctrl-C / SIGTERM: the frame being read is not published; pub prints its summary with
`(interrupted)` and exits 130.";

/// Arguments of `tensorbus pub`.
#[derive(clap::Args, Debug)]
#[command(after_help = PUB_AFTER_HELP)]
pub struct PubArgs {
    /// Channel to publish on.
    #[arg(long)]
    channel: String,
    /// Shape of one frame, e.g. `480x640x3` (`,` works as a separator too).
    #[arg(long, value_parser = parse_shape)]
    shape: Shape,
    /// Element type (`u8`, `f32`, ... or numpy names such as `uint8`).
    #[arg(long, default_value = "u8")]
    dtype: DType,
    #[command(flatten)]
    socket: SocketArg,
    /// Create the channel at run time if it does not exist (see --mode, --pool).
    #[arg(long)]
    create: bool,
    /// With --create: `broadcast` (every subscriber gets every frame, default) or `workqueue` (each frame to one subscriber; `work_queue` is accepted too).
    #[arg(
        long,
        value_name = "M",
        default_value = "broadcast",
        requires = "create"
    )]
    mode: Mode,
    /// With --create: a pool the channel may loan from (repeat for several; default: every pool of the broker).
    #[arg(long = "pool", value_name = "NAME", requires = "create")]
    pools: Vec<String>,
    /// With --create: keep the latest N frames for subscribers that start later (broadcast only; default 0).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "create")]
    history: u32,
    /// Publish at most this many frames per second, 0.001 to 1000000 (0 or absent: as fast as stdin delivers).
    #[arg(long, value_name = "F", value_parser = crate::parse_fps)]
    fps: Option<f64>,
    /// Put the frame index (u64, little endian) in each tensor's user header.
    #[arg(long)]
    user_header_seq: bool,
    /// Before reading stdin, wait (at most 10 s) until the channel has N subscribers (1 to 64).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    wait_subscribers: Option<u64>,
}

/// Arguments of `tensorbus sub`.
#[derive(clap::Args, Debug)]
pub struct SubArgs {
    /// Channel to subscribe to.
    #[arg(long)]
    channel: String,
    /// Stop after N tensors (at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    #[command(flatten)]
    socket: SocketArg,
    /// Policy when this subscriber falls behind: block (lossless, default), drop_oldest, drop_newest, latest.
    #[arg(long, value_name = "P", default_value = "block")]
    policy: Policy,
    /// Ring depth, at least 1 and at most the broker's limits.ring_capacity (channel default if absent).
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u32).range(1..))]
    depth: Option<u32>,
    /// Stop when no tensor arrives within SECS seconds, 0 to 31536000 (default: wait forever).
    #[arg(long, value_name = "SECS", value_parser = crate::parse_seconds)]
    timeout: Option<f64>,
    /// Wait at most SECS seconds for a channel that does not exist yet (0: fail at once; default: wait forever).
    #[arg(long, value_name = "SECS", value_parser = crate::parse_seconds)]
    wait_channel: Option<f64>,
    /// Keep running after the last producer closed (default: exit 0 at end of stream).
    #[arg(long)]
    no_end_of_stream: bool,
}

/// A parsed `--shape`.
#[derive(Clone, Debug)]
pub struct Shape(Vec<u32>);

/// Parses `480x640x3` (or `480,640,3`) into extents, each at least 1.
fn parse_shape(s: &str) -> Result<Shape, String> {
    let dims: Result<Vec<u32>, String> = s
        .split(['x', 'X', ','])
        .map(|d| match d.trim().parse::<u32>() {
            Ok(0) => Err(format!(
                "extent 0 in shape {s:?}: every extent must be at least 1"
            )),
            Ok(n) => Ok(n),
            Err(_) => Err(format!(
                "bad shape {s:?}: expected extents (1 to 4294967295) separated by 'x', such as 480x640x3"
            )),
        })
        .collect();
    let dims = dims?;
    if dims.len() > tensorbus::MAX_DIMS {
        return Err(format!(
            "shape {s:?} has {} dimensions; at most {} are allowed",
            dims.len(),
            tensorbus::MAX_DIMS
        ));
    }
    Ok(Shape(dims))
}

/// Bytes of one frame: product(shape) x itemsize.
fn frame_bytes(shape: &[u32], dtype: DType) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.itemsize(), |acc, &d| acc.checked_mul(d as usize))
}

/// Reads into `buf` until it is full or stdin ends; returns the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Waits until `channel` has at least `n` subscribers.
fn wait_subscribers(client: &Client, channel: &str, n: u64) -> Result<(), CliError> {
    let deadline = Instant::now() + WAIT_SUBSCRIBERS_LIMIT;
    loop {
        let have = client
            .stat()?
            .channels
            .iter()
            .find(|c| c.name == channel)
            .map_or(0, |c| c.subscribers.len() as u64);
        if have >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return fail(format!(
                "channel {channel:?} has {have} subscriber(s), still fewer than the {n} asked for by --wait-subscribers after {WAIT_SUBSCRIBERS_LIMIT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The error of a failed open, told in CLI terms: an unknown channel says
/// which flag or command makes it (`hint`) instead of the library's "open a
/// producer with create options".
fn open_failed(e: OpenError, hint: &str) -> CliError {
    match e {
        OpenError::ChannelNotFound { channel, known } => CliError(format!(
            "unknown channel {channel:?} (known channels: [{}]): declare it in the broker config, or {hint}",
            known.join(", ")
        )),
        e => CliError(e.to_string()),
    }
}

/// Reads frames from stdin into loaned slots and publishes them until EOF.
pub fn run_pub(args: PubArgs) -> Result<(), CliError> {
    let Some(frame_len) = frame_bytes(&args.shape.0, args.dtype) else {
        return fail(format!("shape {:?} is too large", args.shape.0));
    };
    let published = Arc::new(AtomicU64::new(0));
    summary_on_interrupt(published.clone(), frame_len as u64)?;
    let client = Client::connect_to(args.socket.socket.as_deref(), "tensorbus-pub")?;
    let opts = if args.create {
        let pools: Vec<&str> = args.pools.iter().map(String::as_str).collect();
        ProducerOptions::default().create(
            ChannelSpec::new(args.mode)
                .pools(&pools)
                .history(args.history),
        )
    } else {
        ProducerOptions::default()
    };
    let producer = client
        .producer_with(&args.channel, opts)
        .map_err(|e| open_failed(e, "pass --create (with --mode, --pool) to create it"))?;
    if let Some(n) = args.wait_subscribers {
        wait_subscribers(&client, &args.channel, n)?;
    }
    // A File on a duplicate of fd 0: reads go straight into the slot, with
    // no buffer of std's in between.
    let mut stdin = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let period = args
        .fps
        .filter(|f| *f > 0.0)
        .map(|f| Duration::from_secs_f64(1.0 / f));
    let start = Instant::now();
    let (mut frames, mut bytes) = (0u64, 0u64);
    loop {
        let mut t = loan(&producer, &args.shape.0, args.dtype)?;
        let got = read_full(&mut stdin, t.as_mut_bytes())
            .map_err(|e| CliError(format!("reading frame {frames} from stdin: {e}")))?;
        if got == 0 {
            break; // clean EOF: the loan is dropped, the slot released
        }
        if got < frame_len {
            drop(t);
            eprintln!("pub: frames={frames} bytes={bytes}");
            return fail(format!(
                "stdin ended inside frame {frames}: got {got} of {frame_len} bytes, {} bytes missing (is --shape {} --dtype {} right?)",
                frame_len - got,
                args.shape.0.iter().map(u32::to_string).collect::<Vec<_>>().join("x"),
                args.dtype
            ));
        }
        if args.user_header_seq {
            t.set_user_header(&frames.to_le_bytes())?;
        }
        if let Some(p) = period {
            // --fps is at least 0.001, so `p` is at most 1000 s; checked
            // arithmetic all the same, so no flag value can panic here.
            let due = Duration::try_from_secs_f64(p.as_secs_f64() * frames as f64)
                .ok()
                .and_then(|d| start.checked_add(d));
            let now = Instant::now();
            if let Some(due) = due.filter(|&d| d > now) {
                std::thread::sleep(due - now);
            }
        }
        t.publish()?;
        frames += 1;
        bytes += frame_len as u64;
        published.store(frames, Ordering::Relaxed);
    }
    // Close the producer before saying so: its clean close is what ends
    // the stream for the subscribers (they drain, then see end of stream).
    drop(producer);
    eprintln!("pub: frames={frames} bytes={bytes}");
    Ok(())
}

/// On Ctrl-C or SIGTERM, prints what `pub` published so far and exits
/// with status 130. A frame being read at that moment is not published:
/// its loan dies with the process and the broker takes the slot back.
fn summary_on_interrupt(published: Arc<AtomicU64>, frame_len: u64) -> Result<(), CliError> {
    ctrlc::set_handler(move || {
        let frames = published.load(Ordering::Relaxed);
        eprintln!(
            "pub: frames={frames} bytes={} (interrupted)",
            frames * frame_len
        );
        std::process::exit(130);
    })
    .map_err(|e| CliError(format!("cannot install the signal handler: {e}")))
}

/// Loans a slot, waiting as long as it takes: a slow subscriber on a
/// lossless channel holds slots, and that is backpressure, not an error.
fn loan(
    producer: &Producer,
    shape: &[u32],
    dtype: DType,
) -> Result<tensorbus::TensorMut, CliError> {
    Ok(producer.loan_timeout(shape, dtype, LOAN_WAIT)?)
}

/// Whether an I/O error means the reader of stdout went away.
fn is_broken_pipe(e: &io::Error) -> bool {
    e.kind() == ErrorKind::BrokenPipe
}

/// How long `sub`'s signal handler waits for the main loop to stop by
/// itself (it looks at the flag between tensors) before it prints the
/// summary and exits on its own (the loop may be stuck in a write to a
/// stdout nobody reads).
const STOP_GRACE: Duration = Duration::from_millis(50);

/// Exit status after Ctrl-C / SIGTERM (128 + SIGINT, as shells report it).
const INTERRUPTED: i32 = 130;

/// What `sub` has written so far, shared with its signal handler.
#[derive(Default)]
struct SubProgress {
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Set by whoever prints the summary (main loop or signal handler), so
    /// that it is printed once.
    summarized: AtomicBool,
}

impl SubProgress {
    /// Prints the summary unless it was printed already; returns whether
    /// this call printed it.
    fn summarize(&self, interrupted: bool) -> bool {
        if self.summarized.swap(true, Ordering::AcqRel) {
            return false;
        }
        eprintln!(
            "sub: frames={} bytes={}{}",
            self.frames.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            if interrupted { " (interrupted)" } else { "" }
        );
        true
    }
}

/// Subscribes and writes every tensor's bytes to stdout.
///
/// Ctrl-C / SIGTERM stop it within 100 ms even while tensors keep coming
/// (the flag is read before every tensor): the summary ends in
/// `(interrupted)` and the exit status is 130, also when the reader of
/// stdout died of the same Ctrl-C. A closed stdout ends it quietly with
/// status 0.
pub fn run_sub(args: SubArgs) -> Result<(), CliError> {
    let idle_limit = args.timeout.map(Duration::from_secs_f64);
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(SubProgress::default());
    let (flag, shared) = (stop.clone(), progress.clone());
    ctrlc::set_handler(move || {
        flag.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if shared.summarized.load(Ordering::Acquire) {
                return; // the main loop stopped and reports
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if shared.summarize(true) {
            std::process::exit(INTERRUPTED);
        }
    })
    .map_err(|e| CliError(format!("cannot install the signal handler: {e}")))?;
    let client = Client::connect_to(args.socket.socket.as_deref(), "tensorbus-sub")?;
    let mut opts = ConsumerOptions::default()
        .policy(args.policy)
        .end_of_stream(!args.no_end_of_stream);
    if let Some(d) = args.depth {
        opts = opts.depth(d);
    }
    let wait = match args.wait_channel {
        Some(s) if s <= 0.0 => None,
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => Some(Duration::MAX),
    };
    if let Some(w) = wait {
        opts = opts.wait_for_channel(w);
    }
    // Ctrl-C while waiting for the channel: the handler exits with 130.
    let consumer = client
        .consumer_interruptible(&args.channel, opts, || stop.load(Ordering::Relaxed))
        .map_err(|e| {
            open_failed(
                e,
                &format!(
                    "create it with `tensorbus pub --channel {} --create ...` (or start sub first: it waits for the channel unless --wait-channel 0)",
                    args.channel
                ),
            )
        })?;
    // A File on a duplicate of fd 1, buffered only for small tensors:
    // BufWriter passes writes of at least its capacity straight through.
    let stdout = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let mut out = BufWriter::with_capacity(64 << 10, stdout);
    let mut frames = 0u64;
    let mut last = Instant::now();
    let result: io::Result<()> = (|| {
        while args.count.is_none_or(|n| frames < n) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let t = match consumer.try_recv() {
                Ok(t) => t,
                Err(TryRecvError::Empty) => {
                    out.flush()?; // about to wait: let the reader see what we have
                    let slice = match idle_limit {
                        Some(limit) => match limit.checked_sub(last.elapsed()) {
                            Some(left) if !left.is_zero() => left.min(RECV_SLICE),
                            _ => break,
                        },
                        None => RECV_SLICE,
                    };
                    match consumer.recv_timeout(slice) {
                        Ok(t) => t,
                        Err(RecvError::Timeout(_)) => continue,
                        Err(RecvError::EndOfStream) => break,
                        Err(e) => return Err(io::Error::other(e)),
                    }
                }
                // The last producer closed and everything was written.
                Err(TryRecvError::EndOfStream) => break,
                Err(e) => return Err(io::Error::other(e)),
            };
            let n = t.len() as u64;
            out.write_all(&t)?;
            drop(t);
            frames += 1;
            progress.frames.store(frames, Ordering::Relaxed);
            progress.bytes.fetch_add(n, Ordering::Relaxed);
            last = Instant::now();
        }
        out.flush()
    })();
    let interrupted = stop.load(Ordering::Relaxed);
    // The reader of a pipeline (`sub | ffmpeg ...`) often dies of the same
    // Ctrl-C: a stdout closed after the signal is still an interruption
    // (summary, status 130), not a quiet end.
    let result = match result {
        Err(e) if interrupted && is_broken_pipe(&e) => Ok(()),
        r => r,
    };
    match result {
        Err(e) if is_broken_pipe(&e) => {
            progress.summarized.store(true, Ordering::Release);
            Err(CliError::broken_pipe())
        }
        Err(e) => {
            progress.summarized.store(true, Ordering::Release);
            fail(format!("after {frames} tensors: {e}"))
        }
        Ok(()) => {
            if !progress.summarize(interrupted) {
                // The signal handler printed it and is exiting.
                std::thread::sleep(Duration::from_secs(1));
            }
            if interrupted {
                drop(consumer);
                drop(client);
                std::process::exit(INTERRUPTED);
            }
            Ok(())
        }
    }
}

/// Arguments of `tensorbus rm-channel`.
#[derive(clap::Args, Debug)]
pub struct RmChannelArgs {
    /// Channel to remove (one created at run time, e.g. by `pub --create`).
    #[arg(long)]
    channel: String,
    #[command(flatten)]
    socket: SocketArg,
}

/// Removes a run-time channel, so it no longer counts toward the broker's
/// `limits.max_channels`.
pub fn run_rm_channel(args: RmChannelArgs) -> Result<(), CliError> {
    let client = Client::connect_to(args.socket.socket.as_deref(), "tensorbus-rm-channel")?;
    client
        .remove_channel(&args.channel)
        .map_err(|e| CliError(e.to_string()))?;
    eprintln!("rm-channel: removed {:?}", args.channel);
    Ok(())
}
