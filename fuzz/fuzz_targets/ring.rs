//! A descriptor ring under pushes, pops, steals and recoveries: from garbage (no panic) and from a consistent state at any position (FIFO model).
//! See crates/tensorbus-core/tests/fuzz_harness/mod.rs for the properties.
#![no_main]

#[path = "../../crates/tensorbus-core/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::ring(data));
