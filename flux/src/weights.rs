//! The frozen base weights: their expected names and shapes, seeded random initialisation, and
//! loading from the diffusers layout (config.json + one or several safetensors files with an
//! index) or the BFL single file (fused qkv, fused linear1, swapped final shift/scale),
//! memory-mapped (design.md §3.2).
//!
//! Inside the trainer every tensor carries its diffusers name.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::config::{FluxConfig, TIME_FEATURES};
use crate::error::{FluxError, Result};
use crate::rng::{name_hash, stream, Purpose};

/// Name -> frozen tensor, in diffusers naming.
#[derive(Clone)]
pub struct Weights {
    map: HashMap<String, Tensor>,
}

/// How a parameter is initialised at random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Init {
    /// PyTorch's nn.Linear default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    Linear { fan_in: usize },
    /// RMSNorm scale: ones.
    Ones,
}

/// One expected tensor.
#[derive(Debug, Clone)]
pub struct Expected {
    pub name: String,
    pub shape: Vec<usize>,
    init: Init,
}

fn linear(out: &mut Vec<Expected>, name: &str, o: usize, i: usize) {
    out.push(Expected {
        name: format!("{name}.weight"),
        shape: vec![o, i],
        init: Init::Linear { fan_in: i },
    });
    out.push(Expected {
        name: format!("{name}.bias"),
        shape: vec![o],
        init: Init::Linear { fan_in: i },
    });
}

fn norm(out: &mut Vec<Expected>, name: &str, d: usize) {
    out.push(Expected {
        name: format!("{name}.weight"),
        shape: vec![d],
        init: Init::Ones,
    });
}

/// Every tensor of a FLUX.1 transformer of this size, diffusers names (design.md §3.2).
pub fn expected_tensors(cfg: &FluxConfig) -> Vec<Expected> {
    let (d, hd, mlp) = (cfg.hidden(), cfg.head_dim, cfg.mlp_hidden());
    let mut v = Vec::new();
    linear(&mut v, "x_embedder", d, cfg.in_channels);
    linear(&mut v, "context_embedder", d, cfg.context_dim);
    linear(
        &mut v,
        "time_text_embed.timestep_embedder.linear_1",
        d,
        TIME_FEATURES,
    );
    linear(&mut v, "time_text_embed.timestep_embedder.linear_2", d, d);
    if cfg.guidance_embeds {
        linear(
            &mut v,
            "time_text_embed.guidance_embedder.linear_1",
            d,
            TIME_FEATURES,
        );
        linear(&mut v, "time_text_embed.guidance_embedder.linear_2", d, d);
    }
    linear(
        &mut v,
        "time_text_embed.text_embedder.linear_1",
        d,
        cfg.pooled_dim,
    );
    linear(&mut v, "time_text_embed.text_embedder.linear_2", d, d);
    for i in 0..cfg.num_double {
        let p = format!("transformer_blocks.{i}");
        linear(&mut v, &format!("{p}.norm1.linear"), 6 * d, d);
        linear(&mut v, &format!("{p}.norm1_context.linear"), 6 * d, d);
        for m in [
            "to_q",
            "to_k",
            "to_v",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_out.0",
            "to_add_out",
        ] {
            linear(&mut v, &format!("{p}.attn.{m}"), d, d);
        }
        for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
            norm(&mut v, &format!("{p}.attn.{n}"), hd);
        }
        for ff in ["ff", "ff_context"] {
            linear(&mut v, &format!("{p}.{ff}.net.0.proj"), mlp, d);
            linear(&mut v, &format!("{p}.{ff}.net.2"), d, mlp);
        }
    }
    for i in 0..cfg.num_single {
        let p = format!("single_transformer_blocks.{i}");
        linear(&mut v, &format!("{p}.norm.linear"), 3 * d, d);
        for m in ["to_q", "to_k", "to_v"] {
            linear(&mut v, &format!("{p}.attn.{m}"), d, d);
        }
        norm(&mut v, &format!("{p}.attn.norm_q"), hd);
        norm(&mut v, &format!("{p}.attn.norm_k"), hd);
        linear(&mut v, &format!("{p}.proj_mlp"), mlp, d);
        linear(&mut v, &format!("{p}.proj_out"), d, d + mlp);
    }
    linear(&mut v, "norm_out.linear", 2 * d, d);
    linear(&mut v, "proj_out", cfg.in_channels, d);
    v
}

