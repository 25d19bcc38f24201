//! Image and caption encoders: the FLUX VAE encoder (latents, 8x below pixels, 16 channels),
//! a T5 encoder (per-token caption embeddings) and a CLIP text model (pooled embedding), from
//! candle-transformers, with their tokenizers.
//!
//! Two sources of weights ([`EncoderSource`]): FLUX.1's pretrained encoders from the files of a
//! pipeline folder ([`pretrained`]), or tiny random ones drawn from a seed for the tiny CPU
//! model ([`tiny`]).
//!
//! Latents are the encoder's mean (not a sample of its Gaussian) shifted and scaled as FLUX
//! does, so they are deterministic and can be cached. Captions are padded and truncated to a
//! fixed length as FluxPipeline does; no attention mask is given to T5 (as BFL and diffusers),
//! and CLIP's pooled output is taken at the first end token.

pub mod files;
pub mod pixel_codec;
pub mod pretrained;
pub mod tiny;
mod tokenize;
pub mod vae_weights;

use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::clip::text_model::ClipTextTransformer;
use candle_transformers::models::flux::autoencoder::Encoder as VaeEncoder;
use candle_transformers::models::t5::T5EncoderModel;

pub use files::ModelFiles;
pub use pretrained::{Files, VaeAt};
use tokenize::TextTokenizer;

/// Latent channels of the FLUX VAE.
pub const LATENT_CHANNELS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("encoders: {0}")]
    Spec(String),
    /// A model file (weights, config, tokenizer) that cannot be used; the source says why.
    #[error("{at}")]
    File {
        at: String,
        #[source]
        source: crate::BoxError,
    },
    /// A file of a sharded checkpoint that cannot be used (its index, for example).
    #[error(transparent)]
    Weights(#[from] crate::FluxError),
    /// A model file that could not be fetched (from a remote folder); the error names it.
    #[error(transparent)]
    Fetch(Box<dyn std::error::Error + Send + Sync>),
}

impl EncodeError {
    /// `why`: a foreign error or our own text.
    pub fn file(at: impl Into<String>, why: impl Into<crate::BoxError>) -> Self {
        Self::File {
            at: at.into(),
            source: why.into(),
        }
    }

    /// A candle error about the file `at`, without the backtrace candle may carry.
    pub fn candle(at: impl Into<String>, e: candle_core::Error) -> Self {
        let mut e = &e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = inner;
        }
        Self::file(at, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, EncodeError>;

/// `vb` under `prefix` when the weights carry it (a checkpoint of a larger model keeps this
/// one under its name: CLIP's text model in a CLIPModel, a backbone under its head), found by
/// `probe`, a tensor every such checkpoint has.
pub(crate) fn unprefixed<'a>(
    vb: candle_nn::VarBuilder<'a>,
    prefix: &str,
    probe: &str,
) -> candle_nn::VarBuilder<'a> {
    if vb.contains_tensor(&format!("{prefix}.{probe}")) {
        vb.pp(prefix)
    } else {
        vb
    }
}

/// An image as f32 CHW in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// Which encoders.
pub enum EncoderSource {
    /// Tiny random encoders drawn from `seed` ([`tiny`]).
    TinyRandom { seed: u64 },
    /// FLUX.1's pretrained encoders from these files.
    Pretrained(Box<Files>),
}

/// Latents back to pixels, sampling's last step: FLUX's VAE decoder, or the tiny pipeline's
/// pixel codec ([`pixel_codec`]).
pub struct VaeDecoder {
    kind: DecoderKind,
    device: Device,
    dtype: DType,
}

enum DecoderKind {
    Vae {
        decoder: Box<candle_transformers::models::flux::autoencoder::Decoder>,
        scale: f64,
        shift: f64,
    },
    Pixels,
}

/// Pixels to latents: FLUX's VAE encoder (z = (mean - shift) x scale), or the pixel codec.
pub(crate) enum ImageEncoder {
    Vae {
        encoder: Box<VaeEncoder>,
        scale: f64,
        shift: f64,
    },
    Pixels,
}

impl VaeDecoder {
    /// The decoder of configuration `cfg` from its weights in BFL names (`decoder.*`).
    pub fn new(
        cfg: &candle_transformers::models::flux::autoencoder::Config,
        weights: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        at: &str,
    ) -> Result<Self> {
        let vb = candle_nn::VarBuilder::from_tensors(weights, dtype, device);
        let decoder =
            candle_transformers::models::flux::autoencoder::Decoder::new(cfg, vb.pp("decoder"))
                .map_err(|e| EncodeError::candle(at, e))?;
        Ok(Self {
            kind: DecoderKind::Vae {
                decoder: Box::new(decoder),
                scale: cfg.scale_factor,
                shift: cfg.shift_factor,
            },
            device: device.clone(),
            dtype,
        })
    }

