//! A model on disk: a HuggingFace folder (config.json plus safetensors) or a GGUF file, with its
//! config validated and its weights mapped.

use std::path::{Path, PathBuf};

use gemma_proto::{ModelConfig, ModelFiles};

use crate::error::LoadError;
use crate::weights::WeightFiles;

pub struct ModelFolder {
    /// What `--model` named (a folder or a .gguf file).
    pub dir: PathBuf,
    pub files: ModelFiles,
    pub config: ModelConfig,
    pub weights: WeightFiles,
}

impl ModelFolder {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let files = ModelFiles::locate(path)?;
        let config = files.config()?;
        let weights = WeightFiles::open(&files, config.architecture)?;
        Ok(Self {
            dir: path.to_path_buf(),
            files,
            config,
            weights,
        })
    }
}
