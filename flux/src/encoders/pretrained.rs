//! FLUX.1's pretrained encoders from a pipeline folder in the diffusers layout (a snapshot of
//! black-forest-labs/FLUX.1-dev):
//!
//! - `vae/` (config.json + diffusion_pytorch_model.safetensors), or else BFL's `ae.safetensors`
//!   at the top; [`VaeAt`] may name either elsewhere;
//! - `text_encoder/`: CLIP-L (`CLIPTextModel`), config.json + model.safetensors;
//! - `text_encoder_2/`: T5-XXL encoder, config.json + model.safetensors or sharded with
//!   model.safetensors.index.json;
//! - `tokenizer/`: CLIP's tokenizer.json, or its vocab.json + merges.txt;
//! - `tokenizer_2/`: T5's tokenizer.json (a bare spiece.model is not read).
//!
//! The folder is anything that hands out local files ([`ModelFiles`]): a local folder here, or
//! a remote one that the data crate downloads.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::flux::autoencoder::Encoder as VaeEncoder;
use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};

use super::files::ModelFiles;
use super::tokenize::{SpecialTokens, TextTokenizer};
use super::{vae_weights, EncodeError, Result};
use crate::weights::index_files;

/// Bumped when the way files become encoders changes (callers put it in their fingerprints).
pub const LOADER_VERSION: u32 = 1;

enum VaeFiles {
    /// A diffusers `vae/` folder's config and weights.
    Diffusers {
        config: PathBuf,
        weights: Vec<PathBuf>,
    },
    /// One safetensors file (BFL names, or diffusers names) without a config.
    Single(PathBuf),
}

enum ClipTokenizerFiles {
    Json(PathBuf),
    VocabMerges { vocab: PathBuf, merges: PathBuf },
}

impl VaeFiles {
    /// The weight files and the latent (scale, shift): from the diffusers config, or FLUX.1's
    /// for a single BFL file.
    fn files(&self) -> Result<(Vec<PathBuf>, f64, f64)> {
        Ok(match self {
            VaeFiles::Diffusers { config, weights } => {
                let at = config.display().to_string();
                let v = json(config)?;
                if v.get("use_quant_conv").and_then(|q| q.as_bool()) == Some(true) {
                    return Err(EncodeError::file(
                        &at,
                        "use_quant_conv is true (a Stable Diffusion VAE?); FLUX's VAE has none",
                    ));
                }
                let scale = v
                    .get("scaling_factor")
                    .and_then(|s| s.as_f64())
                    .ok_or_else(|| EncodeError::file(&at, "no `scaling_factor`"))?;
                let shift = v
                    .get("shift_factor")
                    .and_then(|s| s.as_f64())
                    .unwrap_or(0.0);
                (weights.clone(), scale, shift)
            }
            VaeFiles::Single(f) => (
                vec![f.clone()],
                vae_weights::FLUX_SCALE,
                vae_weights::FLUX_SHIFT,
            ),
        })
    }
}

impl Files {
    /// The VAE decoder of these files, computing in `dtype` on `device`.
    pub fn vae_decoder(&self, dtype: DType, device: &Device) -> Result<super::VaeDecoder> {
        decoder_of(&self.vae, dtype, device)
    }
}

/// The decoder of the VAE in `vae`, computing in `dtype` on `device`.
fn decoder_of(vae: &VaeFiles, dtype: DType, device: &Device) -> Result<super::VaeDecoder> {
    let (paths, scale, shift) = vae.files()?;
    let at = paths[0].display().to_string();
    // The configuration is read off the encoder's shapes (the halves share it).
    let cfg = vae_weights::config(&vae_weights::load(&paths)?, scale, shift, &at)?;
    let w = vae_weights::load_part(&paths, vae_weights::Part::Decoder)?;
    super::VaeDecoder::new(&cfg, w, dtype, device, &at)
}

/// The decoder of a VAE on its own: a diffusers `vae` folder (config.json and weights) or a
/// folder holding BFL's ae.safetensors, computing in `dtype` on `device`.
pub fn vae_decoder(
    vae: &dyn ModelFiles,
    dtype: DType,
    device: &Device,
) -> Result<super::VaeDecoder> {
    let files = if vae.exists("config.json")? {
        VaeFiles::Diffusers {
            config: vae.file("config.json")?,
            weights: weight_files(vae, "", "diffusion_pytorch_model")?,
        }
    } else if vae.exists("ae.safetensors")? {
        VaeFiles::Single(vae.file("ae.safetensors")?)
    } else {
        return Err(EncodeError::file(
            vae.name("."),
            "not a VAE folder: neither config.json (diffusers) nor ae.safetensors (BFL)",
        ));
    };
    decoder_of(&files, dtype, device)
}

