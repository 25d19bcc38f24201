//! The tiny encoders: the pixel codec in place of a VAE (exact and weightless, so that samples
//! decode to pictures; [`super::pixel_codec`]), and T5 and CLIP at the widths a small model
//! needs, with weights drawn from the run seed (the same seed gives the same encoders on
//! every rank and every restart) and a byte-level tokenizer (ByT5-style ids: byte + 3 for T5;
//! byte + 1 with the end token as the largest id for CLIP, whose pooled output is taken at the
//! end token). The tiny CPU model trains with these.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::pretrained::Loaded;
use super::tokenize::TextTokenizer;
use super::{EncodeError, Result};

/// What the fingerprint says about these encoders.
pub fn fingerprint(seed: u64, context_dim: usize, pooled_dim: usize) -> String {
    format!(
        "tiny-random/pixel-codec-pool4-x{}/t5-d{context_dim}-l2/clip-d{pooled_dim}-l2/seed{seed}",
        super::pixel_codec::SCALE
    )
}

const T5_SPECIAL: u32 = 3;
const T5_EOS: u32 = 1;
const CLIP_VOCAB: usize = 258;
const CLIP_EOS: u32 = 257;

fn t5_config(context_dim: usize) -> Result<T5Config> {
    let heads = if context_dim.is_multiple_of(32) {
        context_dim / 16
    } else {
        1
    };
    serde_json::from_value(serde_json::json!({
        "vocab_size": 256 + T5_SPECIAL as usize,
        "d_model": context_dim,
        "d_kv": context_dim / heads,
        "d_ff": 2 * context_dim,
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

fn clip_config(pooled_dim: usize) -> ClipTextConfig {
    let heads = if pooled_dim.is_multiple_of(8) {
        pooled_dim / 8
    } else {
        1
    };
    ClipTextConfig {
        vocab_size: CLIP_VOCAB,
        embed_dim: pooled_dim,
        activation: Activation::QuickGelu,
        intermediate_size: 2 * pooled_dim,
        max_position_embeddings: 32,
        pad_with: None,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        projection_dim: pooled_dim,
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

/// The tiny pipeline's decoder: the pixel codec's ([`super::pixel_codec`]), which inverts
/// its encoder at a quarter of the resolution.
pub fn vae_decoder(_seed: u64, _dtype: DType, device: &Device) -> Result<super::VaeDecoder> {
    Ok(super::VaeDecoder::pixels(device))
}

/// Builds the tiny encoders.
pub(crate) fn load(
    seed: u64,
    context_dim: usize,
    pooled_dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    let t5_cfg = t5_config(context_dim)?;
    let clip_cfg = clip_config(pooled_dim);
    let t5_w = seeded_weights(
        |vb| T5EncoderModel::load(vb, &t5_cfg).map(|_| ()),
        "t5.",
        seed,
    )?;
    let clip_w = seeded_weights(
        |vb| ClipTextTransformer::new(vb, &clip_cfg).map(|_| ()),
        "clip.",
        seed,
    )?;
    Ok(Loaded {
        vae: super::ImageEncoder::Pixels,
        t5: T5EncoderModel::load(frozen(t5_w, dtype, device), &t5_cfg)?,
        t5_tokenizer: TextTokenizer::Bytes {
            offset: T5_SPECIAL,
            eos: T5_EOS,
        },
        clip: ClipTextTransformer::new(frozen(clip_w, dtype, device), &clip_cfg)?,
        clip_tokenizer: TextTokenizer::Bytes {
            offset: 1,
            eos: CLIP_EOS,
        },
        clip_tokens: clip_cfg.max_position_embeddings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoders::LATENT_CHANNELS;

    #[test]
    fn the_tiny_pipeline_decodes_what_it_encodes() {
        let dev = Device::Cpu;
        let enc = super::super::Encoders::load(
            &super::super::EncoderSource::TinyRandom { seed: 3 },
            8,
            32,
            16,
            DType::F32,
            &dev,
        )
        .unwrap();
        // A left half of -1 and a right half of +1 survives the round trip exactly.
        let (h, w) = (16, 32);
        let data: Vec<f32> = (0..3 * h * w)
            .map(|i| if i % w < w / 2 { -1.0 } else { 1.0 })
            .collect();
        let px = super::super::Pixels {
            height: h,
            width: w,
            data: data.clone(),
        };
        let z = enc.encode_images(&[&px]).unwrap();
        assert_eq!(z.dims(), &[1, LATENT_CHANNELS, 2, 4]);
        let y = vae_decoder(3, DType::F32, &dev)
            .unwrap()
            .decode(&z)
            .unwrap();
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, data);
    }
}
