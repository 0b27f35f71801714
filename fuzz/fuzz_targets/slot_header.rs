//! Slot header words (holder word included) and a slot size through read_meta and validate; a well-formed tensor through write_meta/read_meta.
//! See crates/tensorbus-core/tests/fuzz_harness/mod.rs for the properties.
#![no_main]

#[path = "../../crates/tensorbus-core/tests/fuzz_harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::slot_header(data));
