//! The control plane from the command line (issue 12): socket paths and
//! permissions, signals, closed pipes, numeric flags and messages.
//! Timeouts only guard against hangs; nothing here asserts on timing.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;

use common::{drain, spawn_broker, temp_dir, text, wait_or_kill, KillOnDrop, BIN};

const LIMIT: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` to completion (bounded by LIMIT), collecting its output.
fn output(cmd: &mut Command, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = wait_or_kill(&mut child, LIMIT, what);
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn tensorbus(args: &[&str]) -> Output {
    output(
        Command::new(BIN).args(args),
        &format!("tensorbus {}", args.join(" ")),
    )
}

const POOLS: &str = "[[pools]]\nname = \"frames\"\nslot_size = \"64KiB\"\nslots = 16\n[[channels]]\nname = \"video\"\n";

/// A broker with `extra` prepended to its config; its socket in a
/// directory the broker creates itself (`dir/run`).
fn broker(name: &str, extra: &str) -> (KillOnDrop, PathBuf, PathBuf) {
    let dir = temp_dir(name);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.join("tensorbus.toml");
    std::fs::write(&config, format!("{extra}\n{POOLS}")).unwrap();
    let socket = dir.join("run").join("broker.sock");
    let guard = spawn_broker(&config, &socket, Stdio::null());
    (guard, socket, dir)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a valid pid and signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

/// A copy of the binary that any user can execute, wherever the checkout
/// lives.
fn public_binary() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tb-cli-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("tensorbus");
    if !exe.exists() {
        let tmp = dir.join("tensorbus.tmp");
        std::fs::copy(BIN, &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &exe).unwrap();
    }
    exe
}

/// `tensorbus stat --json --socket S` run as uid/gid (dropped from root).
fn stat_as(uid: u32, gid: u32, socket: &Path) -> Output {
    output(
        Command::new(public_binary())
            .args(["stat", "--json", "--socket"])
            .arg(socket)
            .uid(uid)
            .gid(gid)
            .current_dir("/"),
        &format!("tensorbus stat as uid {uid}"),
    )
}

/// issue 12.3: with other users in allowed_uids / allowed_gids, the broker
/// opens its directory and socket to them by itself (nothing done by hand
/// here), SO_PEERCRED decides: an admitted uid (or gid) sees the stat, any
/// other uid is refused with the broker's permission message. Without
/// other users, another uid gets a clear permission error too.
#[test]
fn allowed_users_connect_as_another_uid_and_others_are_refused() {
    if !is_root() {
        eprintln!(
            "SKIPPED allowed_users_connect_as_another_uid_and_others_are_refused: \
             needs root to run `tensorbus stat` as other uids (CI runs as root)"
        );
        return;
    }
    let (_b, socket, dir) = broker(
        "allowed",
        "[broker]\nallowed_uids = [65534]\nallowed_gids = [65530]",
    );
    assert_eq!(
        std::fs::metadata(socket.parent().unwrap()).unwrap().mode() & 0o7777,
        0o711
    );
    assert_eq!(
        std::fs::symlink_metadata(&socket).unwrap().mode() & 0o777,
        0o666
    );

    let out = stat_as(65534, 65534, &socket);
    assert!(
        out.status.success(),
        "uid 65534 was not admitted: {}",
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["uid"] == 65534),
        "{report}"
    );
    // Admitted through its group.
    let out = stat_as(65533, 65530, &socket);
    assert!(
        out.status.success(),
        "gid 65530 was not admitted: {}",
        text(&out.stderr)
    );

    let out = stat_as(65533, 65533, &socket);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("uid 65533 is not allowed"), "{err}");
    assert!(err.contains("allowed_uids"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);

    // No other users admitted: the socket stays closed to them, and the
    // error says so.
    let (_b, socket, dir) = broker("private", "");
    assert_eq!(
        std::fs::metadata(socket.parent().unwrap()).unwrap().mode() & 0o7777,
        0o700
    );
    let out = stat_as(65534, 65534, &socket);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Permission denied") && err.contains("allowed_uids"),
        "{err}"
    );
    assert!(!err.contains("Start one with"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// issue 12.1: `broker --socket notes.txt` refuses a regular file and
/// keeps it (before: the file was replaced and gone after the broker).
#[test]
fn broker_refuses_to_replace_a_file() {
    let dir = temp_dir("notes");
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();
    let out = tensorbus(&["broker", "--socket", notes.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(notes.to_str().unwrap()) && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep me");
    let _ = std::fs::remove_dir_all(&dir);
}

/// issue 12.2: `--socket ./b.sock` leaves the working directory's mode as
/// it was (before: it became 0700).
#[test]
fn broker_leaves_the_working_directory_mode_alone() {
    let dir = temp_dir("cwd");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["broker", "--socket", "./b.sock"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    common::wait_for_socket(&mut child.0, &dir.join("b.sock"));
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
    signal(child.0.id(), libc::SIGTERM);
    assert!(wait_or_kill(&mut child.0, LIMIT, "broker").success());
    assert!(!dir.join("b.sock").exists());
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o755);
    let _ = std::fs::remove_dir_all(&dir);
}

/// issue 12.10: `tensorbus stat | head -1` (stdout closed early) exits
/// quietly with status 0 (before: a panic, exit 101); so does `demo`.
#[test]
fn closed_stdout_ends_commands_quietly() {
    let (_b, socket, dir) = broker("epipe", "");
    for json in [false, true] {
        // A socket pair whose other end is closed: every write is EPIPE.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(ours);
        let mut cmd = Command::new(BIN);
        cmd.arg("stat").arg("--socket").arg(&socket);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = drain(child.stderr.take().unwrap());
        let status = wait_or_kill(&mut child, LIMIT, "tensorbus stat");
        let err = text(&err.join().unwrap());
        assert_eq!(status.code(), Some(0), "json={json}: {err}");
        assert!(err.is_empty(), "json={json}: {err}");
    }
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(ours);
    let mut child = Command::new(BIN)
        .args(["demo", "--frames", "2", "--fps", "0", "--quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = drain(child.stderr.take().unwrap());
    let status = wait_or_kill(&mut child, Duration::from_secs(120), "tensorbus demo");
    let err = text(&err.join().unwrap());
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// issue 12.10: `sub` stops on SIGTERM and SIGINT while tensors keep
/// coming (its ring never empties: a fast `pub`, a slow reader of sub's
/// stdout), printing its summary; before, the flag was read only when the
/// ring was empty and sub never stopped.
#[test]
fn sub_stops_on_signals_while_tensors_keep_coming() {
    let (_b, socket, dir) = broker("subsig", "");
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut sub = KillOnDrop(
            Command::new(BIN)
                .args(["sub", "--channel", "video", "--socket"])
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let err = drain(sub.0.stderr.take().unwrap());
        let mut out = sub.0.stdout.take().unwrap();
        // A slow reader: 4 KiB at a time with a pause.
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut total = 0u64;
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
                std::thread::sleep(Duration::from_millis(1));
            }
            total
        });
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let mut publisher = KillOnDrop(
            Command::new(BIN)
                .args([
                    "pub",
                    "--channel",
                    "video",
                    "--shape",
                    "65536",
                    "--wait-subscribers",
                    "1",
                    "--socket",
                ])
                .arg(&socket)
                .stdin(Stdio::from(zero))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Let tensors flow for a while.
        std::thread::sleep(Duration::from_millis(500));
        assert!(sub.0.try_wait().unwrap().is_none(), "sub ended by itself");
        signal(sub.0.id(), sig);
        let status = wait_or_kill(
            &mut sub.0,
            Duration::from_secs(20),
            "tensorbus sub after a signal",
        );
        let err = text(&err.join().unwrap());
        assert_eq!(status.code(), Some(130), "signal {sig}: {err}");
        assert!(
            err.contains("sub: frames=") && err.contains("(interrupted)"),
            "{err}"
        );
        let frames: u64 = err
            .split("frames=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(frames > 0, "{err}");
        let _ = reader.join();
        signal(publisher.0.id(), libc::SIGTERM);
        let status = wait_or_kill(&mut publisher.0, LIMIT, "tensorbus pub after SIGTERM");
        assert_eq!(status.code(), Some(130));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// issue 14.4: `sub` waiting on a channel where nothing is published stops
/// on SIGINT and SIGTERM like `pub`: its summary ends in `(interrupted)`
/// and the exit status is 130.
#[test]
fn sub_stops_on_signals_while_idle() {
    let (_b, socket, dir) = broker("sub-idle", "");
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut sub = Command::new(BIN)
            .args(["sub", "--channel", "video", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = drain(sub.stdout.take().unwrap());
        let err = drain(sub.stderr.take().unwrap());
        let mut sub = KillOnDrop(sub);
        // Wait until the subscription exists, so that the signal finds sub
        // waiting for tensors.
        let deadline = std::time::Instant::now() + LIMIT;
        loop {
            let stat = tensorbus(&["stat", "--json", "--socket", socket.to_str().unwrap()]);
            let report: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
            let subscribed =
                report["channels"].as_array().unwrap().iter().any(|c| {
                    c["name"] == "video" && !c["subscribers"].as_array().unwrap().is_empty()
                });
            if subscribed {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "sub never subscribed");
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(sub.0.id(), sig);
        let status = wait_or_kill(&mut sub.0, LIMIT, "tensorbus sub after a signal");
        let err = text(&err.join().unwrap());
        assert_eq!(status.code(), Some(130), "signal {sig}: {err}");
        assert!(
            err.lines()
                .any(|l| l == "sub: frames=0 bytes=0 (interrupted)"),
            "signal {sig}: {err}"
        );
        assert!(out.join().unwrap().is_empty());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// issue 12.10: numeric flags refuse out-of-range and non-finite values
/// with a clear message, before doing anything (before: `--fps 1e-20` and
/// `--timeout 1e30` panicked, `--fps=-1` was accepted).
#[test]
fn numeric_flags_refuse_bad_values() {
    let cases: [&[&str]; 9] = [
        &["pub", "--channel", "v", "--shape", "4", "--fps=-1"],
        &["pub", "--channel", "v", "--shape", "4", "--fps", "1e-20"],
        &["pub", "--channel", "v", "--shape", "4", "--fps", "nan"],
        &[
            "pub",
            "--channel",
            "v",
            "--shape",
            "4",
            "--wait-subscribers",
            "0",
        ],
        &["sub", "--channel", "v", "--timeout", "1e30"],
        &["sub", "--channel", "v", "--timeout", "inf"],
        &["sub", "--channel", "v", "--depth", "0"],
        &["sub", "--channel", "v", "--count", "0"],
        &["demo", "--fps", "1e-20"],
    ];
    for args in cases {
        let out = tensorbus(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("invalid value"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let err = text(&tensorbus(&["sub", "--channel", "v", "--timeout", "1e30"]).stderr);
    assert!(
        err.contains("--timeout") && err.contains("out of range"),
        "{err}"
    );
}

/// issue 12.11: `stat` on a socket that accepts but never answers says so
/// after the timeout, naming the path (before: "Resource temporarily
/// unavailable (os error 11)").
#[test]
fn stat_on_a_silent_socket_says_nothing_answered() {
    let dir = temp_dir("silent");
    let path = dir.join("silent.sock");
    let _listener = tensorbus_shm::SeqpacketListener::bind(&path).unwrap();
    let out = tensorbus(&["stat", "--socket", path.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "nothing answered as a tensorbus broker at {}",
            path.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("os error 11") && !err.contains("temporarily"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// issue 12.11: a socket path over 107 bytes is refused clearly, and the
/// advice does not suggest the same path; the broker creates nothing.
#[test]
fn too_long_socket_path_is_refused_without_suggesting_it() {
    let long = format!(
        "/tmp/tb-cli-{}-long-{}/b.sock",
        std::process::id(),
        "x".repeat(120)
    );
    let out = tensorbus(&["stat", "--socket", &long]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("too long"), "{err}");
    assert!(!err.contains(&format!("--socket {long}")), "{err}");
    assert!(err.contains("at most 107 bytes"), "{err}");

    let out = tensorbus(&["broker", "--socket", &long]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("too long"), "{err}");
    assert!(
        !Path::new(&long).parent().unwrap().exists(),
        "directory created"
    );
}

/// issue 12.11: a TOML error is one line, `invalid config: FIELD: ...`
/// (before: a multi-line snippet, and "untagged enum Raw" for a negative
/// or boolean slot_size).
#[test]
fn config_errors_are_one_line_naming_the_field() {
    let dir = temp_dir("configerr");
    for (value, want) in [("-1", "-1 is negative"), ("true", "invalid type: boolean")] {
        let config = dir.join("bad.toml");
        std::fs::write(
            &config,
            format!("[[pools]]\nname = \"p\"\nslot_size = {value}\nslots = 4\n"),
        )
        .unwrap();
        let out = tensorbus(&[
            "broker",
            "--config",
            config.to_str().unwrap(),
            "--socket",
            dir.join("b.sock").to_str().unwrap(),
        ]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("invalid config: pools[0].slot_size: "),
            "{err}"
        );
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("untagged"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// issue 12.10: `tensorbus demo` stops on SIGTERM (to the demo process
/// alone) and on SIGINT (to its whole process group, as Ctrl-C does) with
/// its usual summary line, the frames received so far, marked
/// `(interrupted)`, exit status 130 like `pub` and `sub`; its children and
/// its private broker's directory are gone. Before, it printed only
/// "tensorbus demo: interrupted" on stderr and exited 1, with no summary.
#[test]
fn demo_stops_on_signals_with_its_summary() {
    use std::io::BufRead;
    for group in [false, true] {
        let mut demo = KillOnDrop(
            Command::new(BIN)
                .args(["demo", "--frames", "1000000", "--fps", "30"])
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let out = drain(demo.0.stdout.take().unwrap());
        // stderr line by line: the start line (pids, socket), then progress.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stderr = demo.0.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                all += &line;
                all.push('\n');
            }
            all
        });
        let mut start = None;
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("the demo prints its start line and a progress line");
            if line.contains(" pid ") {
                start = Some(line);
            } else if line.contains("/1000000 frames,") {
                break; // frames are flowing
            }
        }
        let start = start.expect("start line before progress");
        let pids: Vec<u32> = start
            .split(" pid ")
            .skip(1)
            .map(|r| {
                r.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(pids.len(), 3, "{start}");
        let socket_dir = PathBuf::from(
            start
                .split(" on ")
                .nth(1)
                .and_then(|r| r.split(" (").next())
                .unwrap(),
        )
        .parent()
        .unwrap()
        .to_path_buf();
        assert!(socket_dir.exists(), "{start}");
        let pid = demo.0.id();
        if group {
            // SAFETY: kill(2) on the demo's own process group; no memory
            // is touched.
            let sent = unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGINT) };
            assert_eq!(sent, 0);
        } else {
            signal(pid, libc::SIGTERM);
        }
        let status = wait_or_kill(&mut demo.0, Duration::from_secs(20), "demo after a signal");
        let out = text(&out.join().unwrap());
        let err = err.join().unwrap();
        assert_eq!(status.code(), Some(130), "group={group}: {out} {err}");
        let line = out
            .lines()
            .find(|l| l.starts_with("demo: frames="))
            .unwrap_or_else(|| panic!("no summary line: {out} {err}"));
        assert!(line.ends_with(" (interrupted)"), "{line}");
        for key in ["fps=", "e2e_p50_us=", "e2e_p99_us=", "dropped=", "errors=0"] {
            assert!(line.contains(key), "{line}");
        }
        let frames: u64 = line["demo: frames=".len()..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(frames > 0, "{line}");
        assert!(!err.contains("panicked"), "{err}");
        // Children reaped or dead (none left running), the broker's
        // private directory removed.
        for child in &pids {
            let alive = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .is_ok_and(|s| !s.contains(") Z "));
            assert!(!alive, "demo child {child} still runs: {start}");
        }
        assert!(!socket_dir.exists(), "{} left behind", socket_dir.display());
    }
}
