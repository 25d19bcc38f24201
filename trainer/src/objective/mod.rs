//! The training objective: flow matching on the target tokens plus SCAL and MDL on the sampled
//! attention rows (design.md §5). It turns samples into model inputs (noise, timesteps,
//! sampled correspondence points) and model outputs into the loss; it knows nothing of files.
//!
//! Every random draw comes from a stream keyed by (seed, step, sample slot), so a sample's
//! noise, t and points do not depend on how samples are grouped into batches or ranks.

pub mod dropout;
pub mod spec;

use candle_core::{DType, Device, Tensor};
use kernels::{mdl_loss, sample_points, scal_loss, RefPoints, RefSegments};
use rand::Rng;
use rand_distr::{Distribution, Normal, StandardNormal};

use crate::data::sample::Sample;
use crate::error::{Result, TrainerError};
pub use dropout::{DropoutSpec, Dropped, EmptyCaption};
use flux::embed::{grid_ids, text_ids};
use flux::grad::{loss_and_grads_into, GradSink, NoSink};
use flux::rng::{stream, Purpose};
use flux::{Flux, Lora, ModelInputs, RefInputs};
pub use spec::{
    BlockSelection, ConditioningSpec, DivergenceName, LossSpec, MdlRows, ObjectiveSpec, Recipe,
    RowsImpl, ScalReduceName,
};

/// Resolution-dependent shift mu(seq_len): linear through (256, 0.5) and (4096, 1.15), the
/// same at training and at sampling.
pub use flux::schedule::shift_mu;

/// t' = e^mu / (e^mu + (1/t - 1)) (design.md §3.7 with sigma = 1).
pub fn shift_t(t: f64, mu: f64) -> f64 {
    let e = mu.exp();
    e / (e + (1.0 / t - 1.0))
}

/// t = sigmoid(n), n ~ N(mean, std^2), shifted for `seq_len` target tokens when asked.
pub fn sample_t(spec: &LossSpec, seq_len: usize, rng: &mut impl Rng) -> Result<f64> {
    let normal = Normal::new(spec.logit_mean, spec.logit_std)
        .map_err(|e| TrainerError::config("loss.logit_std", e.to_string()))?;
    let n: f64 = normal.sample(rng);
    let t = 1.0 / (1.0 + (-n).exp());
    Ok(if spec.resolution_shift {
        shift_t(t, shift_mu(seq_len))
    } else {
        t
    })
}

/// A batch turned into model inputs plus what the loss needs.
pub struct Prepared {
    pub inputs: ModelInputs,
    /// noise - x0, [B, N, C] in the loss dtype.
    pub velocity: Tensor,
    /// Per sample, with rows: what SCAL and MDL read from its rows; None for a sample they
    /// leave out (references dropped). Empty without rows.
    pub row_targets: Vec<Option<RowTargets>>,
    /// Per sample: what condition dropout removed.
    pub dropped: Vec<Dropped>,
    /// Tokens per sample (text + target + references), for throughput.
    pub tokens: usize,
}

/// How one sample's attention rows [R, N_tgt] feed the losses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowTargets {
    /// The row of each SCAL pair; None when row j is pair j (the rows are the pairs).
    pub scal_rows: Option<Vec<u32>>,
    /// The target token each SCAL pair must attend to.
    pub scal_tgt: Vec<u32>,
    /// SCAL pairs per reference.
    pub scal_segments: RefSegments,
    /// Rows per reference that MDL averages (all rows, grouped by reference).
    pub mdl_segments: RefSegments,
}

/// f64 models compute the loss in f64 (gradient checks), everything else in f32.
pub fn loss_dtype(model_dtype: DType) -> DType {
    if model_dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Where a micro-batch's random draws come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrawAt {
    pub seed: u64,
    /// Optimizer step.
    pub step: u64,
    /// Position of the micro-batch's first sample in the step's global batch.
    pub first_slot: u64,
}

