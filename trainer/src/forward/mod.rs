//! `trainer forward`: the whole MOSAIC forward on inputs from a file, for parity checks against
//! diffusers and the official code.
//!
//! Inputs (safetensors, named as the arguments of diffusers' `FluxTransformer2DModel.forward`):
//! hidden_states [B, N, C], encoder_hidden_states [B, L, ctx], pooled_projections [B, pooled],
//! timestep [B] and guidance [B] in diffusers' units (the values passed to forward, which
//! multiplies them by 1000), img_ids [N, 3], txt_ids [L, 3]. Optional, for MOSAIC:
//! - `ref_hidden_states.{k}` [B, N_k, C] for k = 0..K-1 (packed reference latents), with
//!   `ref_img_ids.{k}` [N_k, 3] (default: the official rule, column - cols (k + 1), for square
//!   references), `ref_timestep` [B] (default 0) and `ref_guidance` [B] (default 1);
//! - `ref_points` [P] int64: global reference token indices (paper eq. 9);
//! - `ref_targets` [P] int64: the target token of each point.
//!
//! Outputs: `output` [B, N, C]; with `ref_points`, `attention_rows` [B, P, N] (the head mean of
//! softmax(q_ref k_tgt^T / sqrt d) over the target tokens, averaged over the row blocks); with
//! `ref_targets` too, `loss_scal` and `loss_mdl` [1] under the loss settings given (the given
//! pairs exactly, no sampling; all-tokens MDL reads every token of each reference). References
//! are isolated from each other (the group mask); the LoRA acts on reference tokens only. With
//! `--ref-cache`, references see only their own tokens (the first step of cached sampling).

mod inputs;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, TrainerError};
use crate::objective::{row_losses, LossSpec, MdlRows, RowTargets};
use flux::lora::{LoraInit, LoraSpec};
use flux::{weights, Flux, Lora, ModelInputs, RowBlocks};
use inputs::{ids, indices, references, take, values};
use kernels::RefSegments;

/// What `trainer forward` runs.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    pub weights: PathBuf,
    /// A LoRA file (this project's, diffusers, PEFT or kohya keys) applied to the references.
    pub lora: Option<PathBuf>,
    pub inputs: PathBuf,
    pub dtype: DType,
    /// RoPE split for files that do not say it.
    pub axes: Option<[usize; 3]>,
    /// Double blocks whose rows are averaged (None: all).
    pub rows_blocks: Option<Vec<usize>>,
    /// A TOML file holding a `[loss]` table (None: the paper's settings).
    pub loss_config: Option<PathBuf>,
    /// The first step of sampling with the reference cache: references attend only to their
    /// own tokens (`flux::ref_cache`).
    pub ref_cache: bool,
}

impl ForwardOptions {
    /// The plain forward of `inputs` with the weights at `weights`, in `dtype`.
    pub fn new(weights: &Path, inputs: &Path, dtype: DType) -> Self {
        Self {
            weights: weights.to_path_buf(),
            lora: None,
            inputs: inputs.to_path_buf(),
            dtype,
            axes: None,
            rows_blocks: None,
            loss_config: None,
            ref_cache: false,
        }
    }
}

/// What one forward gives.
pub struct ForwardOutputs {
    /// [B, N, C] in f32.
    pub output: Tensor,
    /// [B, P, N] in f32, with `ref_points`.
    pub attention_rows: Option<Tensor>,
    /// (SCAL, MDL), with `ref_points` and `ref_targets`.
    pub losses: Option<(f64, f64)>,
}

/// The `[loss]` table of the TOML file at `path`.
pub fn read_loss_settings(path: &Path) -> Result<LossSpec> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| TrainerError::read(path, e))?;
    let loss = table.get("loss").ok_or_else(|| TrainerError::Input {
        name: path.display().to_string(),
        reason: "has no [loss] table".into(),
    })?;
    let spec: LossSpec =
        loss.clone()
            .try_into()
            .map_err(|e: toml::de::Error| TrainerError::Input {
                name: format!("{} [loss]", path.display()),
                reason: e.to_string(),
            })?;
    spec.validate()?;
    Ok(spec)
}

/// The LoRA of `--lora`, or an empty one (the base alone).
fn lora_of(opts: &ForwardOptions, cfg: &flux::FluxConfig, device: &Device) -> Result<Lora> {
    Ok(match &opts.lora {
        Some(path) => {
            let file = flux::lora_format::load(path)?;
            flux::lora::from_adapters(cfg, &file, path, DType::F32, device)?
        }
        None => Lora::new(
            cfg,
            &LoraSpec {
                rank: 1,
                alpha: 1.0,
                init: LoraInit::Gaussian,
                targets: Vec::new(),
                init_from: String::new(),
            },
            0,
            DType::F32,
            device,
        )?,
    })
}

