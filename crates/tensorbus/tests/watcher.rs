//! The reconnect watcher (issue 16.2, `reconnect.rs`) lives exactly as
//! long as the process has a client: a library must not leave a thread
//! running after its last handle closed (the C tests run under valgrind,
//! which reports a thread alive at exit).

mod common;

use tensorbus::Client;

/// How many threads of this process are named `tensorbus-watch`.
fn watchers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "tensorbus-watch")
        .count()
}

/// Waits for the watcher count to become `n`: a new thread sets its own
/// name once it runs, so `comm` may still show the old name for a moment.
/// (A wait for a condition with a generous bound, not a timing assertion.)
fn wait_for_watchers(n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while watchers() != n && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(watchers(), n);
}

#[test]
fn one_watcher_while_a_client_lives_none_after_the_last_closes() {
    assert_eq!(watchers(), 0);
    let (broker, first, sock) = common::start(
        "watcher",
        "first",
        "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 4\n",
    );
    wait_for_watchers(1);
    let second = Client::connect_to(Some(&sock), "second").unwrap();
    assert_eq!(watchers(), 1, "one watcher per process, not per client");
    drop(first);
    assert_eq!(watchers(), 1, "a client is still open");
    drop(second);
    // Exact, no waiting: the join returns once the thread is gone.
    assert_eq!(watchers(), 0, "the last close joins the watcher");
    // A client connected afterwards gets a watcher again.
    let third = Client::connect_to(Some(&sock), "third").unwrap();
    wait_for_watchers(1);
    drop(third);
    assert_eq!(watchers(), 0);
    drop(broker);
}

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
