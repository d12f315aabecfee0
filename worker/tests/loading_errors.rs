//! Every way a model folder can be broken is met with an error that names the file, the tensor,
//! and what was expected versus found.

use std::path::Path;

use gemma_proto::PlanRequest;
use gemma_testkit::{write_safetensors, LocalCluster, TinyGemma};
use gemma_worker::{LoadError, ModelFolder, ShardOptions};
use safetensors::tensor::Dtype;

fn small() -> TinyGemma {
    TinyGemma {
        vocab_size: 1024,
        ..TinyGemma::mha_like_7b()
    }
}

/// Opens the folder and loads a tp=2 x pp=2 plan; returns the error's message.
fn load_error(dir: &Path) -> String {
    let result = ModelFolder::open(dir).and_then(|folder| {
        LocalCluster::load(&folder, &PlanRequest::new(2, 2), &ShardOptions::default())
    });
    match result {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Writes `model`'s tensors after `edit` as a single model.safetensors in f32.
fn write_edited(
    model: &TinyGemma,
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>),
) {
    model.write(dir).expect("write");
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .tensors()
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    edit(&mut tensors);
    write_safetensors(&dir.join("model.safetensors"), &tensors, Dtype::F32).expect("rewrite");
}

#[test]
fn folder_that_does_not_exist() {
    let e = load_error(Path::new("/nonexistent/gemma-7b"));
    assert!(
        e.contains("/nonexistent/gemma-7b") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn folder_without_weights() {
    let dir = tempfile::tempdir().expect("tmp");
    small().write(dir.path()).expect("write");
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    let e = load_error(dir.path());
    assert!(
        e.contains("no model.safetensors and no model.safetensors.index.json"),
        "{e}"
    );
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
}

#[test]
fn folder_without_config() {
    let dir = tempfile::tempdir().expect("tmp");
    small().write(dir.path()).expect("write");
    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    let e = load_error(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().expect("tmp");
    write_edited(&small(), dir.path(), |t| {
        t.retain(|(n, _, _)| n != "model.layers.3.mlp.up_proj.weight")
    });
    let e = load_error(dir.path());
    assert!(
        e.contains("tensor model.layers.3.mlp.up_proj.weight not found"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn wrong_shape() {
    let dir = tempfile::tempdir().expect("tmp");
    write_edited(&small(), dir.path(), |t| {
        for (n, shape, bytes) in t.iter_mut() {
            if n == "model.layers.2.self_attn.k_proj.weight" {
                // [128, 64] stored as [64, 128]: same bytes, wrong shape.
                *shape = vec![shape[1], shape[0]];
                let _ = bytes;
            }
        }
    });
    let e = load_error(dir.path());
    assert!(
        e.contains("model.safetensors: tensor model.layers.2.self_attn.k_proj.weight has shape [64, 128], expected [128, 64]"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = small();
    model.write(dir.path()).expect("write");
    let tensors: Vec<_> = model
        .tensors()
        .into_iter()
        .map(|(n, s, v)| {
            (
                n,
                s,
                v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
            )
        })
        .collect();
    write_safetensors(&dir.path().join("model.safetensors"), &tensors, Dtype::I32).expect("i32");
    let e = load_error(dir.path());
    assert!(
        e.contains("is stored as I32; supported: F32, BF16, F16"),
        "{e}"
    );
}

#[test]
fn truncated_file() {
    let dir = tempfile::tempdir().expect("tmp");
    small().write(dir.path()).expect("write");
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(len - 1000).expect("truncate");
    let e = load_error(dir.path());
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(
        e.contains(&format!(
            "header describes {len} bytes but the file has {}",
            len - 1000
        )),
        "{e}"
    );
}

#[test]
fn corrupt_header() {
    let dir = tempfile::tempdir().expect("tmp");
    small().write(dir.path()).expect("write");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[8..24].copy_from_slice(b"this is no JSON!");
    std::fs::write(&path, bytes).expect("write");
    let e = load_error(dir.path());
    assert!(
        e.contains(&path.display().to_string()) && e.contains("not a valid safetensors file"),
        "{e}"
    );
}

#[test]
fn index_names_a_missing_file() {
    let dir = tempfile::tempdir().expect("tmp");
    small().with_files(3).write(dir.path()).expect("write");
    let gone = dir.path().join("model-00002-of-00003.safetensors");
    std::fs::remove_file(&gone).expect("rm");
    let e = load_error(dir.path());
    assert!(e.contains(&gone.display().to_string()), "{e}");
    assert!(e.contains("No such file"), "{e}");
}

#[test]
fn index_lacks_a_tensor() {
    let dir = tempfile::tempdir().expect("tmp");
    small().with_files(3).write(dir.path()).expect("write");
    let index = dir.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).expect("read")).expect("json");
    v["weight_map"]
        .as_object_mut()
        .expect("map")
        .remove("model.norm.weight");
    std::fs::write(&index, v.to_string()).expect("write");
    let e = load_error(dir.path());
    assert!(e.contains("tensor model.norm.weight not found in"), "{e}");
    assert!(e.contains("model.safetensors.index.json"), "{e}");
}

#[test]
fn plan_that_does_not_fit_the_model() {
    let dir = tempfile::tempdir().expect("tmp");
    small().write(dir.path()).expect("write");
    let folder = ModelFolder::open(dir.path()).expect("open");
    let e = LocalCluster::load(&folder, &PlanRequest::new(3, 1), &ShardOptions::default())
        .err()
        .expect("tp=3 must be refused");
    assert!(matches!(e, LoadError::Plan(_)));
    assert_eq!(
        e.to_string(),
        "tp=3 does not divide 4 attention heads; use 1, 2 or 4"
    );
}
