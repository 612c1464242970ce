//! Fuzz target: `qflare_protocol::fuzzing::wire_messages` must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qflare_protocol::fuzzing::wire_messages(data);
});