/// Builds the model inputs of `samples` (same shapes) for the draws at `at`.
pub fn prepare(
    spec: &ObjectiveSpec<'_>,
    samples: &[&Sample],
    at: DrawAt,
    with_rows: bool,
    dtype: DType,
    device: &Device,
) -> Result<Prepared> {
    let DrawAt {
        seed,
        step,
        first_slot,
    } = at;
    let first = uniform_batch(samples)?;
    let (n, c) = first.x0.dims2()?;
    let ldt = loss_dtype(dtype);
    // All-tokens MDL queries every reference token; the steps before MDL's ramp need only the
    // SCAL pairs, which are among them, so they query just those.
    let all_tokens =
        spec.loss.mdl_rows == MdlRows::AllTokens && spec.loss.mdl_weight_at(step) > 0.0;
    let mut xt = Vec::with_capacity(samples.len());
    let mut velocity = Vec::with_capacity(samples.len());
    let mut timestep = Vec::with_capacity(samples.len());
    let mut dropped = Vec::with_capacity(samples.len());
    let mut queries = Vec::new();
    let mut row_targets = Vec::new();
    for (b, s) in samples.iter().enumerate() {
        let slot = first_slot + b as u64;
        let t = sample_t(
            spec.loss,
            n,
            &mut stream(seed, Purpose::Timestep, &[step, slot]),
        )?;
        let mut rng = stream(seed, Purpose::Noise, &[step, slot]);
        let noise: Vec<f32> = (0..n * c)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let noise = Tensor::from_vec(noise, (n, c), device)?.to_dtype(ldt)?;
        let x0 = s.x0.to_dtype(ldt)?;
        xt.push(((&x0 * (1.0 - t))? + (&noise * t)?)?.to_dtype(dtype)?);
        velocity.push((noise - x0)?);
        timestep.push(t as f32);
        let drop = spec
            .dropout
            .draw(&mut stream(seed, Purpose::Dropout, &[step, slot]));
        dropped.push(drop);
        if with_rows {
            let draw = stream(seed, Purpose::Points, &[step, slot]);
            let (q, targets) = rows_of(s, spec.loss, all_tokens, slot, draw)?;
            queries.push(q);
            let supervised = !drop.refs || spec.loss.supervise_dropped_refs;
            row_targets.push(supervised.then_some(targets));
        }
    }
    let b = samples.len();
    let refs = ref_inputs(spec, samples, &dropped, dtype)?;
    let (txt, pooled) = captions(spec, samples, &dropped, dtype)?;
    let l = first.txt.dim(0)?;
    let tokens = l + n + refs.as_ref().map_or(0, |r| r.ids.len());
    let inputs = ModelInputs {
        img: Tensor::stack(&xt, 0)?,
        img_ids: grid_ids(first.grid.rows, first.grid.cols, 0),
        txt,
        txt_ids: text_ids(l),
        pooled,
        timestep,
        guidance: vec![spec.conditioning.guidance as f32; b],
        refs,
        isolate_refs: spec.conditioning.isolate_refs,
        row_queries: with_rows.then_some(queries),
    };
    Ok(Prepared {
        inputs,
        velocity: Tensor::stack(&velocity, 0)?,
        row_targets,
        dropped,
        tokens,
    })
}

/// The first sample of a non-empty batch whose samples share reference count and shapes.
fn uniform_batch<'a>(samples: &[&'a Sample]) -> Result<&'a Sample> {
    let first = samples.first().ok_or_else(|| TrainerError::Input {
        name: "batch".into(),
        reason: "empty".into(),
    })?;
    let k = first.refs.len();
    if samples
        .iter()
        .any(|s| s.refs.len() != k || s.x0.dims() != first.x0.dims())
    {
        return Err(TrainerError::Input {
            name: "batch".into(),
            reason: "samples of one batch must share the reference count and shapes".into(),
        });
    }
    Ok(first)
}

