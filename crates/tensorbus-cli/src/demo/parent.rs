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

/// Runs the demo and prints `demo: frames=N fps=F e2e_p50_us=X e2e_p99_us=Y dropped=D errors=E`.
pub fn run(args: Args) -> Result<(), CliError> {
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
    let failed = supervise(&mut children, &stop, limit)?;
    let output = reader.join().unwrap_or_default();
    summarize(&args, &output, failed)
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

/// Waits for every child; on a failure, a hang or Ctrl-C kills the rest.
/// Returns the number of children that did not succeed.
fn supervise(children: &mut Children, stop: &AtomicBool, limit: Duration) -> Result<u64, CliError> {
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
        let signalled = children.0.iter().any(|(_, _, s)| {
            s.and_then(|s| s.signal())
                .is_some_and(|sig| sig == libc::SIGINT || sig == libc::SIGTERM)
        });
        if stop.load(Ordering::Relaxed) || signalled {
            return fail("interrupted");
        }
        let timed_out = Instant::now() >= deadline;
        if running > 0 && failed == 0 && !timed_out {
            std::thread::sleep(Duration::from_millis(20));
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
        return Ok(failed);
    }
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
