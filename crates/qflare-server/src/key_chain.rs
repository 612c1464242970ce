//! The chain of server key hand-overs as the state directory keeps it, and
//! the journal that makes a rotation all-or-nothing (written by
//! `key_rotation`, completed here at every start, before the identity loads).
//!
//! A rotation replaces several files, and a crash must never leave a mix (a
//! new certificate with the old key would lock every device out). So
//! everything new is first written to `rotation.staged/` and synced, then a
//! `complete` marker is written, and only then are the files renamed into
//! place. [`complete_staged`] discards a staged rotation without its marker
//! (never finished) and rolls one with the marker forward, rename by rename,
//! which is safe to repeat after another crash.

use std::fs;
use std::path::Path;

use qflare_protocol::handover::{MAX_CHAIN, ServerKeyHandover};
use qflare_protocol::sig::VerifyingKey;

/// The published chain of hand-overs, in the state directory.
pub const HANDOVERS_FILE: &str = "server-key.handovers.json";
/// Where a rotation stages its files.
pub const STAGING_DIR: &str = "rotation.staged";
/// Written last into [`STAGING_DIR`]: the staged rotation is whole.
pub const COMPLETE_MARKER: &str = "complete";

/// What a rotation stages, as (name in the staging directory, path in the
/// state directory), in the order they are moved into place.
pub const STAGED: [(&str, &str); 5] = [
    ("cert.pem", "tls/cert.pem"),
    ("key.pem", "tls/key.pem"),
    ("server-key.pub.json", "server-key.pub.json"),
    ("server-key.handovers.json", HANDOVERS_FILE),
    ("server-key.json", "server-key.json"),
];

