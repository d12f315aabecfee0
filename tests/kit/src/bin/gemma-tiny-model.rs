//! Writes a tiny random Gemma model as a HuggingFace folder: a model anyone can make offline.
//! Beside config.json and the weights it writes `tiny_model.json` (the variant and
//! `TinyGemma::provenance`), which scripts/golden copies into the golden files it makes.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use gemma_testkit::{Storage, TinyGemma};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = format!(
        "usage: gemma-tiny-model OUT_DIR [{}] [f32|bf16|f16]",
        TinyGemma::VARIANTS.join("|")
    );
    let Some(out) = args.next() else { bail!(usage) };
    let variant = args.next().unwrap_or_else(|| "mha".to_string());
    let Some(model) = TinyGemma::variant(&variant) else {
        bail!("unknown variant {variant}; {usage}")
    };
    let storage = match args.next().as_deref() {
        None | Some("f32") => Storage::F32,
        Some("bf16") => Storage::Bf16,
        Some("f16") => Storage::F16,
        Some(other) => bail!("unknown storage {other}; {usage}"),
    };
    let dir = PathBuf::from(out);
    let model = model.with_storage(storage);
    model.write(&dir)?;
    let description = serde_json::json!({
        "variant": variant,
        "provenance": model.provenance(),
    });
    let path = dir.join("tiny_model.json");
    std::fs::write(&path, serde_json::to_string_pretty(&description)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", dir.display());
    Ok(())
}
