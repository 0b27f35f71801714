//! The reconnect watcher (issue 16.2, `reconnect.rs`) lives exactly as
//! long as the process has a client: a library must not leave a thread
//! running after its last handle closed (the C tests run under valgrind,
//! which reports a thread alive at exit).
//!
//! One test per file: the watcher is per process, and `cargo test` runs a
//! file's tests as threads of one process (the sleeping watcher's test is
//! `watcher_sleeps.rs`).

mod common;

use tensorbus::Client;

#[path = "common/watchers.rs"]
mod watchers;
use watchers::{wait_for_watchers, watchers};

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
    // The last close stops the watcher and joins it; if the watcher held
    // the last reference at that moment (it looks at the clients after each
    // wake), it drops it itself and returns on its own a moment later.
    wait_for_watchers(0);
    // A client connected afterwards gets a watcher again.
    let third = Client::connect_to(Some(&sock), "third").unwrap();
    wait_for_watchers(1);
    drop(third);
    wait_for_watchers(0);
    drop(broker);
}
