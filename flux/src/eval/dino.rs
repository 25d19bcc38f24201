//! The DINO score's network, from a transformers checkpoint folder (`config.json`, safetensors
//! weights, optionally `preprocessor_config.json`), by its `model_type`:
//! - `vit`: a `ViTModel` (facebook/dino-vits16 and the like, DINO v1; weights with or without
//!   the `vit.` prefix), through candle-transformers' ViT embeddings and encoder; images must
//!   be the checkpoint's image size (its processor resizes to it);
//! - `dinov2`: a `Dinov2Model` (facebook/dinov2-*, the DINOv2 the paper's DINO score cites;
//!   weights with or without the `dinov2.` prefix), [`super::dinov2`]; any image size, the
//!   position embeddings resized to its grid.
//!
//! The feature is the CLS token of the last hidden state after the final layer norm
//! (transformers' `last_hidden_state[:, 0]`).

use std::path::PathBuf;

use candle_core::{Device, IndexOp, Module, Tensor};
use candle_nn::LayerNorm;
use candle_transformers::models::vit;
use image::RgbImage;

use super::dinov2::{Dinov2, Dinov2Config};
use super::{processor, read_json, weights, ImageProcessor};
use crate::encoders::{unprefixed, EncodeError, Result};

/// The files of a DINO checkpoint, local.
#[derive(Debug, Clone)]
pub struct DinoFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    /// `preprocessor_config.json`, if the folder has one (else ViT's defaults).
    pub preprocessor: Option<PathBuf>,
}

pub struct DinoScorer {
    net: Net,
    processor: ImageProcessor,
    device: Device,
}

enum Net {
    Vit {
        embeddings: vit::Embeddings,
        encoder: vit::Encoder,
        layernorm: LayerNorm,
    },
    V2(Dinov2),
}

impl DinoScorer {
    pub fn load(files: &DinoFiles, device: &Device) -> Result<Self> {
        let config = files.config.display().to_string();
        let v = read_json(&files.config)?;
        let kind = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        let at = files.weights.first().cloned().unwrap_or_default();
        let load = |e: candle_core::Error| EncodeError::candle(at.display().to_string(), e);
        let vb = weights(&files.weights, device)?;
        let (net, default_processor) = match kind.as_str() {
            "vit" => {
                let cfg: vit::Config = serde_json::from_value(v)
                    .map_err(|e| EncodeError::file(config.clone(), e.to_string()))?;
                let vb = unprefixed(vb, "vit", "embeddings.cls_token");
                let net = Net::Vit {
                    embeddings: vit::Embeddings::new(&cfg, false, vb.pp("embeddings"))
                        .map_err(load)?,
                    encoder: vit::Encoder::new(&cfg, vb.pp("encoder")).map_err(load)?,
                    layernorm: candle_nn::layer_norm(
                        cfg.hidden_size,
                        cfg.layer_norm_eps,
                        vb.pp("layernorm"),
                    )
                    .map_err(load)?,
                };
                (net, ImageProcessor::vit_default())
            }
            "dinov2" => {
                let cfg = Dinov2Config::from_json(v, &config)?;
                let vb = unprefixed(vb, "dinov2", "embeddings.cls_token");
                let net = Net::V2(Dinov2::load(&cfg, vb).map_err(load)?);
                (net, ImageProcessor::dinov2_default())
            }
            other => {
                return Err(EncodeError::file(
                    config,
                    format!(
                        "model_type `{other}`: a DINO ViT (`vit`, e.g. facebook/dino-vits16) or \
                         a DINOv2 (`dinov2`, e.g. facebook/dinov2-base) is expected"
                    ),
                ))
            }
        };
        Ok(Self {
            net,
            processor: processor(files.preprocessor.as_deref(), default_processor)?,
            device: device.clone(),
        })
    }

    /// The CLS feature of pixels [3, H, W] already preprocessed, [D].
    pub fn image_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        let batch = pixels.unsqueeze(0)?;
        match &self.net {
            Net::Vit {
                embeddings,
                encoder,
                layernorm,
            } => {
                let x = encoder.forward(&embeddings.forward(&batch, None, false)?)?;
                Ok(layernorm.forward(&x)?.i((0, 0))?)
            }
            Net::V2(net) => Ok(net.cls(&batch)?.i(0)?),
        }
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
