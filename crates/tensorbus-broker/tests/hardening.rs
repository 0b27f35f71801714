//! Memory protection and bad input: consumers cannot write, pools cannot be
//! resized, malformed requests get clear errors and change nothing.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use tensorbus::error::{ConnectError, LoanError, OpenError, ShapeError};
use tensorbus::TensorView;
use tensorbus::{Client, DType};
use tensorbus_broker::{Config, EmbeddedBroker};

fn socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tb-hard-{}-{name}/broker.sock", std::process::id()))
}

fn config() -> Config {
    Config::from_toml(
        "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 4\n[[channels]]\nname = \"h/c\"\n",
    )
    .unwrap()
}

/// The memfds this process holds, each as a duplicate the caller owns (the
/// other tests of this binary run on other threads and open and close
/// theirs meanwhile: an fd read from /proc/self/fd may be closed, or its
/// number reused, before it is used; the duplicate cannot). (fd, name).
fn memfds() -> Vec<(OwnedFd, String)> {
    let name_of = |fd: RawFd| -> Option<String> {
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
        let t = target.to_string_lossy().into_owned();
        t.starts_with("/memfd:tensorbus").then_some(t)
    };
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
            name_of(fd)?;
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on any fd number touches no
            // memory; a closed one fails with EBADF.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return None;
            }
            // SAFETY: `dup` is a fresh descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(dup) };
            // What we duplicated may already be another file (a reused fd
            // number): check the duplicate itself.
            let name = name_of(owned.as_raw_fd())?;
            Some((owned, name))
        })
        .collect()
}

#[test]
fn pools_and_control_segment_are_sealed() {
    let sock = socket("sealed");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let fds = memfds();
    assert!(
        fds.iter().any(|(_, n)| n.contains("tensorbus-pool-p")),
        "{fds:?}"
    );
    assert!(
        fds.iter().any(|(_, n)| n.contains("tensorbus-control")),
        "{fds:?}"
    );
    for (owned, name) in fds {
        let fd = owned.as_raw_fd();
        // SAFETY: fcntl and ftruncate on a duplicate this test owns; they do
        // not touch memory.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        assert!(
            seals & libc::F_SEAL_SHRINK != 0 && seals & libc::F_SEAL_GROW != 0,
            "{name}: seals {seals:#x}"
        );
        // SAFETY: as above.
        let shrink = unsafe { libc::ftruncate(fd, 0) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        assert_eq!(shrink, -1, "{name} could be truncated");
        // SAFETY: as above.
        let writable =
            unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_ACCMODE != libc::O_RDONLY;
        if writable {
            // The seal refuses it (a read-only fd is refused earlier, EINVAL).
            assert_eq!(errno, Some(libc::EPERM), "{name}");
        }
        // SAFETY: as above.
        let grow = unsafe { libc::ftruncate(fd, 1 << 40) };
        assert_eq!(grow, -1, "{name} could be grown");
    }
}

