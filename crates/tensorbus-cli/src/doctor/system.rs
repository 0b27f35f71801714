//! Checks of the kernel and the process limits: memfd sealing, memory and
//! cgroup limits, /dev/shm, huge pages, rlimits, namespaces, RemoveIPC.

use super::{size, Finding, Level};
use std::path::{Path, PathBuf};
use tensorbus_broker::Config;
use tensorbus_shm::Memfd;

/// The seals the broker needs (and adds to every pool).
const NEEDED_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Size of the huge pages hugetlb pools use (`MFD_HUGE_2MB`).
use tensorbus_broker::HUGE_PAGE;

/// memfd_create works and F_ADD_SEALS (shrink, grow) sticks.
pub fn memfd() -> Finding {
    match Memfd::create("tensorbus-doctor", 4096, false) {
        Err(e) => Finding::new(
            "memfd",
            Level::Fail,
            format!("memfd_create or F_ADD_SEALS failed: {e}"),
            "tensorbus needs memfd_create(2) with sealing (Linux 3.17+); a seccomp profile may block it: allow memfd_create and fcntl",
        ),
        Ok(fd) => match fd.seals() {
            Ok(s) if s & NEEDED_SEALS == NEEDED_SEALS => Finding::ok(
                "memfd",
                "memfd_create works and F_SEAL_SHRINK | F_SEAL_GROW seal it",
            ),
            Ok(s) => Finding::new(
                "memfd",
                Level::Fail,
                format!("a memfd was created but its seals are {s:#x}, without shrink/grow"),
                "the kernel must support F_ADD_SEALS on memfds (Linux 3.17+)",
            ),
            Err(e) => Finding::new(
                "memfd",
                Level::Fail,
                format!("F_GET_SEALS failed on a memfd: {e}"),
                "the kernel must support memfd sealing (Linux 3.17+)",
            ),
        },
    }
}

/// Bytes of one pool's memfd, as the broker sizes it.
fn pool_bytes(p: &tensorbus_broker::config::PoolConfig) -> u64 {
    p.memfd_bytes()
}

/// All pools together.
fn total_pool_bytes(c: &Config) -> u64 {
    c.pools.iter().map(pool_bytes).fold(0, u64::saturating_add)
}

/// RAM + swap, as the broker's own start-up check counts it.
fn machine_memory() -> Option<u64> {
    tensorbus_broker::machine_memory()
}

/// The memory limit of this process's cgroup and where it was read:
/// cgroup v2 `memory.max` (the smallest along the path up to the root),
/// else v1 `memory.limit_in_bytes`. `None` when unlimited or unknown.
fn cgroup_limit() -> Option<(u64, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let parse = |p: &Path| -> Option<u64> {
        let v = std::fs::read_to_string(p).ok()?;
        let v = v.trim().parse::<u64>().ok()?;
        // v1 writes "unlimited" as a huge page-aligned number.
        (v < 1 << 60).then_some(v)
    };
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        let (root, file) = if id == "0" && controllers.is_empty() {
            (PathBuf::from("/sys/fs/cgroup"), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                PathBuf::from("/sys/fs/cgroup/memory"),
                "memory.limit_in_bytes",
            )
        } else {
            continue;
        };
        let mut best: Option<(u64, PathBuf)> = None;
        let mut dir = root.join(rel);
        loop {
            let f = dir.join(file);
            if let Some(v) = parse(&f) {
                if best.as_ref().is_none_or(|(b, _)| v < *b) {
                    best = Some((v, f));
                }
            }
            if dir == root || !dir.pop() {
                break;
            }
        }
        if best.is_some() {
            return best;
        }
    }
    None
}

/// The pools against RAM + swap, the cgroup limit and /dev/shm.
pub fn memory(c: &Config) -> Vec<Finding> {
    let total = total_pool_bytes(c);
    let largest = c
        .pools
        .iter()
        .max_by_key(|p| pool_bytes(p))
        .map_or(String::new(), |p| {
            format!("the largest, pool {:?}, {}", p.name, size(pool_bytes(p)))
        });
    let mut out = Vec::new();
    out.push(match machine_memory() {
        None => Finding::new(
            "memory",
            Level::Warn,
            format!("pools need {}; sysinfo failed, memory unknown", size(total)),
            "",
        ),
        Some(m) if total > m => Finding::new(
            "memory",
            Level::Fail,
            format!("pools need {} but RAM + swap is {}: the broker refuses to start", size(total), size(m)),
            format!("lower slots or slot_size ({largest})"),
        ),
        Some(m) if total > m / 10 * 8 => Finding::new(
            "memory",
            Level::Warn,
            format!("pools need {} of {} RAM + swap (over 80%)", size(total), size(m)),
            format!("filled pools leave little memory for anything else; consider smaller pools ({largest})"),
        ),
        Some(m) => Finding::ok(
            "memory",
            format!("pools need {} of {} RAM + swap", size(total), size(m)),
        ),
    });
    out.push(match cgroup_limit() {
        None => Finding::ok("cgroup", "no cgroup memory limit"),
        Some((l, f)) if total > l => Finding::new(
            "cgroup",
            Level::Fail,
            format!("pools need {} but the cgroup memory limit is {} ({})", size(total), size(l), f.display()),
            format!("memfd pages count against the broker's cgroup: filled pools get it OOM-killed; raise the limit (docker --memory, systemd MemoryMax=) or lower slots or slot_size ({largest})"),
        ),
        Some((l, f)) if total > l / 10 * 8 => Finding::new(
            "cgroup",
            Level::Warn,
            format!("pools need {} of the cgroup memory limit {} ({}; over 80%)", size(total), size(l), f.display()),
            "memfd pages count against the broker's cgroup; raise the limit or use smaller pools",
        ),
        Some((l, f)) => Finding::ok(
            "cgroup",
            format!("pools need {} of the cgroup memory limit {} ({})", size(total), size(l), f.display()),
        ),
    });
    out.push(dev_shm(total));
    out
}