impl Weights {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.map.get(name).ok_or_else(|| FluxError::Input {
            name: name.to_string(),
            reason: "weight not loaded".into(),
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter()
    }

    /// Seeded random weights: each tensor from its own stream keyed by its name, so the result
    /// does not depend on the order of creation.
    pub fn random(cfg: &FluxConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut map = HashMap::new();
        for e in expected_tensors(cfg) {
            let n: usize = e.shape.iter().product();
            let data: Vec<f32> = match e.init {
                Init::Ones => vec![1.0; n],
                Init::Linear { fan_in } => {
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    let mut rng = stream(seed, Purpose::BaseInit, &[name_hash(&e.name)]);
                    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                }
            };
            let t = Tensor::from_vec(data, e.shape.as_slice(), device)?.to_dtype(dtype)?;
            map.insert(e.name, t);
        }
        Ok(Self { map })
    }

    /// Random weights drawn by the device's own generator (seeded with `seed`), each tensor
    /// made where it lives: FLUX.1-dev's 12B parameters take a fraction of a second on a GPU
    /// instead of a minute on one CPU core. The values depend on the device and the order of
    /// creation, so this is for benchmarks; [`Weights::random`] is the reproducible one.
    pub fn random_on_device(
        cfg: &FluxConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        device.set_seed(seed)?;
        let mut map = HashMap::new();
        for e in expected_tensors(cfg) {
            let t = match e.init {
                Init::Ones => Tensor::ones(e.shape.as_slice(), dtype, device)?,
                Init::Linear { fan_in } => {
                    // f32 draws (an f64 bound would make the temporary f64).
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    Tensor::rand(-bound, bound, e.shape.as_slice(), device)?.to_dtype(dtype)?
                }
            };
            map.insert(e.name, t);
        }
        Ok(Self { map })
    }

    /// Checks names and shapes against the config; every problem is reported at once.
    fn validated(map: HashMap<String, Tensor>, cfg: &FluxConfig, file: &Path) -> Result<Self> {
        let mut problems = Vec::new();
        for e in expected_tensors(cfg) {
            match map.get(&e.name) {
                None => problems.push(format!(
                    "missing tensor `{}` (expected shape {:?})",
                    e.name, e.shape
                )),
                Some(t) if t.dims() != e.shape.as_slice() => problems.push(format!(
                    "tensor `{}`: expected shape {:?}, found {:?}",
                    e.name,
                    e.shape,
                    t.dims()
                )),
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(Self { map })
        } else {
            Err(FluxError::Weights {
                file: file.to_path_buf(),
                problems,
            })
        }
    }

    /// Writes the weights in diffusers naming to one safetensors file.
    /// Every tensor as a trainable variable (in `dtype`), and weights that read them: a model
    /// built from the returned weights trains its whole base (the frozen-weight ops see
    /// variables and give their gradients). Variables are sorted by name.
    pub fn trainable(&self, dtype: DType) -> Result<(Self, Vec<(String, candle_core::Var)>)> {
        let mut names: Vec<&String> = self.map.keys().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        let mut map = HashMap::with_capacity(names.len());
        for name in names {
            let var = candle_core::Var::from_tensor(&self.map[name].to_dtype(dtype)?)?;
            map.insert(name.clone(), var.as_tensor().clone());
            vars.push((name.clone(), var));
        }
        Ok((Self { map }, vars))
    }

    /// Weights from named tensors (the values of trained variables, for saving).
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self {
            map: tensors.into_iter().collect(),
        }
    }

    /// Writes a diffusers transformer folder: `config.json` (the architecture `cfg`) and
    /// `diffusion_pytorch_model.safetensors`, which [`load`] and diffusers read.
    pub fn save_diffusers(&self, cfg: &FluxConfig, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| FluxError::io(dir, e))?;
        let config = dir.join("config.json");
        let text = serde_json::to_string_pretty(&cfg.to_diffusers_json())
            .map_err(|e| FluxError::write(&config, e))?;
        std::fs::write(&config, text).map_err(|e| FluxError::io(&config, e))?;
        self.save(&dir.join("diffusion_pytorch_model.safetensors"))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.map, path)?;
        Ok(())
    }
}

