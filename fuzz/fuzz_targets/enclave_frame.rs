//! Fuzz target: the enclave's frame decoder (`qflare_enclave::frame`), the
//! host↔enclave wire. Besides "never panics", it checks that a frame that
//! decodes re-encodes to exactly its input (the format has one encoding), and
//! that the stream reader the enclave and host use reads the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qflare_enclave::frame::{Frame, FrameReader};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        assert_eq!(frame.encode().expect("a decoded frame re-encodes"), data);
        let read = FrameReader::new(data)
            .read()
            .expect("the stream reader reads what decodes");
        assert!(read == frame, "the stream reader read another frame");
    }
});