/// /dev/shm: informational, since memfd pools do not live there.
fn dev_shm(total: u64) -> Finding {
    // SAFETY: zeroed is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated literal and `st` is writable.
    if unsafe { libc::statvfs(c"/dev/shm".as_ptr(), &mut st) } != 0 {
        return Finding::ok(
            "dev-shm",
            "/dev/shm is not mounted (not needed: pools are memfds)",
        );
    }
    let frsize = st.f_frsize as u64;
    let (cap, avail) = (st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize);
    if cap < total {
        Finding::new(
            "dev-shm",
            Level::Warn,
            format!("/dev/shm is {} ({} free), smaller than the pools ({})", size(cap), size(avail), size(total)),
            "memfd pools are not limited by /dev/shm, but a small one (docker's default 64 MiB) often goes with a tight memory budget; check the cgroup finding",
        )
    } else {
        Finding::ok(
            "dev-shm",
            format!(
                "/dev/shm is {} ({} free); pools are memfds and do not use it",
                size(cap),
                size(avail)
            ),
        )
    }
}

/// Reads one number from a file.
fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `Key:   N kB` value of /proc/meminfo, without the unit.
fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Free 2 MiB huge pages against the pools with `hugetlb = true`.
pub fn hugepages(c: &Config) -> Finding {
    let huge: Vec<_> = c.pools.iter().filter(|p| p.hugetlb).collect();
    if huge.is_empty() {
        return Finding::ok("hugepages", "no pool asks for huge pages (hugetlb = true)");
    }
    let need = huge.iter().map(|p| pool_bytes(p) / HUGE_PAGE).sum::<u64>();
    let names: Vec<&str> = huge.iter().map(|p| p.name.as_str()).collect();
    let sys = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let free = match (
        read_u64(&format!("{sys}/free_hugepages")),
        read_u64(&format!("{sys}/resv_hugepages")),
    ) {
        (Some(f), r) => f.saturating_sub(r.unwrap_or(0)),
        (None, _) if meminfo("Hugepagesize") == Some(2048) => meminfo("HugePages_Free")
            .unwrap_or(0)
            .saturating_sub(meminfo("HugePages_Rsvd").unwrap_or(0)),
        (None, _) => 0,
    };
    let page_kb = meminfo("Hugepagesize").unwrap_or(0);
    if free < need {
        Finding::new(
            "hugepages",
            Level::Warn,
            format!(
                "pools {} need {need} free 2 MiB huge pages, {free} are free (HugePages_Free = {}, Hugepagesize = {page_kb} kB)",
                names.join(", "),
                meminfo("HugePages_Free").unwrap_or(0)
            ),
            format!("the broker falls back to normal pages; reserve them: `echo {} > /proc/sys/vm/nr_hugepages` (as root)", read_u64("/proc/sys/vm/nr_hugepages").unwrap_or(0) + need - free),
        )
    } else {
        Finding::ok(
            "hugepages",
            format!(
                "pools {} need {need} 2 MiB huge pages, {free} are free",
                names.join(", ")
            ),
        )
    }
}

/// The soft and hard limit of a resource.
fn rlimit(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return None;
    }
    Some((r.rlim_cur, r.rlim_max))
}

