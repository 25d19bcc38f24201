//! Image and caption encoders: the FLUX VAE encoder (latents, 8x below pixels, 16 channels),
//! a T5 encoder (per-token caption embeddings) and a CLIP text model (pooled embedding), from
//! candle-transformers, with their tokenizers.
//!
//! Two sources of weights ([`EncoderWeights`]): FLUX.1's pretrained encoders from a pipeline
//! folder at a path or URL ([`pretrained`]), or tiny random ones drawn from the run seed for the
//! tiny CPU model ([`tiny`]).
//!
//! Latents are the encoder's mean (not a sample of its Gaussian) shifted and scaled as FLUX
//! does, so they are deterministic and can be cached. Captions are padded and truncated to a
//! fixed length as FluxPipeline does; no attention mask is given to T5 (as BFL and diffusers),
//! and CLIP's pooled output is taken at the first end token.

pub mod pretrained;
pub mod tiny;
mod tokenize;
pub mod vae_weights;

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::clip::text_model::ClipTextTransformer;
use candle_transformers::models::flux::autoencoder::Encoder as VaeEncoder;
use candle_transformers::models::t5::T5EncoderModel;

use crate::transform::Pixels;
use tokenize::TextTokenizer;

/// Latent channels of the FLUX VAE.
pub const LATENT_CHANNELS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("encoders: {0}")]
    Spec(String),
    /// A model file (weights, config, tokenizer) that cannot be used.
    #[error("{at}: {reason}")]
    File { at: String, reason: String },
    #[error(transparent)]
    Data(#[from] crate::error::DataError),
}

impl EncodeError {
    pub fn file(at: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::File {
            at: at.into(),
            reason: reason.to_string(),
        }
    }

    /// A candle error about the file `at`, without the backtrace candle may carry.
    pub fn candle(at: impl Into<String>, e: candle_core::Error) -> Self {
        let mut e = &e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = inner;
        }
        Self::file(at, e)
    }
}

type Result<T> = std::result::Result<T, EncodeError>;

/// Where FLUX.1's pretrained encoders are.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainedSource {
    /// Pipeline folder (path or URL) in the diffusers layout ([`pretrained`]).
    pub folder: String,
    /// The VAE from elsewhere: a `.safetensors` file (BFL's `ae.safetensors`, or diffusers
    /// names) or a diffusers `vae` folder.
    pub vae: Option<String>,
    /// Where remote files are downloaded and digests memoised
    /// ([`crate::model_files::cache_root`]).
    pub cache: PathBuf,
}

/// Which encoders.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderWeights {
    /// Tiny random encoders drawn from `seed` ([`tiny`]).
    TinyRandom { seed: u64 },
    /// FLUX.1's pretrained encoders.
    Pretrained(PretrainedSource),
}

/// What the encoders must produce for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderSpec {
    pub weights: EncoderWeights,
    /// Caption tokens (T5 sequence length).
    pub text_tokens: usize,
    /// Width of a caption token embedding (the model's context dim).
    pub context_dim: usize,
    /// Width of the pooled caption embedding (the model's pooled dim).
    pub pooled_dim: usize,
}

impl EncoderSpec {
    /// A stable description of the encoders, for cache keys: for pretrained encoders it holds
    /// digests of every file, which are fetched (downloaded once, when remote) and hashed (once
    /// per file version, memoised).
    pub fn fingerprint(&self) -> Result<String> {
        let encoders = match &self.weights {
            EncoderWeights::TinyRandom { seed } => {
                tiny::fingerprint(*seed, self.context_dim, self.pooled_dim)
            }
            EncoderWeights::Pretrained(src) => {
                pretrained::Files::resolve(src)?.fingerprint(&src.cache)?
            }
        };
        Ok(format!("{encoders}/tokens{}", self.text_tokens))
    }

    /// Whether pretrained encoders produce the widths the model needs (reads their configs; the
    /// tiny encoders are built at the model's widths).
    pub fn check_widths(&self) -> Result<()> {
        match &self.weights {
            EncoderWeights::TinyRandom { .. } => Ok(()),
            EncoderWeights::Pretrained(src) => {
                pretrained::Files::resolve(src)?.check_widths(self.context_dim, self.pooled_dim)
            }
        }
    }

