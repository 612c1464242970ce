//! Fuzz target: `qflare_protocol::fuzzing::stored_state` must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qflare_protocol::fuzzing::stored_state(data);
});
