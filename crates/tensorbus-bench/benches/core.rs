//! In-process microbenchmarks of the core hot path (`cargo bench -p tensorbus-bench`):
//! SPSC ring push + pop, and loan + release of a slot's holder word through
//! `tensorbus_core::publish::loan` on a heap-backed control segment.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::sync::atomic::AtomicU64;
use tensorbus_core::control::HeapControl;
use tensorbus_core::layout::{Layout, LayoutParams};
use tensorbus_core::publish::loan;
use tensorbus_core::ring::{Ring, RingHeader};
use tensorbus_core::wide::HolderId;

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
        let intent = AtomicU64::new(0);
        let (me, other) = (HolderId::new(0).unwrap(), HolderId::new(1).unwrap());
        c.bench_function(&format!("loan+release ({slots} slots)"), |b| {
            b.iter(|| {
                let (index, _generation) =
                    loan(ctl, 0, me, &intent, &mut cursor).expect("a free slot");
                ctl.slot(0, index).expect("slot in range").release(me)
            })
        });
        // An extension id (handles past the sixteenth): the loan names the
        // slot in its intent, and the release clears a summary bit too.
        let ext = HolderId::new(600).unwrap();
        c.bench_function(
            &format!("loan+release ({slots} slots, extension id)"),
            |b| {
                b.iter(|| {
                    let (index, _generation) =
                        loan(ctl, 0, ext, &intent, &mut cursor).expect("a free slot");
                    ctl.slot(0, index).expect("slot in range").release(ext)
                })
            },
        );
        // Half the slots held by someone else: the scan skips them.
        let held: Vec<usize> = (0..slots / 2)
            .map(|_| {
                loan(ctl, 0, other, &intent, &mut cursor)
                    .expect("a free slot")
                    .0
            })
            .collect();
        c.bench_function(&format!("loan+release ({slots} slots, half held)"), |b| {
            b.iter(|| {
                let (index, _generation) =
                    loan(ctl, 0, me, &intent, &mut cursor).expect("a free slot");
                ctl.slot(0, index).expect("slot in range").release(me)
            })
        });
        for i in held {
            ctl.slot(0, i).expect("slot in range").release(other);
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
