//! `tensorbus doctor`: each failing condition is made to happen for real
//! (lowered RLIMIT_NOFILE, oversized pools, a bad socket directory, a
//! stale socket, ...) and the finding it gives is checked.

mod common;

use common::{spawn_broker, temp_dir, text, BIN};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs `tensorbus doctor ARGS`, with RLIMIT_NOFILE set to `nofile` first
/// when given.
fn doctor(args: &[&str], nofile: Option<u64>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("doctor").args(args).stdin(Stdio::null());
    if let Some(n) = nofile {
        // SAFETY: the closure only calls setrlimit, which is
        // async-signal-safe, on a struct on its own stack.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.output().unwrap()
}

/// The JSON report of `doctor --json ARGS`, and the exit code.
fn report(args: &[&str], nofile: Option<u64>) -> (serde_json::Value, i32) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = doctor(&all, nofile);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)));
    (v, out.status.code().unwrap())
}

/// The finding of `check` in a report.
fn finding<'a>(v: &'a serde_json::Value, check: &str) -> &'a serde_json::Value {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {v}"))
}

/// A socket path in a fresh private directory.
fn socket_in(dir: &Path) -> String {
    dir.join("broker.sock").display().to_string()
}

/// Writes a config file with `pools` (TOML `[[pools]]` tables).
fn config(dir: &Path, pools: &str) -> String {
    let p = dir.join("tensorbus.toml");
    std::fs::write(&p, pools).unwrap();
    p.display().to_string()
}