    /// The pixel codec's decoder (the tiny pipeline's).
    pub fn pixels(device: &Device) -> Self {
        Self {
            kind: DecoderKind::Pixels,
            device: device.clone(),
            dtype: DType::F32,
        }
    }

    /// Images [B, 3, 8h, 8w] in [-1, 1] (f32, unclamped) of FLUX-normalised latents
    /// [B, 16, h, w]: the decoder sees z / scale + shift.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        use candle_core::Module;
        let z = z.to_device(&self.device)?.to_dtype(DType::F32)?;
        match &self.kind {
            DecoderKind::Vae {
                decoder,
                scale,
                shift,
            } => {
                let z = ((z / *scale)? + *shift)?.to_dtype(self.dtype)?;
                Ok(decoder.forward(&z)?.to_dtype(DType::F32)?)
            }
            DecoderKind::Pixels => pixel_codec::decode(&z),
        }
    }
}

/// FLUX's VAE encoder, T5 and CLIP with their tokenizers, ready to encode.
pub struct Encoders {
    text_tokens: usize,
    vae: ImageEncoder,
    t5: T5EncoderModel,
    t5_tokenizer: TextTokenizer,
    clip: ClipTextTransformer,
    clip_tokenizer: TextTokenizer,
    clip_tokens: usize,
    device: Device,
    dtype: DType,
}

impl Encoders {
    /// Builds the encoders from `source`, for captions of `text_tokens` T5 tokens and a model
    /// whose context and pooled widths are `context_dim` and `pooled_dim` (pretrained encoders
    /// of other widths are refused naming their config), computing in `dtype` on `device`.
    pub fn load(
        source: &EncoderSource,
        text_tokens: usize,
        context_dim: usize,
        pooled_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if text_tokens == 0 || context_dim == 0 || pooled_dim == 0 {
            return Err(EncodeError::Spec(
                "text_tokens, context_dim and pooled_dim must be positive".into(),
            ));
        }
        let parts = match source {
            EncoderSource::TinyRandom { seed } => {
                tiny::load(*seed, context_dim, pooled_dim, dtype, device)?
            }
            EncoderSource::Pretrained(files) => {
                pretrained::load(files, text_tokens, context_dim, pooled_dim, dtype, device)?
            }
        };
        Ok(Self {
            text_tokens,
            vae: parts.vae,
            t5: parts.t5,
            t5_tokenizer: parts.t5_tokenizer,
            clip: parts.clip,
            clip_tokenizer: parts.clip_tokenizer,
            clip_tokens: parts.clip_tokens,
            device: device.clone(),
            dtype,
        })
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
        let z = match &self.vae {
            ImageEncoder::Vae {
                encoder,
                scale,
                shift,
            } => {
                let moments = encoder.forward(&x)?;
                let mean = moments.narrow(1, 0, LATENT_CHANNELS)?;
                ((mean - *shift)? * *scale)?
            }
            ImageEncoder::Pixels => pixel_codec::encode(&x.to_dtype(DType::F32)?)?,
        };
        Ok(z.to_dtype(DType::F32)?.detach())
    }

    /// The (T5, CLIP) token ids of `captions`, [B, text_tokens] and [B, CLIP length].
    pub fn token_ids(&self, captions: &[&str]) -> Result<(Tensor, Tensor)> {
        let b = captions.len();
        let t5 = self.t5_tokenizer.ids(captions, self.text_tokens)?;
        let clip = self.clip_tokenizer.ids(captions, self.clip_tokens)?;
        Ok((
            Tensor::from_vec(t5, (b, self.text_tokens), &self.device)?,
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

    fn tiny(seed: u64) -> Encoders {
        Encoders::load(
            &EncoderSource::TinyRandom { seed },
            8,
            32,
            16,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
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
        let mut a = tiny(3);
        let mut b = tiny(3);
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
        // The seed draws the text encoders; the tiny image codec has no weights.
        let mut c = tiny(4);
        assert_eq!(d(&za, &c.encode_images(&[&p, &q]).unwrap()), 0.0);
        let (txt_c, _) = c.encode_text(&["a red square", "a green disc"]).unwrap();
        assert!(d(&txt, &txt_c) > 1e-3);
    }
}
