//! What the CLI's integration tests share.

use std::path::PathBuf;

/// The MNIST directory from `QFLARE_DATA_DIR`, or `None` to skip; a missing
/// directory fails instead when `QFLARE_REQUIRE_DATA=1` (CI).
pub fn data_dir() -> Option<PathBuf> {
    match std::env::var("QFLARE_DATA_DIR") {
        Ok(dir) if PathBuf::from(&dir).exists() => Some(PathBuf::from(dir)),
        _ if std::env::var("QFLARE_REQUIRE_DATA").is_ok_and(|v| v == "1") => {
            panic!("QFLARE_REQUIRE_DATA=1 but QFLARE_DATA_DIR does not name the MNIST directory")
        }
        _ => None,
    }
}