#[test]
fn a_write_through_a_consumer_mapping_faults() {
    let sock = socket("rofault");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let producer_client = Client::connect_to(Some(&sock), "producer").unwrap();
    let consumer_client = Client::connect_to(Some(&sock), "consumer").unwrap();
    let p = producer_client.producer("h/c").unwrap();
    let c = consumer_client.consumer("h/c").unwrap();
    let mut t = p.loan(&[16], DType::U8).unwrap();
    t.fill(7);
    t.publish().unwrap();
    let r = c.try_recv().unwrap();
    let ptr = r.as_ptr() as *mut u8;
    // SAFETY: the child only performs one volatile store and exits; it
    // calls nothing that could take a lock held by another thread at fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: deliberately writes through the read-only mapping: the
        // kernel must kill this child with SIGSEGV before the store happens.
        unsafe {
            std::ptr::write_volatile(ptr, 1);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child we just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFSIGNALED(status),
        "the child was not killed: status {status:#x}"
    );
    assert_eq!(libc::WTERMSIG(status), libc::SIGSEGV);
    assert!(r.iter().all(|&b| b == 7), "the payload is unchanged");
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let sock = socket("badinput");
    let _b = EmbeddedBroker::start(&config(), &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "bad").unwrap();
    let before = client.stat().unwrap();
    let p = client.producer("h/c").unwrap();

    let err = p.loan(&[1; 9], DType::F32).unwrap_err();
    assert!(
        matches!(err, LoanError::Shape(ShapeError::TooManyDims { ndim: 9 })),
        "{err}"
    );
    // An extent beyond u32 cannot even be written as a shape now; a byte
    // length can.
    let err = p.loan_bytes(1 << 33).unwrap_err();
    assert!(
        matches!(err, LoanError::Shape(ShapeError::DimTooLarge { .. })),
        "{err}"
    );
    let err = p
        .loan(&[1 << 31, 1 << 31, 1 << 31], DType::F64)
        .unwrap_err();
    assert!(
        matches!(err, LoanError::Shape(ShapeError::Overflow)),
        "{err}"
    );
    let err = p.loan(&[4097], DType::U8).unwrap_err();
    assert!(
        matches!(
            err,
            LoanError::TooLarge {
                nbytes: 4097,
                largest: 4096,
                ..
            }
        ),
        "{err}"
    );
    let mut t = p.loan(&[4], DType::U8).unwrap();
    let err = t.set_user_header(&[0; 65]).unwrap_err();
    assert!(
        matches!(err, ShapeError::UserHeaderTooLong { len: 65 }),
        "{err}"
    );
    drop(t);

    // Zero-sized tensors are fine: they travel with their shape and no bytes.
    let c = client.consumer("h/c").unwrap();
    p.loan(&[0, 5], DType::F32).unwrap().publish().unwrap();
    let r = c.try_recv().unwrap();
    assert_eq!((r.shape(), r.len()), (&[0u32, 5][..], 0));
    drop(r);

    for bad in [
        "",
        "..",
        "a/../b",
        "/abs",
        "with space",
        "nul\0",
        "ctl\x07",
        &"x".repeat(129),
    ] {
        let err = client.consumer(bad).unwrap_err();
        assert!(matches!(err, OpenError::InvalidName(_)), "{bad:?}: {err}");
    }
    let err = client.consumer("no/such").unwrap_err();
    assert!(
        err.to_string().contains("h/c"),
        "lists the known channels: {err}"
    );
    let err = client
        .consumer_with("h/c", tensorbus::ConsumerOptions::default().depth(0))
        .unwrap_err();
    assert!(matches!(err, OpenError::InvalidArgument(_)), "{err}");
    let err = client
        .consumer_with("h/c", tensorbus::ConsumerOptions::default().depth(1 << 20))
        .unwrap_err();
    assert!(err.to_string().contains("ring capacity"), "{err}");

    let err = Client::connect_to(Some(std::path::Path::new("/nonexistent/dir/tb.sock")), "x")
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::BrokerUnavailable { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("/nonexistent/dir/tb.sock"),
        "names the path: {err}"
    );

    drop((p, c));
    std::thread::sleep(std::time::Duration::from_millis(50));
    let after = client.stat().unwrap();
    assert_eq!(after.pools, before.pools, "nothing held, nothing changed");
    assert_eq!(
        after.channels.iter().map(|c| &c.name).collect::<Vec<_>>(),
        before.channels.iter().map(|c| &c.name).collect::<Vec<_>>(),
        "no channel was created by the bad requests"
    );
}

#[test]
fn pools_larger_than_memory_are_refused() {
    let sock = socket("toolarge");
    let config =
        Config::from_toml("[[pools]]\nname = \"huge\"\nslot_size = \"1GiB\"\nslots = 65536\n")
            .unwrap();
    let err = EmbeddedBroker::start(&config, &sock)
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("huge") && msg.contains("memory"), "{msg}");
}
