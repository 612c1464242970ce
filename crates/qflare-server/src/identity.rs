//! The server's long-term identity in its state directory.
//!
//! | file | holds | mode |
//! |---|---|---|
//! | `server-key.json` | ML-DSA suite and 32-byte seed | 0600 |
//! | `server-key.pub.json` | the verifying key (for `qflare audit verify`) | 0644 |
//! | `tls/cert.pem`, `tls/key.pem` | self-signed ECDSA-P256 certificate when none is configured | 0644 / 0600 |
//! | `storage.key` | 32 bytes wrapping session secrets at rest (and keying the replicas' link) | 0600 |
//! | `admin-token` | the admin bearer token when `QFLARE_ADMIN_TOKEN` is unset | 0600 |
//! | `server-key.handovers.json` | the chain of key hand-overs, after a rotation (`key_rotation`) | 0644 |
//!
//! Secret files are written whole to a temporary file (mode 0600, inside a
//! 0700 directory), synced, and linked into place, so a crash never leaves an
//! empty or torn secret; a secret file that others can read is refused at
//! start-up, as ssh does, and an admin-token file is held to the same rule as
//! `QFLARE_ADMIN_TOKEN`. Several replicas share one identity by sharing these files.
//!
//! The TLS certificate is ECDSA so that browsers can open the web pages; the
//! key exchange is still hybrid post-quantum (X25519MLKEM768), which is what
//! store-now-decrypt-later threatens, and authentication that must resist a
//! future quantum attacker comes from the ML-DSA key the fingerprint pins.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use qflare_protocol::SignatureSuite;
use qflare_protocol::at_rest::AtRestKey;
use qflare_protocol::handover::ServerKeyHandover;
use qflare_protocol::identity::ServerFingerprint;
use qflare_protocol::secret::SecretBytes;
use qflare_protocol::sig::{SigningKey, VerifyingKey};
use qflare_protocol::wire::{from_base64url, to_base64url};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::Config;

/// Problems with the state directory or its files.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    /// The inner error is part of the message, not a `source()`, so a chain
    /// printed with `{:#}` says it once.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A secret file is readable by group or others.
    #[error("{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// A file's contents are not what they should be.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |error| IdentityError::Io {
        path: path.to_path_buf(),
        error,
    }
}

pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
}

/// Writes a new file with `mode`, failing if it exists.
///
/// The bytes go to a temporary file in the same directory, are synced, and
/// the temporary is then hard-linked to `path`: a crash at any point leaves
/// either no file at `path` or the whole one, never an empty or torn secret
/// (which a later start would take for the real thing). Linking, unlike
/// rename, refuses to replace a file that appeared meanwhile.
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut suffix = [0u8; 8];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut suffix);
    let file_name = path.file_name().map_or_else(
        || "secret".into(),
        |name| name.to_string_lossy().into_owned(),
    );
    let temporary = dir.join(format!(".{file_name}.{}.tmp", hex::encode(suffix)));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)
            .map_err(io(&temporary))?;
        file.write_all(contents).map_err(io(&temporary))?;
        file.sync_all().map_err(io(&temporary))?;
        fs::hard_link(&temporary, path).map_err(io(path))
    })();
    // The temporary name is ours alone; whatever happened above, it goes.
    let _ = fs::remove_file(&temporary);
    written?;
    // The new directory entry is durable only once the directory is synced.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Reads a secret file, refusing it if group or others can read it.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read(path).map(Zeroizing::new).map_err(io(path))
}

/// `server-key.json`: the suite and the seed.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SigningKeyFile {
    suite: SignatureSuite,
    seed: String,
}

impl SigningKeyFile {
    pub(crate) fn new(key: &SigningKey) -> Self {
        Self {
            suite: key.suite(),
            seed: to_base64url(key.seed().expose()),
        }
    }
}

impl Drop for SigningKeyFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.seed);
    }
}

/// The published half of the server's signing key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    /// Its suite.
    pub suite: SignatureSuite,
    /// base64url of the FIPS 204 encoding.
    pub verifying_key: String,
}

impl PublicKeyFile {
    /// The file for `key`.
    pub fn new(key: &VerifyingKey) -> Self {
        Self {
            suite: key.suite(),
            verifying_key: to_base64url(key.as_bytes()),
        }
    }

