//! Issue 12.8: the CLI on a broker with 2,000 channels. Before the fix the
//! broker's replies to `stat` (about 250 KB) exceeded the socket's send
//! buffer: `tensorbus stat` reported "broker unavailable", and so did `pub
//! --wait-subscribers` (which polls stat) and the channel list of an
//! "unknown channel" error.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;

use common::{drain, spawn_broker, temp_dir, text, wait_or_kill, KillOnDrop, BIN};

const LIMIT: Duration = Duration::from_secs(60);

fn name(i: usize) -> String {
    format!("site-a/building-3/camera/front-left/stream-{i:04}")
}

/// Runs the binary with `args` and `input` on stdin to completion.
fn run(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&input); // the command may stop early: EPIPE is fine
    });
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let mut child = KillOnDrop(child);
    let status = wait_or_kill(
        &mut child.0,
        LIMIT,
        &format!("tensorbus {}", args.join(" ")),
    );
    writer.join().unwrap();
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[test]
fn stat_pub_and_unknown_channel_on_2000_channels() {
    let dir = temp_dir("large");
    let config = dir.join("tensorbus.toml");
    let mut toml = String::from(
        "[limits]\nmax_channels = 2048\nmax_subscribers_per_channel = 2\n\
         max_producers_per_channel = 2\nring_capacity = 8\n\
         [[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 8\n",
    );
    for i in 0..2000 {
        toml.push_str(&format!("[[channels]]\nname = \"{}\"\n", name(i)));
    }
    std::fs::write(&config, toml).unwrap();
    let socket = dir.join("broker.sock");
    let _broker = spawn_broker(&config, &socket, Stdio::null());
    let sock = socket.to_str().unwrap();

    let out = run(&["stat", "--json", "--socket", sock], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["channels"].as_array().unwrap().len(), 2000);

    let out = run(&["stat", "--socket", sock], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&name(1999)));

    // --wait-subscribers polls stat until a subscriber is there.
    let last = name(1999);
    let mut sub = KillOnDrop(
        Command::new(BIN)
            .args(["sub", "--socket", sock, "--channel", &last, "--count", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let sub_err = drain(sub.0.stderr.take().unwrap());
    let args = [
        "pub",
        "--socket",
        sock,
        "--channel",
        &last,
        "--shape",
        "4x4",
        "--dtype",
        "f32",
        "--wait-subscribers",
        "1",
    ];
    let out = run(&args, &[7u8; 64]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = wait_or_kill(&mut sub.0, LIMIT, "tensorbus sub");
    assert!(status.success(), "{}", text(&sub_err.join().unwrap()));

    // The unknown-channel error lists every channel.
    let args = [
        "pub",
        "--socket",
        sock,
        "--channel",
        "nope",
        "--shape",
        "4x4",
        "--dtype",
        "f32",
    ];
    let out = run(&args, &[7u8; 64]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unknown channel \"nope\""), "{err}");
    assert!(err.contains(&name(0)) && err.contains(&name(1999)), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
