//! Which encoders a dataset's latents and caption embeddings come from, named by path or URL:
//! FLUX.1's pretrained VAE, T5 and CLIP from a pipeline folder (downloaded once when remote,
//! see [`crate::model_files`]) or tiny seeded ones. The encoders themselves are the model
//! crate's ([`flux::encoders`]); this module resolves their files, fingerprints them for cache
//! keys and loads them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use flux::encoders::{tiny, EncoderSource, Files, ModelFiles, VaeAt};
pub use flux::encoders::{EncodeError, Encoders, LATENT_CHANNELS};
use sha2::{Digest, Sha256};

use crate::error::DataError;
use crate::model_files::{file_sha256, ModelFolder};

type Result<T> = std::result::Result<T, EncodeError>;

impl From<DataError> for EncodeError {
    fn from(e: DataError) -> Self {
        EncodeError::Fetch(Box::new(e))
    }
}

impl ModelFiles for ModelFolder {
    fn name(&self, rel: &str) -> String {
        ModelFolder::name(self, rel)
    }

    fn exists(&self, rel: &str) -> Result<bool> {
        Ok(ModelFolder::exists(self, rel)?)
    }

    fn file(&self, rel: &str) -> Result<PathBuf> {
        Ok(ModelFolder::file(self, rel)?)
    }
}

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
            EncoderWeights::Pretrained(src) => files_fingerprint(&resolve(src)?, &src.cache)?,
        };
        Ok(format!("{encoders}/tokens{}", self.text_tokens))
    }

    /// Whether pretrained encoders produce the widths the model needs (reads their configs; the
    /// tiny encoders are built at the model's widths).
    pub fn check_widths(&self) -> Result<()> {
        match &self.weights {
            EncoderWeights::TinyRandom { .. } => Ok(()),
            EncoderWeights::Pretrained(src) => {
                resolve(src)?.check_widths(self.context_dim, self.pooled_dim)
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
    resolve(src)?.widths()
}

/// Local copies of every file of the pretrained encoders (remote ones downloaded once).
fn resolve(src: &PretrainedSource) -> Result<Files> {
    let folder = ModelFolder::open(&src.folder, &src.cache)?;
    match &src.vae {
        Some(url) if url.ends_with(".safetensors") => {
            let (dir, name) = ModelFolder::open_file(url, &src.cache)?;
            Files::resolve(&folder, VaeAt::File { folder: &dir, name })
        }
        Some(url) => {
            let dir = ModelFolder::open(url, &src.cache)?;
            Files::resolve(&folder, VaeAt::Folder(&dir))
        }
        None => Files::resolve(&folder, VaeAt::Pipeline),
    }
}

/// Short digests of each component's files (names and contents), memoised below `cache`.
fn files_fingerprint(files: &Files, cache: &Path) -> Result<String> {
    let mut parts = Vec::new();
    for (component, paths) in files.components() {
        let mut h = Sha256::new();
        for f in paths {
            let name = f.file_name().map(|n| n.to_string_lossy().to_string());
            h.update(name.unwrap_or_default().as_bytes());
            h.update(b":");
            h.update(file_sha256(f, cache)?.as_bytes());
            h.update(b"\n");
        }
        let digest: String = h.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        parts.push(format!("{component}-{digest}"));
    }
    Ok(format!(
        "flux-pretrained-v{}/{}",
        flux::encoders::pretrained::LOADER_VERSION,
        parts.join("/")
    ))
}

/// The VAE decoder of the encoders `spec` names (the tiny random one is seeded like its
/// encoder), computing in `dtype` on `device`.
pub fn load_vae_decoder(
    spec: &EncoderSpec,
    dtype: DType,
    device: &Device,
) -> Result<flux::encoders::VaeDecoder> {
    match &spec.weights {
        EncoderWeights::TinyRandom { seed } => tiny::vae_decoder(*seed, dtype, device),
        EncoderWeights::Pretrained(src) => resolve(src)?.vae_decoder(dtype, device),
    }
}

/// Builds the encoders `spec` names, computing in `dtype` on `device`.
pub fn load_encoders(spec: &EncoderSpec, dtype: DType, device: &Device) -> Result<Encoders> {
    let source = match &spec.weights {
        EncoderWeights::TinyRandom { seed } => EncoderSource::TinyRandom { seed: *seed },
        EncoderWeights::Pretrained(src) => EncoderSource::Pretrained(Box::new(resolve(src)?)),
    };
    Encoders::load(
        &source,
        spec.text_tokens,
        spec.context_dim,
        spec.pooled_dim,
        dtype,
        device,
    )
}