/// The points of an inputs file, grouped by reference for the losses.
struct Points {
    /// As given.
    given: Vec<u32>,
    /// Sorted by reference (stable).
    sorted: Vec<u32>,
    /// Points per reference.
    per_ref: Vec<usize>,
    /// Where each given point went in `sorted`.
    back: Vec<u32>,
}

impl Points {
    fn new(given: Vec<u32>, lens: &[usize]) -> Self {
        let reference = |u: u32| {
            let mut end = 0;
            lens.iter()
                .position(|&n| {
                    end += n;
                    (u as usize) < end
                })
                .unwrap_or(lens.len())
        };
        let mut order: Vec<usize> = (0..given.len()).collect();
        order.sort_by_key(|&i| reference(given[i]));
        let mut back = vec![0u32; given.len()];
        for (pos, &i) in order.iter().enumerate() {
            back[i] = pos as u32;
        }
        let sorted: Vec<u32> = order.iter().map(|&i| given[i]).collect();
        let mut per_ref = vec![0usize; lens.len()];
        for &u in &sorted {
            per_ref[reference(u)] += 1;
        }
        Self {
            given,
            sorted,
            per_ref,
            back,
        }
    }

    /// The targets of the points in `sorted` order.
    fn sorted_targets(&self, targets: &[u32]) -> Vec<u32> {
        let mut out = vec![0u32; targets.len()];
        for (&t, &pos) in targets.iter().zip(&self.back) {
            out[pos as usize] = t;
        }
        out
    }
}

/// What the inputs ask of the attention rows.
struct RowRequest {
    points: Points,
    targets: Option<Vec<u32>>,
    loss: Option<LossSpec>,
    /// Tokens of each reference.
    lens: Vec<usize>,
    /// The rows are every reference token's (all-tokens MDL), not the points'.
    all_tokens: bool,
}

impl RowRequest {
    /// The points' rows [B, P, N] in the given order (f32) and, with targets, (SCAL, MDL) of
    /// the per-sample `rows` in `ldt`.
    fn outputs(self, rows: &[Tensor], ldt: DType) -> Result<(Tensor, Option<(f64, f64)>)> {
        let rows: Vec<Tensor> = rows
            .iter()
            .map(|r| r.to_dtype(ldt))
            .collect::<candle_core::Result<_>>()?;
        let p = &self.points;
        let at = if self.all_tokens { &p.given } else { &p.back };
        let at = Tensor::from_slice(at, at.len(), &Device::Cpu)?;
        let point_rows: Vec<Tensor> = rows
            .iter()
            .map(|r| r.index_select(&at, 0))
            .collect::<candle_core::Result<_>>()?;
        let attention_rows = Tensor::stack(&point_rows, 0)?.to_dtype(DType::F32)?;
        let (Some(loss), Some(targets)) = (&self.loss, &self.targets) else {
            return Ok((attention_rows, None));
        };
        let row_targets = RowTargets {
            scal_rows: self.all_tokens.then(|| p.sorted.clone()),
            scal_tgt: p.sorted_targets(targets),
            scal_segments: RefSegments(p.per_ref.clone()),
            mdl_segments: RefSegments(if self.all_tokens {
                self.lens.clone()
            } else {
                p.per_ref.clone()
            }),
        };
        let targets = vec![Some(row_targets); rows.len()];
        let (scal, mdl) = row_losses(&rows, &targets, loss, ldt)?;
        let v = |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        Ok((attention_rows, Some((v(scal)?, v(mdl)?))))
    }
}

/// The base with the row blocks of `--rows-blocks` (all double blocks by default).
fn model_of(opts: &ForwardOptions, cfg: &flux::FluxConfig, w: &flux::Weights) -> Result<Flux> {
    let double = match &opts.rows_blocks {
        None => (0..cfg.num_double).collect(),
        Some(b) => {
            if let Some(&i) = b.iter().find(|&&i| i >= cfg.num_double) {
                return Err(TrainerError::Input {
                    name: "--rows-blocks".into(),
                    reason: format!(
                        "double block {i} does not exist (the model has {})",
                        cfg.num_double
                    ),
                });
            }
            b.clone()
        }
    };
    let blocks = RowBlocks {
        double,
        single: Vec::new(),
        plain: false,
    };
    Ok(Flux::new(cfg.clone(), w, blocks)?)
}

/// The loss settings when the inputs ask for losses (points and their targets).
fn loss_settings(
    opts: &ForwardOptions,
    points: Option<&Vec<u32>>,
    targets: Option<&Vec<u32>>,
) -> Result<Option<LossSpec>> {
    let bad = |reason: String| TrainerError::Input {
        name: "ref_targets".into(),
        reason,
    };
    match (points, targets) {
        (None, Some(_)) => Err(bad("given without ref_points".into())),
        (Some(p), Some(t)) if p.len() != t.len() => Err(bad(format!(
            "has {} elements, ref_points {}",
            t.len(),
            p.len()
        ))),
        (Some(_), Some(_)) => Ok(Some(match &opts.loss_config {
            Some(path) => read_loss_settings(path)?,
            None => LossSpec::default(),
        })),
        _ => Ok(None),
    }
}

