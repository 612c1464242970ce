//! Entry points for `cargo fuzz` (see `fuzz/`): each takes arbitrary bytes
//! and must return, never panic. They exercise every decoder a peer can reach.

use crate::attestation::AttestationReport;
use crate::channel::{ServerChannel, SessionSecrets};
use crate::enrollment::{EnrollRequest, EnrollResponse};
use crate::envelope::UpdateEnvelope;
use crate::handshake::{AwaitClientConfirm, ClientConfirm, ClientHello, ServerHello};
use crate::identity::SessionId;
use crate::model::ModelCertificate;
use crate::tensor::TensorMap;
use crate::update_encoding::{self, UpdateEncoding};
use crate::wire::{decode, limits};

/// Every JSON message type.
pub fn wire_messages(data: &[u8]) {
    let _ = decode::<EnrollRequest>("fuzz", data, limits::ENROLL_REQUEST);
    let _ = decode::<EnrollResponse>("fuzz", data, limits::ENROLL_RESPONSE);
    let _ = decode::<ClientHello>("fuzz", data, limits::CLIENT_HELLO);
    let _ = decode::<ServerHello>("fuzz", data, limits::SERVER_HELLO);
    let _ = decode::<ClientConfirm>("fuzz", data, limits::CLIENT_CONFIRM);
    let _ = decode::<UpdateEnvelope>("fuzz", data, limits::UPDATE_ENVELOPE);
    // Binary envelopes: whatever decodes must encode back to the same bytes.
    if let Ok(envelope) = crate::envelope::decode(data, limits::UPDATE_ENVELOPE)
        && data.starts_with(&crate::envelope::BINARY_MAGIC)
    {
        assert_eq!(envelope.to_bytes(), data);
    }
    let _ = decode::<AttestationReport>("fuzz", data, limits::ATTESTATION_REPORT);
    let _ = decode::<ModelCertificate>("fuzz", data, limits::MODEL_CERTIFICATE);
}

/// The safetensors decoder, and the update encodings' decoders over it.
pub fn tensors(data: &[u8]) {
    for encoding in UpdateEncoding::ALL {
        let _ = update_encoding::decode(data, encoding, limits::TENSORS);
    }
    if let Ok(map) = TensorMap::from_safetensors(data, limits::TENSORS) {
        // Whatever decodes must re-encode and decode to the same thing.
        let again = TensorMap::from_safetensors(&map.to_safetensors(), limits::TENSORS);
        assert!(again.is_ok_and(|m| m.same_layout(&map)));
    }
}

/// The sealed-record opener, under a fixed key.
pub fn sealed_record(data: &[u8]) {
    let secrets = match SessionSecrets::import(&[7u8; SessionSecrets::EXPORT_LEN]) {
        Ok(secrets) => secrets,
        Err(_) => return,
    };
    if let Ok(channel) =
        ServerChannel::from_secrets(SessionId::from_bytes([1; 16]), u64::MAX, &secrets)
    {
        let mut record = data.to_vec();
        let _ = channel.open_request("POST", crate::api::routes::UPDATES, &mut record, 0, 0);
    }
}

/// The stored-state importers.
pub fn stored_state(data: &[u8]) {
    let _ = AwaitClientConfirm::import(data);
    let _ = SessionSecrets::import(data);
}
