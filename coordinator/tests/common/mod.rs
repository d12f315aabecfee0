//! What the coordinator's integration tests share.

use std::path::PathBuf;

/// Where scripts/fetch-tokenizer.sh keeps the real tokenizer (as the test kit finds it);
/// `GEMMA_TOKENIZER_DIR` overrides it.
pub fn tokenizer_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GEMMA_TOKENIZER_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("GEMMA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gemma-cluster")
        });
    cache.join("tokenizer-gemma")
}