/// Local copies of every file the encoders are built from.
pub struct Files {
    vae: VaeFiles,
    t5_config: PathBuf,
    t5_weights: Vec<PathBuf>,
    clip_config: PathBuf,
    clip_weights: Vec<PathBuf>,
    t5_tokenizer: PathBuf,
    t5_special: Vec<PathBuf>,
    clip_tokenizer: ClipTokenizerFiles,
    clip_special: Vec<PathBuf>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| EncodeError::file(path.display().to_string(), e))
}

fn json(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&read(path)?)
        .map_err(|e| EncodeError::file(path.display().to_string(), format!("not JSON: {e}")))
}

/// `name` inside the component folder `dir` ("" for the top).
fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The weight files of a diffusers or transformers component folder `dir`: `{stem}.safetensors`
/// or the files its `{stem}.safetensors.index.json` lists.
pub(crate) fn weight_files(folder: &dyn ModelFiles, dir: &str, stem: &str) -> Result<Vec<PathBuf>> {
    let single = join(dir, &format!("{stem}.safetensors"));
    let index = format!("{single}.index.json");
    if folder.exists(&index)? {
        let path = folder.file(&index)?;
        return index_files(&path)?
            .into_iter()
            .map(|n| folder.file(&join(dir, &n)))
            .collect();
    }
    if folder.exists(&single)? {
        return Ok(vec![folder.file(&single)?]);
    }
    Err(EncodeError::file(
        folder.name(if dir.is_empty() { "." } else { dir }),
        format!("neither {stem}.safetensors nor {stem}.safetensors.index.json is there"),
    ))
}

fn special_files(folder: &dyn ModelFiles, dir: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let rel = format!("{dir}/{name}");
        if folder.exists(&rel)? {
            out.push(folder.file(&rel)?);
        }
    }
    Ok(out)
}

fn special_tokens(files: &[PathBuf]) -> Result<SpecialTokens> {
    let texts = files
        .iter()
        .map(|f| Ok((f.display().to_string(), read(f)?)))
        .collect::<Result<Vec<_>>>()?;
    SpecialTokens::from_json(&texts)
}

fn required(folder: &dyn ModelFiles, rel: &str, what: &str) -> Result<PathBuf> {
    if !folder.exists(rel)? {
        return Err(EncodeError::file(
            folder.name(rel),
            format!("not found ({what}; expected FLUX.1's diffusers layout, see docs/data.md)"),
        ));
    }
    folder.file(rel)
}

/// Where the VAE is.
pub enum VaeAt<'a> {
    /// In the pipeline folder: `vae/`, else `ae.safetensors` at the top.
    Pipeline,
    /// A diffusers `vae` folder elsewhere.
    Folder(&'a dyn ModelFiles),
    /// One safetensors file `name` in `folder` (BFL's `ae.safetensors`, or diffusers names).
    File {
        folder: &'a dyn ModelFiles,
        name: String,
    },
}

impl Files {
    /// Finds every file of the pipeline `folder` (and of the VAE at `vae`).
    pub fn resolve(folder: &dyn ModelFiles, vae: VaeAt<'_>) -> Result<Self> {
        let vae = match vae {
            VaeAt::File { folder: dir, name } => {
                VaeFiles::Single(required(dir, &name, "the VAE file")?)
            }
            VaeAt::Folder(dir) => VaeFiles::Diffusers {
                config: required(dir, "config.json", "the VAE config")?,
                weights: weight_files(dir, "", "diffusion_pytorch_model")?,
            },
            VaeAt::Pipeline if folder.exists("vae/config.json")? => VaeFiles::Diffusers {
                config: folder.file("vae/config.json")?,
                weights: weight_files(folder, "vae", "diffusion_pytorch_model")?,
            },
            VaeAt::Pipeline => VaeFiles::Single(required(
                folder,
                "ae.safetensors",
                "the VAE: neither vae/config.json nor ae.safetensors",
            )?),
        };
        let clip_tokenizer = if folder.exists("tokenizer/tokenizer.json")? {
            ClipTokenizerFiles::Json(folder.file("tokenizer/tokenizer.json")?)
        } else {
            ClipTokenizerFiles::VocabMerges {
                vocab: required(folder, "tokenizer/vocab.json", "CLIP's tokenizer")?,
                merges: required(folder, "tokenizer/merges.txt", "CLIP's tokenizer")?,
            }
        };
        Ok(Self {
            vae,
            t5_config: required(folder, "text_encoder_2/config.json", "T5's config")?,
            t5_weights: weight_files(folder, "text_encoder_2", "model")?,
            clip_config: required(folder, "text_encoder/config.json", "CLIP's config")?,
            clip_weights: weight_files(folder, "text_encoder", "model")?,
            t5_tokenizer: required(
                folder,
                "tokenizer_2/tokenizer.json",
                "T5's tokenizer.json (a bare spiece.model is not read)",
            )?,
            t5_special: special_files(folder, "tokenizer_2")?,
            clip_tokenizer,
            clip_special: special_files(folder, "tokenizer")?,
        })
    }

