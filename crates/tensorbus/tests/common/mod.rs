//! Shared by the client crate's integration tests: an embedded broker on a
//! thread of the test process, on a private socket.

use std::path::PathBuf;
use tensorbus::Client;
use tensorbus_broker::{Config, EmbeddedBroker};

/// A private socket path for the test `name` of the binary `prefix`.
pub fn socket(prefix: &str, name: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("tb-{prefix}-{}-{name}", std::process::id()))
        .join("broker.sock")
}

/// Starts a broker with `config_toml` and connects a client named `name`.
/// Keep the broker alive as long as the client is used.
pub fn start(prefix: &str, name: &str, config_toml: &str) -> (EmbeddedBroker, Client, PathBuf) {
    let config = Config::from_toml(config_toml).unwrap();
    let sock = socket(prefix, name);
    let broker = EmbeddedBroker::start(&config, &sock).unwrap();
    let client = Client::connect_to(Some(&sock), name).unwrap();
    (broker, client, sock)
}
