//! Runs the harness end to end with very few rounds (`--smoke`: every row,
//! every contender) and checks that the table and the JSON are complete.
//! Numbers are not checked: these machines are shared and noisy.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tensorbus-bench");

const SIZES: [u64; 5] = [8, 4 << 10, 1 << 20, 16 << 20, 64 << 20];
const PINGPONG: [&str; 7] = [
    "limit",
    "tensorbus-busy",
    "tensorbus-futex",
    "iceoryx2-busy",
    "iceoryx2-event",
    "uds",
    "pipe",
];

fn expected_rows() -> HashSet<(String, String, String, u64)> {
    let mut want = HashSet::new();
    for v in ["full", "touch"] {
        for s in SIZES {
            for c in PINGPONG {
                want.insert(("pingpong".into(), c.into(), v.into(), s));
            }
            // The bare-futex reference runs at the small sizes only.
            if s <= 56 {
                want.insert(("pingpong".into(), "futex-raw".into(), v.into(), s));
            }
            for c in ["tensorbus", "iceoryx2"] {
                want.insert(("streaming".into(), c.into(), v.into(), s));
            }
        }
        for s in [8, 1 << 20] {
            for n in [1, 2, 4, 8] {
                want.insert((format!("fanout-{n}"), "tensorbus".into(), v.into(), s));
            }
            for n in 1..=4 {
                want.insert((format!("workqueue-{n}"), "tensorbus".into(), v.into(), s));
            }
        }
    }
    want
}

#[test]
fn smoke_run_prints_every_row_and_writes_complete_json() {
    let dir = std::env::temp_dir().join(format!("tb-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(["--smoke", "--json"])
        .arg(&json_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "tensorbus-bench --smoke failed: {status}");
            break;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tensorbus-bench --smoke did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let table = reader.join().unwrap();
    eprintln!("smoke run took {:.1} s", start.elapsed().as_secs_f64());

    let want = expected_rows();

    // The JSON: every row, every key, every ratio the issue names.
    let text = std::fs::read_to_string(&json_path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = v["rows"].as_array().expect("rows array");
    let mut got = HashSet::new();
    for r in rows {
        for key in [
            "bench",
            "contender",
            "variant",
            "size_bytes",
            "p50_ns",
            "p99_ns",
            "p999_ns",
            "max_ns",
            "msgs_per_s",
        ] {
            assert!(r.get(key).is_some(), "row without {key}: {r}");
        }
        for key in ["p50_ns", "p99_ns", "p999_ns", "max_ns"] {
            assert!(r[key].as_u64().is_some(), "{key} is not an integer: {r}");
        }
        assert!(r["msgs_per_s"].as_f64().is_some_and(|x| x > 0.0), "{r}");
        assert!(r["p50_ns"].as_u64() <= r["max_ns"].as_u64(), "{r}");
        // Ping-pong rows carry context switches per round trip (Linux
        // always has them); other rows carry null.
        let sw = &r["ctx_switches_per_rt"];
        if r["bench"] == "pingpong" {
            for key in [
                "parent_voluntary",
                "parent_involuntary",
                "child_voluntary",
                "child_involuntary",
            ] {
                assert!(sw[key].as_f64().is_some_and(|x| x >= 0.0), "{key}: {r}");
            }
            assert!(sw["round_trips"].as_u64().is_some_and(|n| n > 0), "{r}");
        } else {
            assert!(sw.is_null(), "{r}");
        }
        got.insert((
            r["bench"].as_str().unwrap().to_owned(),
            r["contender"].as_str().unwrap().to_owned(),
            r["variant"].as_str().unwrap().to_owned(),
            r["size_bytes"].as_u64().unwrap(),
        ));
    }
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "rows missing from the JSON: {missing:?}"
    );
    assert_eq!(rows.len(), want.len(), "duplicate or extra rows");
    for key in [
        "tensorbus_over_limit_8B",
        "tensorbus_over_iceoryx2_8B",
        "blocking_over_uds_8B",
        "touch_64MiB_over_8B",
        "tensorbus_futex_over_futex_raw_8B",
    ] {
        assert!(
            v["ratios"][key].as_f64().is_some_and(|x| x > 0.0),
            "ratio {key} missing: {}",
            v["ratios"]
        );
    }

    // The table: one line per row, and the ratios.
    let label = |s: u64| match s {
        8 => "8B".to_owned(),
        4096 => "4KiB".to_owned(),
        s => format!("{}MiB", s >> 20),
    };
    for (bench, contender, variant, size) in &want {
        let prefix = format!("| {bench} | {contender} | {variant} | {} |", label(*size));
        assert!(
            table.lines().any(|l| l.starts_with(&prefix)),
            "table has no line {prefix}\n{table}"
        );
    }
    assert!(table.contains("| tensorbus_over_limit_8B |"), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let out = Command::new(BIN)
        .arg("--sizes")
        .arg("12parsecs")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown unit"), "{err}");
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--quick"));
}

/// issue 12.10: `tensorbus bench` (this binary, which the CLI execs) exits
/// quietly with status 0 when its stdout is closed (`tensorbus bench |
/// head -1`), for the usage and for a run's report, and still writes the
/// JSON file; before, `println!`/`print!` panicked (status 101).
#[test]
fn closed_stdout_ends_quietly() {
    let dir = std::env::temp_dir().join(format!("tb-bench-epipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let run: Vec<String> = [
        "--quick", "--only", "limit", "--sizes", "8", "--blocks", "1", "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([json_path.to_str().unwrap().to_owned()])
    .collect();
    for args in [vec!["--help".to_owned()], run] {
        // A socket pair whose other end is closed: every write is EPIPE.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(ours);
        let out = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let json = std::fs::read_to_string(&json_path).expect("the JSON file is written");
    assert!(json.contains("\"rows\""), "{json}");
    let _ = std::fs::remove_dir_all(&dir);
}
