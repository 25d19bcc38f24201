//! Where model files come from: anything that hands out local paths that candle can
//! memory-map. The data crate implements [`ModelFiles`] for folders at a path or an
//! object-store URL (`datasets::model_files::ModelFolder`, downloading each file once).

use std::path::PathBuf;

use super::Result;

/// A folder of model files, addressed by paths relative to it (`text_encoder/config.json`).
pub trait ModelFiles {
    /// How `rel` is named in messages (a path or a URL).
    fn name(&self, rel: &str) -> String;
    /// Whether `rel` is there.
    fn exists(&self, rel: &str) -> Result<bool>;
    /// A local path holding `rel`.
    fn file(&self, rel: &str) -> Result<PathBuf>;
}
