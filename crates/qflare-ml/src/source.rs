//! Finding the data set on disk, or fetching it once.
//!
//! [`DataSource::locate`] tries, in order:
//!
//! 1. an explicit directory (a command-line flag),
//! 2. the directory named in the config file,
//! 3. the `QFLARE_DATA_DIR` environment variable,
//! 4. `./data/`,
//! 5. Debian's `/usr/share/datasets/` (package `dataset-fashion-mnist`),
//! 6. a download from the data set's canonical mirror into `./data/<name>/`.
//!
//! A directory qualifies if it holds the four IDX files either in a
//! subdirectory named after the data set (`<dir>/mnist/`) or directly. Since
//! both data sets use the same file names, a directory holding the files
//! directly is skipped when its training labels are byte-for-byte the other
//! data set's (a cheap check on a 29 kB file), so `QFLARE_DATA_DIR` pointing
//! at MNIST never serves as Fashion-MNIST.
//!
//! Downloads are checked against the SHA-256 and size of the published files
//! (pinned below, from `shared/data/README.md`): each file streams into a
//! `.part` file while it is hashed, a file larger than pinned is cut off, and
//! a file whose digest differs is deleted and reported; only a verified file
//! is renamed into place. The base URL is a parameter so tests can serve the
//! files from 127.0.0.1.
//!
//! The client is `ureq`: blocking (a one-time fetch needs no async runtime),
//! small, and TLS through rustls on the aws-lc-rs provider the workspace
//! already links, with the Mozilla roots from `webpki-roots` so it works on
//! machines without a system store. MNIST's mirror is HTTPS; Fashion-MNIST's
//! only canonical mirror is plain HTTP, which is safe here because the pinned
//! digests, not the transport, vouch for the bytes.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Split};
use crate::error::{MlError, Result};

/// The environment variable naming a data directory.
pub const DATA_DIR_ENV: &str = "QFLARE_DATA_DIR";

/// A data set in MNIST's IDX format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DatasetKind {
    /// `mnist`: handwritten digits (LeCun, Cortes, Burges).
    #[serde(rename = "mnist")]
    Mnist,
    /// `fashion-mnist`: clothing images (Xiao, Rasul, Vollgraf 2017).
    #[serde(rename = "fashion-mnist")]
    FashionMnist,
}

/// A published file with its size and SHA-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedFile {
    /// File name, the same on the mirror and on disk.
    pub name: &'static str,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: &'static str,
}

const fn pinned(name: &'static str, bytes: u64, sha256: &'static str) -> PinnedFile {
    PinnedFile {
        name,
        bytes,
        sha256,
    }
}

// File order: train images, train labels, test images, test labels.
const MNIST_FILES: [PinnedFile; 4] = [
    pinned(
        "train-images-idx3-ubyte.gz",
        9_912_422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    pinned(
        "train-labels-idx1-ubyte.gz",
        28_881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    pinned(
        "t10k-images-idx3-ubyte.gz",
        1_648_877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    pinned(
        "t10k-labels-idx1-ubyte.gz",
        4_542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
];

const FASHION_MNIST_FILES: [PinnedFile; 4] = [
    pinned(
        "train-images-idx3-ubyte.gz",
        26_421_880,
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    ),
    pinned(
        "train-labels-idx1-ubyte.gz",
        29_515,
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    ),
    pinned(
        "t10k-images-idx3-ubyte.gz",
        4_422_102,
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    ),
    pinned(
        "t10k-labels-idx1-ubyte.gz",
        5_148,
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    ),
];

impl DatasetKind {
    /// Every data set, in a stable order.
    pub const ALL: [Self; 2] = [Self::Mnist, Self::FashionMnist];

    /// The stable id, also the subdirectory name: `mnist` or `fashion-mnist`.
    pub fn id(self) -> &'static str {
        match self {
            Self::Mnist => "mnist",
            Self::FashionMnist => "fashion-mnist",
        }
    }

    /// The canonical mirror's base URL (ends in `/`).
    pub fn mirror(self) -> &'static str {
        match self {
            Self::Mnist => "https://ossci-datasets.s3.amazonaws.com/mnist/",
            Self::FashionMnist => "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        }
    }

    /// The four published files with their sizes and digests.
    pub fn files(self) -> &'static [PinnedFile; 4] {
        match self {
            Self::Mnist => &MNIST_FILES,
            Self::FashionMnist => &FASHION_MNIST_FILES,
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

impl FromStr for DatasetKind {
    type Err = MlError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.id() == s)
            .ok_or_else(|| MlError::UnknownDataset(s.to_owned()))
    }
}

/// Whether and from where [`DataSource::locate`] may download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Download {
    /// Never touch the network.
    Never,
    /// From the data set's canonical mirror ([`DatasetKind::mirror`]).
    CanonicalMirror,
    /// From this base URL (the file names are appended).
    From(String),
}

/// Which step of the search found the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataOrigin {
    /// The explicit directory (flag).
    Explicit,
    /// The config file's directory.
    Config,
    /// `QFLARE_DATA_DIR`.
    Environment,
    /// `./data/`.
    Local,
    /// `/usr/share/datasets/`.
    System,
    /// Downloaded into `./data/<name>/` just now.
    Downloaded,
}

/// Where the data were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatedData {
    /// The directory holding the four files.
    pub dir: PathBuf,
    /// Which step of the search found it.
    pub origin: DataOrigin,
}

