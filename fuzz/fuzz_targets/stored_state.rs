//! Fuzz target: the stored-state importers, a pending handshake and session
//! secrets as the server keeps them (wrapped) in its database. Besides "never
//! panics", whatever imports must export to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qflare_protocol::channel::SessionSecrets;
use qflare_protocol::handshake::AwaitClientConfirm;

fuzz_target!(|data: &[u8]| {
    if let Ok(secrets) = SessionSecrets::import(data) {
        assert_eq!(secrets.export().expose(), data);
    }
    if let Ok(pending) = AwaitClientConfirm::import(data) {
        assert_eq!(pending.export().expose(), data);
    }
});
