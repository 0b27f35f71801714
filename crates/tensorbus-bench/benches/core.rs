//! In-process microbenchmarks of the core hot path (`cargo bench -p tensorbus-bench`):
//! SPSC ring push + pop, and loan + release of a slot's holder word through
//! `tensorbus_core::publish::loan` on a heap-backed control segment.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::sync::atomic::AtomicU64;
use tensorbus_core::control::HeapControl;
use tensorbus_core::layout::{Layout, LayoutParams};
use tensorbus_core::publish::loan;
use tensorbus_core::ring::{Ring, RingHeader};

fn ring(c: &mut Criterion) {
    let header = RingHeader::default();
    let cells: Vec<AtomicU64> = (0..64).map(|_| AtomicU64::new(0)).collect();
    let r = Ring::new(&header, &cells).expect("64 cells is a valid ring");
    let mut cached_head = 0u64;
    c.bench_function("ring push+pop", |b| {
        b.iter(|| {
            r.push(8, black_box(0x1234), &mut cached_head)
                .expect("ring has room");
            black_box(r.pop())
        })
    });
    let mut n = 0u64;
    c.bench_function("ring push x8 + pop x8", |b| {
        b.iter(|| {
            for _ in 0..8 {
                n += 1;
                r.push(8, n & 0xFFFF_FFFF, &mut cached_head)
                    .expect("ring has room");
            }
            for _ in 0..8 {
                black_box(r.pop());
            }
        })
    });
}

fn loan_release(c: &mut Criterion) {
    for slots in [16u32, 256] {
        let layout = Layout::compute(&LayoutParams {
            pool_slots: vec![slots],
            max_channels: 1,
            max_producers: 1,
            max_subscribers: 1,
            ring_capacity: 8,
        })
        .expect("small layout");
        let heap = HeapControl::new(layout);
        let ctl = heap.control();
        let mut cursor = 0usize;
        c.bench_function(&format!("loan+release ({slots} slots)"), |b| {
            b.iter(|| {
                let (index, _generation) = loan(ctl, 0, 1, &mut cursor).expect("a free slot");
                ctl.slot(0, index).expect("slot in range").release(1)
            })
        });
        // Half the slots held by someone else: the scan skips them.
        let held: Vec<usize> = (0..slots / 2)
            .map(|_| loan(ctl, 0, 2, &mut cursor).expect("a free slot").0)
            .collect();
        c.bench_function(&format!("loan+release ({slots} slots, half held)"), |b| {
            b.iter(|| {
                let (index, _generation) = loan(ctl, 0, 1, &mut cursor).expect("a free slot");
                ctl.slot(0, index).expect("slot in range").release(1)
            })
        });
        for i in held {
            ctl.slot(0, i).expect("slot in range").release(2);
        }
    }
}

// The macro generates an undocumented `benches` function.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, ring, loan_release);
}
use group::benches;
criterion_main!(benches);