/// The row queries of sample `s` (indices into its concatenated reference tokens) and how its
/// rows feed the losses: the drawn pairs' rows, or with `all_tokens` every reference token's.
fn rows_of(
    s: &Sample,
    loss: &LossSpec,
    all_tokens: bool,
    slot: u64,
    mut draw: impl Rng,
) -> Result<(Vec<u32>, RowTargets)> {
    let picked = sample_correspondences(s, loss.points_per_ref, &mut draw)?;
    Ok(if all_tokens {
        let lens = reference_token_counts(s, slot)?;
        let total: usize = lens.iter().sum();
        let targets = RowTargets {
            scal_segments: picked.ref_segments(),
            scal_rows: Some(picked.ref_idx),
            scal_tgt: picked.tgt_idx,
            mdl_segments: RefSegments(lens),
        };
        ((0..total as u32).collect(), targets)
    } else {
        let segments = picked.ref_segments();
        let targets = RowTargets {
            scal_rows: None,
            scal_tgt: picked.tgt_idx,
            scal_segments: segments.clone(),
            mdl_segments: segments,
        };
        (picked.ref_idx, targets)
    })
}

/// Tokens of each reference of `s`, refusing an empty one (its MDL distribution would be the
/// mean of no rows).
fn reference_token_counts(s: &Sample, slot: u64) -> Result<Vec<usize>> {
    s.refs
        .iter()
        .enumerate()
        .map(|(k, r)| match r.grid.len() {
            0 => Err(TrainerError::Input {
                name: format!("reference {k} of the sample in batch slot {slot}"),
                reason: "has no tokens; loss.mdl_rows = \"all-tokens\" needs at least one".into(),
            }),
            len => Ok(len),
        })
        .collect()
}

/// P correspondence points per reference of `s` (paper eq. 9), drawn from `rng`; every valid
/// pair when `points_per_ref` is 0.
fn sample_correspondences(
    s: &Sample,
    points_per_ref: usize,
    rng: &mut impl Rng,
) -> Result<kernels::Sampled> {
    let pairs: Vec<Vec<(u32, u32)>> = s
        .refs
        .iter()
        .map(|r| r.pairs.iter().map(|p| (p.ref_token, p.tgt_token)).collect())
        .collect();
    let refs: Vec<RefPoints> = s
        .refs
        .iter()
        .zip(&pairs)
        .map(|(r, pairs)| RefPoints {
            pairs,
            ref_tokens: r.grid.len(),
            mask: None,
        })
        .collect();
    Ok(sample_points(&refs, points_per_ref, rng)?)
}

/// The references of a batch (clean: t = 0) as model inputs, zeroed where condition dropout
/// dropped them; None without references.
fn ref_inputs(
    spec: &ObjectiveSpec<'_>,
    samples: &[&Sample],
    dropped: &[Dropped],
    dtype: DType,
) -> Result<Option<RefInputs>> {
    let Some(first) = samples.first().filter(|s| !s.refs.is_empty()) else {
        return Ok(None);
    };
    let b = samples.len();
    let (ids, lens) = first.ref_positions();
    let per_sample: Vec<Tensor> = samples
        .iter()
        .zip(dropped)
        .map(|(s, d)| s.ref_latents(d.refs))
        .collect::<candle_core::Result<_>>()?;
    Ok(Some(RefInputs {
        latents: Tensor::stack(&per_sample, 0)?.to_dtype(dtype)?,
        ids,
        lens,
        timestep: vec![0.0; b],
        guidance: vec![spec.conditioning.ref_guidance as f32; b],
    }))
}

/// The caption embeddings [B, L, ctx] and pooled [B, pooled] of a batch, the empty caption's
/// where condition dropout dropped the caption.
fn captions(
    spec: &ObjectiveSpec<'_>,
    samples: &[&Sample],
    dropped: &[Dropped],
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let mut txt = Vec::with_capacity(samples.len());
    let mut pooled = Vec::with_capacity(samples.len());
    for (s, d) in samples.iter().zip(dropped) {
        if d.text {
            let empty = spec.empty_caption.ok_or_else(|| TrainerError::Input {
                name: "data.drop_text".into(),
                reason: "a caption was dropped but the data source has no empty caption embeddings"
                    .into(),
            })?;
            empty.check_fits(&s.txt, &s.pooled)?;
            txt.push(empty.txt.to_device(s.txt.device())?);
            pooled.push(empty.pooled.to_device(s.pooled.device())?);
        } else {
            txt.push(s.txt.clone());
            pooled.push(s.pooled.clone());
        }
    }
    Ok((
        Tensor::stack(&txt, 0)?.to_dtype(dtype)?,
        Tensor::stack(&pooled, 0)?.to_dtype(dtype)?,
    ))
}