    /// Reads `server-key.pub.json` from a state directory.
    pub fn load(state_dir: &Path) -> Result<VerifyingKey, IdentityError> {
        let path = state_dir.join("server-key.pub.json");
        let text = fs::read(&path).map_err(io(&path))?;
        let file: Self =
            serde_json::from_slice(&text).map_err(|e| invalid(&path, e.to_string()))?;
        let bytes = from_base64url("verifying key", &file.verifying_key)
            .map_err(|e| invalid(&path, e.to_string()))?;
        VerifyingKey::from_bytes(file.suite, bytes).map_err(|e| invalid(&path, e.to_string()))
    }
}

/// Everything the server proves itself with.
pub struct ServerIdentity {
    /// The ML-DSA key that signs enrollment answers, session hellos and audit checkpoints.
    pub signing_key: SigningKey,
    /// The TLS certificate chain (end entity first).
    pub certificate_chain: Vec<CertificateDer<'static>>,
    /// The TLS private key.
    pub tls_private_key: PrivateKeyDer<'static>,
    /// Wraps session secrets stored in the database.
    pub storage_key: AtRestKey,
    /// What one replica presents to another (derived from `storage.key`,
    /// which replicas share): the bearer of the coordinator's internal routes.
    pub replica_key: SecretBytes,
    /// What devices pin: covers the end-entity certificate and the ML-DSA key.
    pub fingerprint: ServerFingerprint,
    /// Every hand-over of the identity to a new key, oldest first
    /// (`key_rotation`); the last names this key and certificate.
    pub key_handovers: Vec<ServerKeyHandover>,
    /// Every key that has been this server's, oldest first, ending with
    /// the current one (the hand-overs verified): audit checkpoints signed
    /// by any of them are genuine.
    pub key_history: Vec<VerifyingKey>,
}

impl std::fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("signing_key", &self.signing_key)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Loads the identity from the state directory, creating what is missing.
    pub fn load_or_create(config: &Config) -> Result<Self, IdentityError> {
        let dir = &config.server.state_dir;
        ensure_private_dir(dir)?;
        crate::key_chain::complete_staged(dir)
            .map_err(io(&dir.join(crate::key_chain::STAGING_DIR)))?;
        let signing_key = load_or_create_signing_key(dir, config.crypto.server_signature_suite)?;
        let (certificate_chain, tls_private_key) = match (
            &config.server.tls_certificate,
            &config.server.tls_private_key,
        ) {
            (Some(cert), Some(key)) => load_tls(cert, key)?,
            _ => load_or_create_tls(dir, &config.server.tls_subject_alt_names)?,
        };
        let storage_key = load_or_create_secret(&dir.join("storage.key"), 32)?;
        // Replicas share the state directory, so they share this key too:
        // it is what proves one replica to another (`coordination::link`).
        let [replica_key] = qflare_protocol::crypto::hkdf_sha256(
            b"qflare replica link",
            storage_key.expose(),
            [(b"v1 bearer".as_slice(), 32)],
        )
        .map_err(|e| invalid(&dir.join("storage.key"), e.to_string()))?;
        let storage_key = AtRestKey::new(&storage_key)
            .map_err(|e| invalid(&dir.join("storage.key"), e.to_string()))?;
        let end_entity = certificate_chain
            .first()
            .ok_or_else(|| invalid(dir, "the TLS certificate chain is empty"))?;
        let fingerprint =
            ServerFingerprint::compute(end_entity.as_ref(), signing_key.verifying_key());
        let handovers = dir.join(crate::key_chain::HANDOVERS_FILE);
        let key_handovers =
            crate::key_chain::load_handovers(dir).map_err(|reason| invalid(&handovers, reason))?;
        if let Some(last) = key_handovers.last() {
            // Devices that follow the chain refuse a server whose key or
            // certificate is not the one it ends at: say so now, not to them.
            if last.new_verifying_key != signing_key.verifying_key().as_bytes() {
                return Err(invalid(
                    &handovers,
                    "the server key is not the one the last hand-over names",
                ));
            }
            if last.new_certificate != end_entity.as_ref() {
                return Err(invalid(
                    &handovers,
                    "the TLS certificate is not the one the last hand-over names (install the certificate given to `qflare server-key rotate`)",
                ));
            }
        }
        let key_history =
            crate::key_chain::key_history(signing_key.verifying_key(), &key_handovers)
                .map_err(|reason| invalid(&handovers, reason))?;
        Ok(Self {
            signing_key,
            certificate_chain,
            tls_private_key,
            storage_key,
            replica_key,
            fingerprint,
            key_handovers,
            key_history,
        })
    }
}

