//! DINO for the DINO score: transformers' `ViTModel` checkpoint (facebook/dino-vits16 and
//! the like: `config.json`, safetensors weights with or without the `vit.` prefix), through
//! candle-transformers' ViT embeddings and encoder; the feature is the CLS token of the last
//! hidden state after the final layer norm (transformers' `last_hidden_state[:, 0]`).
//! Images must be the checkpoint's image size (the processor resizes to it).

use std::path::PathBuf;

use candle_core::{Device, IndexOp, Module, Tensor};
use candle_nn::LayerNorm;
use candle_transformers::models::vit;
use image::RgbImage;

use super::{processor, read_json, weights, ImageProcessor};
use crate::encoders::{EncodeError, Result};

/// The files of a ViT checkpoint, local.
#[derive(Debug, Clone)]
pub struct DinoFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    /// `preprocessor_config.json`, if the folder has one (else ViT's defaults).
    pub preprocessor: Option<PathBuf>,
}

pub struct DinoScorer {
    embeddings: vit::Embeddings,
    encoder: vit::Encoder,
    layernorm: LayerNorm,
    processor: ImageProcessor,
    device: Device,
}

impl DinoScorer {
    pub fn load(files: &DinoFiles, device: &Device) -> Result<Self> {
        let v = read_json(&files.config)?;
        let kind = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if kind != "vit" {
            return Err(EncodeError::file(
                files.config.display().to_string(),
                format!("model_type `{kind}`: a ViT (DINO ViT-S/16, `vit`) is expected"),
            ));
        }
        let cfg: vit::Config = serde_json::from_value(v)
            .map_err(|e| EncodeError::file(files.config.display().to_string(), e.to_string()))?;
        let at = files.weights.first().cloned().unwrap_or_default();
        let vb = weights(&files.weights, device)?;
        let vb = if vb.contains_tensor("vit.embeddings.cls_token") {
            vb.pp("vit")
        } else {
            vb
        };
        let load = |e: candle_core::Error| EncodeError::candle(at.display().to_string(), e);
        Ok(Self {
            embeddings: vit::Embeddings::new(&cfg, false, vb.pp("embeddings")).map_err(load)?,
            encoder: vit::Encoder::new(&cfg, vb.pp("encoder")).map_err(load)?,
            layernorm: candle_nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("layernorm"),
            )
            .map_err(load)?,
            processor: processor(files.preprocessor.as_deref(), ImageProcessor::vit_default())?,
            device: device.clone(),
        })
    }

    /// The CLS feature of pixels [3, H, W] already preprocessed, [D].
    pub fn image_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self
            .embeddings
            .forward(&pixels.unsqueeze(0)?, None, false)?;
        let x = self.encoder.forward(&x)?;
        Ok(self.layernorm.forward(&x)?.i((0, 0))?)
    }

    /// `img` preprocessed as the checkpoint's processor does.
    pub fn pixels(&self, img: &RgbImage) -> Result<Tensor> {
        self.processor.pixels(img, &self.device)
    }

    /// The CLS feature of `img`, [D].
    pub fn image(&self, img: &RgbImage) -> Result<Tensor> {
        self.image_pixels(&self.pixels(img)?)
    }
}
