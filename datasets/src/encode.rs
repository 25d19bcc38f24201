//! Image and caption encoders: the FLUX VAE encoder (latents, 8x below pixels, 16 channels),
//! a T5 encoder (per-token caption embeddings) and a CLIP text model (pooled embedding), from
//! candle-transformers.
//!
//! `tiny-random` builds the three at the dimensions a small model needs with weights drawn
//! from the run seed (the same seed gives the same encoders on every rank and every restart)
//! and a byte-level tokenizer (ByT5-style ids: byte + 3 for T5; byte + 1 with the end token as
//! the largest id for CLIP, whose pooled output is taken at the end token). This is what the
//! tiny CPU model trains with; FLUX.1-dev's pretrained encoders are not loaded yet.
//!
//! Latents are the encoder's mean (not a sample of its Gaussian) shifted and scaled as FLUX
//! does, so they are deterministic and can be cached.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::flux::autoencoder::{Config as VaeConfig, Encoder as VaeEncoder};
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::transform::Pixels;

/// Latent channels of the FLUX VAE.
pub const LATENT_CHANNELS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("encoders: {0}")]
    Spec(String),
}

type Result<T> = std::result::Result<T, EncodeError>;

/// What the encoders must produce for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderSpec {
    /// Caption tokens (T5 sequence length).
    pub text_tokens: usize,
    /// Width of a caption token embedding (the model's context dim).
    pub context_dim: usize,
    /// Width of the pooled caption embedding (the model's pooled dim).
    pub pooled_dim: usize,
    pub seed: u64,
}

impl EncoderSpec {
    /// A stable description of the encoders, for cache keys and logs.
    pub fn fingerprint(&self) -> String {
        format!(
            "tiny-random/vae-ch32-mult1111/t5-d{}-l2/clip-d{}-l2/seed{}/tokens{}",
            self.context_dim, self.pooled_dim, self.seed, self.text_tokens
        )
    }
}

pub struct Encoders {
    spec: EncoderSpec,
    vae: VaeEncoder,
    vae_shift: f64,
    vae_scale: f64,
    t5: T5EncoderModel,
    clip: ClipTextTransformer,
    clip_tokens: usize,
    device: Device,
    dtype: DType,
}

const T5_SPECIAL: u32 = 3;
const T5_EOS: u32 = 1;
const CLIP_VOCAB: usize = 258;
const CLIP_EOS: u32 = 257;

fn vae_config() -> VaeConfig {
    VaeConfig {
        resolution: 256,
        in_channels: 3,
        ch: 32,
        out_ch: 3,
        ch_mult: vec![1, 1, 1, 1],
        num_res_blocks: 1,
        z_channels: LATENT_CHANNELS,
        scale_factor: 1.0,
        shift_factor: 0.0,
    }
}

fn t5_config(spec: &EncoderSpec) -> Result<T5Config> {
    let heads = if spec.context_dim.is_multiple_of(32) {
        spec.context_dim / 16
    } else {
        1
    };
    serde_json::from_value(serde_json::json!({
        "vocab_size": 256 + T5_SPECIAL as usize,
        "d_model": spec.context_dim,
        "d_kv": spec.context_dim / heads,
        "d_ff": 2 * spec.context_dim,
        "num_layers": 2,
        "num_heads": heads,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": true,
        "pad_token_id": 0,
        "eos_token_id": T5_EOS,
    }))
    .map_err(|e| EncodeError::Spec(format!("T5 config: {e}")))
}

