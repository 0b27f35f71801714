//! Demo role `consumer`: the model side. Verifies every tensor against
//! values recomputed from the frame index, measures end-to-end latency and
//! prints a one-line JSON summary on stdout.

use super::pattern::{
    expected_mean, header_u64, norm_lut, phase_histogram, pixel, Resize, C, PLANE, S,
};
use super::{consumer_options, percentile, RoleArgs, FIRST_WAIT, INPUT, NEXT_WAIT};
use crate::{fail, CliError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus::error::RecvError;
use tensorbus::Tensor;
use tensorbus::TensorView;
use tensorbus_shm::monotonic_ns;

/// Pixels per channel compared value for value (besides the full mean).
const SAMPLES: usize = 64;
/// Largest accepted difference between a channel's mean and the expected one.
const MEAN_TOLERANCE: f64 = 1e-6;
/// Longest wait for a tensor between two looks at the stop flag.
const STOP_SLICE: Duration = Duration::from_millis(10);
/// Exit status after SIGINT / SIGTERM (128 + SIGINT, as `pub` and `sub`).
pub const INTERRUPTED: i32 = 130;

/// What the checker needs, computed once.
struct Checker {
    resize: Resize,
    lut: [[f32; 256]; 3],
    hist: [u64; 256],
    /// Output positions `(oy, ox)` checked exactly.
    samples: Vec<(usize, usize)>,
}

impl Checker {
    fn new() -> Checker {
        let resize = Resize::new();
        let hist = phase_histogram(&resize);
        // A fixed pseudo-random spread of positions (64-bit LCG).
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let samples = (0..SAMPLES)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = (state >> 33) as usize;
                (v % S, (v / S) % S)
            })
            .collect();
        Checker {
            resize,
            lut: norm_lut(),
            hist,
            samples,
        }
    }

    /// Problems with the tensor of frame `index`, if any. Gives up (`Ok`)
    /// between two channels once `stop` is set, so that an interrupt is
    /// not held up by the check (about a third of it at most).
    fn check(&self, t: &Tensor, index: u64, stop: &AtomicBool) -> Result<(), String> {
        if t.shape() != [1, C as u32, S as u32, S as u32] {
            return Err(format!("shape {:?}", t.shape()));
        }
        let data = t.as_slice_of::<f32>().map_err(|e| e.to_string())?;
        for (c, plane) in data.chunks_exact(PLANE).enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            for &(oy, ox) in &self.samples {
                let v = pixel(self.resize.ys[oy], self.resize.xs[ox], index, c);
                let want = self.lut[c][usize::from(v)];
                let got = plane[oy * S + ox];
                if got.to_bits() != want.to_bits() {
                    return Err(format!(
                        "channel {c} pixel ({oy},{ox}) is {got}, expected {want}"
                    ));
                }
            }
            let mean = plane.iter().map(|&v| f64::from(v)).sum::<f64>() / PLANE as f64;
            let want = expected_mean(&self.hist, &self.lut, index, c);
            if (mean - want).abs() > MEAN_TOLERANCE {
                return Err(format!("channel {c} mean is {mean:.6}, expected {want:.6}"));
            }
        }
        Ok(())
    }
}

/// Receives `--frames` model inputs and prints the JSON summary.
///
/// SIGINT / SIGTERM (Ctrl-C reaches the whole process group; the parent
/// sends SIGTERM when it is interrupted) stop it within [`STOP_SLICE`] plus
/// one tensor's check: it prints the summary of what it received so far,
/// with `"interrupted": true`, and exits with status [`INTERRUPTED`].
pub fn run(args: RoleArgs) -> Result<(), CliError> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .map_err(|e| CliError(format!("cannot install the signal handler: {e}")))?;
    let client = super::connect(&args, "demo-consumer")?;
    let input = client.consumer_with(INPUT, consumer_options(&client, "tensors"))?;
    let checker = Checker::new();
    let mut latencies: Vec<u64> = Vec::with_capacity(args.frames as usize);
    let (mut errors, mut gaps, mut next) = (0u64, 0u64, 0u64);
    let (mut first, mut last) = (None::<Instant>, Instant::now());
    let mut report_at = Instant::now() + Duration::from_secs(1);
    let mut window: Vec<u64> = Vec::new();
    let mut waiting_since = Instant::now();
    while (latencies.len() as u64) < args.frames && !stop.load(Ordering::Relaxed) {
        let wait = if first.is_none() {
            FIRST_WAIT
        } else {
            NEXT_WAIT
        };
        let t = match input.recv_timeout(STOP_SLICE) {
            Ok(t) => t,
            Err(RecvError::Timeout(_)) if waiting_since.elapsed() < wait => continue,
            Err(RecvError::Timeout(_)) if first.is_some() => {
                eprintln!("demo: consumer: no tensor for {wait:?}; the pipeline stalled");
                errors += 1;
                break;
            }
            Err(RecvError::Timeout(_)) => {
                return fail(format!(
                    "receiving from {INPUT}: nothing arrived within {wait:?}"
                ))
            }
            Err(e) => return fail(format!("receiving from {INPUT}: {e}")),
        };
        let now_ns = monotonic_ns();
        last = Instant::now();
        waiting_since = last;
        first.get_or_insert(last);
        let header = t.user_header();
        let (Some(index), Some(camera_ts)) = (header_u64(header, 0), header_u64(header, 8)) else {
            errors += 1;
            eprintln!("demo: consumer: tensor without frame index and timestamp");
            continue;
        };
        let latency = now_ns.saturating_sub(camera_ts);
        latencies.push(latency);
        window.push(latency);
        if index < next {
            errors += 1;
            eprintln!(
                "demo: consumer: frame {index} arrived after frame {}",
                next - 1
            );
        } else {
            gaps += index - next;
            next = index + 1;
        }
        if let Err(e) = checker.check(&t, index, &stop) {
            errors += 1;
            if errors <= 5 {
                eprintln!("demo: consumer: frame {index}: {e}");
            }
        }
        drop(t);
        if !args.quiet && Instant::now() >= report_at {
            window.sort_unstable();
            let span = last.duration_since(first.unwrap_or(last)).as_secs_f64();
            eprintln!(
                "demo: {}/{} frames, {:.1} fps, e2e p50 {} µs",
                latencies.len(),
                args.frames,
                rate(latencies.len(), span),
                percentile(&window, 0.5) / 1000
            );
            window.clear();
            report_at += Duration::from_secs(1);
        }
        if next >= args.frames {
            break;
        }
    }
    let received = latencies.len();
    let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    latencies.sort_unstable();
    let summary = serde_json::json!({
        "received": received,
        "gaps": gaps,
        "errors": errors,
        "e2e_p50_us": percentile(&latencies, 0.5) as f64 / 1e3,
        "e2e_p99_us": percentile(&latencies, 0.99) as f64 / 1e3,
        "span_s": span,
        "fps": rate(received, span),
        "interrupted": stop.load(Ordering::Relaxed),
    });
    crate::print_stdout(&format!("{summary}\n"))?;
    if stop.load(Ordering::Relaxed) {
        drop(input);
        drop(client);
        std::process::exit(INTERRUPTED);
    }
    Ok(())
}

/// Frames per second of `n` frames whose first and last arrived `span_s` apart.
fn rate(n: usize, span_s: f64) -> f64 {
    if n < 2 || span_s <= 0.0 {
        0.0
    } else {
        (n - 1) as f64 / span_s
    }
}
