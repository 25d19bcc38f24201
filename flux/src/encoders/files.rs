//! Where model files come from: anything that hands out local paths that candle can
//! memory-map. A local folder is [`LocalFolder`]; the data crate implements [`ModelFiles`] for
//! folders at object-store URLs, downloading each file once.

use std::path::{Path, PathBuf};

use super::{EncodeError, Result};

/// A folder of model files, addressed by paths relative to it (`text_encoder/config.json`).
pub trait ModelFiles {
    /// How `rel` is named in messages (a path or a URL).
    fn name(&self, rel: &str) -> String;
    /// Whether `rel` is there.
    fn exists(&self, rel: &str) -> Result<bool>;
    /// A local path holding `rel`.
    fn file(&self, rel: &str) -> Result<PathBuf>;
}

/// A folder on a local file system.
pub struct LocalFolder {
    root: PathBuf,
}

impl LocalFolder {
    /// `root` must be a folder.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(EncodeError::file(
                root.display().to_string(),
                "not a folder (or not there)",
            ));
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }
}

impl ModelFiles for LocalFolder {
    fn name(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    fn exists(&self, rel: &str) -> Result<bool> {
        Ok(self.root.join(rel).is_file())
    }

    fn file(&self, rel: &str) -> Result<PathBuf> {
        let path = self.root.join(rel);
        if path.is_file() {
            Ok(path)
        } else {
            Err(EncodeError::file(path.display().to_string(), "not found"))
        }
    }
}