fn load_or_create_signing_key(
    dir: &Path,
    suite: SignatureSuite,
) -> Result<SigningKey, IdentityError> {
    let path = dir.join("server-key.json");
    let public_path = dir.join("server-key.pub.json");
    let key = if path.exists() {
        let text = read_secret_file(&path)?;
        let file: SigningKeyFile =
            serde_json::from_slice(&text).map_err(|e| invalid(&path, e.to_string()))?;
        let seed = Zeroizing::new(
            from_base64url("seed", &file.seed).map_err(|e| invalid(&path, e.to_string()))?,
        );
        SigningKey::from_seed(file.suite, SecretBytes::from_slice(&seed))
            .map_err(|e| invalid(&path, e.to_string()))?
    } else {
        let key = SigningKey::generate(suite, &mut rand::rng())
            .map_err(|e| invalid(&path, e.to_string()))?;
        let file = SigningKeyFile::new(&key);
        let text = Zeroizing::new(
            serde_json::to_vec_pretty(&file).map_err(|e| invalid(&path, e.to_string()))?,
        );
        write_new_file(&path, &text, 0o600)?;
        tracing::info!(path = %path.display(), %suite, "generated the server signing key");
        key
    };
    if !public_path.exists() {
        let public = PublicKeyFile::new(key.verifying_key());
        let text =
            serde_json::to_vec_pretty(&public).map_err(|e| invalid(&public_path, e.to_string()))?;
        write_new_file(&public_path, &text, 0o644)?;
    }
    Ok(key)
}

fn load_or_create_secret(path: &Path, len: usize) -> Result<SecretBytes, IdentityError> {
    if path.exists() {
        let bytes = read_secret_file(path)?;
        if bytes.len() != len {
            return Err(invalid(path, format!("expected {len} bytes")));
        }
        return Ok(SecretBytes::from_slice(&bytes));
    }
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    rand::Rng::fill_bytes(&mut rand::rng(), &mut bytes);
    write_new_file(path, &bytes, 0o600)?;
    Ok(SecretBytes::from_slice(&bytes))
}

fn load_tls(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IdentityError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert, e.to_string()))?;
    let key_pem = read_secret_file(key)?;
    let private =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| invalid(key, e.to_string()))?;
    Ok((chain, private))
}

fn load_or_create_tls(
    dir: &Path,
    names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IdentityError> {
    let tls_dir = dir.join("tls");
    ensure_private_dir(&tls_dir)?;
    let cert_path = tls_dir.join("cert.pem");
    let key_path = tls_dir.join("key.pem");
    if !cert_path.exists() {
        let (cert_pem, key_pem) = generate_certificate(names, &cert_path)?;
        write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
        write_new_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "generated a self-signed TLS certificate");
    }
    load_tls(&cert_path, &key_path)
}

