//! The hot path (loan, publish, try_recv, release) makes no heap
//! allocation: a counting global allocator watches 100,000 round trips on a
//! broadcast channel with two subscribers, a work-queue channel and a stage.
//! (Syscalls: see scripts/hot-path-syscalls.sh, which runs the same loop
//! under strace.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use tensorbus::TensorView;
use tensorbus::{Client, ConsumerOptions, DType, Policy};
use tensorbus_broker::{Config, EmbeddedBroker};

struct Counting;

thread_local! {
    /// Counting is per thread: the embedded broker's thread is not on the hot path.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

fn counting() -> bool {
    COUNTING.with(|c| c.get())
}

// SAFETY: forwards every call unchanged to the system allocator; the
// counter is a plain atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn hot_path_does_not_allocate() {
    let sock = std::env::temp_dir().join(format!("tb-hotpath-{}/broker.sock", std::process::id()));
    let config = Config::from_toml(
        r#"
        [[pools]]
        name = "p"
        slot_size = 4096
        slots = 16
        [[channels]]
        name = "b"
        [[channels]]
        name = "w"
        mode = "workqueue"
        [[channels]]
        name = "o"
        "#,
    )
    .unwrap();
    let _broker = EmbeddedBroker::start(&config, &sock).unwrap();
    let client = Client::connect_to(Some(&sock), "hot").unwrap();
    let bp = client.producer("b").unwrap();
    let c1 = client.consumer("b").unwrap();
    let c2 = client
        .consumer_with(
            "b",
            ConsumerOptions::default()
                .policy(Policy::DropOldest)
                .depth(2),
        )
        .unwrap();
    let wp = client.producer("w").unwrap();
    let stage = client.stage("w", "o").unwrap();
    let out = client.consumer("o").unwrap();

    const N: usize = 100_000;
    let mut checksum = 0u64;
    COUNTING.with(|c| c.set(true));
    for i in 0..N {
        let mut t = bp.loan(&[8], DType::U8).unwrap();
        t.copy_from_slice(&(i as u64).to_le_bytes());
        t.set_user_header(b"frame").unwrap();
        t.publish().unwrap();
        let a = c1.try_recv().unwrap();
        let b = c2.try_recv().unwrap();
        checksum = checksum.wrapping_add(u64::from_le_bytes(a[..8].try_into().unwrap()));
        assert_eq!(&a[..], &b[..]);
        drop((a, b));

        let mut w = wp.loan(&[2], DType::F32).unwrap();
        w.as_mut_slice_of::<f32>().unwrap()[0] = i as f32;
        w.publish().unwrap();
        let mut s = stage.try_recv_mut().unwrap();
        s.as_mut_slice_of::<f32>().unwrap()[1] = 1.0;
        s.forward().unwrap();
        let r = out.try_recv().unwrap();
        assert_eq!(r.as_slice_of::<f32>().unwrap()[0], i as f32);
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(checksum, (0..N as u64).sum::<u64>());
    assert_eq!(
        ALLOCS.load(Ordering::SeqCst),
        0,
        "heap allocations on the hot path over {N} iterations"
    );
}
