//! IDX files and the in-memory data set.
//!
//! MNIST and Fashion-MNIST ship as gzip'd IDX files: a 4-byte magic
//! (`0x00 0x00`, an element-type code, the number of dimensions), one
//! big-endian `u32` per dimension, then the elements in row-major order. We
//! read only unsigned-byte files (type `0x08`), the type both data sets use,
//! and check everything before trusting it: the magic, the rank the caller
//! expects, a size cap before allocating, the exact length (no truncation,
//! no trailing bytes) and the gzip stream itself.
//!
//! A [`Dataset`] holds images as `f32` scaled to `[0, 1]` (pixel / 255) and
//! labels as `u8`. We deliberately do not subtract the mean or divide by the
//! standard deviation: inputs then equal what PyTorch's `ToTensor()` gives,
//! so a model trained here behaves the same when loaded there, and both
//! models train well on `[0, 1]` inputs.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};

use crate::error::{MlError, Result};
use crate::model::NUM_CLASSES;

/// Largest number of elements an IDX file may declare (MNIST's training
/// images are 47 million); bounds memory before the data are read.
pub const MAX_IDX_ELEMENTS: usize = 1 << 30;

/// Which half of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training images (60,000 for MNIST).
    Train,
    /// The test images (10,000 for MNIST).
    Test,
}

impl Split {
    /// The gzip'd IDX file holding this split's images.
    pub fn images_file(self) -> &'static str {
        match self {
            Self::Train => "train-images-idx3-ubyte.gz",
            Self::Test => "t10k-images-idx3-ubyte.gz",
        }
    }

    /// The gzip'd IDX file holding this split's labels.
    pub fn labels_file(self) -> &'static str {
        match self {
            Self::Train => "train-labels-idx1-ubyte.gz",
            Self::Test => "t10k-labels-idx1-ubyte.gz",
        }
    }
}

/// The contents of an unsigned-byte IDX file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first.
    pub dims: Vec<usize>,
    /// The elements in row-major order.
    pub data: Vec<u8>,
}

/// Reads a gzip'd IDX file of unsigned bytes with `rank` dimensions.
pub fn read_idx_gz(path: &Path, rank: usize) -> Result<IdxArray> {
    let file = File::open(path).map_err(|e| MlError::io(path, e))?;
    parse_idx(GzDecoder::new(BufReader::new(file)), path, rank)
}

/// Fills `buf` from a decompressing reader; returns how many bytes arrived
/// before the end of the stream.
fn read_full(reader: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The file opened, so a read error here is the gzip stream's.
            Err(e) => {
                return Err(MlError::Gzip {
                    error: e,
                    path: path.to_path_buf(),
                });
            }
        }
    }
    Ok(filled)
}

fn parse_idx(mut reader: impl Read, path: &Path, rank: usize) -> Result<IdxArray> {
    let mut magic = [0u8; 4];
    if read_full(&mut reader, &mut magic, path)? < 4 {
        return Err(MlError::idx(
            path,
            "truncated: shorter than the 4-byte magic",
        ));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(MlError::idx(
            path,
            format!("wrong magic {:02x?}, expected 00 00 08 0{rank}", magic),
        ));
    }
    if magic[2] != 0x08 {
        return Err(MlError::idx(
            path,
            format!(
                "element type 0x{:02x} is not unsigned byte (0x08)",
                magic[2]
            ),
        ));
    }
    if usize::from(magic[3]) != rank {
        return Err(MlError::idx(
            path,
            format!("{} dimensions, expected {rank}", magic[3]),
        ));
    }
    let mut header = vec![0u8; 4 * rank];
    if read_full(&mut reader, &mut header, path)? < header.len() {
        return Err(MlError::idx(path, "truncated in the dimension header"));
    }
    let dims: Vec<usize> = header
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_IDX_ELEMENTS)
        .ok_or_else(|| {
            MlError::idx(
                path,
                format!("dimensions {dims:?} exceed {MAX_IDX_ELEMENTS} elements"),
            )
        })?;
    // Grow as the data arrive rather than trusting the header with one
    // allocation: a lying header then costs only what was actually sent.
    let mut data = Vec::with_capacity(count.min(64 << 20));
    let got = (&mut reader)
        .take(count as u64)
        .read_to_end(&mut data)
        .map_err(|e| MlError::Gzip {
            error: e,
            path: path.to_path_buf(),
        })?;
    if got < count {
        return Err(MlError::idx(
            path,
            format!("truncated: header declares {count} elements, found {got}"),
        ));
    }
    let mut extra = [0u8; 1];
    if read_full(&mut reader, &mut extra, path)? != 0 {
        return Err(MlError::idx(
            path,
            "trailing bytes after the declared elements",
        ));
    }
    Ok(IdxArray { dims, data })
}

