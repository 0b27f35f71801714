//! Runs the hot path (loan, publish, recv, release) 100,000 times between
//! two marker writes, on a producer thread and a busy-polling consumer
//! thread, so that `scripts/hot-path-syscalls.sh` can count, under strace,
//! the syscalls those two threads make between the markers (expected: none).
//!
//! `cargo run --release --example hot_path_syscalls`

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tensorbus::{Client, ConsumerOptions, DType, Policy, WaitStrategy};
use tensorbus_broker::{Config, EmbeddedBroker};

const N: usize = 100_000;

fn gettid() -> i64 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sock = std::env::temp_dir().join(format!("tb-hotsys-{}/broker.sock", std::process::id()));
    let config = Config::from_toml(
        "[[pools]]\nname = \"p\"\nslot_size = 4096\nslots = 32\n[[channels]]\nname = \"hot\"\n",
    )?;
    let _broker = EmbeddedBroker::start(&config, &sock)?;
    let client = Client::connect_to(Some(&sock), "hot-path")?;
    let producer = client.producer("hot")?;
    // drop_oldest: the producer never waits, so nobody ever parks.
    let consumer = client.consumer_with(
        "hot",
        ConsumerOptions::default()
            .policy(Policy::DropOldest)
            .depth(16)
            .wait(WaitStrategy::BusyPoll),
    )?;
    let received = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let consumer_tid = Arc::new(AtomicUsize::new(0));
    let (r2, d2, t2) = (received.clone(), done.clone(), consumer_tid.clone());
    let thread = std::thread::spawn(move || {
        t2.store(gettid() as usize, Ordering::SeqCst);
        let mut sum = 0u64;
        loop {
            if let Ok(t) = consumer.try_recv() {
                sum = sum.wrapping_add(u64::from(t[0]));
                r2.fetch_add(1, Ordering::Release);
            } else if d2.load(Ordering::Acquire) {
                break;
            }
            std::hint::spin_loop();
        }
        sum
    });
    while consumer_tid.load(Ordering::SeqCst) == 0 {
        std::hint::spin_loop();
    }
    println!(
        "TB-HOT-TIDS {} {}",
        gettid(),
        consumer_tid.load(Ordering::SeqCst)
    );
    std::io::stdout().flush()?;
    let mut stderr = std::io::stderr();
    stderr.write_all(b"TB-HOT-BEGIN\n")?;
    let mut published = 0usize;
    while published < N {
        let mut t = producer.loan(&[64], DType::U8)?;
        t.fill(published as u8);
        t.publish()?;
        published += 1;
    }
    // Wait (spinning, no syscall) until the consumer has drained the ring.
    let mut last = usize::MAX;
    let mut stable = 0;
    while stable < 1_000_000 {
        let now = received.load(Ordering::Acquire);
        if now == last {
            stable += 1;
        } else {
            stable = 0;
            last = now;
        }
        std::hint::spin_loop();
    }
    stderr.write_all(b"TB-HOT-END\n")?;
    done.store(true, Ordering::Release);
    let _ = thread.join();
    eprintln!(
        "published {published}, received {} (drop_oldest may drop when the consumer falls behind)",
        received.load(Ordering::SeqCst)
    );
    Ok(())
}
