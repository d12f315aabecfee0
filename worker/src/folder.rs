//! A HuggingFace model folder: config.json plus safetensors weights.

use std::path::{Path, PathBuf};

use gemma_proto::ModelConfig;

use crate::error::LoadError;
use crate::weights::WeightFiles;

pub struct ModelFolder {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: WeightFiles,
}

impl ModelFolder {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::Io {
                path: dir.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model folder does not exist or is not a directory",
                ),
            });
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = WeightFiles::open(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }
}
