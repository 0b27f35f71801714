//! The reconnect watcher sleeps while the broker lives (issue 16.2,
//! `reconnect.rs`). Its own file: the watcher is per process, and `cargo
//! test` runs a file's tests as threads of one process.

mod common;

#[path = "common/watchers.rs"]
mod watchers;
use watchers::wait_for_watchers;

/// Context switches of the watcher thread so far (`None`: no watcher).
fn watcher_switches() -> Option<u64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|n| n.trim_end() == "tensorbus-watch")
        })
        .and_then(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
        })
}

/// While the broker lives the watcher sleeps in `poll` (woken by a hang-up,
/// a client joining or leaving, or once a second at most), not every 20 ms:
/// a periodic wake-up would preempt spinning receivers on a small machine.
#[test]
fn the_watcher_sleeps_while_the_broker_lives() {
    let (broker, client, _) = common::start(
        "watcher",
        "sleeps",
        "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 4\n",
    );
    wait_for_watchers(1);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = watcher_switches().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2000));
    let after = watcher_switches().unwrap();
    // Polling every 20 ms would be ~100 wake-ups; the 1 s cap makes 2.
    assert!(
        after - before <= 6,
        "the watcher woke {} times in 2 s",
        after - before
    );
    drop(client);
    drop(broker);
}
