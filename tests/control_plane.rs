//! Requests that time out (issue 12.5): a broker process frozen with
//! SIGSTOP for longer than the client's request timeout.
//!
//! Before the fix, replies were not matched to requests: after SIGCONT
//! every reply a client read was the one of its previous request
//! (`unexpected reply Consumer{...}` for a stat), and the broker held a
//! subscriber for a consumer object that never existed. Now requests carry
//! ids, the late reply is discarded, and the broker undoes what the
//! abandoned request opened.

mod common;

use common::Bus;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tensorbus::error::{OpenError, RequestError};
use tensorbus::stat::StatReport;
use tensorbus::Client;

const CONFIG: &str = "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 16\n\
[[channels]]\nname = \"f/c\"\npolicy = \"block\"\n";

/// A broker in a process of its own (`tb-peer broker`), killed on drop.
struct BrokerProcess(Child);

impl BrokerProcess {
    fn start(dir: &std::path::Path) -> BrokerProcess {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("broker.toml");
        std::fs::write(&config, CONFIG).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tb-peer"))
            .arg("broker")
            .arg("--socket")
            .arg(dir.join("broker.sock"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the broker");
        BrokerProcess(child)
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.0.id()).unwrap();
        // SAFETY: kill(2) on our own unreaped child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        if sig == libc::SIGSTOP {
            self.wait_stopped(pid);
        }
    }

    /// kill(2) returns before the group stop completes: wait until every
    /// thread of the broker is stopped (state `T`), so the next request
    /// really meets a frozen broker (on a loaded machine the stop can lag).
    fn wait_stopped(&self, pid: libc::pid_t) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let all_stopped = || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.flatten().all(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                    // `pid (comm) S ...`: the state follows the last ')'.
                    st.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                })
            })
        };
        while !all_stopped() {
            assert!(
                std::time::Instant::now() < deadline,
                "the broker did not stop"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn producers_and_subscribers(stat: &StatReport, channel: &str) -> (u32, usize) {
    stat.channels
        .iter()
        .find(|c| c.name == channel)
        .map_or((0, 0), |c| (c.producers, c.subscribers.len()))
}

fn is_timeout(e: &OpenError) -> bool {
    matches!(e, OpenError::Request(RequestError::Timeout { .. }))
}

#[test]
fn requests_abandoned_while_the_broker_is_stopped_leave_nothing_behind() {
    let dir = std::env::temp_dir().join(format!("tb-it-{}-sigstop", std::process::id()));
    let broker = BrokerProcess::start(&dir);
    let bus = Bus::attach(&dir.join("broker.sock"));
    let client = Client::connect_to(Some(&bus.socket), "frozen").unwrap();
    client.set_request_timeout(Duration::from_millis(300));
    assert_eq!(client.request_timeout(), Duration::from_millis(300));
    let live = client.consumer("f/c").unwrap();

    broker.signal(libc::SIGSTOP);
    let e = client.consumer("f/c").unwrap_err();
    assert!(is_timeout(&e), "expected a timeout, got {e:?}");
    let msg = e.to_string();
    assert!(msg.contains("did not answer within 300ms"), "{msg}");
    let e = client.producer("f/c").unwrap_err();
    assert!(is_timeout(&e), "expected a timeout, got {e:?}");
    match client.stat() {
        Err(RequestError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Frozen well past the timeout, as in the report.
    std::thread::sleep(Duration::from_millis(500));
    broker.signal(libc::SIGCONT);

    // The broker now answers the abandoned open requests (late), the
    // abandoned stat, and then this one: the client gets its own reply...
    let stat = client.stat().expect("the stat's own reply");
    // ...and the abandoned consumer and producer were closed again: what
    // the broker holds is exactly the live consumer object.
    assert_eq!(producers_and_subscribers(&stat, "f/c"), (0, 1));
    assert_eq!(stat.channels[0].subscribers[0].handle, live.handle());
    // Still in step for opens and closes after that.
    let second = client.consumer("f/c").unwrap();
    let p = client.producer("f/c").unwrap();
    assert_eq!(
        producers_and_subscribers(&bus.client.stat().unwrap(), "f/c"),
        (1, 2)
    );
    drop((second, p, live));
    assert_eq!(
        producers_and_subscribers(&client.stat().unwrap(), "f/c"),
        (0, 0)
    );
}