/// A limit value for messages.
fn limit(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// RLIMIT_MEMLOCK: informational (tensorbus locks nothing itself).
pub fn memlock() -> Finding {
    match rlimit(libc::RLIMIT_MEMLOCK) {
        None => Finding::new("memlock", Level::Warn, "getrlimit(RLIMIT_MEMLOCK) failed", ""),
        Some((soft, hard)) => Finding::new(
            "memlock",
            Level::Ok,
            format!(
                "RLIMIT_MEMLOCK soft {} hard {}",
                if soft == libc::RLIM_INFINITY { "unlimited".into() } else { size(soft) },
                if hard == libc::RLIM_INFINITY { "unlimited".into() } else { size(hard) },
            ),
            "tensorbus does not lock pools in memory; raise it (ulimit -l, LimitMEMLOCK=) only if your application mlock()s mapped pools",
        ),
    }
}

/// RLIMIT_NOFILE: the broker holds two descriptors per pool and one socket
/// per client; each client one descriptor per pool.
pub fn nofile(pools: usize) -> Finding {
    let Some((soft, hard)) = rlimit(libc::RLIMIT_NOFILE) else {
        return Finding::new("nofile", Level::Warn, "getrlimit(RLIMIT_NOFILE) failed", "");
    };
    let pools = pools as u64;
    let minimum = 2 * pools + 16;
    let msg = format!("RLIMIT_NOFILE soft {} hard {}", limit(soft), limit(hard));
    let raise = format!(
        "raise it: `ulimit -n {}` (up to the hard limit), LimitNOFILE= in a systemd unit, docker --ulimit nofile=",
        if hard == libc::RLIM_INFINITY { 65536 } else { hard.min(65536) }
    );
    if soft < minimum {
        Finding::new(
            "nofile",
            Level::Fail,
            format!("{msg}: below {minimum}, too few for {pools} pools (each client holds one descriptor per pool, the broker two per pool and one per client)"),
            raise,
        )
    } else if soft < 1024 {
        Finding::new(
            "nofile",
            Level::Warn,
            format!(
                "{msg}: below 1024; a broker with {pools} pools can serve about {} clients",
                soft.saturating_sub(2 * pools + 8)
            ),
            raise,
        )
    } else {
        Finding::ok("nofile", msg)
    }
}

/// Private IPC / PID namespace and container hints (warnings only).
pub fn namespaces() -> Vec<Finding> {
    let mut private = Vec::new();
    for ns in ["ipc", "pid"] {
        let me = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        let init = std::fs::read_link(format!("/proc/1/ns/{ns}"));
        if let (Ok(a), Ok(b)) = (me, init) {
            if a != b {
                private.push(ns);
            }
        }
    }
    let mut out = vec![if private.is_empty() {
        Finding::ok(
            "namespaces",
            "same IPC and PID namespaces as PID 1 (or not comparable)",
        )
    } else {
        Finding::new(
            "namespaces",
            Level::Warn,
            format!("private {} namespace(s), not those of PID 1", private.join(" and ")),
            "pools travel as descriptors over the broker's Unix socket, so this works as long as broker and clients reach the same socket; process ids differ between PID namespaces",
        )
    }];
    let container = [("/.dockerenv", "docker"), ("/run/.containerenv", "podman")]
        .into_iter()
        .find(|(p, _)| Path::new(p).exists());
    out.push(match container {
        None => Finding::ok("container", "not in a docker or podman container"),
        Some((marker, kind)) => Finding::new(
            "container",
            Level::Warn,
            format!("running in a {kind} container ({marker} exists)"),
            "broker and clients in different containers need the socket directory bind-mounted into each (and --pid=host or a shared pod for comparable pids); the cgroup and dev-shm findings show the container's limits",
        ),
    });
    out
}

/// systemd-logind's RemoveIPC (default yes) for non-system users.
pub fn remove_ipc() -> Finding {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut files = vec![PathBuf::from("/etc/systemd/logind.conf")];
    for dir in [
        "/usr/lib/systemd/logind.conf.d",
        "/etc/systemd/logind.conf.d",
        "/run/systemd/logind.conf.d",
    ] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                .collect();
            v.sort();
            files.extend(v);
        }
    }
    let mut setting: Option<(String, PathBuf)> = None;
    let mut any = false;
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        any = true;
        for line in text.lines() {
            if let Some(v) = line.trim().strip_prefix("RemoveIPC=") {
                setting = Some((v.trim().to_owned(), f.clone()));
            }
        }
    }
    if !any && !Path::new("/run/systemd/system").exists() {
        return Finding::ok("remove-ipc", "no systemd-logind configuration");
    }
    let (value, from) = match &setting {
        Some((v, f)) => (v.clone(), f.display().to_string()),
        None => ("yes".into(), "systemd's default".into()),
    };
    let yes = matches!(value.as_str(), "yes" | "true" | "1" | "on");
    if uid < 1000 {
        Finding::ok(
            "remove-ipc",
            format!("RemoveIPC={value} ({from}); does not apply to system users (uid {uid})"),
        )
    } else if yes {
        Finding::new(
            "remove-ipc",
            Level::Warn,
            format!("RemoveIPC={value} ({from}): logind cleans up uid {uid}'s IPC objects and runtime directory (the default socket's) when its last session ends"),
            "run the broker as a system service, or enable lingering (`loginctl enable-linger`), or set RemoveIPC=no in /etc/systemd/logind.conf",
        )
    } else {
        Finding::ok("remove-ipc", format!("RemoveIPC={value} ({from})"))
    }
}
