//! Where a model's files are: `--model` names a HuggingFace folder (config.json + safetensors), a
//! .gguf file, or a folder holding exactly one .gguf. The tokenizer (tokenizer.json, and
//! tokenizer_config.json for the chat template) is always the one in the same folder.

use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::ConfigError;
use crate::gguf::GgufHeader;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    /// config.json plus model.safetensors or an index of safetensors files.
    HfFolder,
    /// One GGUF file (llama.cpp's format): config in its metadata, tensors possibly quantized.
    Gguf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub format: ModelFormat,
    /// The folder, or the .gguf file.
    pub weights: PathBuf,
    /// Where tokenizer.json and tokenizer_config.json are looked for.
    pub tokenizer_dir: PathBuf,
}

impl ModelFiles {
    /// Resolves `path` to a model, or says what was expected there.
    pub fn locate(path: &Path) -> Result<Self, ConfigError> {
        let not_a_model = |reason: String| ConfigError::NotAModel {
            path: path.display().to_string(),
            reason,
        };
        if path.is_file() {
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            {
                let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                return Ok(Self {
                    format: ModelFormat::Gguf,
                    weights: path.to_path_buf(),
                    tokenizer_dir: dir,
                });
            }
            return Err(not_a_model("a file that is not a .gguf".to_string()));
        }
        if !path.is_dir() {
            return Err(not_a_model("it does not exist".to_string()));
        }
        if path.join("config.json").is_file() {
            return Ok(Self {
                format: ModelFormat::HfFolder,
                weights: path.to_path_buf(),
                tokenizer_dir: path.to_path_buf(),
            });
        }
        let ggufs = gguf_files(path).map_err(|e| not_a_model(e.to_string()))?;
        match ggufs.as_slice() {
            [one] => Ok(Self {
                format: ModelFormat::Gguf,
                weights: one.clone(),
                tokenizer_dir: path.to_path_buf(),
            }),
            [] => Err(not_a_model(
                "a folder with neither config.json (HuggingFace) nor a .gguf file".to_string(),
            )),
            many => Err(not_a_model(format!(
                "a folder with {} .gguf files ({}); name the one to serve",
                many.len(),
                many.iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The model's validated config, from config.json or the GGUF metadata.
    pub fn config(&self) -> Result<ModelConfig, ConfigError> {
        match self.format {
            ModelFormat::HfFolder => ModelConfig::from_file(&self.weights.join("config.json")),
            ModelFormat::Gguf => {
                let header = GgufHeader::read_file(&self.weights)?;
                ModelConfig::from_gguf(&header).map_err(|e| e.in_file(&self.weights))
            }
        }
    }
}

fn gguf_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    found.sort();
    Ok(found)
}