/// A self-signed ECDSA-P256 certificate for `names`: (certificate PEM,
/// private key PEM). `path` names the file in errors.
pub(crate) fn generate_certificate(
    names: &[String],
    path: &Path,
) -> Result<(String, Zeroizing<String>), IdentityError> {
    let key = rcgen::KeyPair::generate().map_err(|e| invalid(path, e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(names.to_vec()).map_err(|e| invalid(path, e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "QFLARE server");
    let cert = params
        .self_signed(&key)
        .map_err(|e| invalid(path, e.to_string()))?;
    Ok((cert.pem(), Zeroizing::new(key.serialize_pem())))
}

/// The one rule for an admin token, whether it comes from the environment
/// or the state directory: long enough to resist guessing, and made of
/// visible ASCII so that it survives a Basic-auth header and a shell.
fn check_admin_token(token: &str) -> Result<(), &'static str> {
    if token.len() < MIN_ADMIN_TOKEN_LEN {
        return Err("the admin token must be at least 32 characters");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the admin token must be visible ASCII characters without spaces");
    }
    Ok(())
}

/// The shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// The admin token: from the environment when given, else from (or newly
/// into) the state directory. Returned as the token itself so the caller can
/// hash it; never logged.
pub fn admin_token(
    state_dir: &Path,
    from_env: Option<String>,
) -> Result<SecretBytes, IdentityError> {
    if let Some(token) = from_env.filter(|t| !t.is_empty()) {
        check_admin_token(&token)
            .map_err(|reason| invalid(Path::new("QFLARE_ADMIN_TOKEN"), reason))?;
        return Ok(SecretBytes::new(token.into_bytes()));
    }
    let path = state_dir.join("admin-token");
    if path.exists() {
        let bytes = read_secret_file(&path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| invalid(&path, "the admin token file is not UTF-8"))?
            .trim();
        check_admin_token(text).map_err(|reason| {
            invalid(
                &path,
                format!("{reason}; write a longer token into it, or delete it to have a new one generated"),
            )
        })?;
        return Ok(SecretBytes::new(text.as_bytes().to_vec()));
    }
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::Rng::fill_bytes(&mut rand::rng(), raw.as_mut());
    let token = Zeroizing::new(to_base64url(raw.as_ref()));
    write_new_file(&path, token.as_bytes(), 0o600)?;
    tracing::info!(path = %path.display(), "generated the admin token");
    Ok(SecretBytes::from_slice(token.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded_with_owner_only_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.state_dir = dir.path().join("state");
        let first = ServerIdentity::load_or_create(&config).unwrap();
        let again = ServerIdentity::load_or_create(&config).unwrap();
        assert!(first.fingerprint.matches(&again.fingerprint));
        for secret in ["server-key.json", "storage.key", "tls/key.pem"] {
            let mode = fs::metadata(config.server.state_dir.join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        let mode = fs::metadata(&config.server.state_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let public = PublicKeyFile::load(&config.server.state_dir).unwrap();
        assert_eq!(&public, first.signing_key.verifying_key());
    }

    #[test]
    fn world_readable_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.state_dir = dir.path().to_path_buf();
        ServerIdentity::load_or_create(&config).unwrap();
        let key = dir.path().join("server-key.json");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ServerIdentity::load_or_create(&config),
            Err(IdentityError::Permissions { .. })
        ));
    }

    #[test]
    fn admin_token_sources() {
        let dir = tempfile::tempdir().unwrap();
        assert!(admin_token(dir.path(), Some("short".into())).is_err());
        let env = "x".repeat(40);
        assert_eq!(
            admin_token(dir.path(), Some(env.clone())).unwrap().expose(),
            env.as_bytes()
        );
        let generated = admin_token(dir.path(), None).unwrap();
        assert_eq!(admin_token(dir.path(), None).unwrap(), generated);
        assert_eq!(generated.len(), 43);
    }

    /// A crash between creating and writing the file used to leave an empty
    /// token, and Basic auth with an empty password then opened the pages.
    #[test]
    fn admin_token_file_is_validated_like_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        for bad in [
            "",
            "  \n",
            "short-token",
            &format!("{} {}", "a".repeat(20), "b".repeat(20)),
        ] {
            let _ = fs::remove_file(&path);
            fs::write(&path, bad).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = admin_token(dir.path(), None).unwrap_err().to_string();
            assert!(err.contains("admin-token"), "{bad:?}: {err}");
        }
        assert!(
            admin_token(
                dir.path(),
                Some("tab\tinside-a-token-that-is-long-enough".into())
            )
            .is_err()
        );
        let good = "g".repeat(32);
        fs::remove_file(&path).unwrap();
        fs::write(&path, format!("{good}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            admin_token(dir.path(), None).unwrap().expose(),
            good.as_bytes()
        );
    }

    #[test]
    fn secret_files_appear_whole_and_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_new_file(&path, b"first", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let err = write_new_file(&path, b"second", 0o600).unwrap_err();
        assert!(matches!(err, IdentityError::Io { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"first");
        // No temporary is left behind, whether the write succeeded or not.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    }
}
