//! Where scripts/fetch-tokenizer.sh and scripts/fetch-model.sh keep the real Gemma tokenizer and
//! gemma-3-270m (`~/.cache/gemma-cluster`, or the `GEMMA_*` variables that override it).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where scripts/fetch-tokenizer.sh keeps the real Gemma tokenizer: $GEMMA_TOKENIZER_DIR, else
/// the script's cache.
pub fn tokenizer_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GEMMA_TOKENIZER_DIR") {
        return dir.into();
    }
    cache_dir().join("tokenizer-gemma")
}

/// The real gemma-3-270m that scripts/fetch-model.sh fetched: $GEMMA_REAL_MODEL, else the
/// script's cache. Tests that need it fail (never skip) when it is missing.
pub fn real_model_dir() -> PathBuf {
    let dir = real_model_path();
    assert!(
        dir.exists(),
        "{} is missing: run scripts/fetch-model.sh (or set GEMMA_REAL_MODEL)",
        dir.display()
    );
    dir
}

/// Where the real gemma-3-270m is expected ($GEMMA_REAL_MODEL, else the fetch script's cache).
pub fn real_model_path() -> PathBuf {
    match std::env::var_os("GEMMA_REAL_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir().join("models/gemma-3-270m"),
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("GEMMA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/gemma-cluster")
        })
}

/// Copies the real Gemma tokenizer (tokenizer.json, tokenizer_config.json) into a model folder.
pub fn add_tokenizer(model_dir: &Path) -> Result<()> {
    let src = tokenizer_dir();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(name), model_dir.join(name)).with_context(|| {
            format!(
                "copying {} (run scripts/fetch-tokenizer.sh first)",
                src.join(name).display()
            )
        })?;
    }
    Ok(())
}
