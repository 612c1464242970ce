//! AWS Nitro Enclaves: the Nitro Secure Module returns an attestation
//! document, a COSE_Sign1 structure (ES384) whose payload is a CBOR map of
//! the enclave's PCRs, the caller's `user_data`, `nonce` and `public_key`,
//! a timestamp, the signing certificate and the bundle of certificates up to
//! the AWS Nitro Enclaves root. The leaf certificate lives about three hours,
//! so the verification time matters.
//!
//! COSE is parsed with `coset` and the payload with `ciborium`; the chain is
//! checked by rustls' `webpki` (the path builder the TLS stack already
//! trusts) with aws-lc-rs, against the root pinned below by the SHA-256 of
//! its DER, the fingerprint AWS publishes. The signature is checked with
//! aws-lc-rs over the COSE `Sig_structure`. QFLARE's enclave puts its
//! 64-byte commitment in `user_data` (which also covers the nonce).
//!
//! A debug-mode enclave reports all-zero PCRs and its memory is open to its
//! parent; it is refused.

use std::time::Duration;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED, UnparsedPublicKey};
use ciborium::Value;
use coset::{CborSerializable, CoseSign1, TaggedCborSerializable, iana};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_cert::der::Decode;

use crate::error::{AttestError, Result};
use crate::evidence::{NitroEvidence, TeeKind};
use crate::policy::NitroPolicy;
use crate::{Checked, MEASUREMENT_LEN, REPORT_DATA_LEN};

const KIND: TeeKind = TeeKind::Nitro;

/// SHA-256 of the DER of the AWS Nitro Enclaves root certificate (G1,
/// `CN=aws.nitro-enclaves`, valid 2019-10-28 to 2049-10-28): the certificate
/// fingerprint AWS shows for it. (AWS also publishes a SHA-256 for the zip
/// file the root is distributed in, `8cf60e2b…`; that one is of the archive,
/// not of the certificate, and cannot be compared with a document's root.)
pub const AWS_NITRO_ROOT_G1_SHA256: [u8; 32] = [
    0x64, 0x1a, 0x03, 0x21, 0xa3, 0xe2, 0x44, 0xef, 0xe4, 0x56, 0x46, 0x31, 0x95, 0xd6, 0x06, 0x31,
    0x7e, 0xd7, 0xcd, 0xcc, 0x3c, 0x17, 0x56, 0xe0, 0x98, 0x93, 0xf3, 0xc6, 0x8f, 0x79, 0xbb, 0x5b,
];

/// Algorithms the Nitro chain uses (ECDSA P-384 throughout) and nothing else.
static CHAIN_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
];

/// `id-kp-clientAuth`: the Nitro certificates carry no extended key usage,
/// so this only refuses a certificate that names other purposes.
const CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// The payload of an attestation document, as AWS specifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationDocument {
    /// The enclave's module ID.
    pub module_id: String,
    /// Milliseconds since the Unix epoch when the NSM made the document.
    pub timestamp_ms: u64,
    /// PCR index → value (SHA-384).
    pub pcrs: Vec<(u64, Vec<u8>)>,
    /// The signing certificate (DER).
    pub certificate: Vec<u8>,
    /// Root first, then intermediates (DER).
    pub cabundle: Vec<Vec<u8>>,
    /// Caller-supplied public key, if any.
    pub public_key: Option<Vec<u8>>,
    /// Caller-supplied data, if any.
    pub user_data: Option<Vec<u8>>,
    /// Caller-supplied nonce, if any.
    pub nonce: Option<Vec<u8>>,
}

impl AttestationDocument {
    /// The value of PCR `index`, if present.
    pub fn pcr(&self, index: u64) -> Option<&[u8]> {
        self.pcrs
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, value)| value.as_slice())
    }
}

fn malformed(detail: impl std::fmt::Display) -> AttestError {
    AttestError::malformed("Nitro attestation document", detail)
}

