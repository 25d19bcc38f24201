//! Sizes of a FLUX.1 transformer. FLUX.1-dev and the tiny test model share all code; only
//! these numbers differ (design.md §3.1).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{FluxError, Result};

/// Architecture hyper-parameters of a FLUX.1 transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    /// Channels of a packed latent token (16 latent channels x 2 x 2 patch = 64).
    pub in_channels: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    /// Double-stream blocks (19 in FLUX.1-dev).
    pub num_double: usize,
    /// Single-stream blocks (38 in FLUX.1-dev).
    pub num_single: usize,
    /// Width of the T5 text embeddings (4096).
    pub context_dim: usize,
    /// Width of the pooled CLIP embedding (768).
    pub pooled_dim: usize,
    /// RoPE dims per position axis; they sum to `head_dim`.
    pub axes_dims: [usize; 3],
    pub theta: f64,
    pub guidance_embeds: bool,
}

/// Width of the sinusoidal timestep features fed to the time embedders.
pub const TIME_FEATURES: usize = 256;
/// MLP width is 4x the hidden size in every FLUX.1 block.
pub const MLP_RATIO: usize = 4;

impl FluxConfig {
    pub fn hidden(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn mlp_hidden(&self) -> usize {
        self.hidden() * MLP_RATIO
    }

    pub fn flux_dev() -> Self {
        Self {
            in_channels: 64,
            num_heads: 24,
            head_dim: 128,
            num_double: 19,
            num_single: 38,
            context_dim: 4096,
            pooled_dim: 768,
            axes_dims: [16, 56, 56],
            theta: 10_000.0,
            guidance_embeds: true,
        }
    }

    /// The tiny model of the README's main job and the tests.
    pub fn tiny() -> Self {
        Self {
            in_channels: 64,
            num_heads: 2,
            head_dim: 32,
            num_double: 2,
            num_single: 2,
            context_dim: 32,
            pooled_dim: 16,
            axes_dims: [4, 14, 14],
            theta: 10_000.0,
            guidance_embeds: true,
        }
    }

    /// The tiny model at twice its width (4 heads x 32) with twice the single blocks: wide
    /// enough to denoise the synthetic scenes' tokens (16 x 16 px each), still a CPU model
    /// (the committed tiny base, trainer/assets/tiny-base).
    pub fn small() -> Self {
        Self {
            num_heads: 4,
            num_single: 4,
            ..Self::tiny()
        }
    }

    /// A mid-sized CPU model for benchmarks (about 1/6 of FLUX.1-dev's width, 6 + 12 blocks).
    pub fn medium() -> Self {
        Self {
            in_channels: 64,
            num_heads: 8,
            head_dim: 64,
            num_double: 6,
            num_single: 12,
            context_dim: 256,
            pooled_dim: 128,
            axes_dims: [8, 28, 28],
            theta: 10_000.0,
            guidance_embeds: true,
        }
    }

    /// The FLUX rule scaled to another head size: (hd/8, 7hd/16, 7hd/16), when those are even.
    pub fn default_axes(head_dim: usize) -> Option<[usize; 3]> {
        if !head_dim.is_multiple_of(16) {
            return None;
        }
        let a = [head_dim / 8, 7 * head_dim / 16, 7 * head_dim / 16];
        a.iter().all(|d| d % 2 == 0).then_some(a)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| {
            Err(FluxError::ModelConfig {
                field: field.to_string(),
                reason: why,
            })
        };
        if self.num_heads == 0 || self.head_dim == 0 {
            return bad("num_heads/head_dim", "must be positive".into());
        }
        if self.axes_dims.iter().sum::<usize>() != self.head_dim {
            return bad(
                "axes_dims",
                format!(
                    "{:?} must sum to head_dim {}",
                    self.axes_dims, self.head_dim
                ),
            );
        }
        if self.axes_dims.iter().any(|d| d % 2 != 0) {
            return bad(
                "axes_dims",
                format!("{:?} must all be even", self.axes_dims),
            );
        }
        if self.in_channels == 0 || self.context_dim == 0 || self.pooled_dim == 0 {
            return bad(
                "in_channels/context_dim/pooled_dim",
                "must be positive".into(),
            );
        }
        Ok(())
    }

    /// This architecture as a diffusers `FluxTransformer2DModel` config.
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        serde_json::json!({
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": self.in_channels,
            "num_layers": self.num_double,
            "num_single_layers": self.num_single,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.context_dim,
            "pooled_projection_dim": self.pooled_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": self.axes_dims,
        })
    }

    /// Reads a diffusers `transformer/config.json`.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default = "d_in")]
            in_channels: usize,
            num_layers: usize,
            num_single_layers: usize,
            attention_head_dim: usize,
            num_attention_heads: usize,
            joint_attention_dim: usize,
            pooled_projection_dim: usize,
            #[serde(default)]
            guidance_embeds: bool,
            #[serde(default = "d_axes")]
            axes_dims_rope: [usize; 3],
            #[serde(default = "d_patch")]
            patch_size: usize,
        }
        fn d_in() -> usize {
            64
        }
        fn d_axes() -> [usize; 3] {
            [16, 56, 56]
        }
        fn d_patch() -> usize {
            1
        }
        let text = std::fs::read_to_string(path).map_err(|e| FluxError::io(path, e))?;
        let raw: Raw = serde_json::from_str(&text).map_err(|e| FluxError::read(path, e))?;
        if raw.patch_size != 1 {
            return Err(FluxError::ModelConfig {
                field: "patch_size".into(),
                reason: format!(
                    "{} is not supported (FLUX packs latents outside the model: 1)",
                    raw.patch_size
                ),
            });
        }
        let cfg = Self {
            in_channels: raw.in_channels,
            num_heads: raw.num_attention_heads,
            head_dim: raw.attention_head_dim,
            num_double: raw.num_layers,
            num_single: raw.num_single_layers,
            context_dim: raw.joint_attention_dim,
            pooled_dim: raw.pooled_projection_dim,
            axes_dims: raw.axes_dims_rope,
            theta: 10_000.0,
            guidance_embeds: raw.guidance_embeds,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for c in [
            FluxConfig::flux_dev(),
            FluxConfig::tiny(),
            FluxConfig::medium(),
        ] {
            c.validate().unwrap();
        }
        assert_eq!(FluxConfig::flux_dev().hidden(), 3072);
        assert_eq!(FluxConfig::default_axes(128), Some([16, 56, 56]));
        assert_eq!(FluxConfig::default_axes(32), Some([4, 14, 14]));
    }

    #[test]
    fn bad_axes_are_refused() {
        let mut c = FluxConfig::tiny();
        c.axes_dims = [4, 14, 12];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("axes_dims"), "{err}");
    }
}