impl LocatedData {
    /// Reads `split` from the located directory.
    pub fn load(&self, split: Split) -> Result<Dataset> {
        Dataset::load(&self.dir, split)
    }
}

/// The places to look for a data set, in search order. Build it with
/// [`DataSource::from_env`] and override fields as needed; tests set every
/// field so they never depend on the process environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSource {
    /// A directory given on the command line.
    pub explicit: Option<PathBuf>,
    /// A directory from the config file.
    pub config: Option<PathBuf>,
    /// A directory from `QFLARE_DATA_DIR`.
    pub env: Option<PathBuf>,
    /// The working directory's data folder, `./data`; downloads go to
    /// `<local_root>/<name>/`.
    pub local_root: PathBuf,
    /// The system data folder, `/usr/share/datasets`.
    pub system_root: PathBuf,
    /// Whether to download as a last resort, and from where.
    pub download: Download,
}

impl Default for DataSource {
    /// The standard search without the environment variable: `./data/`,
    /// `/usr/share/datasets/`, then the canonical mirror.
    fn default() -> Self {
        Self {
            explicit: None,
            config: None,
            env: None,
            local_root: PathBuf::from("data"),
            system_root: PathBuf::from("/usr/share/datasets"),
            download: Download::CanonicalMirror,
        }
    }
}