/// Reads the chain of hand-overs; empty when the key was never rotated.
/// The reason is for the caller to attach to the file's path.
pub fn load_handovers(state_dir: &Path) -> Result<Vec<ServerKeyHandover>, String> {
    let path = state_dir.join(HANDOVERS_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = fs::read(&path).map_err(|e| e.to_string())?;
    let chain: Vec<ServerKeyHandover> = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    if chain.len() > MAX_CHAIN {
        return Err(format!(
            "more than {MAX_CHAIN} hand-overs; devices would not walk them"
        ));
    }
    Ok(chain)
}

/// Every key that has been the server's, oldest first, ending with
/// `current`: each hand-over verified and each linked to the next. Audit
/// checkpoints signed by any of them are the server's.
pub fn key_history(
    current: &VerifyingKey,
    chain: &[ServerKeyHandover],
) -> Result<Vec<VerifyingKey>, String> {
    let mut keys = Vec::with_capacity(chain.len() + 1);
    for link in chain {
        let old = link.old_key().map_err(|e| e.to_string())?;
        if keys.last().is_some_and(|previous| previous != &old) {
            return Err("a hand-over does not start where the previous one ended".into());
        }
        let new = link.verify(&old).map_err(|e| e.to_string())?;
        if keys.is_empty() {
            keys.push(old);
        }
        keys.push(new);
    }
    match keys.last() {
        None => Ok(vec![current.clone()]),
        Some(last) if last == current => Ok(keys),
        Some(_) => Err("the last hand-over does not name the current server key".into()),
    }
}

/// Finishes or discards a staged rotation (see the module docs).
pub fn complete_staged(state_dir: &Path) -> std::io::Result<()> {
    let staging = state_dir.join(STAGING_DIR);
    if !staging.exists() {
        return Ok(());
    }
    if !staging.join(COMPLETE_MARKER).exists() {
        tracing::warn!(path = %staging.display(), "discarding a key rotation that was never finished");
        return fs::remove_dir_all(&staging);
    }
    for (staged, target) in STAGED {
        let from = staging.join(staged);
        if from.exists() {
            fs::rename(&from, state_dir.join(target))?;
        }
    }
    for dir in [state_dir.join("tls"), state_dir.to_path_buf()] {
        if dir.exists() {
            fs::File::open(&dir)?.sync_all()?;
        }
    }
    fs::remove_dir_all(&staging)?;
    tracing::info!("completed the staged server key rotation");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::identity::ServerIdentity;

    /// Owner-only, as the server requires of secret files.
    fn write_private(path: &Path, bytes: &[u8]) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap();
        file.write_all(bytes).unwrap();
    }

    fn config_in(dir: &Path) -> Config {
        let mut config = Config::default();
        config.server.state_dir = dir.to_path_buf();
        config
    }

    #[test]
    fn rotations_chain_and_the_identity_checks_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let first = ServerIdentity::load_or_create(&config).unwrap();
        crate::key_rotation::rotate(&config, None, 100).unwrap();
        crate::key_rotation::rotate(&config, None, 200).unwrap();
        let third = ServerIdentity::load_or_create(&config).unwrap();
        assert_eq!(third.key_handovers.len(), 2);
        assert_eq!(third.key_history.len(), 3);
        assert_eq!(&third.key_history[0], first.signing_key.verifying_key());
        assert_eq!(&third.key_history[2], third.signing_key.verifying_key());
        assert!(!third.fingerprint.matches(&first.fingerprint));
        assert!(!dir.path().join(STAGING_DIR).exists());

        // A chain edited on disk no longer verifies, and the server says so
        // at start rather than serving it to devices.
        let path = dir.path().join(HANDOVERS_FILE);
        let mut chain = load_handovers(dir.path()).unwrap();
        chain[0].issued_at += 1;
        fs::write(&path, serde_json::to_vec(&chain).unwrap()).unwrap();
        let err = ServerIdentity::load_or_create(&config).unwrap_err();
        assert!(err.to_string().contains(HANDOVERS_FILE), "{err}");
    }

    #[test]
    fn a_staged_rotation_is_finished_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let original = ServerIdentity::load_or_create(&config).unwrap();
        let key_file = dir.path().join("server-key.json");
        let before = fs::read(&key_file).unwrap();

        // Crashed while staging (no marker): discarded, nothing changes.
        let staging = dir.path().join(STAGING_DIR);
        fs::create_dir(&staging).unwrap();
        write_private(&staging.join("server-key.json"), b"half written");
        let reloaded = ServerIdentity::load_or_create(&config).unwrap();
        assert!(reloaded.fingerprint.matches(&original.fingerprint));
        assert_eq!(fs::read(&key_file).unwrap(), before);
        assert!(!staging.exists());

        // Crashed after the marker, midway through the renames: the start
        // rolls forward to the whole new identity.
        crate::key_rotation::rotate(&config, None, 100).unwrap();
        let rotated = ServerIdentity::load_or_create(&config).unwrap();
        let new_files: Vec<(String, Vec<u8>)> = STAGED
            .iter()
            .map(|(_, target)| {
                (
                    (*target).to_owned(),
                    fs::read(dir.path().join(target)).unwrap(),
                )
            })
            .collect();
        // Put the old identity back and stage the new one again, as if the
        // process died after moving only the certificate.
        let rolled_back = tempfile::tempdir().unwrap();
        let second = config_in(rolled_back.path());
        ServerIdentity::load_or_create(&second).unwrap();
        let staging = rolled_back.path().join(STAGING_DIR);
        fs::create_dir(&staging).unwrap();
        for ((staged, _), (target, bytes)) in STAGED.iter().zip(&new_files) {
            if *staged == "cert.pem" {
                write_private(&rolled_back.path().join(target), bytes);
            } else {
                write_private(&staging.join(staged), bytes);
            }
        }
        fs::write(staging.join(COMPLETE_MARKER), b"").unwrap();
        let finished = ServerIdentity::load_or_create(&second).unwrap();
        assert!(finished.fingerprint.matches(&rotated.fingerprint));
        assert!(!staging.exists());
    }
}
