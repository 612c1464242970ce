//! Model files interoperate with the reference safetensors implementation —
//! the Rust crate the Python `safetensors` package (and so
//! `safetensors.torch.load_file`) is built on.

use qflare_ml::{Architecture, initial_model, load_model, save_model};
use safetensors::{Dtype, SafeTensors};

#[test]
fn our_files_parse_with_the_reference_implementation() {
    for arch in Architecture::ALL {
        let map = initial_model(arch, 21).unwrap();
        let bytes = map.to_safetensors();
        let parsed = SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = parsed.names().into_iter().map(str::to_owned).collect();
        names.sort();
        let mut expected: Vec<&str> = arch.layout().iter().map(|s| s.name).collect();
        expected.sort_unstable();
        assert_eq!(names, expected, "{arch}: PyTorch state_dict keys");
        for spec in arch.layout() {
            let view = parsed.tensor(spec.name).unwrap();
            assert_eq!(view.dtype(), Dtype::F32);
            assert_eq!(view.shape(), spec.shape, "{arch} {}", spec.name);
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(values, map.get(spec.name).unwrap().data());
        }
    }
}

#[test]
fn files_written_by_the_reference_implementation_load() {
    let arch = Architecture::MnistCnn;
    let map = initial_model(arch, 22).unwrap();
    // Serialise in reverse layout order, as another writer might.
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = arch
        .layout()
        .iter()
        .rev()
        .map(|spec| {
            let bytes = map
                .get(spec.name)
                .unwrap()
                .data()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (spec.name.to_owned(), spec.shape.to_vec(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes);
            (name.clone(), view.unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("from-elsewhere.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let loaded = load_model(&path, Some(arch)).unwrap();
    assert_eq!(loaded, map);
    // Re-saving gives our canonical encoding, so digests agree across writers.
    save_model(&path, &loaded).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), map.to_safetensors());
}