impl DataSource {
    /// The standard search, with `QFLARE_DATA_DIR` read from the environment.
    pub fn from_env() -> Self {
        Self {
            env: std::env::var_os(DATA_DIR_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            ..Self::default()
        }
    }

    /// Sets the explicit (flag) directory.
    #[must_use]
    pub fn with_explicit(mut self, dir: Option<PathBuf>) -> Self {
        self.explicit = dir;
        self
    }

    /// Sets the config file's directory.
    #[must_use]
    pub fn with_config(mut self, dir: Option<PathBuf>) -> Self {
        self.config = dir;
        self
    }

    /// Sets the download policy.
    #[must_use]
    pub fn with_download(mut self, download: Download) -> Self {
        self.download = download;
        self
    }

    /// Finds `kind` (see the module documentation for the order), downloading
    /// it as a last resort if allowed.
    pub fn locate(&self, kind: DatasetKind) -> Result<LocatedData> {
        let mut tried = Vec::new();
        let candidates = [
            (
                self.explicit.as_deref(),
                DataOrigin::Explicit,
                "explicit directory",
            ),
            (self.config.as_deref(), DataOrigin::Config, "config file"),
            (self.env.as_deref(), DataOrigin::Environment, DATA_DIR_ENV),
            (Some(self.local_root.as_path()), DataOrigin::Local, "local"),
            (
                Some(self.system_root.as_path()),
                DataOrigin::System,
                "system",
            ),
        ];
        for (dir, origin, label) in candidates {
            let Some(dir) = dir else { continue };
            match find_in(dir, kind) {
                Ok(found) => {
                    tracing::info!(dataset = %kind, dir = %found.display(), ?origin, "data set found");
                    return Ok(LocatedData { dir: found, origin });
                }
                Err(why) => {
                    if matches!(
                        origin,
                        DataOrigin::Explicit | DataOrigin::Config | DataOrigin::Environment
                    ) {
                        tracing::warn!(dataset = %kind, dir = %dir.display(), reason = %why, "configured data directory not usable");
                    }
                    tried.push(format!("  {label} {}: {why}", dir.display()));
                }
            }
        }
        let base_url = match &self.download {
            Download::Never => {
                tried.push("  download: disabled".to_owned());
                None
            }
            Download::CanonicalMirror => Some(kind.mirror().to_owned()),
            Download::From(url) => Some(url.clone()),
        };
        if let Some(base_url) = base_url {
            let dest = self.local_root.join(kind.id());
            match download(kind, &base_url, &dest) {
                Ok(()) => {
                    return Ok(LocatedData {
                        dir: dest,
                        origin: DataOrigin::Downloaded,
                    });
                }
                Err(e) => tried.push(format!("  download from {base_url}: {e}")),
            }
        }
        Err(MlError::DataNotFound {
            dataset: kind.id(),
            tried: tried.join("\n"),
            help: help(kind, &self.local_root, &self.system_root),
        })
    }
}

fn help(kind: DatasetKind, local_root: &Path, system_root: &Path) -> String {
    let name = kind.id();
    let files: Vec<&str> = kind.files().iter().map(|f| f.name).collect();
    format!(
        "Provide the {name} files ({}) in any of these ways, checked in this order:\n\
         \x20 1. name the directory explicitly (the program's own data option; see its help);\n\
         \x20 2. set the data directory in the config file;\n\
         \x20 3. set {DATA_DIR_ENV}=<DIR>;\n\
         \x20 4. put the files in {}/;\n\
         \x20 5. on Debian, install the data set package into {}/ (apt install dataset-fashion-mnist for fashion-mnist);\n\
         \x20 6. allow the download from {} (network access; files are checked against pinned SHA-256 digests).\n\
         A directory may hold the files directly or in a subdirectory named {name}/.",
        files.join(", "),
        local_root.join(name).display(),
        system_root.join(name).display(),
        kind.mirror(),
    )
}

/// The directory under `dir` that holds `kind`'s four files, or why none does.
fn find_in(dir: &Path, kind: DatasetKind) -> std::result::Result<PathBuf, String> {
    if !dir.is_dir() {
        return Err("not a directory".to_owned());
    }
    let nested = dir.join(kind.id());
    if has_all_files(&nested, kind) {
        return Ok(nested);
    }
    if has_all_files(dir, kind) {
        if let Some(other) = identified_as_other(dir, kind) {
            return Err(format!("holds the {other} data set"));
        }
        return Ok(dir.to_path_buf());
    }
    let missing: Vec<&str> = kind
        .files()
        .iter()
        .filter(|f| !dir.join(f.name).is_file())
        .map(|f| f.name)
        .collect();
    Err(format!(
        "no {}/ subdirectory with the files, and missing {}",
        kind.id(),
        missing.join(", ")
    ))
}

fn has_all_files(dir: &Path, kind: DatasetKind) -> bool {
    kind.files().iter().all(|f| dir.join(f.name).is_file())
}

/// Another data set whose pinned training labels equal the ones in `dir`.
fn identified_as_other(dir: &Path, kind: DatasetKind) -> Option<DatasetKind> {
    let labels = kind.files()[1];
    let digest = hex::encode(file_sha256(&dir.join(labels.name)).ok()?);
    DatasetKind::ALL
        .into_iter()
        .find(|other| *other != kind && other.files()[1].sha256 == digest)
}

/// SHA-256 of a file's contents.
pub fn file_sha256(path: &Path) -> Result<[u8; 32]> {
    let mut file = BufReader::new(File::open(path).map_err(|e| MlError::io(path, e))?);
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|e| MlError::io(path, e))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

/// Checks a file against its pinned digest; deletes it if it differs.
pub fn verify_file(path: &Path, pinned: &PinnedFile) -> Result<()> {
    let actual = hex::encode(file_sha256(path)?);
    if actual == pinned.sha256 {
        return Ok(());
    }
    // A file that is not the published one must not be picked up later.
    std::fs::remove_file(path).map_err(|e| MlError::io(path, e))?;
    Err(MlError::HashMismatch {
        path: path.to_path_buf(),
        expected: pinned.sha256.to_owned(),
        actual,
    })
}

fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(Duration::from_secs(30)))
        // Generous for 26 MB on a slow link, but a stalled server cannot hang us.
        .timeout_global(Some(Duration::from_secs(30 * 60)))
        .http_status_as_error(true)
        .user_agent(concat!("qflare-ml/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent()
}

/// Downloads `kind`'s four files from `base_url` into `dest`, skipping files
/// already there with the right digest. Every file is checked against its
/// pinned SHA-256; one that differs is deleted and reported.
pub fn download(kind: DatasetKind, base_url: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| MlError::io(dest, e))?;
    let agent = agent();
    let base = if base_url.ends_with('/') {
        base_url.to_owned()
    } else {
        format!("{base_url}/")
    };
    for file in kind.files() {
        let target = dest.join(file.name);
        if target.is_file() {
            match verify_file(&target, file) {
                Ok(()) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "replacing a local file that is not the published one")
                }
            }
        }
        let url = format!("{base}{}", file.name);
        tracing::info!(%url, bytes = file.bytes, "downloading");
        let part = dest.join(format!("{}.part", file.name));
        let fetched = fetch(&agent, &url, &part, file).and_then(|()| verify_file(&part, file));
        if let Err(e) = fetched {
            if part.exists() {
                let _ = std::fs::remove_file(&part);
            }
            return Err(e);
        }
        std::fs::rename(&part, &target).map_err(|e| MlError::io(&target, e))?;
    }
    tracing::info!(dataset = %kind, dir = %dest.display(), "data set downloaded and verified");
    Ok(())
}

