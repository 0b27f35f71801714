//! Issue 16: a thousand holder handles on one broker. Eight processes open
//! 125 consumers each over four channels (256 subscribers on m/0, 248 on
//! the others; all but the first 15 handles hold extension ids of the
//! two-level holder set), four
//! producers publish 100 tensors on each channel, and four of the eight
//! processes are killed with SIGKILL while they hold slots: the survivors
//! receive every tensor in order and every slot comes back.

mod common;
use common::*;

const CHANNELS: [&str; 4] = ["m/0", "m/1", "m/2", "m/3"];
const N: u64 = 100;

fn config() -> String {
    let mut s = String::from(
        "[limits]\nring_capacity = 8\nmax_channels = 8\nmax_producers_per_channel = 2\n\
         max_subscribers_per_channel = 256\nmax_handles = 1024\n\
         [[pools]]\nname = \"p\"\nslot_size = \"4KiB\"\nslots = 128\n",
    );
    for c in CHANNELS {
        s.push_str(&format!("[[channels]]\nname = \"{c}\"\n"));
    }
    s
}

#[test]
fn a_thousand_handles_receive_everything_in_order_and_kills_reclaim_every_slot() {
    let bus = Bus::start("many", &config());
    let chans = CHANNELS.join(",");
    let mut peers: Vec<Peer> = (0..8)
        .map(|p| {
            let mut args = vec!["--channels", &chans, "--consumers", "125", "--count", "100"];
            if p < 4 {
                // The victims: keep the 10th tensor of every consumer.
                args.extend(["--stall-after", "10"]);
            }
            bus.spawn(&format!("many{p}"), "many", &args)
        })
        .collect();
    for p in &mut peers {
        p.wait_line("ready");
    }
    let stat = bus.stat();
    assert_eq!(stat.handles_open, 1000, "{stat:#?}");
    assert_eq!(stat.max_handles, 1024);
    // Consumer i of each process is on channel i mod 4: 32 + 31 + 31 + 31.
    for c in &stat.channels {
        let want = if c.name == "m/0" { 256 } else { 248 };
        assert_eq!(c.subscribers.len(), want, "channel {}", c.name);
    }
    let producers: Vec<Peer> = CHANNELS
        .iter()
        .map(|c| bus.producer(c, N, &["--size", "1024"]))
        .collect();
    for p in &mut peers[..4] {
        p.wait_line("stalled");
    }
    let in_flight: u32 = bus.stat().pools.iter().map(|p| p.in_flight).sum();
    assert!(in_flight >= 4, "the victims hold slots ({in_flight})");
    for p in &mut peers[..4] {
        p.kill9();
    }
    for p in producers {
        assert_done(&p.finish(), N);
    }
    for p in peers.drain(4..) {
        let name = p.name.clone();
        let lines = p.finish();
        assert!(
            lines.iter().any(|l| l == "done 125 100"),
            "{name}: {lines:?}"
        );
    }
    bus.assert_all_free();
    let stat = bus.stat();
    assert_eq!(stat.handles_open, 0, "{stat:#?}");
}
