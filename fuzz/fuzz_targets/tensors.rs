//! Fuzz target: `qflare_protocol::fuzzing::tensors` must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qflare_protocol::fuzzing::tensors(data);
});
