//! The trainer library's typed errors. Each variant names the file, key or tensor at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    #[error(transparent)]
    Tokens(#[from] datasets::TokensError),
    /// Data or storage: names the dataset, shard, row or object at fault.
    #[error(transparent)]
    Data(#[from] datasets::DataError),
    #[error(transparent)]
    Dist(#[from] crate::ddp::DistError),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{file}: {reason}")]
    Parse { file: PathBuf, reason: String },
    /// A checkpoint that cannot be written, read or used, naming the file and what is wrong.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// A model architecture value is unusable.
    #[error("model config field `{field}`: {reason}")]
    ModelConfig { field: String, reason: String },
    /// A run config key is unknown, malformed or out of range.
    #[error("config key `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// Weights that do not fit the model: one line per offending tensor.
    #[error("weights {file}: {} problem(s):\n  {}", problems.len(), problems.join("\n  "))]
    Weights {
        file: PathBuf,
        problems: Vec<String>,
    },
    /// A named input tensor of a command is missing or misshaped.
    #[error("input `{name}`: {reason}")]
    Input { name: String, reason: String },
    #[error("loss is not finite at step {step} ({what}); stopping as configured (train.on_nonfinite = \"stop\")")]
    NonFinite { step: u64, what: String },
}

impl TrainerError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            err: source,
        }
    }

    pub fn config(key: &str, reason: impl Into<String>) -> Self {
        Self::Config {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TrainerError>;
