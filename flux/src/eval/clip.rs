//! CLIP for CLIP-I and CLIP-T: transformers' `CLIPModel` checkpoint (`config.json` with
//! `text_config` and `vision_config`, safetensors weights, `tokenizer.json`), through
//! candle-transformers' `ClipModel`. Text is tokenized without padding (one prompt at a time),
//! truncated to the model's positions; the text embedding is taken at the end-of-text token,
//! which CLIP's vocabulary puts last, as transformers does for CLIP checkpoints.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use candle_transformers::models::clip::{ClipConfig, ClipModel};
use image::RgbImage;

use super::{processor, read_json, weights, ImageProcessor};
use crate::encoders::{EncodeError, Result};

/// The files of a CLIP checkpoint, local.
#[derive(Debug, Clone)]
pub struct ClipFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    /// `preprocessor_config.json`, if the folder has one (else CLIP's defaults).
    pub preprocessor: Option<PathBuf>,
}

pub struct ClipScorer {
    model: ClipModel,
    tokenizer: tokenizers::Tokenizer,
    max_tokens: usize,
    processor: ImageProcessor,
    device: Device,
}

fn configs(path: &Path) -> Result<ClipConfig> {
    let v = read_json(path)?;
    let bad = |reason: String| EncodeError::file(path.display().to_string(), reason);
    let section = |k: &str| {
        v.get(k)
            .cloned()
            .ok_or_else(|| bad(format!("no `{k}`: not a CLIPModel config")))
    };
    let (t, vis) = (section("text_config")?, section("vision_config")?);
    let num = |x: &serde_json::Value, k: &str| -> Result<usize> {
        x.get(k)
            .and_then(|n| n.as_u64())
            .map(|n| n as usize)
            .ok_or_else(|| bad(format!("no integer `{k}`")))
    };
    for (what, x) in [("text_config", &t), ("vision_config", &vis)] {
        let act = x
            .get("hidden_act")
            .and_then(|a| a.as_str())
            .unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(bad(format!(
                "{what}.hidden_act `{act}`: only quick_gelu (OpenAI CLIP) is supported"
            )));
        }
    }
    // CLIPModel projects both towers to the top-level projection_dim.
    let projection = num(&v, "projection_dim").unwrap_or(512);
    Ok(ClipConfig {
        text_config: ClipTextConfig {
            vocab_size: num(&t, "vocab_size")?,
            embed_dim: num(&t, "hidden_size")?,
            activation: Activation::QuickGelu,
            intermediate_size: num(&t, "intermediate_size")?,
            max_position_embeddings: num(&t, "max_position_embeddings")?,
            pad_with: None,
            num_hidden_layers: num(&t, "num_hidden_layers")?,
            num_attention_heads: num(&t, "num_attention_heads")?,
            projection_dim: projection,
        },
        vision_config: ClipVisionConfig {
            embed_dim: num(&vis, "hidden_size")?,
            activation: Activation::QuickGelu,
            intermediate_size: num(&vis, "intermediate_size")?,
            num_hidden_layers: num(&vis, "num_hidden_layers")?,
            num_attention_heads: num(&vis, "num_attention_heads")?,
            projection_dim: projection,
            num_channels: num(&vis, "num_channels").unwrap_or(3),
            image_size: num(&vis, "image_size")?,
            patch_size: num(&vis, "patch_size")?,
        },
        logit_scale_init_value: 2.6592,
        image_size: num(&vis, "image_size")?,
    })
}

impl ClipScorer {
    pub fn load(files: &ClipFiles, device: &Device) -> Result<Self> {
        let cfg = configs(&files.config)?;
        let at = files.weights.first().cloned().unwrap_or_default();
        let model = ClipModel::new(weights(&files.weights, device)?, &cfg)
            .map_err(|e| EncodeError::candle(at.display().to_string(), e))?;
        let tokenizer = tokenizers::Tokenizer::from_file(&files.tokenizer)
            .map_err(|e| EncodeError::file(files.tokenizer.display().to_string(), e))?;
        Ok(Self {
            model,
            tokenizer,
            max_tokens: cfg.text_config.max_position_embeddings,
            processor: processor(
                files.preprocessor.as_deref(),
                ImageProcessor::clip_default(),
            )?,
            device: device.clone(),
        })
    }

    /// The token ids of `text` (start and end tokens added, truncated keeping the end token).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EncodeError::file("prompt", e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_tokens {
            let last = ids[ids.len() - 1];
            ids.truncate(self.max_tokens);
            ids[self.max_tokens - 1] = last;
        }
        Ok(ids)
    }

    /// The projected text embedding of `text`, [P].
    pub fn text(&self, text: &str) -> Result<Tensor> {
        let ids = self.token_ids(text)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.model.get_text_features(&ids)?.squeeze(0)?)
    }

    /// The projected image embedding of pixels [3, H, W] already preprocessed, [P].
    pub fn image_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self
            .model
            .get_image_features(&pixels.unsqueeze(0)?)?
            .squeeze(0)?)
    }

    /// `img` preprocessed as the checkpoint's processor does.
    pub fn pixels(&self, img: &RgbImage) -> Result<Tensor> {
        self.processor.pixels(img, &self.device)
    }

    /// The projected image embedding of `img`, [P].
    pub fn image(&self, img: &RgbImage) -> Result<Tensor> {
        self.image_pixels(&self.pixels(img)?)
    }
}