/// `guidance`, required when the model embeds it.
fn guidance_of(
    map: &HashMap<String, Tensor>,
    cfg: &flux::FluxConfig,
    b: usize,
) -> Result<Vec<f32>> {
    match map.get("guidance") {
        Some(g) => values(g, "guidance", b),
        None if cfg.guidance_embeds => Err(TrainerError::Input {
            name: "guidance".into(),
            reason: "required: the model has a guidance embedder".into(),
        }),
        None => Ok(vec![0.0; b]),
    }
}

/// Runs the forward `opts` describes.
pub fn forward_file(opts: &ForwardOptions) -> Result<ForwardOutputs> {
    let device = Device::Cpu;
    let dtype = opts.dtype;
    let (cfg, w) = weights::load(&opts.weights, dtype, &device, opts.axes)?;
    let model = model_of(opts, &cfg, &w)?;
    let lora = lora_of(opts, &cfg, &device)?;
    let map = candle_core::safetensors::load(&opts.inputs, &device)
        .map_err(|e| TrainerError::read(&opts.inputs, e))?;
    let img = take(&map, "hidden_states")?.to_dtype(dtype)?;
    let (b, n, c) = img.dims3().map_err(|_| TrainerError::Input {
        name: "hidden_states".into(),
        reason: format!("expected [B, N, C], found {:?}", img.dims()),
    })?;
    let refs = references(&map, b, c, dtype)?;
    let lens = refs.as_ref().map_or(Vec::new(), |r| r.lens.clone());
    let total: usize = lens.iter().sum();
    let points = indices(&map, "ref_points", total, "global reference token indices")?;
    let targets = indices(&map, "ref_targets", n, "target token indices")?;
    let loss = loss_settings(opts, points.as_ref(), targets.as_ref())?;
    let all_tokens = loss
        .as_ref()
        .is_some_and(|l| l.mdl_rows == MdlRows::AllTokens);
    let points = points.map(|p| Points::new(p, &lens));
    let queries = points.as_ref().map(|p| match all_tokens {
        true => (0..total as u32).collect(),
        false => p.sorted.clone(),
    });
    let inp = ModelInputs {
        img,
        img_ids: ids(take(&map, "img_ids")?, "img_ids", Some(n))?,
        txt: take(&map, "encoder_hidden_states")?.to_dtype(dtype)?,
        txt_ids: ids(take(&map, "txt_ids")?, "txt_ids", None)?,
        pooled: take(&map, "pooled_projections")?.to_dtype(dtype)?,
        timestep: values(take(&map, "timestep")?, "timestep", b)?,
        guidance: guidance_of(&map, &cfg, b)?,
        refs,
        isolate_refs: true,
        row_queries: queries.map(|q| vec![q; b]),
    };
    let out = if opts.ref_cache && inp.refs.is_some() {
        model.forward_filling_cache(&inp, lora.view(false))?.0
    } else {
        model.forward(&inp, lora.view(false))?
    };
    let output = out.pred.to_dtype(DType::F32)?;
    let (Some(rows), Some(points)) = (out.rows, points) else {
        return Ok(ForwardOutputs {
            output,
            attention_rows: None,
            losses: None,
        });
    };
    let req = RowRequest {
        points,
        targets,
        loss,
        lens,
        all_tokens,
    };
    let (attention_rows, losses) = req.outputs(&rows, crate::objective::loss_dtype(dtype))?;
    let attention_rows = Some(attention_rows);
    Ok(ForwardOutputs {
        output,
        attention_rows,
        losses,
    })
}

/// `trainer forward`: writes `output` (and `attention_rows`, `loss_scal`, `loss_mdl` when the
/// inputs ask for them) to `out`.
pub fn forward_cmd(opts: &ForwardOptions, out: &Path) -> Result<()> {
    let f = forward_file(opts)?;
    let mut map = HashMap::new();
    map.insert("output".to_string(), f.output);
    if let Some(r) = f.attention_rows {
        map.insert("attention_rows".to_string(), r);
    }
    if let Some((scal, mdl)) = f.losses {
        let device = Device::Cpu;
        map.insert(
            "loss_scal".to_string(),
            Tensor::new(&[scal as f32], &device)?,
        );
        map.insert("loss_mdl".to_string(), Tensor::new(&[mdl as f32], &device)?);
    }
    candle_core::safetensors::save(&map, out).map_err(|e| TrainerError::read(out, e))?;
    Ok(())
}
