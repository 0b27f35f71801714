//! Shell pipes: `tensorbus pub` reads raw frames from stdin, `tensorbus sub`
//! writes them to stdout; every byte must arrive, in order. Timeouts only
//! guard against hangs; nothing here asserts on timing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

mod common;

use common::{drain, spawn_broker, temp_dir, text, wait_or_kill, KillOnDrop, BIN};
const LIMIT: Duration = Duration::from_secs(120);

/// A broker on a private socket with one `slots` x 1 MiB pool and the
/// channel `video`.
struct Broker {
    _child: KillOnDrop,
    socket: PathBuf,
}

fn broker(name: &str, slots: u32) -> Broker {
    let dir = temp_dir(name);
    let config = dir.join("tensorbus.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [[pools]]
            name = "frames"
            slot_size = "1MiB"
            slots = {slots}
            [[channels]]
            name = "video"
            pools = ["frames"]
            "#
        ),
    )
    .unwrap();
    let socket = dir.join("broker.sock");
    Broker {
        _child: spawn_broker(&config, &socket, Stdio::null()),
        socket,
    }
}

/// A running `tensorbus sub` whose stdout and stderr are collected.
struct Sub {
    child: KillOnDrop,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

fn start_sub(socket: &Path, args: &[&str]) -> Sub {
    let mut child = Command::new(BIN)
        .arg("sub")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    Sub {
        child: KillOnDrop(child),
        stdout: Some(stdout),
        stderr: Some(stderr),
    }
}

impl Sub {
    /// Waits for exit; returns (status, stdout, stderr).
    fn finish(mut self) -> (ExitStatus, Vec<u8>, String) {
        let status = wait_or_kill(&mut self.child.0, LIMIT, "tensorbus sub");
        let out = self.stdout.take().unwrap().join().unwrap();
        let err = text(&self.stderr.take().unwrap().join().unwrap());
        (status, out, err)
    }
}

/// Where `tensorbus pub` reads from.
enum Input {
    Bytes(Vec<u8>),
    Pipe(ChildStdout),
}

/// Runs `tensorbus pub` to completion; returns (status, stderr).
fn run_pub(socket: &Path, args: &[&str], input: Input) -> (ExitStatus, String) {
    let (stdin, bytes) = match input {
        Input::Bytes(b) => (Stdio::piped(), Some(b)),
        Input::Pipe(p) => (Stdio::from(p), None),
    };
    let mut child = Command::new(BIN)
        .arg("pub")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writer = bytes.map(|b| {
        let mut w = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&b); // pub may stop early (an error): EPIPE is fine
        })
    });
    let err = drain(child.stderr.take().unwrap());
    let mut child = KillOnDrop(child);
    let status = wait_or_kill(&mut child.0, LIMIT, "tensorbus pub");
    if let Some(w) = writer {
        w.join().unwrap();
    }
    (status, text(&err.join().unwrap()))
}

/// `n` frames of `len` bytes each from a seeded xorshift PRNG: frame `i`
/// starts from seed `i`, so a lost, repeated or reordered frame shows.
fn frames(n: usize, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * len);
    for i in 0..n {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push((x >> 24) as u8);
        }
    }
    v
}

/// Compares without printing megabytes: first differing offset and lengths.
fn assert_same(got: &[u8], want: &[u8], frame: usize) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "sub output differs: got {} bytes, want {}; first difference at byte {:?} (frame {:?})",
            got.len(),
            want.len(),
            at,
            at.map(|a| a / frame)
        );
    }
}

#[test]
fn pub_to_sub_every_byte_in_order() {
    // 4 slots for 200 frames: the lossless subscriber's pace holds the
    // producer back (backpressure) instead of failing its loans.
    let b = broker("roundtrip", 4);
    let (n, len) = (200, 48 * 64 * 3);
    let input = frames(n, len);
    let sub = start_sub(
        &b.socket,
        &["--channel", "video", "--count", &n.to_string()],
    );
    let (status, err) = run_pub(
        &b.socket,
        &[
            "--channel",
            "video",
            "--shape",
            "48x64x3",
            "--dtype",
            "u8",
            "--wait-subscribers",
            "1",
            "--user-header-seq",
        ],
        Input::Bytes(input.clone()),
    );
    assert!(status.success(), "pub failed: {err}");
    assert!(
        err.contains(&format!("pub: frames={n} bytes={}", n * len)),
        "{err}"
    );
    let (status, out, err) = sub.finish();
    assert!(status.success(), "sub failed: {err}");
    assert!(
        err.contains(&format!("sub: frames={n} bytes={}", n * len)),
        "{err}"
    );
    assert_same(&out, &input, len);
}

