//! Fuzz target: `qflare_protocol::fuzzing::sealed_record` must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qflare_protocol::fuzzing::sealed_record(data);
});