/// Streams `url` into `part`, refusing more bytes than the pinned size.
fn fetch(agent: &ureq::Agent, url: &str, part: &Path, file: &PinnedFile) -> Result<()> {
    let failed = |reason: String| MlError::Download {
        url: url.to_owned(),
        reason,
    };
    let response = agent.get(url).call().map_err(|e| failed(e.to_string()))?;
    let mut body = response.into_body().into_reader().take(file.bytes + 1);
    let mut out = File::create(part).map_err(|e| MlError::io(part, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = body.read(&mut buf).map_err(|e| failed(e.to_string()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > file.bytes {
            return Err(failed(format!(
                "more than the published {} bytes",
                file.bytes
            )));
        }
        out.write_all(&buf[..n]).map_err(|e| MlError::io(part, e))?;
    }
    out.sync_all().map_err(|e| MlError::io(part, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for kind in DatasetKind::ALL {
            assert_eq!(kind.to_string().parse::<DatasetKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.id()));
        }
        assert!("emnist".parse::<DatasetKind>().is_err());
    }

    #[test]
    fn nothing_found_lists_every_way() {
        let dir = tempfile::tempdir().unwrap();
        let source = DataSource {
            explicit: Some(dir.path().join("flag")),
            config: Some(dir.path().join("config")),
            env: Some(dir.path().join("env")),
            local_root: dir.path().join("data"),
            system_root: dir.path().join("system"),
            download: Download::Never,
        };
        let err = source.locate(DatasetKind::Mnist).unwrap_err().to_string();
        // The library names no program's flag; each program adds its own.
        assert!(!err.contains("--data"), "{err}");
        for needle in [
            "flag",
            "config",
            "env",
            "explicitly",
            DATA_DIR_ENV,
            "dataset-fashion-mnist",
            "ossci-datasets",
            "download: disabled",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
    }
}
