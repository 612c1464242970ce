//! Fuzz target: `qflare_attest::fuzzing::evidence` (the hardware evidence a
//! host relays inside an attestation report) must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qflare_protocol::attestation::hardware::fuzzing::evidence(data);
});