/// Labelled images in memory.
#[derive(Clone, PartialEq)]
pub struct Dataset {
    images: Vec<f32>,
    labels: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A device's data are private; show the size, never the pixels.
        f.debug_struct("Dataset")
            .field("len", &self.len())
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish_non_exhaustive()
    }
}

impl Dataset {
    /// A data set of `labels.len()` images of `rows x cols` pixels in `[0, 1]`.
    pub fn new(images: Vec<f32>, labels: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        let pixels = rows
            .checked_mul(cols)
            .filter(|&p| p > 0)
            .ok_or_else(|| MlError::InvalidData(format!("image size {rows}x{cols}")))?;
        if Some(images.len()) != labels.len().checked_mul(pixels) {
            return Err(MlError::InvalidData(format!(
                "{} pixels for {} images of {pixels}",
                images.len(),
                labels.len()
            )));
        }
        if let Some(bad) = labels.iter().find(|&&l| usize::from(l) >= NUM_CLASSES) {
            return Err(MlError::InvalidData(format!(
                "label {bad} outside 0..{NUM_CLASSES}"
            )));
        }
        if !images.iter().all(|p| (0.0..=1.0).contains(p)) {
            return Err(MlError::InvalidData("a pixel lies outside [0, 1]".into()));
        }
        Ok(Self {
            images,
            labels,
            rows,
            cols,
        })
    }

    /// Reads `split` from the gzip'd IDX files in `dir` (the four files'
    /// standard names, see [`Split::images_file`]).
    pub fn load(dir: &Path, split: Split) -> Result<Self> {
        let images_path: PathBuf = dir.join(split.images_file());
        let labels_path: PathBuf = dir.join(split.labels_file());
        let images = read_idx_gz(&images_path, 3)?;
        let labels = read_idx_gz(&labels_path, 1)?;
        let (n, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
        if rows == 0 || cols == 0 {
            return Err(MlError::idx(
                &images_path,
                format!("image size {rows}x{cols}"),
            ));
        }
        if labels.dims[0] != n {
            return Err(MlError::InvalidData(format!(
                "{} holds {n} images but {} holds {} labels",
                images_path.display(),
                labels_path.display(),
                labels.dims[0]
            )));
        }
        if let Some(bad) = labels.data.iter().find(|&&l| usize::from(l) >= NUM_CLASSES) {
            return Err(MlError::idx(
                &labels_path,
                format!("label {bad} outside 0..{NUM_CLASSES}"),
            ));
        }
        let images = images.data.iter().map(|&p| f32::from(p) / 255.0).collect();
        tracing::debug!(dir = %dir.display(), ?split, examples = n, "data set loaded");
        Ok(Self {
            images,
            labels: labels.data,
            rows,
            cols,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// All images, `len() * rows * cols` values in `[0, 1]`, row-major.
    pub fn images(&self) -> &[f32] {
        &self.images
    }

    /// All labels, each in `0..10`.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Image height and width in pixels.
    pub fn image_shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Pixels per image.
    pub fn pixels_per_image(&self) -> usize {
        self.rows * self.cols
    }

    /// The pixels of example `index`, if it exists.
    pub fn image(&self, index: usize) -> Option<&[f32]> {
        let p = self.pixels_per_image();
        self.images.get(index * p..(index + 1) * p)
    }

    /// How many examples carry each label.
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut counts = [0; NUM_CLASSES];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts
    }

    /// The examples at `indices`, in that order (repeats allowed).
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let p = self.pixels_per_image();
        let mut images = Vec::with_capacity(indices.len() * p);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let image = self.image(i).ok_or_else(|| {
                MlError::InvalidArgument(format!(
                    "index {i} out of range for {} examples",
                    self.len()
                ))
            })?;
            images.extend_from_slice(image);
            labels.push(self.labels[i]);
        }
        Ok(Self {
            images,
            labels,
            rows: self.rows,
            cols: self.cols,
        })
    }

    /// The first `n` examples (all of them if there are fewer).
    pub fn head(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            images: self.images[..n * self.pixels_per_image()].to_vec(),
            labels: self.labels[..n].to_vec(),
            rows: self.rows,
            cols: self.cols,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn idx(rank: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, rank];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn reads_a_small_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.gz", &gz(&idx(3, &[2, 2, 3], &[1; 12])));
        let array = read_idx_gz(&path, 3).unwrap();
        assert_eq!(array.dims, vec![2, 2, 3]);
        assert_eq!(array.data, vec![1; 12]);
    }

    #[test]
    fn rejects_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let err = |path: &Path, rank| read_idx_gz(path, rank).unwrap_err().to_string();

        assert!(matches!(
            read_idx_gz(&d.join("absent.gz"), 1),
            Err(MlError::MissingFile { .. })
        ));

        let wrong_magic = write(d, "magic.gz", &gz(&[0x12, 0x34, 8, 1, 0, 0, 0, 1, 5]));
        assert!(err(&wrong_magic, 1).contains("wrong magic"));

        let wrong_type = write(d, "type.gz", &gz(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 5]));
        assert!(err(&wrong_type, 1).contains("not unsigned byte"));

