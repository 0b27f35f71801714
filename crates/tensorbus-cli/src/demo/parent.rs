//! The demo's parent process: broker, children, supervision, summary line.

use super::Args;
use crate::{fail, CliError};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus_broker::EmbeddedBroker;

/// The roles, in start order (downstream first).
const ROLES: [&str; 3] = ["demo-consumer", "demo-preprocess", "demo-camera"];

/// A private broker that removes its socket directory when dropped.
struct PrivateBroker {
    broker: Option<EmbeddedBroker>,
    dir: PathBuf,
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        drop(self.broker.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Children that are killed if still running when this is dropped.
struct Children(Vec<(&'static str, Child, Option<ExitStatus>)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child, status) in &mut self.0 {
            if status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// How often the parent looks at its children and the stop flag.
const TICK: Duration = Duration::from_millis(5);
/// How long an interrupted parent waits at most for the consumer to report
/// what it received before it kills it (the consumer looks at its stop
/// flag every 10 ms and between the channels of a tensor's check: it
/// reports within a few ms of a release build; this is the fallback).
const REPORT_GRACE: Duration = Duration::from_millis(250);

/// How the children ended.
enum Ending {
    /// Every child ran to its end, or one failed or hung (the count).
    Done(u64),
    /// SIGINT or SIGTERM reached the demo (the parent or a child); the
    /// children are stopped.
    Interrupted,
}

/// Runs the demo and prints `demo: frames=N fps=F e2e_p50_us=X e2e_p99_us=Y dropped=D errors=E`.
///
/// On SIGINT / SIGTERM (Ctrl-C reaches the children too; a SIGTERM to the
/// parent alone is passed on to the consumer) it stops within 100 ms: the
/// consumer reports what it received so far, the other children are killed
/// and reaped, the private broker stops and its directory is removed, and
/// the line reports the frames received so far (`frames=` those,
/// `dropped=` those missing among them) ending in `(interrupted)`; the
/// exit status is 130, as for `pub` and `sub`.
pub fn run(args: Args) -> Result<(), CliError> {
    let interrupted = run_until_done(args)?;
    if interrupted {
        // Every child, the broker and its directory are gone by now.
        std::process::exit(super::consumer::INTERRUPTED);
    }
    Ok(())
}

/// [`run`] up to the exit: `Ok(true)` when interrupted (the summary is
/// printed; children and broker are cleaned up on return).
fn run_until_done(args: Args) -> Result<bool, CliError> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .map_err(|e| CliError(format!("cannot install the signal handler: {e}")))?;
    let (_broker, socket) = match &args.socket {
        Some(s) => (None, s.clone()),
        None => {
            let dir = std::env::temp_dir().join(format!("tensorbus-demo-{}", std::process::id()));
            let socket = dir.join("broker.sock");
            let broker = EmbeddedBroker::start(&super::broker_config(), &socket)?;
            let private = PrivateBroker {
                broker: Some(broker),
                dir,
            };
            (Some(private), socket)
        }
    };
    let mut children = Children(Vec::new());
    for role in ROLES {
        let child = spawn(role, &args, &socket)?;
        children.0.push((role, child, None));
    }
    if !args.quiet {
        let pids: Vec<String> = children
            .0
            .iter()
            .map(|(r, c, _)| format!("{} pid {}", r.trim_start_matches("demo-"), c.id()))
            .collect();
        eprintln!(
            "demo: {} frames of 1920x1080x3 u8 -> 1x3x640x640 f32 at {} fps on {} ({})",
            args.frames,
            if args.fps > 0.0 {
                args.fps.to_string()
            } else {
                "max".into()
            },
            socket.display(),
            pids.join(", ")
        );
    }
    let mut stdout = children.0[0]
        .1
        .stdout
        .take()
        .expect("consumer stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let paced = if args.fps > 0.0 {
        args.frames as f64 / args.fps
    } else {
        0.0
    };
    let limit = Duration::from_secs_f64(60.0 + 2.0 * paced + 0.5 * args.frames as f64);
    let ending = supervise(&mut children, &stop, limit)?;
    let output = reader.join().unwrap_or_default();
    match ending {
        Ending::Done(failed) => summarize(&args, &output, failed).map(|()| false),
        Ending::Interrupted => summarize_interrupted(&output).map(|()| true),
    }
}

/// Starts one role as a child process of the current executable.
fn spawn(role: &str, args: &Args, socket: &Path) -> Result<Child, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError(format!("cannot find the tensorbus executable: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg(role)
        .arg("--socket")
        .arg(socket)
        .arg("--frames")
        .arg(args.frames.to_string())
        .arg("--fps")
        .arg(args.fps.to_string())
        .stdin(Stdio::null())
        .stdout(if role == "demo-consumer" {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    if args.quiet {
        cmd.arg("--quiet");
    }
    cmd.spawn()
        .map_err(|e| CliError(format!("cannot start {role}: {e}")))
}

/// Whether a child's end means the demo was interrupted: killed by SIGINT
/// or SIGTERM, or (the consumer) stopped by one.
fn interrupted_by(s: &ExitStatus) -> bool {
    s.signal()
        .is_some_and(|sig| sig == libc::SIGINT || sig == libc::SIGTERM)
        || s.code() == Some(super::consumer::INTERRUPTED)
}

/// Waits for every child; on a failure, a hang or Ctrl-C kills the rest.
fn supervise(
    children: &mut Children,
    stop: &AtomicBool,
    limit: Duration,
) -> Result<Ending, CliError> {
    let deadline = Instant::now() + limit;
    loop {
        let mut running = 0;
        let mut failed = 0;
        for (role, child, status) in &mut children.0 {
            if status.is_none() {
                *status = child
                    .try_wait()
                    .map_err(|e| CliError(format!("waiting for {role}: {e}")))?;
            }
            match status {
                None => running += 1,
                Some(s) if !s.success() => failed += 1,
                Some(_) => {}
            }
        }
        // Ctrl-C reaches the whole process group: the children may die of
        // it before our own handler has run.
        let signalled = children
            .0
            .iter()
            .any(|(_, _, s)| s.as_ref().is_some_and(interrupted_by));
        if stop.load(Ordering::Relaxed) || signalled {
            stop_all(children);
            return Ok(Ending::Interrupted);
        }
        let timed_out = Instant::now() >= deadline;
        if running > 0 && failed == 0 && !timed_out {
            std::thread::sleep(TICK);
            continue;
        }
        for (role, child, status) in &mut children.0 {
            match status {
                None => {
                    if timed_out {
                        eprintln!("demo: {role} still running after {limit:?}; killing it");
                        failed += 1;
                    } else {
                        eprintln!("demo: stopping {role}");
                    }
                    let _ = child.kill();
                    *status = child.wait().ok();
                }
                Some(s) if !s.success() => eprintln!("demo: {role} failed ({s})"),
                Some(_) => {}
            }
        }
        return Ok(Ending::Done(failed));
    }
}

/// After an interrupt: asks the consumer (SIGTERM) to report what it
/// received, kills the other children, and reaps them all; a consumer that
/// has not reported within [`REPORT_GRACE`] is killed too.
fn stop_all(children: &mut Children) {
    for (role, child, status) in &mut children.0 {
        if status.is_some() {
            continue;
        }
        if *role == "demo-consumer" {
            // SAFETY: kill(2) on our own child, not yet reaped (its pid
            // cannot have been reused).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        } else {
            let _ = child.kill();
            *status = child.wait().ok();
        }
    }
    let deadline = Instant::now() + REPORT_GRACE;
    for (role, child, status) in &mut children.0 {
        while status.is_none() {
            *status = child.try_wait().ok().flatten();
            if status.is_none() && Instant::now() >= deadline {
                eprintln!("demo: {role} did not stop within {REPORT_GRACE:?}; killing it");
                let _ = child.kill();
                *status = child.wait().ok();
            } else if status.is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Prints the summary line of an interrupted run: what the consumer
/// received until then (nothing when it could not report).
fn summarize_interrupted(output: &str) -> Result<(), CliError> {
    let summary: serde_json::Value = output
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let num = |k: &str| summary.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    crate::print_stdout(&format!(
        "demo: frames={} fps={:.1} e2e_p50_us={:.0} e2e_p99_us={:.0} dropped={} errors={} (interrupted)\n",
        num("received") as u64,
        num("fps"),
        num("e2e_p50_us"),
        num("e2e_p99_us"),
        num("gaps") as u64,
        num("errors") as u64,
    ))
}

/// Prints the summary line from the consumer's JSON output.
fn summarize(args: &Args, output: &str, failed: u64) -> Result<(), CliError> {
    let summary: serde_json::Value = output
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let num = |k: &str| summary.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    let received = num("received") as u64;
    let errors = num("errors") as u64 + failed;
    let dropped = args.frames.saturating_sub(received);
    crate::print_stdout(&format!(
        "demo: frames={} fps={:.1} e2e_p50_us={:.0} e2e_p99_us={:.0} dropped={dropped} errors={errors}\n",
        args.frames,
        num("fps"),
        num("e2e_p50_us"),
        num("e2e_p99_us"),
    ))?;
    if failed > 0 {
        return fail(format!(
            "{failed} demo process(es) failed (see the messages above)"
        ));
    }
    if errors > 0 {
        return fail(format!("{errors} error(s); see the messages above"));
    }
    Ok(())
}