fn parse_cose(document: &[u8]) -> Result<CoseSign1> {
    // The NSM emits the untagged form; accept the tagged one (tag 18) too.
    CoseSign1::from_slice(document)
        .or_else(|_| CoseSign1::from_tagged_slice(document))
        .map_err(|e| malformed(format!("not COSE_Sign1: {e}")))
}

fn bytes(value: Value, name: &str) -> Result<Vec<u8>> {
    match value {
        Value::Bytes(bytes) => Ok(bytes),
        _ => Err(malformed(format!("{name} is not a byte string"))),
    }
}

fn optional_bytes(value: Value, name: &str) -> Result<Option<Vec<u8>>> {
    match value {
        Value::Null => Ok(None),
        other => bytes(other, name).map(Some),
    }
}

fn unsigned(value: &Value, name: &str) -> Result<u64> {
    value
        .as_integer()
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| malformed(format!("{name} is not an unsigned integer")))
}

/// Parses a document's payload (without checking anything signed).
pub fn parse_payload(payload: &[u8]) -> Result<AttestationDocument> {
    let value: Value = ciborium::de::from_reader(payload)
        .map_err(|e| malformed(format!("payload is not CBOR: {e}")))?;
    let Value::Map(entries) = value else {
        return Err(malformed("payload is not a map"));
    };
    let mut module_id = None;
    let mut digest_name = None;
    let mut timestamp_ms = None;
    let mut pcrs = None;
    let mut certificate = None;
    let mut cabundle = None;
    let mut public_key = None;
    let mut user_data = None;
    let mut nonce = None;
    for (key, value) in entries {
        let Value::Text(key) = key else {
            return Err(malformed("a payload key is not text"));
        };
        match key.as_str() {
            "module_id" => module_id = value.into_text().ok(),
            "digest" => digest_name = value.into_text().ok(),
            "timestamp" => timestamp_ms = Some(unsigned(&value, "timestamp")?),
            "pcrs" => {
                let Value::Map(map) = value else {
                    return Err(malformed("pcrs is not a map"));
                };
                let mut out = Vec::with_capacity(map.len());
                for (index, value) in map {
                    out.push((unsigned(&index, "a PCR index")?, bytes(value, "a PCR")?));
                }
                pcrs = Some(out);
            }
            "certificate" => certificate = Some(bytes(value, "certificate")?),
            "cabundle" => {
                let Value::Array(items) = value else {
                    return Err(malformed("cabundle is not an array"));
                };
                cabundle = Some(
                    items
                        .into_iter()
                        .map(|item| bytes(item, "a cabundle certificate"))
                        .collect::<Result<Vec<_>>>()?,
                );
            }
            "public_key" => public_key = optional_bytes(value, "public_key")?,
            "user_data" => user_data = optional_bytes(value, "user_data")?,
            "nonce" => nonce = optional_bytes(value, "nonce")?,
            other => return Err(malformed(format!("unknown payload field {other:?}"))),
        }
    }
    if digest_name.as_deref() != Some("SHA384") {
        return Err(malformed("digest is not SHA384"));
    }
    let missing = |name: &str| malformed(format!("{name} is missing"));
    let document = AttestationDocument {
        module_id: module_id.ok_or_else(|| missing("module_id"))?,
        timestamp_ms: timestamp_ms.ok_or_else(|| missing("timestamp"))?,
        pcrs: pcrs.ok_or_else(|| missing("pcrs"))?,
        certificate: certificate.ok_or_else(|| missing("certificate"))?,
        cabundle: cabundle.ok_or_else(|| missing("cabundle"))?,
        public_key,
        user_data,
        nonce,
    };
    if document.cabundle.is_empty() {
        return Err(malformed("cabundle is empty"));
    }
    Ok(document)
}

fn payload(cose: &CoseSign1) -> Result<AttestationDocument> {
    parse_payload(
        cose.payload
            .as_deref()
            .ok_or_else(|| malformed("the payload is detached"))?,
    )
}

