//! Issue 17.3: `tensorbus top`. `--once` against an embedded broker with
//! channels, producers and consumers (plain text, sorted, rates filled in,
//! a clear error without a broker); the live view in a real terminal under
//! tmux (skipped without tmux unless TENSORBUS_REQUIRE_TMUX=1): counters
//! change, `s` changes the sort, a killed broker shows "broker gone,
//! retrying" and a new one is picked up, `q` and SIGTERM restore the
//! terminal. Deadlines only guard against hangs; nothing asserts on timing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorbus::{Client, ConsumerOptions, DType, Policy};
use tensorbus_broker::{Config, EmbeddedBroker};

mod common;

use common::{spawn_broker, temp_dir, text, BIN};

const CONFIG: &str = r#"
[[pools]]
name = "p"
slot_size = 4096
slots = 64
[[channels]]
name = "cam"
[[channels]]
name = "lossy"
[[channels]]
name = "fast"
"#;

fn publish(p: &tensorbus::Producer, n: usize) {
    for i in 0..n {
        let mut t = p.loan(&[16], DType::U8).unwrap();
        t.fill(i as u8);
        t.publish().unwrap();
    }
}

/// The whitespace-separated cells of the first line whose first cell
/// (after a `│` border, in the live view) is `name`.
fn row(screen: &str, name: &str) -> Option<Vec<String>> {
    screen.lines().find_map(|l| {
        let cells: Vec<String> = l
            .split_whitespace()
            .filter(|c| *c != "│")
            .map(str::to_owned)
            .collect();
        (cells.first().map(String::as_str) == Some(name)).then_some(cells)
    })
}

/// The line numbers of `names`' rows, in that order.
fn positions(screen: &str, names: &[&str]) -> Vec<usize> {
    names
        .iter()
        .map(|n| {
            screen
                .lines()
                .position(|l| l.split_whitespace().find(|c| *c != "│") == Some(n))
                .unwrap_or_else(|| panic!("no row {n} in\n{screen}"))
        })
        .collect()
}