/// Where weights come from, as decided by looking at the path.
enum Source {
    /// A diffusers transformer folder: config.json + safetensors (+ index).
    Diffusers {
        config: PathBuf,
        files: Vec<PathBuf>,
    },
    /// A single safetensors file (BFL naming, or diffusers naming without a config).
    SingleFile(PathBuf),
}

fn find_source(path: &Path) -> Result<Source> {
    if path.is_file() {
        return Ok(Source::SingleFile(path.to_path_buf()));
    }
    if !path.is_dir() {
        return Err(FluxError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    // Accept the pipeline root as well as its transformer/ folder.
    let dir = if path.join("transformer").join("config.json").is_file() {
        path.join("transformer")
    } else {
        path.to_path_buf()
    };
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(FluxError::Parse {
            file: dir.clone(),
            reason: "not a diffusers transformer folder: config.json is missing".into(),
        });
    }
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    let files = if index.is_file() {
        index_files(&index)?
            .into_iter()
            .map(|n| dir.join(n))
            .collect()
    } else {
        let single = dir.join("diffusion_pytorch_model.safetensors");
        if !single.is_file() {
            return Err(FluxError::Parse {
                file: dir.clone(),
                reason:
                    "neither diffusion_pytorch_model.safetensors nor its .index.json is present"
                        .into(),
            });
        }
        vec![single]
    };
    for f in &files {
        if !f.is_file() {
            return Err(FluxError::Parse {
                file: f.clone(),
                reason: "listed in the index but missing".into(),
            });
        }
    }
    Ok(Source::Diffusers { config, files })
}

/// The files a sharded-safetensors index (`*.safetensors.index.json`, as diffusers and
/// transformers write it) lists in its `weight_map`, sorted and each once.
pub fn index_files(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| FluxError::io(index, e))?;
    let parse = |reason: String| FluxError::Parse {
        file: index.to_path_buf(),
        reason,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| FluxError::read(index, e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| parse("no `weight_map` object".into()))?;
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    if names.is_empty() {
        return Err(parse("`weight_map` lists no file".into()));
    }
    Ok(names.into_iter().map(str::to_string).collect())
}

fn mmap(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    // SAFETY: the files are opened read-only; like every mmap user we rely on nobody truncating
    // them while training runs.
    unsafe { MmapedSafetensors::multi(files) }
        .map_err(|e| FluxError::read(files.first().map_or(Path::new(""), |f| f.as_path()), e))
}

/// How one stored tensor becomes one or more diffusers tensors.
enum Piece {
    Whole(String),
    /// Consecutive row blocks of the stored tensor, with their diffusers names.
    Rows(Vec<(String, usize)>),
    /// BFL final layer: [shift; scale] stored, diffusers wants [scale; shift].
    SwapHalves(String),
}

const BFL_PREFIX: &str = "model.diffusion_model.";

/// The diffusers name(s) of a BFL tensor; `None` for a tensor we do not know.
fn bfl_to_diffusers(name: &str, hidden: usize) -> Option<Piece> {
    let (stem, suffix) = name.rsplit_once('.')?; // suffix: weight, bias or scale
    let whole = |s: &str| Some(Piece::Whole(format!("{s}.{suffix}")));
    let top = match stem {
        "img_in" => return whole("x_embedder"),
        "txt_in" => return whole("context_embedder"),
        "time_in.in_layer" => return whole("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer" => return whole("time_text_embed.timestep_embedder.linear_2"),
        "vector_in.in_layer" => return whole("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer" => return whole("time_text_embed.text_embedder.linear_2"),
        "guidance_in.in_layer" => return whole("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer" => return whole("time_text_embed.guidance_embedder.linear_2"),
        "final_layer.linear" => return whole("proj_out"),
        "final_layer.adaLN_modulation.1" => {
            return Some(Piece::SwapHalves(format!("norm_out.linear.{suffix}")))
        }
        _ => None,
    };
    if top.is_some() {
        return top;
    }
    let parts: Vec<&str> = stem.splitn(3, '.').collect();
    if parts.len() < 3 {
        return None;
    }
    let (kind, idx, rest) = (parts[0], parts[1], parts[2]);
    idx.parse::<usize>().ok()?;
    let norm_suffix = if suffix == "scale" { "weight" } else { suffix };
    match kind {
        "double_blocks" => {
            let p = format!("transformer_blocks.{idx}");
            let qkv = |stream: &str, names: [&str; 3]| {
                let _ = stream;
                Some(Piece::Rows(
                    names
                        .iter()
                        .map(|n| (format!("{p}.attn.{n}.{suffix}"), hidden))
                        .collect(),
                ))
            };
            let mapped = match rest {
                "img_mod.lin" => format!("{p}.norm1.linear"),
                "txt_mod.lin" => format!("{p}.norm1_context.linear"),
                "img_attn.qkv" => return qkv("img", ["to_q", "to_k", "to_v"]),
                "txt_attn.qkv" => return qkv("txt", ["add_q_proj", "add_k_proj", "add_v_proj"]),
                "img_attn.norm.query_norm" => {
                    return Some(Piece::Whole(format!("{p}.attn.norm_q.{norm_suffix}")))
                }
                "img_attn.norm.key_norm" => {
                    return Some(Piece::Whole(format!("{p}.attn.norm_k.{norm_suffix}")))
                }
                "txt_attn.norm.query_norm" => {
                    return Some(Piece::Whole(format!("{p}.attn.norm_added_q.{norm_suffix}")))
                }
                "txt_attn.norm.key_norm" => {
                    return Some(Piece::Whole(format!("{p}.attn.norm_added_k.{norm_suffix}")))
                }
                "img_attn.proj" => format!("{p}.attn.to_out.0"),
                "txt_attn.proj" => format!("{p}.attn.to_add_out"),
                "img_mlp.0" => format!("{p}.ff.net.0.proj"),
                "img_mlp.2" => format!("{p}.ff.net.2"),
                "txt_mlp.0" => format!("{p}.ff_context.net.0.proj"),
                "txt_mlp.2" => format!("{p}.ff_context.net.2"),
                _ => return None,
            };
            Some(Piece::Whole(format!("{mapped}.{suffix}")))
        }
        "single_blocks" => {
            let p = format!("single_transformer_blocks.{idx}");
            let mapped = match rest {
                "modulation.lin" => format!("{p}.norm.linear"),
                "linear1" => {
                    let mlp = 4 * hidden;
                    return Some(Piece::Rows(vec![
                        (format!("{p}.attn.to_q.{suffix}"), hidden),
                        (format!("{p}.attn.to_k.{suffix}"), hidden),
                        (format!("{p}.attn.to_v.{suffix}"), hidden),
                        (format!("{p}.proj_mlp.{suffix}"), mlp),
                    ]));
                }
                "norm.query_norm" => {
                    return Some(Piece::Whole(format!("{p}.attn.norm_q.{norm_suffix}")))
                }
                "norm.key_norm" => {
                    return Some(Piece::Whole(format!("{p}.attn.norm_k.{norm_suffix}")))
                }
                "linear2" => format!("{p}.proj_out"),
                _ => return None,
            };
            Some(Piece::Whole(format!("{mapped}.{suffix}")))
        }
        _ => None,
    }
}

/// Every BFL linear module of a model of `cfg` with the diffusers module(s) it holds: one for a
/// plain module, several (with their output rows, in order) for a fused one (qkv, linear1).
pub fn bfl_linear_modules(cfg: &FluxConfig) -> Vec<(String, Vec<(String, usize)>)> {
    let mut stems: Vec<String> = [
        "img_in",
        "txt_in",
        "time_in.in_layer",
        "time_in.out_layer",
        "vector_in.in_layer",
        "vector_in.out_layer",
        "guidance_in.in_layer",
        "guidance_in.out_layer",
        "final_layer.linear",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..cfg.num_double {
        for m in [
            "img_mod.lin",
            "txt_mod.lin",
            "img_attn.qkv",
            "txt_attn.qkv",
            "img_attn.proj",
            "txt_attn.proj",
            "img_mlp.0",
            "img_mlp.2",
            "txt_mlp.0",
            "txt_mlp.2",
        ] {
            stems.push(format!("double_blocks.{i}.{m}"));
        }
    }
    for i in 0..cfg.num_single {
        for m in ["modulation.lin", "linear1", "linear2"] {
            stems.push(format!("single_blocks.{i}.{m}"));
        }
    }
    let strip = |n: &str| n.strip_suffix(".weight").unwrap_or(n).to_string();
    stems
        .into_iter()
        .filter_map(|stem| {
            let parts = match bfl_to_diffusers(&format!("{stem}.weight"), cfg.hidden())? {
                Piece::Whole(n) | Piece::SwapHalves(n) => vec![(strip(&n), 0)],
                Piece::Rows(v) => v.into_iter().map(|(n, r)| (strip(&n), r)).collect(),
            };
            Some((stem, parts))
        })
        .collect()
}

/// Counts distinct block indices of names `<prefix>.<i>.`.
fn count_blocks(names: &[String], prefix: &str) -> usize {
    let mut idx = BTreeSet::new();
    for n in names {
        if let Some(rest) = n.strip_prefix(prefix) {
            if let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                idx.insert(i);
            }
        }
    }
    idx.len()
}

/// The stored shape of tensor `name`, or an error saying it is needed to infer the model size.
fn stored_shape(st: &MmapedSafetensors, name: &str, file: &Path) -> Result<Vec<usize>> {
    st.get(name)
        .map(|v| v.shape().to_vec())
        .map_err(|_| FluxError::Weights {
            file: file.to_path_buf(),
            problems: vec![format!(
                "missing tensor `{name}`, needed to infer the model size"
            )],
        })
}

/// The RoPE split: the override, else the FLUX rule for this head size.
fn resolve_axes(axes: Option<[usize; 3]>, head_dim: usize) -> Result<[usize; 3]> {
    axes.or_else(|| FluxConfig::default_axes(head_dim))
        .ok_or_else(|| FluxError::ModelConfig {
            field: "axes_dims".into(),
            reason: format!("head dim {head_dim} has no default RoPE split; give axes_dims"),
        })
}

/// Infers the architecture of a BFL-named file from its tensor shapes.
fn infer_bfl_config(
    st: &MmapedSafetensors,
    names: &[String],
    strip: &str,
    file: &Path,
    axes: Option<[usize; 3]>,
) -> Result<FluxConfig> {
    let shape = |n: &str| stored_shape(st, &format!("{strip}{n}"), file);
    let img_in = shape("img_in.weight")?;
    let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?[0];
    let hidden = img_in[0];
    let stripped: Vec<String> = names
        .iter()
        .map(|n| n.trim_start_matches(strip).to_string())
        .collect();
    let cfg = FluxConfig {
        in_channels: img_in[1],
        num_heads: hidden / head_dim,
        head_dim,
        num_double: count_blocks(&stripped, "double_blocks."),
        num_single: count_blocks(&stripped, "single_blocks."),
        context_dim: shape("txt_in.weight")?[1],
        pooled_dim: shape("vector_in.in_layer.weight")?[1],
        axes_dims: resolve_axes(axes, head_dim)?,
        theta: 10_000.0,
        guidance_embeds: names
            .iter()
            .any(|n| n.ends_with("guidance_in.in_layer.weight")),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Infers the architecture of a diffusers-named single file (no config.json) from its shapes.
fn infer_diffusers_config(
    st: &MmapedSafetensors,
    names: &[String],
    file: &Path,
    axes: Option<[usize; 3]>,
) -> Result<FluxConfig> {
    let shape = |n: &str| stored_shape(st, n, file);
    let x = shape("x_embedder.weight")?;
    let head_dim = shape("transformer_blocks.0.attn.norm_q.weight")?[0];
    let cfg = FluxConfig {
        in_channels: x[1],
        num_heads: x[0] / head_dim,
        head_dim,
        num_double: count_blocks(names, "transformer_blocks."),
        num_single: count_blocks(names, "single_transformer_blocks."),
        context_dim: shape("context_embedder.weight")?[1],
        pooled_dim: shape("time_text_embed.text_embedder.linear_1.weight")?[1],
        axes_dims: resolve_axes(axes, head_dim)?,
        theta: 10_000.0,
        guidance_embeds: names
            .iter()
            .any(|n| n.starts_with("time_text_embed.guidance_embedder")),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Loads base weights from a diffusers folder or a single safetensors file (BFL or diffusers
/// naming), converted to `dtype` on `device`. `axes` overrides the RoPE split when the files
/// do not say it (BFL files never do).
pub fn load(
    path: &Path,
    dtype: DType,
    device: &Device,
    axes: Option<[usize; 3]>,
) -> Result<(FluxConfig, Weights)> {
    match find_source(path)? {
        Source::Diffusers { config, files } => {
            let mut cfg = FluxConfig::from_diffusers_json(&config)?;
            if let Some(a) = axes {
                cfg.axes_dims = a;
                cfg.validate()?;
            }
            let st = mmap(&files)?;
            let map = load_diffusers_names(&st, dtype, device)?;
            Ok((cfg.clone(), Weights::validated(map, &cfg, path)?))
        }
        Source::SingleFile(file) => {
            let st = mmap(std::slice::from_ref(&file))?;
            let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
            let is_bfl = names
                .iter()
                .any(|n| n.contains("double_blocks.") || n.ends_with("img_in.weight"));
            if is_bfl {
                let strip = if names.iter().all(|n| n.starts_with(BFL_PREFIX)) {
                    BFL_PREFIX
                } else {
                    ""
                };
                let cfg = infer_bfl_config(&st, &names, strip, &file, axes)?;
                let map = load_bfl(&st, &names, strip, cfg.hidden(), dtype, device, &file)?;
                Ok((cfg.clone(), Weights::validated(map, &cfg, &file)?))
            } else {
                let cfg = infer_diffusers_config(&st, &names, &file, axes)?;
                let map = load_diffusers_names(&st, dtype, device)?;
                Ok((cfg.clone(), Weights::validated(map, &cfg, &file)?))
            }
        }
    }
}

fn load_diffusers_names(
    st: &MmapedSafetensors,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for (name, _) in st.tensors() {
        let t = st.load(&name, device)?.to_dtype(dtype)?;
        map.insert(name, t);
    }
    Ok(map)
}

fn load_bfl(
    st: &MmapedSafetensors,
    names: &[String],
    strip: &str,
    hidden: usize,
    dtype: DType,
    device: &Device,
    file: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    let mut problems = Vec::new();
    for name in names {
        let short = name.trim_start_matches(strip);
        let Some(piece) = bfl_to_diffusers(short, hidden) else {
            tracing::warn!(tensor = %name, "unknown tensor in BFL file, ignored");
            continue;
        };
        let t = st.load(name, device)?.to_dtype(dtype)?;
        match piece {
            Piece::Whole(n) => {
                map.insert(n, t);
            }
            Piece::Rows(parts) => {
                let total: usize = parts.iter().map(|(_, r)| r).sum();
                if t.dim(0)? != total {
                    problems.push(format!(
                        "tensor `{name}`: expected {total} rows to split, found shape {:?}",
                        t.dims()
                    ));
                    continue;
                }
                let mut start = 0;
                for (n, rows) in parts {
                    map.insert(n, t.narrow(0, start, rows)?.contiguous()?);
                    start += rows;
                }
            }
            Piece::SwapHalves(n) => {
                let rows = t.dim(0)?;
                if rows % 2 != 0 {
                    problems.push(format!(
                        "tensor `{name}`: expected an even number of rows, found shape {:?}",
                        t.dims()
                    ));
                    continue;
                }
                let half = rows / 2;
                map.insert(
                    n,
                    Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)?,
                );
            }
        }
    }
    if problems.is_empty() {
        Ok(map)
    } else {
        Err(FluxError::Weights {
            file: file.to_path_buf(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_count_matches_flux_dev() {
        let cfg = FluxConfig::flux_dev();
        let total: usize = expected_tensors(&cfg)
            .iter()
            .map(|e| e.shape.iter().product::<usize>())
            .sum();
        assert_eq!(
            total, 11_901_408_320,
            "design.md §3.1 derived parameter count"
        );
    }

    #[test]
    fn bfl_names_map_to_diffusers() {
        let h = 3072;
        match bfl_to_diffusers("double_blocks.3.img_attn.qkv.weight", h) {
            Some(Piece::Rows(p)) => assert_eq!(p[1].0, "transformer_blocks.3.attn.to_k.weight"),
            _ => panic!("qkv must split"),
        }
        match bfl_to_diffusers("single_blocks.0.linear1.bias", h) {
            Some(Piece::Rows(p)) => assert_eq!(
                p[3],
                (
                    "single_transformer_blocks.0.proj_mlp.bias".to_string(),
                    4 * h
                )
            ),
            _ => panic!("linear1 must split"),
        }
        assert!(matches!(
            bfl_to_diffusers("final_layer.adaLN_modulation.1.weight", h),
            Some(Piece::SwapHalves(_))
        ));
        match bfl_to_diffusers("double_blocks.0.txt_attn.norm.key_norm.scale", h) {
            Some(Piece::Whole(n)) => assert_eq!(n, "transformer_blocks.0.attn.norm_added_k.weight"),
            _ => panic!(),
        }
        assert!(bfl_to_diffusers("something.else.weight", h).is_none());
    }

    /// A loss of the plain forward (no references) that depends on every output.
    fn base_loss(model: &crate::Flux, lora: &crate::Lora) -> Tensor {
        use crate::embed::{grid_ids, text_ids};
        use crate::test_util::uniform;
        let inp = crate::ModelInputs {
            img: uniform(&[1, 4, 64], 1, 1.0),
            img_ids: grid_ids(2, 2, 0),
            txt: uniform(&[1, 3, 32], 2, 1.0),
            txt_ids: text_ids(3),
            pooled: uniform(&[1, 16], 3, 1.0),
            timestep: vec![0.4],
            guidance: vec![1.0],
            refs: None,
            isolate_refs: true,
            row_queries: None,
        };
        let pred = model.forward(&inp, lora.view(false)).unwrap().pred;
        (pred * uniform(&[1, 4, 64], 4, 1.0))
            .unwrap()
            .sum_all()
            .unwrap()
    }

    #[test]
    fn a_trainable_base_gets_the_gradients_of_finite_differences() {
        let cfg = FluxConfig::tiny();
        let base = Weights::random(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
        let (w, vars) = base.trainable(DType::F64).unwrap();
        let spec = crate::LoraSpec {
            targets: vec![],
            ..Default::default()
        };
        let lora = crate::Lora::new(&cfg, &spec, 0, DType::F64, &Device::Cpu).unwrap();
        let model = crate::Flux::new(cfg.clone(), &w, crate::RowBlocks::default()).unwrap();
        let grads = base_loss(&model, &lora).backward().unwrap();
        assert_eq!(vars.len(), base.len());
        // A linear of each kind, a QK-norm weight (the fused RMSNorm gives none), biases.
        for (name, at) in [
            ("transformer_blocks.0.attn.to_q.weight", [3, 5]),
            ("transformer_blocks.1.attn.norm_added_k.weight", [0, 7]),
            ("single_transformer_blocks.1.proj_out.weight", [2, 40]),
            ("x_embedder.bias", [0, 9]),
            ("time_text_embed.guidance_embedder.linear_1.weight", [1, 2]),
            ("norm_out.linear.weight", [4, 1]),
        ] {
            let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let orig = var.as_tensor().copy().unwrap();
            let flat = orig.flatten_all().unwrap();
            let i = if var.rank() == 1 {
                at[1]
            } else {
                at[0] * var.dim(1).unwrap() + at[1]
            };
            let g_i = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[i];
            let h = 1e-5;
            let mut fd = 0.0;
            for (sign, scale) in [(1.0, 1.0), (-1.0, -1.0)] {
                let mut v = flat.to_vec1::<f64>().unwrap();
                v[i] += sign * h;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                fd += scale * base_loss(&model, &lora).to_scalar::<f64>().unwrap();
            }
            var.set(&orig).unwrap();
            fd /= 2.0 * h;
            assert!(
                (g_i - fd).abs() <= 1e-6 * fd.abs().max(1e-3),
                "{name}: gradient {g_i} vs finite difference {fd}"
            );
        }
    }

    #[test]
    fn misshaped_and_missing_tensors_are_each_named() {
        let cfg = FluxConfig::tiny();
        let w = Weights::random(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let mut map = w.map.clone();
        map.remove("proj_out.bias");
        map.insert(
            "x_embedder.weight".into(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Weights::validated(map, &cfg, Path::new("w.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing tensor `proj_out.bias`"), "{err}");
        assert!(
            err.contains("tensor `x_embedder.weight`: expected shape [64, 64], found [3, 3]"),
            "{err}"
        );
    }
}
