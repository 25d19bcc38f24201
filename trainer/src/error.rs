//! The trainer library's typed errors. Each variant names the file, key or tensor at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The model crate's errors (a model setting is mapped to its config key instead, see the
    /// `From` impl below).
    #[error(transparent)]
    Model(flux::FluxError),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    /// The image and caption encoders could not be built or failed.
    #[error("encoders")]
    Encode(#[from] flux::encoders::EncodeError),
    #[error(transparent)]
    Tokens(#[from] datasets::TokensError),
    /// Data or storage: names the dataset, shard, row or object at fault.
    #[error(transparent)]
    Data(#[from] datasets::DataError),
    #[error(transparent)]
    Dist(#[from] crate::ddp::DistError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose content could not be read (TOML, JSON, safetensors, ...).
    #[error("cannot read {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: flux::BoxError,
    },
    #[error("{}: {reason}", file.display())]
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
    /// A value that could not be serialised (it would otherwise be written empty).
    #[error("cannot serialise {what}")]
    Serialize {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Another process holds the run folder or the checkpoint location.
    #[error("{what} is in use by {holder}: another trainer runs there (a job started twice, or requeued while the old one still runs); wait for it or stop it, or set another run.dir")]
    RunInUse { what: String, holder: String },
    /// Starting here would lose an earlier run's checkpoints or metrics.
    #[error("run folder {}: {reason}; pass --overwrite to move its contents to {}/previous-<time>/ (nothing is deleted), or set another run.dir", dir.display(), dir.display())]
    RunFolderTaken { dir: PathBuf, reason: String },
    #[error("loss is not finite at step {step} ({what}); stopping as configured (train.on_nonfinite = \"stop\")")]
    NonFinite { step: u64, what: String },
}

/// The config key that sets each model setting.
pub fn setting_key(setting: flux::Setting) -> &'static str {
    match setting {
        flux::Setting::RowDoubleBlocks => "loss.double_blocks",
        flux::Setting::RowSingleBlocks => "loss.single_blocks",
        flux::Setting::LoraRank => "lora.rank",
        flux::Setting::LoraAlpha => "lora.alpha",
        flux::Setting::LoraTargets => "lora.targets",
    }
}

impl From<flux::FluxError> for TrainerError {
    fn from(e: flux::FluxError) -> Self {
        match e {
            flux::FluxError::Setting { setting, reason } => {
                Self::config(setting_key(setting), reason)
            }
            flux::FluxError::Candle(e) => Self::Candle(e),
            flux::FluxError::Kernel(e) => Self::Kernel(e),
            e => Self::Model(e),
        }
    }
}

impl TrainerError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// `file`'s content could not be read because of `source`.
    pub fn read(file: &Path, source: impl Into<flux::BoxError>) -> Self {
        Self::Read {
            file: file.to_path_buf(),
            source: source.into(),
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
