//! Atomics that switch to `loom`'s model-checked versions under `--cfg loom`.
//!
//! Production code maps the `#[repr(C)]` structs of this crate straight onto
//! shared memory, so they must be made of plain `core` atomics. Under loom the
//! same structs are built in ordinary memory (with `new`) and every access is
//! explored by the model checker.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicI64, AtomicU32, AtomicU64, Ordering};

/// Tells the CPU we are in a spin-wait loop (PAUSE on x86); under loom, yields
/// to the model checker so that spin loops terminate.
#[inline]
pub fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}
