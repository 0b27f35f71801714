//! End-to-end tests of the `tensorbus` binary. Timeouts only guard against
//! hangs; nothing here asserts on timing.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;

use common::{drain, spawn_broker, temp_dir, text, wait_or_kill, BIN};

/// Runs the binary with `args` to completion (bounded by `limit`).
fn run(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out_reader = drain(child.stdout.take().unwrap());
    let err_reader = drain(child.stderr.take().unwrap());
    let status = wait_or_kill(&mut child, limit, &format!("tensorbus {}", args.join(" ")));
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// The value of `key=` in a `demo: k=v ...` line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn demo_runs_lossless_and_verified() {
    let out = run(
        &["demo", "--frames", "20", "--fps", "0", "--quiet"],
        Duration::from_secs(120),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "demo failed: {stderr}\n{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("demo: frames=20 "), "{last:?}");
    assert_eq!(field(last, "dropped"), Some("0"), "{last:?}");
    assert_eq!(field(last, "errors"), Some("0"), "{last:?}");
    for key in ["fps", "e2e_p50_us", "e2e_p99_us"] {
        let v = field(last, key).unwrap_or_else(|| panic!("{key} missing in {last:?}"));
        assert!(v.parse::<f64>().is_ok(), "{key}={v}");
    }
}

#[test]
fn broker_stat_and_sigterm() {
    let dir = temp_dir("broker");
    let config = dir.join("tensorbus.toml");
    std::fs::write(
        &config,
        r#"
        [[pools]]
        name = "frames"
        slot_size = "1MiB"
        slots = 4
        [[pools]]
        name = "small"
        slot_size = "64KiB"
        slots = 8
        [[channels]]
        name = "camera/raw"
        pools = ["frames"]
        "#,
    )
    .unwrap();
    let socket = dir.join("run").join("broker.sock");
    let mut guard = spawn_broker(&config, &socket, Stdio::piped());
    let broker = &mut guard.0;
    let sock = socket.to_str().unwrap();

    let out = run(
        &["stat", "--json", "--socket", sock],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pools = report["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 2);
    assert_eq!(pools[0]["name"], "frames");
    assert_eq!(pools[0]["slots_total"], 4);
    assert_eq!(pools[0]["slots_free"], 4);
    assert_eq!(pools[1]["name"], "small");
    let channels = report["channels"].as_array().unwrap();
    assert_eq!(channels[0]["name"], "camera/raw");
    assert_eq!(channels[0]["published"], 0);
    let clients = report["clients"].as_array().unwrap();
    assert!(
        clients
            .iter()
            .any(|c| c["pid"].as_i64().is_some_and(|p| p > 0)),
        "{clients:?}"
    );

    let out = run(&["stat", "--socket", sock], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let human = text(&out.stdout);
    for word in [
        "pools",
        "frames",
        "slots_free",
        "channels",
        "camera/raw",
        "clients",
        "tensorbus-stat",
    ] {
        assert!(human.contains(word), "{word} missing in:\n{human}");
    }

    // SAFETY: kill(2) with a valid pid and signal number has no memory effects.
    let rc = unsafe { libc::kill(broker.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = wait_or_kill(broker, Duration::from_secs(30), "broker after SIGTERM");
    let mut stderr = String::new();
    broker
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "broker exited with {status}: {stderr}");
    assert!(stderr.contains("listening on"), "{stderr}");
    // issue 14.4: one line at the end, without --verbose too.
    assert_eq!(
        stderr.lines().last(),
        Some("tensorbus broker: stopped (signal)"),
        "{stderr}"
    );
    assert!(!socket.exists(), "socket file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broker_rejects_malformed_config() {
    let dir = temp_dir("badconfig");
    let config = dir.join("bad.toml");
    std::fs::write(
        &config,
        "[[pools]]\nname = \"frames\"\nslot_size = \"8MiB\"\nslots = 4\nbogus_field = 1\n",
    )
    .unwrap();
    let socket = dir.join("broker.sock");
    let out = run(
        &[
            "broker",
            "--config",
            config.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bogus_field"), "{stderr}");
    assert!(stderr.contains("bad.toml"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!socket.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stat_without_broker_explains_how_to_start_one() {
    let out = run(
        &["stat", "--socket", "/nonexistent/x.sock"],
        Duration::from_secs(30),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/x.sock"), "{stderr}");
    assert!(stderr.contains("tensorbus broker"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Runs a just-copied executable. `ETXTBSY` is retried: while one test
/// thread writes its copy, another test's fork can inherit the write
/// descriptor for the moment before its exec, and the kernel refuses to
/// run a file open for writing.
fn output_of_copy(cmd: &mut Command) -> std::process::Output {
    for _ in 0..100 {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    cmd.output().unwrap()
}

#[test]
fn bridge_without_the_binary_says_how_to_build_it() {
    // A copy of the CLI in a directory without tensorbus-bridge next to it,
    // and a PATH without one.
    let dir = temp_dir("bridge-missing");
    let exe = dir.join("tensorbus");
    std::fs::copy(BIN, &exe).unwrap();
    let out = output_of_copy(
        Command::new(&exe)
            .args(["bridge", "--config", "x.toml"])
            .env("PATH", &dir)
            .stdin(Stdio::null()),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cargo build --release -p tensorbus-bridge"),
        "{err}"
    );
    assert!(
        err.contains("--config x.toml"),
        "arguments are echoed: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_without_the_harness_says_how_to_build_it() {
    // A copy of the CLI in a directory without tensorbus-bench next to it.
    let dir = temp_dir("bench-missing");
    let exe = dir.join("tensorbus");
    std::fs::copy(BIN, &exe).unwrap();
    let out = output_of_copy(
        Command::new(&exe)
            .args(["bench", "--quick"])
            .stdin(Stdio::null()),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cargo build --release -p tensorbus-bench"),
        "{err}"
    );
    assert!(err.contains("--quick"), "arguments are echoed: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}