#[test]
fn json_has_stable_keys_and_text_has_one_line_per_finding() {
    let dir = temp_dir("doctor-json");
    let sock = socket_in(&dir);
    let (v, code) = report(&["--socket", &sock], None);
    let findings = v["findings"].as_array().unwrap();
    assert!(findings.len() >= 10, "{v}");
    for f in findings {
        let keys: Vec<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 4, "{f}");
        for k in ["check", "level", "message", "advice"] {
            assert!(f[k].is_string(), "{k} in {f}");
        }
        assert!(["ok", "warn", "fail"].contains(&f["level"].as_str().unwrap()));
    }
    let failed = findings.iter().any(|f| f["level"] == "fail");
    assert_eq!(v["ok"], !failed);
    assert_eq!(code, i32::from(failed), "{v}");
    for check in [
        "memfd",
        "memory",
        "cgroup",
        "dev-shm",
        "hugepages",
        "memlock",
        "nofile",
        "namespaces",
        "container",
        "remove-ipc",
        "socket-dir",
        "broker",
    ] {
        finding(&v, check);
    }
    assert_eq!(finding(&v, "memfd")["level"], "ok", "{v}");
    assert_eq!(finding(&v, "socket-dir")["level"], "ok", "{v}");
    assert_eq!(finding(&v, "broker")["level"], "ok", "{v}");

    let out = doctor(&["--socket", &sock], None);
    let t = text(&out.stdout);
    let lines: Vec<&str> = t.lines().collect();
    let heads = lines
        .iter()
        .filter(|l| l.starts_with("ok ") || l.starts_with("WARN ") || l.starts_with("FAIL "))
        .count();
    assert_eq!(heads, findings.len(), "{t}");
    for l in &lines[..lines.len() - 1] {
        assert!(
            l.starts_with("ok ")
                || l.starts_with("WARN ")
                || l.starts_with("FAIL ")
                || l.starts_with("       "),
            "{l:?} in\n{t}"
        );
    }
    assert!(t.contains("no broker running"), "{t}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn low_nofile_warns_and_too_low_fails() {
    let dir = temp_dir("doctor-nofile");
    let sock = socket_in(&dir);
    let (v, code) = report(&["--socket", &sock], Some(64));
    let f = finding(&v, "nofile");
    assert_eq!(f["level"], "warn", "{v}");
    assert!(f["message"].as_str().unwrap().contains("soft 64"), "{f}");
    assert!(f["advice"].as_str().unwrap().contains("ulimit -n"), "{f}");
    assert_eq!(code, 0, "a warning alone exits 0: {v}");

    // 3 default pools need at least 2 * 3 + 16 = 22.
    let (v, code) = report(&["--socket", &sock], Some(20));
    assert_eq!(finding(&v, "nofile")["level"], "fail", "{v}");
    assert_eq!(v["ok"], false);
    assert_eq!(code, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pools_larger_than_memory_fail() {
    let dir = temp_dir("doctor-memory");
    let sock = socket_in(&dir);
    // 32 TiB: more than RAM + swap (and any cgroup limit) of any test machine.
    let cfg = config(
        &dir,
        "[[pools]]\nname = 'huge'\nslot_size = '1024GiB'\nslots = 32\n",
    );
    let (v, code) = report(&["--config", &cfg, "--socket", &sock], None);
    let f = finding(&v, "memory");
    assert_eq!(f["level"], "fail", "{v}");
    assert!(f["message"].as_str().unwrap().contains("32.0 TiB"), "{f}");
    assert!(f["advice"].as_str().unwrap().contains("\"huge\""), "{f}");
    assert_eq!(finding(&v, "config")["level"], "ok");
    assert_eq!(code, 1);
    assert_eq!(v["ok"], false);

    // The plain text says FAIL with the advice indented below.
    let out = doctor(&["--config", &cfg, "--socket", &sock], None);
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out.stdout);
    let line = t
        .lines()
        .position(|l| l.starts_with("FAIL memory"))
        .expect(&t);
    assert!(
        t.lines()
            .nth(line + 1)
            .unwrap()
            .starts_with("       lower slots"),
        "{t}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_config_fails_and_usage_error_is_2() {
    let dir = temp_dir("doctor-badcfg");
    let sock = socket_in(&dir);
    let cfg = config(&dir, "[[pools]]\nname = 'a'\nslot_size = 0\nslots = 1\n");
    let (v, code) = report(&["--config", &cfg, "--socket", &sock], None);
    let f = finding(&v, "config");
    assert_eq!(f["level"], "fail", "{v}");
    assert!(f["message"].as_str().unwrap().contains("positive"), "{f}");
    assert_eq!(code, 1);
    let missing = dir.join("nope.toml").display().to_string();
    let (v, code) = report(&["--config", &missing, "--socket", &sock], None);
    assert_eq!(finding(&v, "config")["level"], "fail");
    assert_eq!(code, 1);
    assert_eq!(doctor(&["--bogus"], None).status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn world_writable_or_foreign_socket_dir_fails() {
    let dir = temp_dir("doctor-sockdir");
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = socket_in(&open);
    let (v, code) = report(&["--socket", &sock], None);
    let f = finding(&v, "socket-dir");
    assert_eq!(f["level"], "fail", "{v}");
    assert!(f["message"].as_str().unwrap().contains("mode 0777"), "{f}");
    assert!(f["advice"].as_str().unwrap().contains("chmod go-w"), "{f}");
    assert_eq!(code, 1);
    // Not changed.
    assert_eq!(
        std::fs::metadata(&open).unwrap().permissions().mode() & 0o7777,
        0o777
    );

    // A missing directory below the bad one is refused too.
    let deeper = open.join("sub").join("broker.sock").display().to_string();
    let (v, _) = report(&["--socket", &deeper], None);
    assert_eq!(finding(&v, "socket-dir")["level"], "fail", "{v}");
    assert!(!open.join("sub").exists(), "doctor created a directory");

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = dir.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let (v, code) = report(&["--socket", &socket_in(&theirs)], None);
        let f = finding(&v, "socket-dir");
        assert_eq!(f["level"], "fail", "{v}");
        assert!(
            f["message"]
                .as_str()
                .unwrap()
                .contains("owned by uid 65534"),
            "{f}"
        );
        assert!(
            f["advice"]
                .as_str()
                .unwrap()
                .contains("directory of your own"),
            "{f}"
        );
        assert_eq!(code, 1);
    } else {
        eprintln!("not root: the directory owned by another user is not tried");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hugetlb_pool_without_free_huge_pages_warns() {
    let dir = temp_dir("doctor-huge");
    let sock = socket_in(&dir);
    // 512 huge pages (1 GiB).
    let cfg = config(
        &dir,
        "[[pools]]\nname = 'frames'\nslot_size = '2MiB'\nslots = 512\nhugetlb = true\n",
    );
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
    let (v, code) = report(&["--config", &cfg, "--socket", &sock], None);
    let f = finding(&v, "hugepages");
    if free >= 512 {
        eprintln!("this machine has {free} free huge pages: the shortage is not tried");
        assert_eq!(f["level"], "ok", "{v}");
    } else {
        assert_eq!(f["level"], "warn", "{v}");
        let m = f["message"].as_str().unwrap();
        assert!(
            m.contains("frames") && m.contains("need 512") && m.contains("HugePages_Free"),
            "{f}"
        );
        assert!(
            f["advice"].as_str().unwrap().contains("nr_hugepages"),
            "{f}"
        );
        assert_eq!(code, 0, "{v}");
    }
    // Without hugetlb pools it is ok.
    let (v, _) = report(&["--socket", &sock], None);
    assert_eq!(finding(&v, "hugepages")["level"], "ok");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stale_socket_warns() {
    let dir = temp_dir("doctor-stale");
    let sock = dir.join("broker.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let (v, code) = report(&["--socket", &sock.display().to_string()], None);
    let f = finding(&v, "broker");
    assert_eq!(f["level"], "warn", "{v}");
    assert!(
        f["message"].as_str().unwrap().contains("stale socket"),
        "{f}"
    );
    assert!(f["advice"].as_str().unwrap().contains("replaces it"), "{f}");
    assert_eq!(code, 0, "{v}");

    // A plain file at the socket path blocks the broker: fail.
    std::fs::remove_file(&sock).unwrap();
    std::fs::write(&sock, b"x").unwrap();
    let (v, code) = report(&["--socket", &sock.display().to_string()], None);
    assert_eq!(finding(&v, "broker")["level"], "fail", "{v}");
    assert_eq!(code, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn live_broker_is_reported_with_its_pid() {
    let dir = temp_dir("doctor-live");
    let sock = dir.join("broker.sock");
    let cfg = config(
        &dir,
        "[[pools]]\nname = 'cam'\nslot_size = '64KiB'\nslots = 4\n",
    );
    let broker = spawn_broker(Path::new(&cfg), &sock, Stdio::null());
    let pid = broker.0.id();
    let out = doctor(
        &["--config", &cfg, "--socket", &sock.display().to_string()],
        None,
    );
    let t = text(&out.stdout);
    let line = t
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("broker"))
        .expect(&t);
    assert!(line.starts_with("ok "), "{t}");
    assert!(
        line.contains(&format!("broker pid {pid} answers")) && line.contains("cam"),
        "{t}"
    );
    assert_eq!(out.status.code(), Some(0), "{t}");
    drop(broker);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The memory cgroup directory of this process and the limit file there
/// (v2 `memory.max`, v1 `memory.limit_in_bytes`).
fn own_memory_cgroup() -> Option<(std::path::PathBuf, &'static str)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut v2 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, ctl, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if ctl.split(',').any(|c| c == "memory") {
            return Some((
                Path::new("/sys/fs/cgroup/memory").join(rel),
                "memory.limit_in_bytes",
            ));
        }
        if id == "0" && ctl.is_empty() {
            v2 = Some((Path::new("/sys/fs/cgroup").join(rel), "memory.max"));
        }
    }
    v2
}

#[test]
fn pools_above_the_cgroup_limit_fail() {
    let dir = temp_dir("doctor-cgroup");
    let sock = socket_in(&dir);
    // A child cgroup limited to 64 MiB; the default pools need 164 MiB.
    let setup = || -> Option<std::path::PathBuf> {
        let (parent, file) = own_memory_cgroup()?;
        let cg = parent.join(format!("tb-doctor-{}", std::process::id()));
        std::fs::create_dir(&cg).ok()?;
        if std::fs::write(cg.join(file), (64u64 << 20).to_string()).is_err() {
            let _ = std::fs::remove_dir(&cg);
            return None;
        }
        Some(cg)
    };
    let Some(cg) = setup() else {
        eprintln!(
            "cannot make a memory cgroup here (not root, or no writable cgroup fs): not tried"
        );
        return;
    };
    let procs = std::ffi::CString::new(cg.join("cgroup.procs").display().to_string()).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["doctor", "--json", "--socket", &sock])
        .stdin(Stdio::null());
    // SAFETY: the closure only calls open, write and close (async-signal-safe)
    // on a path prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output();
    let _ = std::fs::remove_dir(&cg);
    let out = out.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = finding(&v, "cgroup");
    assert_eq!(f["level"], "fail", "{v}");
    assert!(f["message"].as_str().unwrap().contains("64.0 MiB"), "{f}");
    assert!(
        f["advice"].as_str().unwrap().contains("raise the limit"),
        "{f}"
    );
    assert_eq!(out.status.code(), Some(1));
    std::fs::remove_dir_all(&dir).unwrap();
}
