//! The models of DreamBench's metrics, from transformers checkpoints in local files: CLIP
//! (image and text embeddings, projected: CLIP-I and CLIP-T) and DINO (the CLS token after the
//! final layer norm of a DINO ViT or a DINOv2: the DINO score). candle-transformers provides
//! CLIP and the ViT, [`dinov2`] DINOv2; this module reads transformers' configs, weights and
//! preprocessing around them. Checked against transformers' CLIPModel, ViTModel and
//! Dinov2Model on tiny random models (trainer/tests/eval.rs).

pub mod clip;
pub mod dino;
pub mod dinov2;
pub mod preprocess;

use candle_core::{DType, Tensor, D};

use crate::encoders::files::ModelFiles;
use crate::encoders::{EncodeError, Result};

pub use clip::{ClipFiles, ClipScorer};
pub use dino::{DinoFiles, DinoScorer};
pub use preprocess::ImageProcessor;

/// Cosine similarity of two vectors (any float dtype), in f64.
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let dot = (&a * &b)?.sum_all()?.to_scalar::<f64>()?;
    let na = a.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let nb = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    if na == 0.0 || nb == 0.0 {
        return Err(EncodeError::file(
            "embedding",
            "a zero vector has no direction",
        ));
    }
    Ok(dot / (na * nb))
}

/// Rows of `x` [N, D] scaled to unit length.
pub fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

/// `rel` in `folder`, local; an error naming it (as `what`) when it is not there.
fn needed(folder: &dyn ModelFiles, rel: &str, what: &str) -> Result<std::path::PathBuf> {
    if !folder.exists(rel)? {
        return Err(EncodeError::file(
            folder.name(rel),
            format!("not found ({what}; expected a transformers checkpoint folder)"),
        ));
    }
    folder.file(rel)
}

/// `rel` in `folder`, local, if it is there.
fn optional(folder: &dyn ModelFiles, rel: &str) -> Result<Option<std::path::PathBuf>> {
    if folder.exists(rel)? {
        Ok(Some(folder.file(rel)?))
    } else {
        Ok(None)
    }
}

impl ClipFiles {
    /// The files of the CLIPModel checkpoint folder `folder` (a path or, through the data
    /// crate's folders, a URL).
    pub fn from_folder(folder: &dyn ModelFiles) -> Result<Self> {
        Ok(Self {
            config: needed(folder, "config.json", "the CLIPModel config")?,
            weights: crate::encoders::pretrained::weight_files(folder, "", "model")?,
            tokenizer: needed(folder, "tokenizer.json", "CLIP's tokenizer")?,
            preprocessor: optional(folder, "preprocessor_config.json")?,
        })
    }
}

impl DinoFiles {
    /// The files of the DINO (ViT or DINOv2) checkpoint folder `folder`.
    pub fn from_folder(folder: &dyn ModelFiles) -> Result<Self> {
        Ok(Self {
            config: needed(folder, "config.json", "the ViT or DINOv2 config")?,
            weights: crate::encoders::pretrained::weight_files(folder, "", "model")?,
            preprocessor: optional(folder, "preprocessor_config.json")?,
        })
    }
}

/// A config's JSON, naming the file when it is not.
fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EncodeError::file(path.display().to_string(), e))?;
    serde_json::from_str(&text)
        .map_err(|e| EncodeError::file(path.display().to_string(), format!("not JSON: {e}")))
}

/// Memory-maps safetensors files for a model's weights.
fn weights(
    files: &[std::path::PathBuf],
    device: &candle_core::Device,
) -> Result<candle_nn::VarBuilder<'static>> {
    let first = files
        .first()
        .ok_or_else(|| EncodeError::file("weights", "no safetensors file"))?;
    // SAFETY: read-only mappings of files nobody truncates while the model lives.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(files, DType::F32, device) }
        .map_err(|e| EncodeError::candle(first.display().to_string(), e))
}

/// The image processor of a model folder: its `preprocessor_config.json` when given, else
/// `base`.
fn processor(path: Option<&std::path::Path>, base: ImageProcessor) -> Result<ImageProcessor> {
    match path {
        None => Ok(base),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| EncodeError::file(p.display().to_string(), e))?;
            ImageProcessor::from_json(&text, p, base)
        }
    }
}
