//! The model crate's typed errors. Each variant names the file, tensor, field or setting at
//! fault; callers that take settings from their own configuration map [`Setting`] to their own
//! key names (the trainer maps them to config keys).

use std::path::{Path, PathBuf};

/// A setting the caller chose (not read from a file) that the model cannot use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// Double blocks that emit attention rows ([`crate::RowBlocks::double`]).
    RowDoubleBlocks,
    /// Single blocks that emit attention rows ([`crate::RowBlocks::single`]).
    RowSingleBlocks,
    /// The LoRA rank ([`crate::LoraSpec::rank`]).
    LoraRank,
    /// The LoRA scale numerator ([`crate::LoraSpec::alpha`]).
    LoraAlpha,
    /// The module patterns the LoRA adapts ([`crate::LoraSpec::targets`]).
    LoraTargets,
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Setting::RowDoubleBlocks => "double blocks for attention rows",
            Setting::RowSingleBlocks => "single blocks for attention rows",
            Setting::LoraRank => "LoRA rank",
            Setting::LoraAlpha => "LoRA alpha",
            Setting::LoraTargets => "LoRA targets",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FluxError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose content could not be read (JSON, safetensors, ...).
    #[error("cannot read {}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: BoxError,
    },
    /// A file that could not be written or serialised.
    #[error("cannot write {}", file.display())]
    Write {
        file: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("{}: {reason}", file.display())]
    Parse { file: PathBuf, reason: String },
    /// A model architecture value is unusable.
    #[error("model config field `{field}`: {reason}")]
    ModelConfig { field: String, reason: String },
    /// Weights that do not fit the model: one line per offending tensor.
    #[error("weights {}: {} problem(s):\n  {}", file.display(), problems.len(), problems.join("\n  "))]
    Weights {
        file: PathBuf,
        problems: Vec<String>,
    },
    /// A named input tensor or argument is missing or misshaped.
    #[error("input `{name}`: {reason}")]
    Input { name: String, reason: String },
    /// A setting the caller chose is unusable.
    #[error("{setting}: {reason}")]
    Setting { setting: Setting, reason: String },
}

impl FluxError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// `file`'s content could not be read because of `source`.
    pub fn read(file: &Path, source: impl Into<BoxError>) -> Self {
        Self::Read {
            file: file.to_path_buf(),
            source: source.into(),
        }
    }

    /// `file` could not be written because of `source`.
    pub fn write(file: &Path, source: impl Into<BoxError>) -> Self {
        Self::Write {
            file: file.to_path_buf(),
            source: source.into(),
        }
    }

    pub fn setting(setting: Setting, reason: impl Into<String>) -> Self {
        Self::Setting {
            setting,
            reason: reason.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, FluxError>;

/// Any error, as the cause of one of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `e` and every cause below it, "outer: inner: innermost", as anyhow's `{:#}` prints them:
/// for logs and reports, where an error is shown without the binary's error printer.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_shows_every_cause_once() {
        let e = FluxError::read(
            Path::new("a/config.json"),
            std::io::Error::other("bad byte"),
        );
        assert_eq!(e.to_string(), "cannot read a/config.json");
        assert_eq!(chain(&e), "cannot read a/config.json: bad byte");
    }
}