fn once(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("top")
        .arg("--once")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn once_prints_one_sorted_plain_frame_of_a_real_broker() {
    let dir = temp_dir("top-once");
    let socket = dir.join("broker.sock");
    let _broker = EmbeddedBroker::start(&Config::from_toml(CONFIG).unwrap(), &socket).unwrap();
    let client = Client::connect_to(Some(&socket), "top-test").unwrap();
    // cam: 10 published, 4 received, 6 queued in a ring of 16.
    let cam = client
        .consumer_with("cam", ConsumerOptions::default().depth(16))
        .unwrap();
    let cam_producer = client.producer("cam").unwrap();
    publish(&cam_producer, 10);
    for _ in 0..4 {
        cam.recv().unwrap();
    }
    // lossy: 5 published into a drop_oldest ring of 2: 3 dropped.
    let _lossy = client
        .consumer_with(
            "lossy",
            ConsumerOptions::default()
                .policy(Policy::DropOldest)
                .depth(2),
        )
        .unwrap();
    let lossy_producer = client.producer("lossy").unwrap();
    publish(&lossy_producer, 5);
    // fast: published to all the time while top runs, by another client
    // (its loans come and go; top-test's holds stay put).
    let fast_client = Client::connect_to(Some(&socket), "top-fast").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let fast = fast_client.producer("fast").unwrap();
    let publisher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                publish(&fast, 1);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let out = once(&socket, &["--interval", "300"]);
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}{}", text(&out.stderr));
    assert!(!screen.contains('\x1b'), "control codes in {screen:?}");
    let head = screen.lines().next().unwrap();
    assert!(
        head.starts_with(&format!(
            "tensorbus top   broker pid {}",
            std::process::id()
        )),
        "{head}"
    );
    assert!(head.contains("every 300 ms   rates over"), "{head}");
    assert!(screen.contains("channels (3) sorted by drops"), "{screen}");
    // By drops: lossy; then cam (6 queued) before fast (no subscriber).
    let p = positions(&screen, &["lossy", "cam", "fast"]);
    assert!(p[0] < p[1] && p[1] < p[2], "{screen}");
    // channel mode state published pub/s subs queued dropped drop/s p99
    let cam_row = row(&screen, "cam").unwrap();
    assert_eq!(
        cam_row,
        [
            "cam",
            "broadcast",
            "live",
            "10",
            "0.0",
            "1",
            "6/16",
            "0",
            "0.0",
            "-"
        ],
        "{screen}"
    );
    let lossy_row = row(&screen, "lossy").unwrap();
    assert_eq!(
        lossy_row,
        [
            "lossy",
            "broadcast",
            "live",
            "5",
            "0.0",
            "1",
            "2/2",
            "3",
            "0.0",
            "-"
        ],
        "{screen}"
    );
    let fast_rate: f64 = row(&screen, "fast").unwrap()[4].parse().unwrap();
    assert!(fast_rate > 0.0, "{screen}");
    let pool = row(&screen, "p").unwrap();
    assert_eq!(&pool[1..3], ["4KiB", "64"], "{screen}");
    assert!(screen.contains("clients (3) sorted by holds"), "{screen}");
    // Its 4 handles hold the 6 + 2 queued tensors' slots.
    let me = screen
        .lines()
        .find(|l| l.contains(" top-test "))
        .unwrap_or_else(|| panic!("{screen}"));
    let me: Vec<&str> = me.split_whitespace().collect();
    assert_eq!(&me[2..5], ["top-test", "4", "8"], "{screen}");
    // The oldest hold's age, and no hold past the 5 s leak threshold.
    assert!(me[5].ends_with('s') && me[6] == "0", "{screen}");
    assert!(screen.contains("tensorbus-top"), "{screen}");

    // --sort rate: fast first.
    let out = once(&socket, &["--interval", "300", "--sort", "rate"]);
    let screen = text(&out.stdout);
    assert!(screen.contains("channels (3) sorted by rate"), "{screen}");
    let p = positions(&screen, &["fast", "cam", "lossy"]);
    assert!(p[0] < p[1] && p[1] < p[2], "{screen}");
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    drop((cam_producer, lossy_producer));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_broker_or_a_terminal_top_says_why() {
    let dir = temp_dir("top-none");
    let socket = dir.join("nobody.sock");
    let out = once(&socket, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("tensorbus top: no broker to watch:"),
        "{err}"
    );
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert!(out.stdout.is_empty());

    let _broker = EmbeddedBroker::start(&Config::from_toml(CONFIG).unwrap(), &socket).unwrap();
    let out = Command::new(BIN)
        .args(["top", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stdout is not a terminal (use --once"),
        "{err}"
    );
    for bad in ["0", "10", "100000", "x"] {
        let out = Command::new(BIN)
            .args(["top", "--interval", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--interval {bad}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `line` ends with the words `want` (after a space or at its
/// start): the shell's output, also when it lands after a prompt.
fn ends_with_word(line: &str, want: &str) -> bool {
    let l = line.trim();
    l == want || l.ends_with(&format!(" {want}"))
}

/// A private tmux server (its own socket), killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(["-f", "/dev/null"])
            .args(args)
            .env_remove("TMUX")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(out.status.success(), "tmux {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Types `line` and Enter.
    fn type_line(&self, line: &str) {
        self.ok(&["send-keys", "-t", "top", "-l", line]);
        self.ok(&["send-keys", "-t", "top", "Enter"]);
    }

    fn screen(&self) -> String {
        self.ok(&["capture-pane", "-p", "-J", "-t", "top"])
    }

    /// Polls the screen until `done` holds (30 s at most); the screen then.
    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen();
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "waited for {what}; screen:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn alternate_screen(&self) -> bool {
        self.ok(&["display-message", "-p", "-t", "top", "#{alternate_on}"])
            .trim()
            == "1"
    }

    /// The pid of the pane's shell's only child (the running `top`).
    fn child_of_shell(&self) -> i32 {
        let shell = self.ok(&["display-message", "-p", "-t", "top", "#{pane_pid}"]);
        let shell = shell.trim();
        let children =
            std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap();
        let kids: Vec<i32> = children
            .split_whitespace()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(kids.len(), 1, "children of the shell: {kids:?}");
        kids[0]
    }

    /// Checks that the terminal is out of raw mode and the alternate
    /// screen: the shell's `stty` sees canonical mode and echo.
    fn assert_restored(&self, n: u32) {
        assert!(!self.alternate_screen(), "still on the alternate screen");
        self.type_line(&format!(
            "stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo | tr '\\n' ' '; echo stty-done-{n}"
        ));
        let want = format!("icanon echo stty-done-{n}");
        self.wait_for(&want, |s| s.lines().any(|l| ends_with_word(l, &want)));
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// The pids of the tmux servers on `socket` (from /proc).
fn tmux_servers(socket: &Path) -> Vec<u32> {
    let want = socket.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<String> = c
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.first().is_some_and(|a| a.ends_with("tmux")) && args.contains(&want)
            })
        })
        .collect()
}

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn live_view_in_tmux_updates_sorts_survives_the_broker_and_restores_the_terminal() {
    if !tmux_available() {
        assert!(
            std::env::var_os("TENSORBUS_REQUIRE_TMUX").is_none_or(|v| v != "1"),
            "TENSORBUS_REQUIRE_TMUX=1 but tmux is not installed (scripts/setup.sh installs it)"
        );
        eprintln!("SKIPPED: tmux not found (apt-get install tmux); set TENSORBUS_REQUIRE_TMUX=1 to make this a failure");
        return;
    }
    let dir = temp_dir("top-tmux");
    let socket = dir.join("broker.sock");
    let config = dir.join("tensorbus.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut broker = spawn_broker(&config, &socket, Stdio::null());

    let tmux = Tmux {
        socket: dir.join("tmux.sock"),
    };
    // A plain sh (no line editor that would reset the terminal itself).
    tmux.ok(&[
        "new-session",
        "-d",
        "-x",
        "120",
        "-y",
        "40",
        "-s",
        "top",
        "sh",
    ]);
    // Run `n` of top; the shell then prints `top-N-exited-STATUS`.
    let top_cmd = |n: u32| {
        format!(
            "{BIN} top --socket {} --interval 200; echo top-{n}-exited-$?",
            socket.display()
        )
    };
    let exited = |n: u32, status: i32| {
        let want = format!("top-{n}-exited-{status}");
        move |s: &str| s.lines().any(|l| ends_with_word(l, &want))
    };
    tmux.type_line(&top_cmd(1));
    // One client (top itself) before anything else connects.
    tmux.wait_for("the first frame", |s| {
        s.contains("channels (3) sorted by drops") && s.contains("tensorbus-top")
    });
    assert!(tmux.alternate_screen());

    let client = Client::connect_to(Some(&socket), "tmux-test").unwrap();
    let consumer = client
        .consumer_with("cam", ConsumerOptions::default().depth(16))
        .unwrap();
    let producer = client.producer("cam").unwrap();
    let cam = |s: &str| row(s, "cam");
    publish(&producer, 5);
    tmux.wait_for("cam at 5 published, 5 queued", |s| {
        cam(s).is_some_and(|r| r[3] == "5" && r[6] == "5/16")
    });
    publish(&producer, 7);
    consumer.recv().unwrap();
    tmux.wait_for("cam at 12 published, 11 queued", |s| {
        cam(s).is_some_and(|r| r[3] == "12" && r[6] == "11/16")
    });
    tmux.wait_for("the test client's holds", |s| {
        row(s, "1").is_some() || s.contains("tmux-test")
    });

    // s: the channels' sort; Down, then s: the pools'.
    tmux.ok(&["send-keys", "-t", "top", "s"]);
    tmux.wait_for("sort by depth", |s| {
        s.contains("channels (3) sorted by depth")
    });
    // By depth: cam (11 queued) above the others.
    let s = tmux.screen();
    let p = positions(&s, &["cam", "fast"]);
    assert!(p[0] < p[1], "{s}");
    tmux.ok(&["send-keys", "-t", "top", "Tab"]);
    tmux.wait_for("sort by rate", |s| {
        s.contains("channels (3) sorted by rate")
    });
    tmux.ok(&["send-keys", "-t", "top", "Down"]);
    tmux.ok(&["send-keys", "-t", "top", "s"]);
    tmux.wait_for("pools sorted by name", |s| {
        s.contains("pools (1) sorted by name") && s.contains("channels (3) sorted by rate")
    });

    // A smaller terminal: the frame is laid out again, the numbers whole.
    tmux.ok(&["resize-window", "-t", "top", "-x", "80", "-y", "24"]);
    tmux.wait_for("the 80 x 24 frame", |s| {
        let lines: Vec<&str> = s.lines().collect();
        lines.len() == 24
            && lines[23].starts_with("q quit")
            && lines[1].chars().count() == 80
            && cam(s).is_some_and(|r| r[3] == "12" && r[6] == "11/16")
    });
    // Back to 120 x 40 (the shell's screen, reflowed by tmux while top had
    // the alternate screen, then gets its lines back as they were).
    tmux.ok(&["resize-window", "-t", "top", "-x", "120", "-y", "40"]);
    tmux.wait_for("the 120 x 40 frame", |s| {
        let lines: Vec<&str> = s.lines().collect();
        lines.len() == 40 && lines[39].starts_with("q quit")
    });

    // The broker goes away: top says so and keeps going; a new broker on
    // the same socket is picked up.
    drop((consumer, producer, client));
    let old_pid = broker.0.id();
    broker.0.kill().unwrap();
    broker.0.wait().unwrap();
    tmux.wait_for("broker gone", |s| s.contains("broker gone, retrying"));
    let _ = std::fs::remove_file(&socket);
    let broker2 = spawn_broker(&config, &socket, Stdio::null());
    let new_pid = broker2.0.id();
    assert_ne!(old_pid, new_pid);
    tmux.wait_for("the new broker", |s| {
        s.contains(&format!("broker pid {new_pid} at")) && !s.contains("broker gone")
    });

    // q: top exits 0 and the terminal is as before.
    tmux.ok(&["send-keys", "-t", "top", "q"]);
    tmux.wait_for("top to exit after q", exited(1, 0));
    tmux.assert_restored(1);

    // SIGTERM: exit status 130, terminal restored too.
    tmux.type_line(&top_cmd(2));
    tmux.wait_for("top again", |s| s.contains("channels (3) sorted by drops"));
    let top = tmux.child_of_shell();
    // SAFETY: kill has no memory preconditions; `top` is our child's child.
    assert_eq!(unsafe { libc::kill(top, libc::SIGTERM) }, 0);
    tmux.wait_for("top to exit on SIGTERM", exited(2, 130));
    tmux.assert_restored(2);

    // Esc, and Ctrl-C (a key in raw mode, not SIGINT): exit 0.
    for (n, key) in [(3, "Escape"), (4, "C-c")] {
        tmux.type_line(&top_cmd(n));
        tmux.wait_for("top again", |s| s.contains("channels (3) sorted by drops"));
        tmux.ok(&["send-keys", "-t", "top", key]);
        tmux.wait_for(&format!("top to exit after {key}"), exited(n, 0));
        tmux.assert_restored(n);
    }
    drop(broker2);
    // The server goes while its socket is still there to be told so.
    let tmux_socket = tmux.socket.clone();
    drop(tmux);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tmux_servers(&tmux_socket).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the tmux server outlived kill-server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
