//! Writes a tiny random Gemma model as a HuggingFace folder: a model anyone can make offline.

use std::path::PathBuf;

use anyhow::{bail, Result};
use gemma_testkit::{Storage, TinyGemma};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: gemma-tiny-model OUT_DIR [mha|mqa] [f32|bf16|f16]";
    let Some(out) = args.next() else { bail!(usage) };
    let model = match args.next().as_deref() {
        None | Some("mha") => TinyGemma::mha_like_7b(),
        Some("mqa") => TinyGemma::mqa_like_2b(),
        Some(other) => bail!("unknown variant {other}; {usage}"),
    };
    let storage = match args.next().as_deref() {
        None | Some("f32") => Storage::F32,
        Some("bf16") => Storage::Bf16,
        Some("f16") => Storage::F16,
        Some(other) => bail!("unknown storage {other}; {usage}"),
    };
    let dir = PathBuf::from(out);
    model.with_storage(storage).write(&dir)?;
    eprintln!("wrote {}", dir.display());
    Ok(())
}
