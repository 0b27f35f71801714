//! issue 13.5: one futex parker and one wait helper. Scans the workspace's
//! Rust sources (crates/ and bindings/) and fails, naming the file, if a
//! second `Parker` implementation appears outside the allowed places, or if
//! the event count's wait steps (`prepare_wait`, `cancel_wait`) or a raw
//! futex sleep are spelled out anywhere but in the helper itself. Before
//! the fix this found three parkers (core, client, broker) and four
//! hand-written wait sequences (recv's park, the blocked publish,
//! `wait_for_room`, the readiness thread).

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, skipping build outputs.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && name != ".git" && name != "node_modules" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (file relative to the root, line number, line) for every line containing
/// `needle` outside the `allowed` files.
fn offenders(root: &Path, needle: &str, allowed: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    for top in ["crates", "bindings"] {
        rust_files(&root.join(top), &mut files);
    }
    assert!(
        files.len() > 20,
        "found only {} Rust files under {}: wrong root?",
        files.len(),
        root.display()
    );
    let mut hits = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(root)
            .unwrap_or(&f)
            .to_string_lossy()
            .into_owned();
        if allowed.contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue; // docs may name the steps
            }
            if line.contains(needle) {
                hits.push(format!("{rel}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    hits
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn one_futex_parker() {
    // The trait and its test stand-ins live in core; the one futex
    // implementation lives in tensorbus-shm next to the syscalls.
    let allowed = [
        "crates/tensorbus-core/src/park.rs",
        "crates/tensorbus-core/src/event.rs",
        "crates/tensorbus-shm/src/futex.rs",
    ];
    let hits = offenders(&root(), "Parker for", &allowed);
    assert!(
        hits.is_empty(),
        "a second Parker implementation (use tensorbus_shm::futex::FutexParker):\n{}",
        hits.join("\n")
    );
}

#[test]
fn one_wait_helper() {
    let allowed = ["crates/tensorbus-core/src/event.rs"];
    for step in ["prepare_wait(", "cancel_wait("] {
        let hits = offenders(&root(), step, &allowed);
        assert!(
            hits.is_empty(),
            "`{step}` spelled out outside EventCount::wait_unless:\n{}",
            hits.join("\n")
        );
    }
    // A raw futex sleep bypasses the helper's re-check. The bench's `limit`
    // contender is the raw-futex baseline the others are measured against.
    let allowed = [
        "crates/tensorbus-shm/src/futex.rs",
        "crates/tensorbus-bench/src/limit.rs",
    ];
    let hits = offenders(&root(), "futex::wait(", &allowed);
    assert!(
        hits.is_empty(),
        "a raw futex sleep outside the parker (use EventCount::wait_unless):\n{}",
        hits.join("\n")
    );
}
