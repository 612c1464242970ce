//! Fuzz target: the enclave's frame decoder (`qflare_enclave::fuzzing::frame`) must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qflare_enclave::fuzzing::frame(data);
});