/// Loss values of one micro-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossParts {
    pub total: f64,
    pub diff: f64,
    pub scal: f64,
    pub mdl: f64,
}

impl LossParts {
    /// Adds `w` times `other`, part by part.
    pub fn add_scaled(&mut self, other: &LossParts, w: f64) {
        self.total += w * other.total;
        self.diff += w * other.diff;
        self.scal += w * other.scal;
        self.mdl += w * other.mdl;
    }
}

fn value(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// SCAL and MDL of a micro-batch: each sample's, summed over the samples the losses supervise
/// and divided by the batch size (a sample left out counts as 0, so condition dropout scales
/// the losses' expected weight by the share of samples kept, whatever the batch size).
pub fn row_losses(
    rows: &[Tensor],
    targets: &[Option<RowTargets>],
    loss: &LossSpec,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let device = rows.first().map_or(&Device::Cpu, |r| r.device());
    let mut scal = Tensor::zeros((), dtype, device)?;
    let mut mdl = Tensor::zeros((), dtype, device)?;
    for (r, t) in rows.iter().zip(targets) {
        let Some(t) = t else { continue };
        let r = r.to_dtype(dtype)?;
        let pairs = match &t.scal_rows {
            Some(idx) => r.index_select(&Tensor::from_slice(idx, idx.len(), r.device())?, 0)?,
            None => r.clone(),
        };
        scal = (scal + scal_loss(&pairs, &t.scal_tgt, &t.scal_segments, loss.scal())?)?;
        mdl = (mdl + mdl_loss(&r, &t.mdl_segments, loss.mdl())?)?;
    }
    let b = rows.len().max(1) as f64;
    Ok(((scal / b)?, (mdl / b)?))
}

/// L = L_diff + alpha L_SCA + beta L_MD and the LoRA gradients, for `prep` at step `step`.
pub fn loss_and_lora_grads(
    model: &Flux,
    lora: &Lora,
    prep: &Prepared,
    spec: &ObjectiveSpec<'_>,
    step: u64,
    checkpointing: bool,
) -> Result<(LossParts, Vec<Tensor>)> {
    loss_and_lora_grads_into(model, lora, prep, spec, step, checkpointing, &mut NoSink)
}

/// As [`loss_and_lora_grads`], handing each gradient to `sink` as soon as it is final.
pub fn loss_and_lora_grads_into(
    model: &Flux,
    lora: &Lora,
    prep: &Prepared,
    spec: &ObjectiveSpec<'_>,
    step: u64,
    checkpointing: bool,
    sink: &mut dyn GradSink<TrainerError>,
) -> Result<(LossParts, Vec<Tensor>)> {
    let alpha = spec.loss.scal_weight;
    let beta = spec.loss.mdl_weight_at(step);
    let loss_fn = |pred: &Tensor, rows: Option<&[Tensor]>| -> Result<(Tensor, LossParts)> {
        let diff = (pred.to_dtype(prep.velocity.dtype())? - &prep.velocity)?
            .sqr()?
            .mean_all()?;
        let mut parts = LossParts {
            diff: value(&diff)?,
            ..Default::default()
        };
        let mut total = diff;
        if let Some(rows) = rows {
            let (scal, mdl) = row_losses(rows, &prep.row_targets, spec.loss, total.dtype())?;
            parts.scal = value(&scal)?;
            parts.mdl = value(&mdl)?;
            total = ((total + (scal * alpha)?)? + (mdl * beta)?)?;
        }
        parts.total = value(&total)?;
        Ok((total, parts))
    };
    loss_and_grads_into(model, &prep.inputs, lora, checkpointing, loss_fn, sink)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_matches_the_spec_values() {
        assert!((shift_mu(256) - 0.5).abs() < 1e-12);
        assert!((shift_mu(4096) - 1.15).abs() < 1e-12);
        assert!((shift_mu(1024) - 0.63).abs() < 1e-12);
        assert!((shift_t(0.5, 0.0) - 0.5).abs() < 1e-12);
        assert!(
            shift_t(0.5, 0.63) > 0.5,
            "a positive mu moves t toward noise"
        );
    }
}
