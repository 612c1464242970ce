//! A stored device's registered public keys, parsed back into protocol
//! types. Shared by the handshake, the sealed routes and the round controller
//! (which hands the keys of the selected devices to the enclave).

use qflare_protocol::kem::KemPublicKey;
use qflare_protocol::sig::VerifyingKey;
use qflare_protocol::{KemSuite, ProtocolError, SignatureSuite};
use qflare_store::DeviceRecord;

/// The device's registered KEM and verifying keys. The store only holds
/// keys that were checked at enrollment or rotation, so a failure here means
/// the stored record is damaged.
pub fn registered_keys(
    device: &DeviceRecord,
) -> Result<(KemPublicKey, VerifyingKey), ProtocolError> {
    let kem_suite: KemSuite = device.keys.kem_suite.parse()?;
    let signature_suite: SignatureSuite = device.keys.signature_suite.parse()?;
    Ok((
        KemPublicKey::from_bytes(kem_suite, device.keys.kem_public_key.clone())?,
        VerifyingKey::from_bytes(signature_suite, device.keys.verifying_key.clone())?,
    ))
}