    /// For logs (no I/O).
    pub fn describe(&self) -> String {
        match &self.weights {
            EncoderWeights::TinyRandom { seed } => format!("tiny random encoders (seed {seed})"),
            EncoderWeights::Pretrained(src) => match &src.vae {
                Some(vae) => format!("encoders from {} (VAE from {vae})", src.folder),
                None => format!("encoders from {}", src.folder),
            },
        }
    }
}

/// The (context, pooled) widths pretrained encoders produce, read from their configs.
pub fn pretrained_widths(src: &PretrainedSource) -> Result<(usize, usize)> {
    pretrained::Files::resolve(src)?.widths()
}

pub struct Encoders {
    spec: EncoderSpec,
    vae: VaeEncoder,
    vae_shift: f64,
    vae_scale: f64,
    t5: T5EncoderModel,
    t5_tokenizer: TextTokenizer,
    clip: ClipTextTransformer,
    clip_tokenizer: TextTokenizer,
    clip_tokens: usize,
    device: Device,
    dtype: DType,
}

impl Encoders {
    /// Builds the encoders `spec` names, computing in `dtype` on `device`.
    pub fn load(spec: &EncoderSpec, dtype: DType, device: &Device) -> Result<Self> {
        if spec.text_tokens == 0 || spec.context_dim == 0 || spec.pooled_dim == 0 {
            return Err(EncodeError::Spec(
                "text_tokens, context_dim and pooled_dim must be positive".into(),
            ));
        }
        let parts = match &spec.weights {
            EncoderWeights::TinyRandom { seed } => {
                tiny::load(*seed, spec.context_dim, spec.pooled_dim, dtype, device)?
            }
            EncoderWeights::Pretrained(src) => pretrained::load(
                &pretrained::Files::resolve(src)?,
                spec.text_tokens,
                spec.context_dim,
                spec.pooled_dim,
                dtype,
                device,
            )?,
        };
        Ok(Self {
            spec: spec.clone(),
            vae: parts.vae,
            vae_shift: parts.vae_shift,
            vae_scale: parts.vae_scale,
            t5: parts.t5,
            t5_tokenizer: parts.t5_tokenizer,
            clip: parts.clip,
            clip_tokenizer: parts.clip_tokenizer,
            clip_tokens: parts.clip_tokens,
            device: device.clone(),
            dtype,
        })
    }

    pub fn spec(&self) -> &EncoderSpec {
        &self.spec
    }

    /// Latents [B, 16, H/8, W/8] of images of one size (pixels in [-1, 1], [3, H, W] each).
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

    /// The (T5, CLIP) token ids of `captions`, [B, text_tokens] and [B, CLIP length].
    pub fn token_ids(&self, captions: &[&str]) -> Result<(Tensor, Tensor)> {
        let b = captions.len();
        let t5 = self.t5_tokenizer.ids(captions, self.spec.text_tokens)?;
        let clip = self.clip_tokenizer.ids(captions, self.clip_tokens)?;
        Ok((
            Tensor::from_vec(t5, (b, self.spec.text_tokens), &self.device)?,
            Tensor::from_vec(clip, (b, self.clip_tokens), &self.device)?,
        ))
    }

    /// Per-token caption embeddings [B, text_tokens, context_dim] and pooled embeddings
    /// [B, pooled_dim].
    pub fn encode_text(&mut self, captions: &[&str]) -> Result<(Tensor, Tensor)> {
        let (t5_ids, clip_ids) = self.token_ids(captions)?;
        let txt = self.t5.forward_dt(&t5_ids, Some(self.dtype))?;
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
            weights: EncoderWeights::TinyRandom { seed: 3 },
            text_tokens: 8,
            context_dim: 32,
            pooled_dim: 16,
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
        let mut a = Encoders::load(&spec(), DType::F32, &Device::Cpu).unwrap();
        let mut b = Encoders::load(&spec(), DType::F32, &Device::Cpu).unwrap();
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
        other.weights = EncoderWeights::TinyRandom { seed: 4 };
        let c = Encoders::load(&other, DType::F32, &Device::Cpu).unwrap();
        assert!(d(&za, &c.encode_images(&[&p, &q]).unwrap()) > 1e-3);
    }
}