fn clip_config(spec: &EncoderSpec) -> ClipTextConfig {
    let heads = if spec.pooled_dim.is_multiple_of(8) {
        spec.pooled_dim / 8
    } else {
        1
    };
    ClipTextConfig {
        vocab_size: CLIP_VOCAB,
        embed_dim: spec.pooled_dim,
        activation: Activation::QuickGelu,
        intermediate_size: 2 * spec.pooled_dim,
        max_position_embeddings: 32,
        pad_with: None,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        projection_dim: spec.pooled_dim,
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name, mixed with the seed.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Seeded weights for every parameter a model asks for: biases 0, norm scales 1, embeddings
/// N(0, 1), other weights N(0, 1/fan_in).
fn seeded_weights(
    build: impl Fn(VarBuilder) -> candle_core::Result<()>,
    prefix: &str,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let map = VarMap::new();
    build(VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    let data = map
        .data()
        .lock()
        .map_err(|_| EncodeError::Spec("poisoned".into()))?;
    let mut out = HashMap::new();
    for (name, var) in data.iter() {
        let shape = var.as_tensor().dims().to_vec();
        let n: usize = shape.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(name_seed(seed, &format!("{prefix}{name}")));
        let leaf = name.rsplit('.').next().unwrap_or("");
        let values: Vec<f32> = if leaf == "bias" || leaf == "beta" {
            vec![0.0; n]
        } else if shape.len() == 1 {
            vec![1.0; n]
        } else {
            let embedding = name.contains("embed") || name.contains("shared");
            let fan_in: usize = shape[1..].iter().product();
            let std = if embedding {
                1.0
            } else {
                (1.0 / fan_in.max(1) as f32).sqrt()
            };
            (0..n)
                .map(|_| {
                    // Box-Muller from two uniforms keeps this free of rand_distr.
                    let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                    std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                })
                .collect()
        };
        out.insert(name.clone(), Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    Ok(out)
}

fn frozen(weights: HashMap<String, Tensor>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_tensors(weights, dtype, device)
}

impl Encoders {
    /// The tiny random encoders for `spec` (see the module docs).
    pub fn tiny_random(spec: &EncoderSpec, dtype: DType, device: &Device) -> Result<Self> {
        if spec.text_tokens == 0 || spec.context_dim == 0 || spec.pooled_dim == 0 {
            return Err(EncodeError::Spec(
                "text_tokens, context_dim and pooled_dim must be positive".into(),
            ));
        }
        let vae_cfg = vae_config();
        let t5_cfg = t5_config(spec)?;
        let clip_cfg = clip_config(spec);
        let vae_w = seeded_weights(
            |vb| VaeEncoder::new(&vae_cfg, vb.pp("encoder")).map(|_| ()),
            "vae.",
            spec.seed,
        )?;
        let t5_w = seeded_weights(
            |vb| T5EncoderModel::load(vb, &t5_cfg).map(|_| ()),
            "t5.",
            spec.seed,
        )?;
        let clip_w = seeded_weights(
            |vb| ClipTextTransformer::new(vb, &clip_cfg).map(|_| ()),
            "clip.",
            spec.seed,
        )?;
        Ok(Self {
            spec: spec.clone(),
            vae: VaeEncoder::new(&vae_cfg, frozen(vae_w, dtype, device).pp("encoder"))?,
            vae_shift: vae_cfg.shift_factor,
            vae_scale: vae_cfg.scale_factor,
            t5: T5EncoderModel::load(frozen(t5_w, dtype, device), &t5_cfg)?,
            clip: ClipTextTransformer::new(frozen(clip_w, dtype, device), &clip_cfg)?,
            clip_tokens: clip_cfg.max_position_embeddings,
            device: device.clone(),
            dtype,
        })
    }

    pub fn spec(&self) -> &EncoderSpec {
        &self.spec
    }

    /// Latents [B, 16, H/8, W/8] of images of one size.
    pub fn encode_images(&self, images: &[&Pixels]) -> Result<Tensor> {
        let Some(first) = images.first() else {
            return Err(EncodeError::Spec("no images to encode".into()));
        };
        let (h, w) = (first.height, first.width);
        let mut data = Vec::with_capacity(images.len() * 3 * h * w);
        for p in images {
            if (p.height, p.width) != (h, w) {
                return Err(EncodeError::Spec(format!(
                    "images of one batch differ in size: {h}x{w} and {}x{}",
                    p.height, p.width
                )));
            }
            data.extend_from_slice(&p.data);
        }
        let x =
            Tensor::from_vec(data, (images.len(), 3, h, w), &self.device)?.to_dtype(self.dtype)?;
        let moments = self.vae.forward(&x)?;
        let mean = moments.narrow(1, 0, LATENT_CHANNELS)?;
        let z = ((mean - self.vae_shift)? * self.vae_scale)?;
        Ok(z.to_dtype(DType::F32)?.detach())
    }

    fn ids(&self, captions: &[&str], len: usize, offset: u32, eos: u32) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(captions.len() * len);
        for c in captions {
            let mut row: Vec<u32> = c.bytes().map(|b| b as u32 + offset).take(len - 1).collect();
            row.push(eos);
            row.resize(len, 0);
            ids.extend(row);
        }
        Ok(Tensor::from_vec(ids, (captions.len(), len), &self.device)?)
    }

    /// Per-token caption embeddings [B, text_tokens, context_dim] and pooled embeddings
    /// [B, pooled_dim].
    pub fn encode_text(&mut self, captions: &[&str]) -> Result<(Tensor, Tensor)> {
        let t5_ids = self.ids(captions, self.spec.text_tokens, T5_SPECIAL, T5_EOS)?;
        let txt = self.t5.forward_dt(&t5_ids, Some(self.dtype))?;
        let clip_ids = self.ids(captions, self.clip_tokens, 1, CLIP_EOS)?;
        let pooled = self.clip.forward(&clip_ids)?;
        Ok((
            txt.to_dtype(DType::F32)?.detach(),
            pooled.to_dtype(DType::F32)?.detach(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EncoderSpec {
        EncoderSpec {
            text_tokens: 8,
            context_dim: 32,
            pooled_dim: 16,
            seed: 3,
        }
    }

    fn pixels(v: f32) -> Pixels {
        Pixels {
            height: 32,
            width: 32,
            data: (0..3 * 32 * 32)
                .map(|i| v * ((i % 7) as f32 / 7.0))
                .collect(),
        }
    }

    #[test]
    fn encoders_are_seeded_shaped_and_tell_inputs_apart() {
        let mut a = Encoders::tiny_random(&spec(), DType::F32, &Device::Cpu).unwrap();
        let mut b = Encoders::tiny_random(&spec(), DType::F32, &Device::Cpu).unwrap();
        let (p, q) = (pixels(0.5), pixels(-0.5));
        let za = a.encode_images(&[&p, &q]).unwrap();
        assert_eq!(za.dims(), &[2, 16, 4, 4]);
        let zb = b.encode_images(&[&p, &q]).unwrap();
        let d = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(d(&za, &zb), 0.0, "same seed, same latents");
        assert!(d(&za.get(0).unwrap(), &za.get(1).unwrap()) > 1e-3);
        let (txt, pooled) = a.encode_text(&["a red square", "a green disc"]).unwrap();
        assert_eq!(txt.dims(), &[2, 8, 32]);
        assert_eq!(pooled.dims(), &[2, 16]);
        let (txt_b, _) = b.encode_text(&["a red square", "a green disc"]).unwrap();
        assert_eq!(d(&txt, &txt_b), 0.0);
        assert!(d(&txt.get(0).unwrap(), &txt.get(1).unwrap()) > 1e-3);
        assert!(d(&pooled.get(0).unwrap(), &pooled.get(1).unwrap()) > 1e-3);
        let mut other = spec();
        other.seed = 4;
        let c = Encoders::tiny_random(&other, DType::F32, &Device::Cpu).unwrap();
        assert!(d(&za, &c.encode_images(&[&p, &q]).unwrap()) > 1e-3);
    }
}
