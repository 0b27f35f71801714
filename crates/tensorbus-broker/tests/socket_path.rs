//! The broker's socket path and directory (issue 12.1, 12.2, 12.3, 12.9):
//! only a stale tensorbus socket is taken over, existing directories are
//! never changed, the modes follow the admitted users, and a stopping
//! broker removes only its own socket.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tensorbus::Client;
use tensorbus_broker::{Broker, Config, EmbeddedBroker, StartError};
use tensorbus_shm::SeqpacketListener;

fn config(extra: &str) -> Config {
    Config::from_toml(&format!(
        "{extra}\n[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 4\n"
    ))
    .unwrap()
}

/// A fresh directory for one test, made by the test (so: existing).
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tb-sockpath-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn bind_err(socket: &Path) -> StartError {
    match Broker::bind(&config(""), socket) {
        Ok(_) => panic!("the broker bound {socket:?}"),
        Err(e) => e,
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// issue 12.1: a regular file at --socket is refused and kept (before: it
/// was replaced by the socket and gone after the broker stopped).
#[test]
fn regular_file_is_refused_and_kept() {
    let d = dir("file");
    let path = d.join("notes.txt");
    std::fs::write(&path, b"my notes").unwrap();
    let msg = bind_err(&path).to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("regular file"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), b"my notes");
    let _ = std::fs::remove_dir_all(&d);
}

/// issue 12.1: a directory and a symbolic link (even one to a stale
/// socket) are refused and left alone.
#[test]
fn directory_and_symlink_are_refused() {
    let d = dir("dirlink");
    let sub = d.join("sub.sock");
    std::fs::create_dir(&sub).unwrap();
    let msg = bind_err(&sub).to_string();
    assert!(
        msg.contains("directory") && msg.contains(&sub.display().to_string()),
        "{msg}"
    );
    assert!(sub.is_dir());

    let stale = d.join("stale.sock");
    drop(SeqpacketListener::bind(&stale).unwrap());
    let link = d.join("link.sock");
    std::os::unix::fs::symlink(&stale, &link).unwrap();
    let msg = bind_err(&link).to_string();
    assert!(
        msg.contains("symbolic link") && msg.contains("stale.sock"),
        "{msg}"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let _ = std::fs::remove_dir_all(&d);
}

/// issue 12.1: a live stream socket of another program is refused, and
/// the program keeps its socket (before: it was removed).
#[test]
fn live_stream_socket_is_refused() {
    let d = dir("stream");
    let path = d.join("other.sock");
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let msg = bind_err(&path).to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("another program listens"), "{msg}");
    // Still the other program's socket: a client reaches it.
    let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    other.accept().unwrap();
    let _ = std::fs::remove_dir_all(&d);
}

/// issue 12.1: a live seqpacket socket that accepts but does not answer as
/// a broker is refused, not taken over.
#[test]
fn live_foreign_seqpacket_socket_is_refused() {
    let d = dir("seqpacket");
    let path = d.join("quiet.sock");
    let quiet = SeqpacketListener::bind(&path).unwrap();
    let msg = bind_err(&path).to_string();
    assert!(
        msg.contains("did not answer as a tensorbus broker"),
        "{msg}"
    );
    // The connection of the probe is pending on the other program's socket.
    quiet.accept().unwrap();
    assert!(std::fs::symlink_metadata(&path).is_ok());
    let _ = std::fs::remove_dir_all(&d);
}

/// issue 12.1: a live broker is reported as such; a stale socket file (a
/// dead broker's) is taken over.
#[test]
fn live_broker_is_refused_and_stale_socket_taken_over() {
    let d = dir("stale");
    let path = d.join("broker.sock");
    drop(SeqpacketListener::bind(&path).unwrap()); // the file stays: stale
    let first = EmbeddedBroker::start(&config(""), &path).unwrap();
    assert!(matches!(bind_err(&path), StartError::AlreadyRunning(_)));
    Client::connect_to(Some(&path), "still-there").unwrap();
    drop(first);
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "socket removed at stop"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// issue 12.2: existing directories keep their mode: a 1777 one stays 1777,
/// a 0755 one stays 0755 (before: both became 0700).
#[test]
fn existing_directory_modes_are_kept() {
    for m in [0o1777, 0o755] {
        let d = dir(&format!("keep{m:o}"));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m)).unwrap();
        let path = d.join("b.sock");
        let b = EmbeddedBroker::start(&config(""), &path).unwrap();
        assert_eq!(mode(&d), m, "directory mode changed");
        assert_eq!(mode(&path), 0o600, "the socket is the owner's only");
        drop(b);
        assert_eq!(mode(&d), m);
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// issue 12.2: a world-writable directory without the sticky bit, or one
/// owned by another (non-root) user, is refused with advice and unchanged.
#[test]
fn unsafe_existing_directories_are_refused() {
    let d = dir("unsafe");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    let msg = bind_err(&d.join("b.sock")).to_string();
    assert!(
        msg.contains("sticky") && msg.contains(&d.display().to_string()),
        "{msg}"
    );
    assert_eq!(mode(&d), 0o777);
    assert!(!d.join("b.sock").exists());

    if !is_root() {
        eprintln!("unsafe_existing_directories_are_refused: the other-owner case needs root (CI runs as root); not run");
    } else {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        let msg = bind_err(&d.join("b.sock")).to_string();
        assert!(msg.contains("owned by uid 65534"), "{msg}");
        assert_eq!(mode(&d), 0o755);
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// issue 12.2/12.3: directories the broker creates are 0700 with a 0600
/// socket; when the config admits another user they are 0711 and the
/// socket 0666 (SO_PEERCRED decides who gets in).
#[test]
fn created_directory_and_socket_modes_follow_the_config() {
    let d = dir("modes");
    let private = d.join("private/run/broker.sock");
    let b = EmbeddedBroker::start(&config(""), &private).unwrap();
    assert_eq!(mode(&d), 0o755, "the existing parent is unchanged");
    assert_eq!(mode(&d.join("private")), 0o700);
    assert_eq!(mode(&d.join("private/run")), 0o700);
    assert_eq!(mode(&private), 0o600);
    drop(b);

    for extra in [
        "[broker]\nallowed_uids = [65534]",
        "[broker]\nallowed_gids = [65534]",
    ] {
        let shared = d.join("shared/run/broker.sock");
        let _ = std::fs::remove_dir_all(d.join("shared"));
        let b = EmbeddedBroker::start(&config(extra), &shared).unwrap();
        assert_eq!(mode(&d.join("shared")), 0o711, "{extra}");
        assert_eq!(mode(&d.join("shared/run")), 0o711, "{extra}");
        assert_eq!(mode(&shared), 0o666, "{extra}");
        drop(b);
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// issue 12.9: an old broker that stops removes only the socket it
/// created; a newer broker that took the path over keeps its socket.
#[test]
fn stopping_broker_leaves_a_newer_brokers_socket() {
    let d = dir("newer");
    let path = d.join("broker.sock");
    let old = EmbeddedBroker::start(&config(""), &path).unwrap();
    // The path is taken over (an operator removed it, a new broker bound it).
    std::fs::remove_file(&path).unwrap();
    let new = EmbeddedBroker::start(&config(""), &path).unwrap();
    drop(old);
    assert!(
        std::fs::symlink_metadata(&path).is_ok(),
        "the old broker removed the newer broker's socket"
    );
    let client = Client::connect_to(Some(&path), "after").unwrap();
    client.stat().unwrap();
    drop(client);
    drop(new);
    assert!(std::fs::symlink_metadata(&path).is_err());

    // Broker::socket_removed says what happened.
    let mut b = Broker::bind(&config(""), &path).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(true);
    b.run(&stop);
    assert!(b.socket_removed());
    let _ = std::fs::remove_dir_all(&d);
}