    /// Every file, by component (`vae`, `t5`, `clip`, `tokenizers`), in a fixed order: what a
    /// fingerprint of the encoders must hash.
    pub fn components(&self) -> [(&'static str, Vec<&Path>); 4] {
        let vae: Vec<&Path> = match &self.vae {
            VaeFiles::Diffusers { config, weights } => std::iter::once(config)
                .chain(weights)
                .map(PathBuf::as_path)
                .collect(),
            VaeFiles::Single(f) => vec![f],
        };
        let t5 = std::iter::once(&self.t5_config)
            .chain(&self.t5_weights)
            .map(PathBuf::as_path)
            .collect();
        let clip = std::iter::once(&self.clip_config)
            .chain(&self.clip_weights)
            .map(PathBuf::as_path)
            .collect();
        let mut tok: Vec<&Path> = vec![&self.t5_tokenizer];
        tok.extend(self.t5_special.iter().map(PathBuf::as_path));
        match &self.clip_tokenizer {
            ClipTokenizerFiles::Json(f) => tok.push(f),
            ClipTokenizerFiles::VocabMerges { vocab, merges } => tok.extend([&**vocab, &**merges]),
        }
        tok.extend(self.clip_special.iter().map(PathBuf::as_path));
        [
            ("vae", vae),
            ("t5", t5),
            ("clip", clip),
            ("tokenizers", tok),
        ]
    }

    /// Errors naming the config when T5 or CLIP is not as wide as the model needs.
    pub fn check_widths(&self, context_dim: usize, pooled_dim: usize) -> Result<()> {
        let (t5, clip) = self.widths()?;
        same_width(&self.t5_config, "T5", t5, "context_dim", context_dim)?;
        same_width(&self.clip_config, "CLIP", clip, "pooled_dim", pooled_dim)
    }

    /// (T5 width, CLIP width): the context and pooled dims the encoders produce.
    pub fn widths(&self) -> Result<(usize, usize)> {
        Ok((self.t5_cfg()?.d_model, self.clip_cfg()?.embed_dim))
    }

    fn t5_cfg(&self) -> Result<T5Config> {
        let at = self.t5_config.display().to_string();
        let c: T5Config = serde_json::from_str(&read(&self.t5_config)?)
            .map_err(|e| EncodeError::file(&at, format!("not a T5 config: {e}")))?;
        let sizes = [
            ("vocab_size", c.vocab_size),
            ("d_model", c.d_model),
            ("d_kv", c.d_kv),
            ("d_ff", c.d_ff),
            ("num_layers", c.num_layers),
            ("num_heads", c.num_heads),
            (
                "relative_attention_num_buckets",
                c.relative_attention_num_buckets,
            ),
        ];
        if let Some((k, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(EncodeError::file(&at, format!("`{k}` must be positive")));
        }
        Ok(c)
    }

    fn clip_cfg(&self) -> Result<ClipTextConfig> {
        let at = self.clip_config.display().to_string();
        let v = json(&self.clip_config)?;
        // A whole CLIPModel config nests the text model's.
        let v = v.get("text_config").cloned().unwrap_or(v);
        let num = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| EncodeError::file(&at, format!("no integer `{k}`")))
        };
        let act = v
            .get("hidden_act")
            .and_then(|a| a.as_str())
            .unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(EncodeError::file(
                &at,
                format!("hidden_act `{act}`: only CLIP-L's quick_gelu is supported"),
            ));
        }
        let eps = v
            .get("layer_norm_eps")
            .and_then(|e| e.as_f64())
            .unwrap_or(1e-5);
        if (eps - 1e-5).abs() > 1e-12 {
            return Err(EncodeError::file(
                &at,
                format!("layer_norm_eps {eps}: only CLIP's 1e-5 is supported"),
            ));
        }
        let embed_dim = num("hidden_size")?;
        let positions = num("max_position_embeddings")?;
        if positions == 0 || embed_dim == 0 {
            return Err(EncodeError::file(
                &at,
                "hidden_size and max_position_embeddings must be positive",
            ));
        }
        Ok(ClipTextConfig {
            vocab_size: num("vocab_size")?,
            embed_dim,
            activation: Activation::QuickGelu,
            intermediate_size: num("intermediate_size")?,
            max_position_embeddings: positions,
            pad_with: None,
            num_hidden_layers: num("num_hidden_layers")?,
            num_attention_heads: num("num_attention_heads")?,
            projection_dim: num("projection_dim").unwrap_or(embed_dim),
        })
    }
}

