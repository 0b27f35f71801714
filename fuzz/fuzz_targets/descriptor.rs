//! Real traffic, then arbitrary words of slot headers, rings and records overwritten; a subscriber pops and validates every descriptor and reads what it accepts; the broker's repairs run over the rest.
//! See crates/tensorbus-core/tests/fuzz_harness/mod.rs for the properties.
#![no_main]

#[path = "../../crates/tensorbus-core/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::descriptor(data));
