//! The device's identity file: who it is, which server it trusts, and its
//! private keys. Written at enrollment into a 0700 directory as a 0600 file
//! that enrollment never overwrites (key rotation replaces it atomically);
//! always written whole (temporary file, sync, link or rename), so a crash
//! never leaves a torn key file; refused at load if others can read it. A
//! rotation's new keys are in the file before the request leaves the device
//! (`pending_keys`), so a lost answer cannot strand the device with keys
//! only the server knows.

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

/// How a write puts the identity file in place.
#[derive(Clone, Copy)]
enum Placement {
    /// Only where there is none yet.
    New,
    /// Over the existing one, atomically.
    Replace,
}

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
    /// Keys of a rotation sent but not (yet) known to have taken effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_keys: Option<KeysFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    alternate_urls: Vec<String>,
}

impl Drop for IdentityFile {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.kem_secret_key.zeroize();
        self.signing_seed.zeroize();
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    kem_suite: KemSuite,
    #[serde(with = "b64")]
    kem_public_key: Vec<u8>,
    #[serde(with = "b64")]
    kem_secret_key: Vec<u8>,
    signature_suite: SignatureSuite,
    #[serde(with = "b64")]
    signing_seed: Vec<u8>,
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.kem_secret_key.zeroize();
        self.signing_seed.zeroize();
    }
}

impl KeysFile {
    fn from_keys(keys: &DeviceKeys) -> Self {
        Self {
            kem_suite: keys.kem.public.suite(),
            kem_public_key: keys.kem.public.as_bytes().to_vec(),
            kem_secret_key: keys.kem.secret.to_secret_bytes().expose().to_vec(),
            signature_suite: keys.signing.suite(),
            signing_seed: keys.signing.seed().expose().to_vec(),
        }
    }

    fn to_keys(&self) -> Result<DeviceKeys, EdgeError> {
        let kem = KemKeyPair {
            secret: KemSecretKey::from_bytes(
                self.kem_suite,
                SecretBytes::from_slice(&self.kem_secret_key),
            )?,
            public: KemPublicKey::from_bytes(self.kem_suite, self.kem_public_key.clone())?,
        };
        let signing = SigningKey::from_seed(
            self.signature_suite,
            SecretBytes::from_slice(&self.signing_seed),
        )?;
        Ok(DeviceKeys { kem, signing })
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
    /// New keys of a rotation that was sent but whose answer never came:
    /// written to the file before the request goes out, so that whichever
    /// keys the server ended up with, the device still holds them
    /// (`client::load_identity` finds out which at the next start).
    pub pending_keys: Option<DeviceKeys>,
    /// Other replicas of the same server (same fingerprint and
    /// certificate), tried in turn when the one in use cannot be reached.
    pub alternate_urls: Vec<String>,
}

impl Identity {
    fn to_file(&self) -> IdentityFile {
        let keys = KeysFile::from_keys(&self.keys);
        IdentityFile {
            format: 1,
            device_id: self.device_id,
            device_name: self.device_name.clone(),
            server_url: self.server_url.clone(),
            server_fingerprint: self.server_fingerprint.to_string(),
            server_certificate_sha256: self.server_certificate_sha256,
            server_signature_suite: self.server_key.suite(),
            server_verifying_key: self.server_key.as_bytes().to_vec(),
            kem_suite: keys.kem_suite,
            kem_public_key: keys.kem_public_key.clone(),
            kem_secret_key: keys.kem_secret_key.clone(),
            signature_suite: keys.signature_suite,
            signing_seed: keys.signing_seed.clone(),
            key_version: self.key_version,
            pending_keys: self.pending_keys.as_ref().map(KeysFile::from_keys),
            alternate_urls: self.alternate_urls.clone(),
        }
    }

    fn from_file(file: &IdentityFile) -> Result<Self, EdgeError> {
        if file.format != 1 {
            return Err(EdgeError::Identity(format!(
                "unknown identity format {}",
                file.format
            )));
        }
        let keys = KeysFile {
            kem_suite: file.kem_suite,
            kem_public_key: file.kem_public_key.clone(),
            kem_secret_key: file.kem_secret_key.clone(),
            signature_suite: file.signature_suite,
            signing_seed: file.signing_seed.clone(),
        }
        .to_keys()?;
        let pending_keys = file
            .pending_keys
            .as_ref()
            .map(KeysFile::to_keys)
            .transpose()?;
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
            keys,
            key_version: file.key_version,
            pending_keys,
            alternate_urls: file.alternate_urls.clone(),
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
        self.write(dir, Placement::New)
    }

    /// Replaces the identity (after a key rotation, or to record keys about
    /// to be rotated to).
    pub fn replace(&self, dir: &Path) -> Result<(), EdgeError> {
        self.write(dir, Placement::Replace)
    }

    /// Writes the file whole or not at all: to a temporary file (0600) in
    /// `dir`, synced, then linked (a new identity: never over an existing
    /// one) or renamed (a replacement) into place, and the directory synced.
    /// A crash leaves the old file or the new one, never a torn key file.
    fn write(&self, dir: &Path, placement: Placement) -> Result<(), EdgeError> {
        let path = Self::path(dir);
        let fail =
            |p: &Path, e: std::io::Error| EdgeError::Identity(format!("{}: {e}", p.display()));
        let text = Zeroizing::new(
            serde_json::to_vec_pretty(&self.to_file())
                .map_err(|e| EdgeError::Identity(e.to_string()))?,
        );
        let temporary = dir.join(format!(".{IDENTITY_FILE}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&temporary);
        let written = (|| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temporary)
                .map_err(|e| fail(&temporary, e))?;
            file.write_all(&text)
                .and_then(|()| file.sync_all())
                .map_err(|e| fail(&temporary, e))?;
            match placement {
                Placement::New => fs::hard_link(&temporary, &path).map_err(|e| fail(&path, e)),
                Placement::Replace => fs::rename(&temporary, &path).map_err(|e| fail(&path, e)),
            }
        })();
        let _ = fs::remove_file(&temporary);
        written?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail(dir, e))
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
