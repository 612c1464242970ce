//! Shared by the integration tests: finding the real data without ever
//! reaching the network.
//!
//! Tests read MNIST through `QFLARE_DATA_DIR` (the MNIST directory, or its
//! parent holding `mnist/` and `fashion-mnist/`). Without it they print a
//! skip line and pass, unless `QFLARE_REQUIRE_DATA=1`, which turns a missing
//! data set into a failure (for CI machines that must run everything).

#![allow(dead_code)] // each test binary uses a different part

use std::io::Write;
use std::path::PathBuf;

use qflare_ml::{DataSource, Dataset, DatasetKind, Download, Split};

fn require_data() -> bool {
    std::env::var("QFLARE_REQUIRE_DATA").is_ok_and(|v| v == "1")
}

/// The directory holding `kind`'s files, or `None` after printing why the
/// calling test is skipped.
pub fn data_dir(kind: DatasetKind, test: &str) -> Option<PathBuf> {
    let env = DataSource::from_env().env;
    // Look only where the variable points: no ./data, no system folder, no download.
    let mut candidates: Vec<PathBuf> = env.iter().cloned().collect();
    if let Some(parent) = env.as_ref().and_then(|p| p.parent()) {
        candidates.push(parent.to_path_buf());
    }
    for dir in candidates {
        let source = DataSource {
            explicit: Some(dir),
            config: None,
            env: None,
            local_root: PathBuf::from("/nonexistent/qflare-test-local"),
            system_root: PathBuf::from("/nonexistent/qflare-test-system"),
            download: Download::Never,
        };
        if let Ok(found) = source.locate(kind) {
            return Some(found.dir);
        }
    }
    let why = format!(
        "{kind} data not found through QFLARE_DATA_DIR (set it to the directory with the IDX files)"
    );
    assert!(
        !require_data(),
        "{test}: {why}; QFLARE_REQUIRE_DATA=1 makes this a failure"
    );
    // Straight to the stream, past libtest's capture, so the skip shows in
    // a normal `cargo test` run and not only with --nocapture.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

/// `split` of `kind`, or `None` (test skipped).
pub fn load(kind: DatasetKind, split: Split, test: &str) -> Option<Dataset> {
    let dir = data_dir(kind, test)?;
    Some(Dataset::load(&dir, split).expect("the data directory holds valid IDX files"))
}
