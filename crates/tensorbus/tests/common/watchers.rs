//! Shared by `watcher.rs` and `watcher_sleeps.rs`: the client library's
//! reconnect watcher threads of this process, from /proc.

/// How many threads of this process are named `tensorbus-watch`.
pub fn watchers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "tensorbus-watch")
        .count()
}

/// Waits for the watcher count to become `n`: a new thread sets its own
/// name once it runs, so `comm` may still show the old name for a moment.
/// (A wait for a condition with a generous bound, not a timing assertion.)
pub fn wait_for_watchers(n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while watchers() != n && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(watchers(), n);
}