/// The report data as the document states it (its `user_data`), unverified.
/// A document without exactly 64 bytes there commits to nothing of ours.
pub fn claimed_report_data(document: &[u8]) -> Result<[u8; REPORT_DATA_LEN]> {
    let parsed = payload(&parse_cose(document)?)?;
    parsed
        .user_data
        .as_deref()
        .and_then(|data| <[u8; REPORT_DATA_LEN]>::try_from(data).ok())
        .ok_or(AttestError::BindingMismatch)
}

/// PCR0 (the enclave image) as the document states it, unverified (see
/// [`crate::sev_snp::claimed_measurement`] for why that is wanted).
pub fn claimed_measurement(document: &[u8]) -> Result<[u8; MEASUREMENT_LEN]> {
    let parsed = payload(&parse_cose(document)?)?;
    parsed
        .pcr(0)
        .and_then(|pcr| <[u8; MEASUREMENT_LEN]>::try_from(pcr).ok())
        .ok_or_else(|| malformed("PCR0 is not a SHA-384 value"))
}

fn check_chain(document: &AttestationDocument, now: u64) -> Result<()> {
    let root = &document.cabundle[0];
    let fingerprint = digest::digest(&digest::SHA256, root);
    if fingerprint.as_ref() != AWS_NITRO_ROOT_G1_SHA256 {
        return Err(AttestError::chain(
            KIND,
            format!(
                "the bundle's root (SHA-256 {}) is not the AWS Nitro Enclaves root",
                hex::encode(fingerprint.as_ref())
            ),
        ));
    }
    let root = CertificateDer::from(root.as_slice());
    let anchor = webpki::anchor_from_trusted_cert(&root)
        .map_err(|e| AttestError::chain(KIND, format!("the root does not parse: {e}")))?;
    let intermediates: Vec<CertificateDer<'_>> = document.cabundle[1..]
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let leaf = CertificateDer::from(document.certificate.as_slice());
    let leaf = EndEntityCert::try_from(&leaf).map_err(|e| {
        AttestError::chain(KIND, format!("the signing certificate does not parse: {e}"))
    })?;
    leaf.verify_for_usage(
        CHAIN_ALGORITHMS,
        &[anchor],
        &intermediates,
        UnixTime::since_unix_epoch(Duration::from_secs(now)),
        KeyUsage::required_if_present(CLIENT_AUTH),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| AttestError::chain(KIND, format!("at {now} (Unix seconds): {e:?}")))
}

fn check_signature(cose: &CoseSign1, certificate: &[u8]) -> Result<()> {
    let es384 = coset::RegisteredLabelWithPrivate::Assigned(iana::Algorithm::ES384);
    if cose.protected.header.alg.as_ref() != Some(&es384) {
        return Err(AttestError::signature(
            KIND,
            "the protected header does not say ES384",
        ));
    }
    let certificate = x509_cert::Certificate::from_der(certificate)
        .map_err(|e| malformed(format!("the signing certificate: {e}")))?;
    let point = certificate
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .raw_bytes();
    let key = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, point);
    cose.verify_signature(b"", |signature, signed| key.verify(signed, signature))
        .map_err(|_| {
            AttestError::signature(KIND, "the signing certificate did not sign this document")
        })
}

fn pcr48(document: &AttestationDocument, index: u64) -> Result<[u8; MEASUREMENT_LEN]> {
    document
        .pcr(index)
        .and_then(|value| <[u8; MEASUREMENT_LEN]>::try_from(value).ok())
        .ok_or_else(|| malformed(format!("PCR{index} is missing or not 48 bytes")))
}

/// Checks that AWS vouches for `document` at `now`: the chain from its
/// signing certificate to the pinned root, then the COSE signature. Returns
/// the payload, which is AWS's word from then on; nothing about it is judged.
pub fn authenticate(document: &[u8], now: u64) -> Result<AttestationDocument> {
    let cose = parse_cose(document)?;
    let parsed = payload(&cose)?;
    check_chain(&parsed, now)?;
    check_signature(&cose, &parsed.certificate)?;
    Ok(parsed)
}