        let wrong_rank = write(d, "rank.gz", &gz(&idx(3, &[1, 1, 1], &[0])));
        assert!(err(&wrong_rank, 1).contains("3 dimensions, expected 1"));

        let truncated = write(d, "short.gz", &gz(&idx(1, &[10], &[1, 2, 3])));
        assert!(err(&truncated, 1).contains("truncated"));

        let short_header = write(d, "hdr.gz", &gz(&[0, 0, 8, 3, 0, 0]));
        assert!(err(&short_header, 3).contains("truncated"));

        let trailing = write(d, "long.gz", &gz(&idx(1, &[2], &[1, 2, 3])));
        assert!(err(&trailing, 1).contains("trailing"));

        let huge = write(d, "huge.gz", &gz(&idx(3, &[u32::MAX, u32::MAX, 2], &[])));
        assert!(err(&huge, 3).contains("exceed"));

        let not_gzip = write(d, "plain.gz", &idx(1, &[1], &[0]));
        assert!(matches!(
            read_idx_gz(&not_gzip, 1),
            Err(MlError::Gzip { .. })
        ));

        let mut cut = gz(&idx(1, &[4096], &[7; 4096]));
        cut.truncate(cut.len() / 2);
        let cut = write(d, "cut.gz", &cut);
        assert!(matches!(read_idx_gz(&cut, 1), Err(MlError::Gzip { .. })));

        let mut flipped = gz(&idx(1, &[4096], &[7; 4096]));
        let n = flipped.len();
        flipped[n - 6] ^= 0xff; // inside the CRC-32 trailer
        let flipped = write(d, "crc.gz", &flipped);
        assert!(read_idx_gz(&flipped, 1).is_err());
    }

    #[test]
    fn load_checks_consistency() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            d,
            Split::Test.images_file(),
            &gz(&idx(3, &[2, 2, 2], &[0, 255, 51, 0, 0, 0, 0, 0])),
        );
        write(d, Split::Test.labels_file(), &gz(&idx(1, &[2], &[3, 9])));
        let data = Dataset::load(d, Split::Test).unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data.image_shape(), (2, 2));
        assert_eq!(data.image(0).unwrap(), &[0.0, 1.0, 0.2, 0.0]);
        assert_eq!(data.labels(), &[3, 9]);

        write(d, Split::Test.labels_file(), &gz(&idx(1, &[3], &[3, 9, 1])));
        assert!(
            Dataset::load(d, Split::Test)
                .unwrap_err()
                .to_string()
                .contains("3 labels")
        );

        write(d, Split::Test.labels_file(), &gz(&idx(1, &[2], &[3, 10])));
        assert!(
            Dataset::load(d, Split::Test)
                .unwrap_err()
                .to_string()
                .contains("label 10")
        );
    }

    #[test]
    fn subset_and_constructor() {
        let data = Dataset::new(vec![0.0, 0.5, 1.0, 0.25], vec![1, 2, 3, 4], 1, 1).unwrap();
        let sub = data.subset(&[3, 0, 3]).unwrap();
        assert_eq!(sub.labels(), &[4, 1, 4]);
        assert_eq!(sub.images(), &[0.25, 0.0, 0.25]);
        assert!(data.subset(&[4]).is_err());
        assert_eq!(data.head(2).labels(), &[1, 2]);
        assert_eq!(data.head(9).len(), 4);
        assert_eq!(data.class_counts()[1..5], [1, 1, 1, 1]);
        assert!(Dataset::new(vec![0.0; 3], vec![1, 2], 1, 1).is_err());
        assert!(Dataset::new(vec![0.0; 2], vec![1, 12], 1, 1).is_err());
        assert!(Dataset::new(vec![0.0, 2.0], vec![1, 2], 1, 1).is_err());
        assert!(Dataset::new(vec![], vec![], 0, 5).is_err());
        assert!(!format!("{data:?}").contains("0.25"));
    }
}