#[test]
fn sub_stops_after_idle_timeout() {
    let b = broker("idle", 4);
    let len = 8 * 8;
    let input = frames(3, len);
    let sub = start_sub(&b.socket, &["--channel", "video", "--timeout", "1"]);
    let (status, err) = run_pub(
        &b.socket,
        &[
            "--channel",
            "video",
            "--shape",
            "8x8",
            "--wait-subscribers",
            "1",
        ],
        Input::Bytes(input.clone()),
    );
    assert!(status.success(), "pub failed: {err}");
    let (status, out, err) = sub.finish();
    assert!(status.success(), "sub failed: {err}");
    assert!(err.contains("sub: frames=3 bytes=192"), "{err}");
    assert_same(&out, &input, len);
}

#[test]
fn partial_last_frame_is_an_error() {
    let b = broker("partial", 4);
    let len = 48 * 64 * 3;
    let mut input = frames(2, len);
    input.extend_from_slice(&[7u8; 100]);
    let (status, err) = run_pub(
        &b.socket,
        &["--channel", "video", "--shape", "48x64x3", "--dtype", "u8"],
        Input::Bytes(input),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("pub: frames=2 "), "{err}");
    assert!(
        err.contains(&format!(
            "got 100 of {len} bytes, {} bytes missing",
            len - 100
        )),
        "{err}"
    );
}

#[test]
fn unknown_channel_lists_known_ones_and_create_makes_it() {
    let b = broker("unknown", 4);
    let args = ["--channel", "nope", "--shape", "4x4", "--dtype", "f32"];
    let (status, err) = run_pub(&b.socket, &args, Input::Bytes(frames(1, 64)));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("unknown channel \"nope\""), "{err}");
    assert!(err.contains("known channels: [video]"), "{err}");
    // issue 14.4: in CLI terms, the flag that makes it.
    assert!(err.contains("--create"), "{err}");
    assert!(!err.contains("create options"), "{err}");

    let mut with_create = args.to_vec();
    with_create.push("--create");
    let (status, err) = run_pub(&b.socket, &with_create, Input::Bytes(frames(2, 64)));
    assert!(status.success(), "{err}");
    assert!(err.contains("pub: frames=2 bytes=128"), "{err}");
}

/// The GStreamer pipeline of the README, minus the last stage.
fn gst(buffers: usize) -> Command {
    let mut c = Command::new("gst-launch-1.0");
    c.args([
        "-q",
        "videotestsrc",
        &format!("num-buffers={buffers}"),
        "!",
        "video/x-raw,format=RGB,width=640,height=480",
        "!",
        "fdsink",
        "fd=1",
    ]);
    c
}