/// Verifies Nitro evidence at `now` against `policy` (the report data is
/// compared by [`crate::verify`]).
pub fn verify(evidence: &NitroEvidence, policy: &NitroPolicy, now: u64) -> Result<Checked> {
    judge(&authenticate(&evidence.document, now)?, policy)
}

/// Compares a document that AWS vouches for with `policy`.
fn judge(document: &AttestationDocument, policy: &NitroPolicy) -> Result<Checked> {
    let pcr0 = pcr48(document, 0)?;
    let pcr1 = pcr48(document, 1)?;
    let pcr2 = pcr48(document, 2)?;
    if [pcr0, pcr1, pcr2]
        .iter()
        .all(|pcr| pcr.iter().all(|&b| b == 0))
    {
        return Err(AttestError::policy(
            KIND,
            "the enclave runs in debug mode (its PCRs are all zero)",
        ));
    }
    if !policy.pcr0.iter().any(|m| m.0 == pcr0) {
        return Err(AttestError::policy(
            KIND,
            format!("PCR0 {} is not on the allow-list", hex::encode(pcr0)),
        ));
    }
    for (index, allowed, value) in [(1, &policy.pcr1, pcr1), (2, &policy.pcr2, pcr2)] {
        if !allowed.is_empty() && !allowed.iter().any(|m| m.0 == value) {
            return Err(AttestError::policy(
                KIND,
                format!("PCR{index} {} is not on the allow-list", hex::encode(value)),
            ));
        }
    }
    Ok(Checked {
        measurement: pcr0,
        platform: format!(
            "AWS Nitro Enclave {}, document made at {} ms",
            document.module_id, document.timestamp_ms
        ),
    })
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;
    use crate::policy::Digest48;
    use crate::vectors;

    /// Evervault's documents: `beta-valid-…` from an enclave in production
    /// mode, made at 2022-10-13T08:58:02Z; `valid-…-base64` from an enclave
    /// started in debug mode (PCR0..2 are zero), verified by its publisher's
    /// tests at 2023-09-18T15:16:05Z. The leaf certificates live about three
    /// hours.
    fn document(test: &str, which: &str) -> Option<(Vec<u8>, u64)> {
        let dir = vectors::dir(test, "nitro")?;
        Some(match which {
            "genuine" => (
                vectors::read(&dir, "beta-valid-attestation-doc-bytes"),
                vectors::unix("2022-10-13T09:00:00Z"),
            ),
            "debug" => {
                let text =
                    String::from_utf8(vectors::read(&dir, "valid-attestation-doc-base64")).unwrap();
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .unwrap();
                (bytes, vectors::unix("2023-09-18T15:16:05Z"))
            }
            _ => unreachable!("no such sample"),
        })
    }

    fn trusting_its_pcr0(document: &[u8], now: u64) -> NitroPolicy {
        let parsed = authenticate(document, now).unwrap();
        NitroPolicy::trusting(vec![Digest48(pcr48(&parsed, 0).unwrap())])
    }

    /// The document with its payload map edited and re-encoded (which also
    /// invalidates the signature, checked after the chain).
    fn with_payload_edit(document: &[u8], edit: impl FnOnce(&mut Vec<(Value, Value)>)) -> Vec<u8> {
        let mut cose = parse_cose(document).unwrap();
        let Value::Map(mut entries) =
            ciborium::de::from_reader::<Value, _>(cose.payload.as_deref().unwrap()).unwrap()
        else {
            panic!("payload is a map");
        };
        edit(&mut entries);
        let mut encoded = Vec::new();
        ciborium::ser::into_writer(&Value::Map(entries), &mut encoded).unwrap();
        cose.payload = Some(encoded);
        cose.to_vec().unwrap()
    }

    fn entry<'a>(entries: &'a mut [(Value, Value)], name: &str) -> &'a mut Value {
        &mut entries
            .iter_mut()
            .find(|(key, _)| key.as_text() == Some(name))
            .unwrap()
            .1
    }

    fn bundle(entries: &mut [(Value, Value)]) -> &mut Vec<Value> {
        match entry(entries, "cabundle") {
            Value::Array(items) => items,
            _ => panic!("cabundle is an array"),
        }
    }

    #[test]
    fn the_genuine_document_verifies_at_its_time() {
        let Some((document, now)) = document("the_genuine_document_verifies", "genuine") else {
            return;
        };
        let parsed = authenticate(&document, now).unwrap();
        let root = digest::digest(&digest::SHA256, &parsed.cabundle[0]);
        assert_eq!(root.as_ref(), AWS_NITRO_ROOT_G1_SHA256);
        let policy = trusting_its_pcr0(&document, now);
        assert_eq!(
            claimed_measurement(&document).unwrap(),
            pcr48(&parsed, 0).unwrap()
        );
        let checked = verify(&NitroEvidence { document }, &policy, now).unwrap();
        assert_eq!(checked.measurement, pcr48(&parsed, 0).unwrap());
        assert!(checked.platform.contains(&parsed.module_id));
    }

    #[test]
    fn debug_mode_documents_are_refused() {
        let test = "debug_mode_documents_are_refused";
        // AWS vouches for this one (at its time); it is refused for debug
        // mode, even under a policy that lists the zero PCR0.
        let Some((debug, now)) = document(test, "debug") else {
            return;
        };
        assert!(authenticate(&debug, now).is_ok());
        assert!(authenticate(&debug, vectors::unix("2023-09-18T17:18:00Z")).is_ok());
        let trusting_zero = NitroPolicy::trusting(vec![Digest48([0; 48])]);
        assert!(matches!(
            verify(&NitroEvidence { document: debug }, &trusting_zero, now),
            Err(AttestError::Policy { rule, .. }) if rule.contains("debug mode")
        ));
        // The other debug-mode sample: refused for debug mode at its own
        // time, and for its expired chain at the time its publisher's tests
        // use (where they see it fail trust-chain validation).
        let dir = vectors::dir(test, "nitro").unwrap();
        let beta_debug = NitroEvidence {
            document: vectors::read(&dir, "beta-debug-mode-attestation-doc-bytes"),
        };
        assert!(matches!(
            verify(&beta_debug, &trusting_zero, vectors::unix("2022-10-12T13:51:00Z")),
            Err(AttestError::Policy { rule, .. }) if rule.contains("debug mode")
        ));
        assert!(matches!(
            verify(&beta_debug, &trusting_zero, now),
            Err(AttestError::Chain { .. })
        ));
    }

    #[test]
    fn outside_the_leafs_validity_fails() {
        let Some((document, _)) = document("outside_the_leafs_validity_fails", "genuine") else {
            return;
        };
        for when in [
            "2022-10-13T08:00:00Z",
            "2022-10-13T12:30:00Z",
            "2030-01-01T00:00:00Z",
        ] {
            assert!(
                matches!(
                    authenticate(&document, vectors::unix(when)),
                    Err(AttestError::Chain { .. })
                ),
                "{when}"
            );
        }
    }

    #[test]
    fn a_flipped_byte_in_the_signed_document_fails() {
        let Some((document, now)) =
            document("a_flipped_byte_in_the_signed_document_fails", "genuine")
        else {
            return;
        };
        let accepted: Vec<usize> = (0..document.len())
            .step_by(3)
            .chain([document.len() - 1])
            .filter(|&offset| {
                let mut tampered = document.clone();
                tampered[offset] ^= 0x01;
                authenticate(&tampered, now).is_ok()
            })
            .collect();
        assert!(accepted.is_empty(), "flips at {accepted:?} were accepted");
    }

    #[test]
    fn a_missing_wrong_or_foreign_certificate_fails() {
        let Some((document, now)) =
            document("a_missing_wrong_or_foreign_certificate_fails", "genuine")
        else {
            return;
        };
        let bundle_len = authenticate(&document, now).unwrap().cabundle.len();
        assert!(bundle_len >= 3, "root and at least two intermediates");
        for drop in 1..bundle_len {
            let missing = with_payload_edit(&document, |entries| {
                bundle(entries).remove(drop);
            });
            assert!(
                matches!(authenticate(&missing, now), Err(AttestError::Chain { .. })),
                "without intermediate {drop}"
            );
        }
        let duplicated = with_payload_edit(&document, |entries| {
            let items = bundle(entries);
            items[2] = items[1].clone();
        });
        assert!(matches!(
            authenticate(&duplicated, now),
            Err(AttestError::Chain { .. })
        ));
        // Another root (here: an intermediate posing as one) is not the pinned one.
        let foreign_root = with_payload_edit(&document, |entries| {
            bundle(entries).remove(0);
        });
        assert!(matches!(
            authenticate(&foreign_root, now),
            Err(AttestError::Chain { detail, .. }) if detail.contains("not the AWS Nitro Enclaves root")
        ));
        // A genuine chain over another payload: the signature fails.
        let other_user_data = with_payload_edit(&document, |entries| {
            *entry(entries, "user_data") = Value::Bytes(vec![7; 64]);
        });
        assert!(matches!(
            authenticate(&other_user_data, now),
            Err(AttestError::Signature { .. })
        ));
    }

    #[test]
    fn unlisted_pcrs_are_refused() {
        let Some((document, now)) = document("unlisted_pcrs_are_refused", "genuine") else {
            return;
        };
        let parsed = authenticate(&document, now).unwrap();
        let pcr = |index| Digest48(pcr48(&parsed, index).unwrap());
        let evidence = NitroEvidence { document };
        let refusal = |policy: &NitroPolicy| match verify(&evidence, policy, now) {
            Err(AttestError::Policy { rule, .. }) => rule,
            other => panic!("expected a policy refusal, got {other:?}"),
        };
        assert!(refusal(&NitroPolicy::trusting(vec![Digest48([0x5a; 48])])).starts_with("PCR0"));
        assert!(refusal(&NitroPolicy::trusting(vec![])).starts_with("PCR0"));
        let mut pinned = NitroPolicy::trusting(vec![pcr(0)]);
        pinned.pcr1 = vec![pcr(1)];
        pinned.pcr2 = vec![Digest48([0x5a; 48])];
        assert!(refusal(&pinned).starts_with("PCR2"));
        pinned.pcr2.push(pcr(2));
        assert!(verify(&evidence, &pinned, now).is_ok());
    }

    #[test]
    fn documents_without_64_bytes_of_user_data_commit_to_nothing() {
        let Some((document, _)) = document("documents_without_64_bytes_of_user_data", "debug")
        else {
            return;
        };
        // This document's user_data is Evervault's own (91 bytes).
        assert!(matches!(
            claimed_report_data(&document),
            Err(AttestError::BindingMismatch)
        ));
        for data in [
            Value::Null,
            Value::Bytes(vec![1; 32]),
            Value::Bytes(vec![1; 65]),
        ] {
            let edited =
                with_payload_edit(&document, |entries| *entry(entries, "user_data") = data);
            assert!(matches!(
                claimed_report_data(&edited),
                Err(AttestError::BindingMismatch)
            ));
        }
        let edited = with_payload_edit(&document, |entries| {
            *entry(entries, "user_data") = Value::Bytes(vec![9; 64]);
        });
        assert_eq!(claimed_report_data(&edited).unwrap(), [9; 64]);
    }

    #[test]
    fn malformed_documents_are_refused_clearly() {
        for bad in [&b""[..], b"\x84\x40\xa0\x40\x40", b"not cbor at all"] {
            assert!(matches!(
                claimed_report_data(bad),
                Err(AttestError::Malformed { .. })
            ));
        }
    }
}
