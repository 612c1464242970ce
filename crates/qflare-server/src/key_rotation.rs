//! `qflare server-key rotate`: a new ML-DSA key and TLS certificate, handed
//! over by the old key (`qflare_protocol::handover`), staged and moved into
//! place through the journal of `key_chain`, published to devices in
//! `/v1/server-info`, and audited at the server's next start.
//!
//! | file | after a rotation |
//! |---|---|
//! | `server-key.handovers.json` | one more hand-over (public) |
//! | `server-key.json`, `server-key.pub.json` | the new key; the old seed is gone |
//! | `tls/cert.pem`, `tls/key.pem` | the new certificate, when the server makes its own |

use std::fs;
use std::path::Path;

use qflare_protocol::handover::{self, MAX_CHAIN};
use qflare_protocol::identity::ServerFingerprint;
use qflare_protocol::sig::SigningKey;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::identity::{
    IdentityError, PublicKeyFile, ServerIdentity, SigningKeyFile, generate_certificate, invalid,
    io, write_new_file,
};
use crate::key_chain::{COMPLETE_MARKER, HANDOVERS_FILE, STAGING_DIR, complete_staged};

/// What [`rotate`] did.
#[derive(Debug, Clone)]
pub struct RotationSummary {
    /// The fingerprint devices pinned until now.
    pub old_fingerprint: ServerFingerprint,
    /// The fingerprint they move to.
    pub new_fingerprint: ServerFingerprint,
    /// Hand-overs in the published chain, this one included.
    pub chain_length: usize,
}

/// Replaces the server's key (and, when the server makes its own, its TLS
/// certificate) with new ones handed over by the current key. Takes effect
/// at the server's next start; every replica sharing the state directory
/// must restart. With a configured certificate the operator passes the new
/// one (a PEM file, end entity first) as `configured_certificate` and puts
/// it and its private key at the configured paths before that start.
pub fn rotate(
    config: &Config,
    configured_certificate: Option<&Path>,
    now: u64,
) -> Result<RotationSummary, IdentityError> {
    let state_dir = &config.server.state_dir;
    let current = ServerIdentity::load_or_create(config)?;
    let new_key = SigningKey::generate(config.crypto.server_signature_suite, &mut rand::rng())
        .map_err(|e| invalid(state_dir, e.to_string()))?;
    let self_made = config.server.tls_certificate.is_none();
    let (certificate_der, tls_files) = match (self_made, configured_certificate) {
        (true, None) => {
            let (cert_pem, key_pem) = generate_certificate(
                &config.server.tls_subject_alt_names,
                &state_dir.join("tls/cert.pem"),
            )?;
            let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|e| invalid(state_dir, e.to_string()))?
                .to_vec();
            (der, Some((cert_pem, key_pem)))
        }
        (false, Some(path)) => {
            let der = CertificateDer::pem_file_iter(path)
                .map_err(|e| invalid(path, e.to_string()))?
                .next()
                .ok_or_else(|| invalid(path, "no certificate in the file"))?
                .map_err(|e| invalid(path, e.to_string()))?
                .to_vec();
            (der, None)
        }
        (true, Some(_)) => {
            return Err(invalid(
                state_dir,
                "the server makes its own certificate (server.tls_certificate is unset); rotate without --tls-certificate",
            ));
        }
        (false, None) => {
            return Err(invalid(
                state_dir,
                "the certificate is configured (server.tls_certificate): pass the new key's certificate with --tls-certificate",
            ));
        }
    };
    let link = handover::build(&current.signing_key, &new_key, &certificate_der, now)
        .map_err(|e| invalid(state_dir, e.to_string()))?;
    let mut chain = current.key_handovers.clone();
    chain.push(link);
    if chain.len() > MAX_CHAIN {
        return Err(invalid(
            &state_dir.join(HANDOVERS_FILE),
            format!("already {MAX_CHAIN} hand-overs"),
        ));
    }

    let staging = state_dir.join(STAGING_DIR);
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    crate::identity::ensure_private_dir(&staging)?;
    let seed = SigningKeyFile::new(&new_key);
    write_new_file(
        &staging.join("server-key.json"),
        &to_json(&seed, &staging)?,
        0o600,
    )?;
    let public = PublicKeyFile::new(new_key.verifying_key());
    write_new_file(
        &staging.join("server-key.pub.json"),
        &to_json(&public, &staging)?,
        0o644,
    )?;
    write_new_file(
        &staging.join(HANDOVERS_FILE),
        &to_json(&chain, &staging)?,
        0o644,
    )?;
    if let Some((cert_pem, key_pem)) = &tls_files {
        write_new_file(&staging.join("key.pem"), key_pem.as_bytes(), 0o600)?;
        write_new_file(&staging.join("cert.pem"), cert_pem.as_bytes(), 0o644)?;
    }
    write_new_file(&staging.join(COMPLETE_MARKER), b"", 0o600)?;
    complete_staged(state_dir).map_err(io(&staging))?;
    Ok(RotationSummary {
        old_fingerprint: current.fingerprint,
        new_fingerprint: ServerFingerprint::compute(&certificate_der, new_key.verifying_key()),
        chain_length: chain.len(),
    })
}

fn to_json<T: serde::Serialize>(
    value: &T,
    path: &Path,
) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
    serde_json::to_vec_pretty(value)
        .map(Zeroizing::new)
        .map_err(|e| invalid(path, e.to_string()))
}