#[test]
fn gstreamer_videotestsrc_through_pub_and_sub() {
    let have_gst = Command::new("gst-launch-1.0")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_gst {
        // CI (`CI` set by most runners, `TENSORBUS_REQUIRE_GST` by .ci/run)
        // must run this test, never skip it.
        let required = ["CI", "TENSORBUS_REQUIRE_GST"]
            .into_iter()
            .find(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
        if let Some(var) = required {
            panic!("gst-launch-1.0 is missing but {var} is set: install gstreamer1.0-tools and gstreamer1.0-plugins-base (.ci/run does)");
        }
        eprintln!("SKIPPED: gst-launch-1.0 not found (apt-get install gstreamer1.0-tools gstreamer1.0-plugins-base)");
        return;
    }
    let n = 60;
    let len = 640 * 480 * 3;
    let reference = gst(n).stdin(Stdio::null()).output().unwrap();
    assert!(reference.status.success(), "{}", text(&reference.stderr));
    assert_eq!(reference.stdout.len(), n * len, "gst produced an odd size");

    let b = broker("gst", 8);
    let sub = start_sub(
        &b.socket,
        &["--channel", "video", "--count", &n.to_string()],
    );
    let mut source = KillOnDrop(
        gst(n)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pipe = source.0.stdout.take().unwrap();
    let (status, err) = run_pub(
        &b.socket,
        &[
            "--channel",
            "video",
            "--shape",
            "480x640x3",
            "--dtype",
            "u8",
            "--wait-subscribers",
            "1",
        ],
        Input::Pipe(pipe),
    );
    assert!(status.success(), "pub failed: {err}");
    assert!(wait_or_kill(&mut source.0, LIMIT, "gst-launch-1.0").success());
    let (status, out, err) = sub.finish();
    assert!(status.success(), "sub failed: {err}");
    assert_same(&out, &reference.stdout, len);
}

#[test]
fn sub_exits_quietly_when_stdout_closes() {
    let b = broker("epipe", 4);
    let mut child = Command::new(BIN)
        .args(["sub", "--channel", "video", "--socket"])
        .arg(&b.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away at once
    let err = drain(child.stderr.take().unwrap());
    let mut child = KillOnDrop(child);
    let (status, perr) = run_pub(
        &b.socket,
        &[
            "--channel",
            "video",
            "--shape",
            "256x256",
            "--wait-subscribers",
            "1",
        ],
        Input::Bytes(frames(4, 256 * 256)),
    );
    assert!(status.success(), "pub failed: {perr}");
    let status = wait_or_kill(&mut child.0, LIMIT, "tensorbus sub");
    let err = text(&err.join().unwrap());
    assert!(status.success(), "sub: {status} {err}");
    assert!(err.is_empty(), "sub was not quiet: {err}");
}

#[test]
fn create_takes_mode_and_pools() {
    let b = broker("create-mode", 4);
    let args = [
        "--channel",
        "jobs",
        "--shape",
        "16",
        "--dtype",
        "u8",
        "--create",
        "--mode",
        "work_queue",
        "--pool",
        "frames",
    ];
    let (status, err) = run_pub(&b.socket, &args, Input::Bytes(frames(2, 16)));
    assert!(status.success(), "{err}");
    let out = Command::new(BIN)
        .args(["stat", "--socket"])
        .arg(&b.socket)
        .output()
        .unwrap();
    let stat = text(&out.stdout);
    let row = stat
        .lines()
        .find(|l| l.contains("jobs"))
        .unwrap_or_else(|| panic!("{stat}"));
    assert!(row.contains("workqueue"), "{stat}");

    // issue 14.4: `workqueue` is the spelling of the config and of stat;
    // `--mode` takes it too (and `work_queue` above, as an alias), and its
    // help names `workqueue`.
    let args = [
        "--channel",
        "jobs2",
        "--shape",
        "16",
        "--create",
        "--mode",
        "workqueue",
    ];
    let (status, err) = run_pub(&b.socket, &args, Input::Bytes(frames(1, 16)));
    assert!(status.success(), "{err}");
    let out = Command::new(BIN)
        .args(["stat", "--json", "--socket"])
        .arg(&b.socket)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modes: Vec<(String, String)> = report["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].to_string(), c["mode"].to_string()))
        .collect();
    for name in ["\"jobs\"", "\"jobs2\""] {
        assert!(
            modes.iter().any(|(n, m)| n == name && m == "\"workqueue\""),
            "{name}: {modes:?}"
        );
    }
    let help = Command::new(BIN).args(["pub", "--help"]).output().unwrap();
    let help = text(&help.stdout);
    let mode_line = help
        .lines()
        .find(|l| l.trim_start().starts_with("--mode"))
        .unwrap_or_else(|| panic!("{help}"));
    assert!(
        mode_line.contains("`workqueue`") && !mode_line.contains("or `work_queue`"),
        "{mode_line}"
    );

    let (status, err) = run_pub(
        &b.socket,
        &[
            "--channel",
            "x",
            "--shape",
            "4",
            "--create",
            "--pool",
            "nope",
        ],
        Input::Bytes(frames(1, 4)),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("nope"),
        "an unknown pool is named in the error: {err}"
    );

    let (status, err) = run_pub(
        &b.socket,
        &["--channel", "video", "--shape", "4", "--mode", "work_queue"],
        Input::Bytes(Vec::new()),
    );
    assert_eq!(
        status.code(),
        Some(2),
        "--mode without --create is a usage error: {err}"
    );
}

#[test]
fn interrupted_pub_prints_what_it_published() {
    let b = broker("interrupt", 4);
    let (n, len) = (3, 256);
    let sub = start_sub(&b.socket, &["--channel", "video", "--count", "3"]);
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["pub", "--socket"])
            .arg(&b.socket)
            .args([
                "--channel",
                "video",
                "--shape",
                "256",
                "--wait-subscribers",
                "1",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let err = drain(child.0.stderr.take().unwrap());
    // Keep stdin open: pub is blocked reading frame 4 when it is interrupted.
    let mut stdin = child.0.stdin.take().unwrap();
    stdin.write_all(&frames(n, len)).unwrap();
    stdin.flush().unwrap();
    let (status, out, serr) = sub.finish();
    assert!(status.success(), "{serr}");
    assert_eq!(out.len(), n * len);
    let kill = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_or_kill(&mut child.0, LIMIT, "tensorbus pub");
    drop(stdin);
    let err = text(&err.join().unwrap());
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains(&format!("pub: frames={n} bytes={} (interrupted)", n * len)),
        "{err}"
    );
}

/// `tensorbus stat --json` of the broker at `socket`, parsed.
fn stat_json(socket: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["stat", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "stat failed: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until channel `name` shows in stat as reserved by a waiting `sub`.
fn wait_until_pending(socket: &Path, name: &str) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let s = stat_json(socket);
        let pending = s["channels"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["name"] == name && c["pending"] == true));
        if pending {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "sub never registered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 14 acceptance: `sub > out &` started first, then `pub --create` of
/// 300 frames: `sub` exits 0 by itself (end of stream) and `cmp` finds the
/// bytes identical. Run through bash, as a user types it.
#[test]
fn sub_started_first_waits_for_the_channel_and_exits_at_end_of_stream() {
    let b = broker("sub-first", 4);
    let dir = temp_dir("sub-first-files");
    let input = frames(300, 16 * 16 * 3);
    std::fs::write(dir.join("in.raw"), &input).unwrap();
    let sock = b.socket.display().to_string();
    let mut sub = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "cd {} && exec {BIN} sub --socket {sock} --channel cam/new > out.raw",
            dir.display()
        ))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sub_err = drain(sub.stderr.take().unwrap());
    // "Started first": its subscription is registered at the broker.
    wait_until_pending(&b.socket, "cam/new");
    let script = format!(
        "cd {} && {BIN} pub --socket {sock} --channel cam/new --create --shape 16x16x3 < in.raw",
        dir.display()
    );
    let st = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .status()
        .unwrap();
    assert!(st.success(), "pub failed");
    let mut sub = KillOnDrop(sub);
    let status = wait_or_kill(&mut sub.0, LIMIT, "tensorbus sub");
    let err = text(&sub_err.join().unwrap());
    assert!(
        status.success(),
        "sub did not exit 0 at end of stream: {err}"
    );
    assert!(err.contains("sub: frames=300"), "{err}");
    let cmp = Command::new("cmp")
        .arg(dir.join("in.raw"))
        .arg(dir.join("out.raw"))
        .status()
        .unwrap();
    assert!(cmp.success(), "cmp found differences");
}

/// A `sub` started after `pub --create --history 1` finished gets the last
/// frame, then end of stream: exit 0.
#[test]
fn late_sub_gets_the_channels_history_then_exits() {
    let b = broker("history", 4);
    let len = 8 * 8;
    let input = frames(3, len);
    let (status, err) = run_pub(
        &b.socket,
        &[
            "--channel",
            "calib",
            "--create",
            "--history",
            "1",
            "--shape",
            "8x8",
        ],
        Input::Bytes(input.clone()),
    );
    assert!(status.success(), "pub failed: {err}");
    let (status, out, err) = start_sub(&b.socket, &["--channel", "calib"]).finish();
    assert!(status.success(), "sub failed: {err}");
    assert_same(&out, &input[2 * len..], len);
    // --no-end-of-stream keeps it running: the idle timeout ends it instead.
    let (status, out, err) = start_sub(
        &b.socket,
        &[
            "--channel",
            "calib",
            "--no-end-of-stream",
            "--timeout",
            "0.5",
        ],
    )
    .finish();
    assert!(status.success(), "sub failed: {err}");
    assert_same(&out, &input[2 * len..], len);
}

#[test]
fn sub_wait_channel_times_out_and_rm_channel_removes_run_time_channels() {
    let b = broker("rm", 4);
    let (status, _, err) =
        start_sub(&b.socket, &["--channel", "nope", "--wait-channel", "0.3"]).finish();
    assert!(!status.success());
    assert!(err.contains("did not appear within"), "{err}");
    let (status, err) = run_pub(
        &b.socket,
        &["--channel", "tmp/x", "--create", "--shape", "4"],
        Input::Bytes(vec![1, 2, 3, 4]),
    );
    assert!(status.success(), "{err}");
    let rm = |name: &str| {
        Command::new(BIN)
            .args(["rm-channel", "--channel", name, "--socket"])
            .arg(&b.socket)
            .output()
            .unwrap()
    };
    let out = rm("tmp/x");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = rm("tmp/x");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown channel"));
    let out = rm("video");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("declared in the broker config"),
        "{}",
        text(&out.stderr)
    );
}