fn mmaped(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: read-only mappings of files nobody truncates while the encoders live.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
        EncodeError::candle(
            files
                .first()
                .map(|f| f.display().to_string())
                .unwrap_or_default(),
            e,
        )
    })
}

/// An encoder (configured in `config`) whose output width is not the model's.
fn same_width(config: &Path, what: &str, width: usize, model_key: &str, want: usize) -> Result<()> {
    if width == want {
        return Ok(());
    }
    Err(EncodeError::file(
        config.display().to_string(),
        format!("{what} is {width} wide but the model's {model_key} is {want}"),
    ))
}

/// The parts [`super::Encoders`] is made of.
pub(crate) struct Loaded {
    pub vae: super::ImageEncoder,
    pub t5: T5EncoderModel,
    pub t5_tokenizer: TextTokenizer,
    pub clip: ClipTextTransformer,
    pub clip_tokenizer: TextTokenizer,
    pub clip_tokens: usize,
}

/// Builds the encoders, checking their widths against the model's (`context_dim`,
/// `pooled_dim`).
pub(crate) fn load(
    files: &Files,
    text_tokens: usize,
    context_dim: usize,
    pooled_dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    files.check_widths(context_dim, pooled_dim)?;
    // VAE.
    let (vae_paths, scale, shift) = files.vae.files()?;
    let vae_at = vae_paths[0].display().to_string();
    let vae_w = vae_weights::load(&vae_paths)?;
    let vae_cfg = vae_weights::config(&vae_w, scale, shift, &vae_at)?;
    let vae = VaeEncoder::new(
        &vae_cfg,
        VarBuilder::from_tensors(vae_w, dtype, device).pp("encoder"),
    )
    .map_err(|e| EncodeError::candle(&vae_at, e))?;

    // T5.
    let t5_cfg = files.t5_cfg()?;
    let t5_at = files.t5_weights[0].display().to_string();
    let t5 = T5EncoderModel::load(mmaped(&files.t5_weights, dtype, device)?, &t5_cfg)
        .map_err(|e| EncodeError::candle(&t5_at, e))?;
    let t5_special = special_tokens(&files.t5_special)?;
    let t5_tokenizer = TextTokenizer::from_json(
        &files.t5_tokenizer,
        text_tokens,
        t5_special.pad.as_deref().unwrap_or("<pad>"),
    )?;

    // CLIP.
    let clip_cfg = files.clip_cfg()?;
    let clip_at = files.clip_weights[0].display().to_string();
    let vb = mmaped(&files.clip_weights, dtype, device)?;
    let vb = super::unprefixed(vb, "text_model", "embeddings.token_embedding.weight");
    let clip =
        ClipTextTransformer::new(vb, &clip_cfg).map_err(|e| EncodeError::candle(&clip_at, e))?;
    let clip_tokens = clip_cfg.max_position_embeddings;
    let clip_special = special_tokens(&files.clip_special)?;
    let clip_tokenizer = match &files.clip_tokenizer {
        ClipTokenizerFiles::Json(f) => TextTokenizer::from_json(
            f,
            clip_tokens,
            clip_special.pad.as_deref().unwrap_or("<|endoftext|>"),
        )?,
        ClipTokenizerFiles::VocabMerges { vocab, merges } => {
            TextTokenizer::clip_from_vocab(vocab, merges, clip_tokens, &clip_special)?
        }
    };
    Ok(Loaded {
        vae: super::ImageEncoder::Vae {
            encoder: Box::new(vae),
            scale,
            shift,
        },
        t5,
        t5_tokenizer,
        clip,
        clip_tokenizer,
        clip_tokens,
    })
}
