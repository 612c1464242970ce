//! The device's identity file: who it is, which server it trusts, and its
//! private keys. Written at enrollment into a 0700 directory as a 0600 file
//! that enrollment never overwrites (key rotation replaces it atomically);
//! refused at load if others can read it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use qflare_protocol::identity::{DeviceId, DeviceKeys, ServerFingerprint};
use qflare_protocol::kem::{KemKeyPair, KemPublicKey, KemSecretKey};
use qflare_protocol::secret::SecretBytes;
use qflare_protocol::sig::{SigningKey, VerifyingKey};
use qflare_protocol::wire::b64;
use qflare_protocol::{KemSuite, SignatureSuite};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::EdgeError;

/// The file name inside the identity directory.
pub const IDENTITY_FILE: &str = "identity.json";
/// The default identity directory.
pub const DEFAULT_IDENTITY_DIR: &str = "./qflare-edge";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    format: u32,
    device_id: DeviceId,
    device_name: String,
    server_url: String,
    server_fingerprint: String,
    #[serde(with = "qflare_protocol::wire::hex_array")]
    server_certificate_sha256: [u8; 32],
    server_signature_suite: SignatureSuite,
    #[serde(with = "b64")]
    server_verifying_key: Vec<u8>,
    kem_suite: KemSuite,
    #[serde(with = "b64")]
    kem_public_key: Vec<u8>,
    #[serde(with = "b64")]
    kem_secret_key: Vec<u8>,
    signature_suite: SignatureSuite,
    #[serde(with = "b64")]
    signing_seed: Vec<u8>,
    key_version: u32,
}

impl Drop for IdentityFile {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.kem_secret_key.zeroize();
        self.signing_seed.zeroize();
    }
}

/// An enrolled device.
#[derive(Debug)]
pub struct Identity {
    /// The id the server assigned.
    pub device_id: DeviceId,
    /// The operator's name for it.
    pub device_name: String,
    /// The server's base URL.
    pub server_url: String,
    /// The fingerprint the operator gave.
    pub server_fingerprint: ServerFingerprint,
    /// SHA-256 of the server's certificate, pinned for every connection.
    pub server_certificate_sha256: [u8; 32],
    /// The server's ML-DSA key, pinned for every handshake.
    pub server_key: VerifyingKey,
    /// The device's long-term keys.
    pub keys: DeviceKeys,
    /// 1 at enrollment, +1 per rotation.
    pub key_version: u32,
}

impl Identity {
    fn to_file(&self) -> IdentityFile {
        IdentityFile {
            format: 1,
            device_id: self.device_id,
            device_name: self.device_name.clone(),
            server_url: self.server_url.clone(),
            server_fingerprint: self.server_fingerprint.to_string(),
            server_certificate_sha256: self.server_certificate_sha256,
            server_signature_suite: self.server_key.suite(),
            server_verifying_key: self.server_key.as_bytes().to_vec(),
            kem_suite: self.keys.kem.public.suite(),
            kem_public_key: self.keys.kem.public.as_bytes().to_vec(),
            kem_secret_key: self.keys.kem.secret.to_secret_bytes().expose().to_vec(),
            signature_suite: self.keys.signing.suite(),
            signing_seed: self.keys.signing.seed().expose().to_vec(),
            key_version: self.key_version,
        }
    }

    fn from_file(file: &IdentityFile) -> Result<Self, EdgeError> {
        if file.format != 1 {
            return Err(EdgeError::Identity(format!(
                "unknown identity format {}",
                file.format
            )));
        }
        let kem = KemKeyPair {
            secret: KemSecretKey::from_bytes(
                file.kem_suite,
                SecretBytes::from_slice(&file.kem_secret_key),
            )?,
            public: KemPublicKey::from_bytes(file.kem_suite, file.kem_public_key.clone())?,
        };
        let signing = SigningKey::from_seed(
            file.signature_suite,
            SecretBytes::from_slice(&file.signing_seed),
        )?;
        Ok(Self {
            device_id: file.device_id,
            device_name: file.device_name.clone(),
            server_url: file.server_url.clone(),
            server_fingerprint: ServerFingerprint::parse(&file.server_fingerprint)?,
            server_certificate_sha256: file.server_certificate_sha256,
            server_key: VerifyingKey::from_bytes(
                file.server_signature_suite,
                file.server_verifying_key.clone(),
            )?,
            keys: DeviceKeys { kem, signing },
            key_version: file.key_version,
        })
    }

    /// The identity file's path in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(IDENTITY_FILE)
    }

    /// Writes a new identity; refuses to overwrite an existing one.
    pub fn create(&self, dir: &Path) -> Result<(), EdgeError> {
        let path = Self::path(dir);
        if path.exists() {
            return Err(EdgeError::Identity(format!(
                "{} already exists; refusing to overwrite an enrolled identity (use --identity DIR for another)",
                path.display()
            )));
        }
        if !dir.exists() {
            fs::create_dir_all(dir)
                .map_err(|e| EdgeError::Identity(format!("{}: {e}", dir.display())))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| EdgeError::Identity(format!("{}: {e}", dir.display())))?;
        }
        self.write(&path)
    }

    /// Replaces the identity after a key rotation (atomically: write, then rename).
    pub fn replace(&self, dir: &Path) -> Result<(), EdgeError> {
        let path = Self::path(dir);
        let temporary = dir.join(format!("{IDENTITY_FILE}.new"));
        let _ = fs::remove_file(&temporary);
        self.write(&temporary)?;
        fs::rename(&temporary, &path)
            .map_err(|e| EdgeError::Identity(format!("{}: {e}", path.display())))
    }

    fn write(&self, path: &Path) -> Result<(), EdgeError> {
        let text = Zeroizing::new(
            serde_json::to_vec_pretty(&self.to_file())
                .map_err(|e| EdgeError::Identity(e.to_string()))?,
        );
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| EdgeError::Identity(format!("{}: {e}", path.display())))?;
        file.write_all(&text)
            .and_then(|()| file.sync_all())
            .map_err(|e| EdgeError::Identity(format!("{}: {e}", path.display())))
    }

    /// Loads the identity from `dir`.
    pub fn load(dir: &Path) -> Result<Self, EdgeError> {
        let path = Self::path(dir);
        let meta = fs::metadata(&path).map_err(|e| {
            EdgeError::Identity(format!(
                "{}: {e} (enroll first: qflare-edge enroll ...)",
                path.display()
            ))
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(EdgeError::Identity(format!(
                "{} is readable by other users (mode {mode:o}); run: chmod 600 {}",
                path.display(),
                path.display()
            )));
        }
        let text = Zeroizing::new(
            fs::read(&path).map_err(|e| EdgeError::Identity(format!("{}: {e}", path.display())))?,
        );
        let file: IdentityFile = serde_json::from_slice(&text)
            .map_err(|e| EdgeError::Identity(format!("{}: {e}", path.display())))?;
        Self::from_file(&file)
    }
}
