//! Process tests' support: the project's binaries started as real processes (`process`) and a
//! minimal HTTP client for their API (`http`). Models, the reference and the single-process
//! cluster come from the test kit, `gemma-testkit`.

pub mod http;
pub mod process;

/// A temporary folder holding the tiny multi-query model with the real tokenizer, servable by a
/// coordinator; the folder lives as long as the returned guard.
pub fn tiny_servable_model() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join("model");
    gemma_testkit::TinyGemma::mqa_like_2b()
        .write_servable(&dir)
        .expect("tiny model");
    (tmp, dir)
}
