//! The training objective: flow matching on the target tokens plus SCAL and MDL on the sampled
//! attention rows (design.md §5). It turns samples into model inputs (noise, timesteps,
//! sampled correspondence points) and model outputs into the loss; it knows nothing of files.
//!
//! Every random draw comes from a stream keyed by (seed, step, sample slot), so a sample's
//! noise, t and points do not depend on how samples are grouped into batches or ranks.

use candle_core::{DType, Device, Tensor};
use kernels::{mdl_loss, sample_points, scal_loss, MdlVariant, RefPoints, RefSegments};
use rand::Rng;
use rand_distr::{Distribution, Normal, StandardNormal};

use serde::{Deserialize, Serialize};

use crate::checks::{non_negative, positive};
use crate::data::sample::Sample;
use crate::error::{Result, TrainerError};
use flux::embed::{grid_ids, reference_ids, text_ids};
use flux::grad::{loss_and_grads_into, GradSink, NoSink};
use flux::rng::{stream, Purpose};
use flux::{Flux, Lora, ModelInputs, RefInputs, RowBlocks};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// A run config's `[conditioning]` section: how references and guidance enter the model.
pub struct ConditioningSpec {
    /// References do not attend to each other (the official group mask).
    pub isolate_refs: bool,
    /// Guidance value fed to text and target (MOSAIC trains with 1.0).
    pub guidance: f64,
    /// Guidance value fed to the references.
    pub ref_guidance: f64,
}

impl Default for ConditioningSpec {
    fn default() -> Self {
        Self {
            isolate_refs: true,
            guidance: 1.0,
            ref_guidance: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MdlVariantName {
    PaperKl,
    OfficialJsd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// A run config's `[loss]` section: the loss weights and schedule, the attention rows the
/// losses read, and the timestep distribution.
pub struct LossSpec {
    pub scal_weight: f64,
    pub mdl_weight: f64,
    pub mdl_variant: MdlVariantName,
    /// The MDL weight is 0 before this optimizer step...
    pub mdl_ramp_start: u64,
    /// ...then rises linearly to `mdl_weight` over this many steps (0: at once).
    pub mdl_ramp_steps: u64,
    pub points_per_ref: usize,
    /// Double blocks whose attention rows feed SCAL/MDL.
    pub double_blocks: Vec<usize>,
    pub single_blocks: Vec<usize>,
    /// How the attention rows are computed: "fused" (the kernels crate's op, no attention map)
    /// or "plain" (candle ops materializing [heads, P, N_tgt], the reference).
    pub rows: RowsImpl,
    /// t = sigmoid(n), n ~ N(logit_mean, logit_std^2).
    pub logit_mean: f64,
    pub logit_std: f64,
    /// Apply the resolution-dependent shift mu(seq_len) to t.
    pub resolution_shift: bool,
}

impl Default for LossSpec {
    fn default() -> Self {
        Self {
            scal_weight: 0.4,
            mdl_weight: 0.6,
            mdl_variant: MdlVariantName::PaperKl,
            mdl_ramp_start: 0,
            mdl_ramp_steps: 0,
            points_per_ref: 150,
            double_blocks: vec![0],
            single_blocks: vec![],
            rows: RowsImpl::Fused,
            logit_mean: 0.0,
            logit_std: 1.0,
            resolution_shift: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowsImpl {
    Fused,
    Plain,
}

impl MdlVariantName {
    /// The kernels crate's variant.
    pub fn kernel(self) -> MdlVariant {
        match self {
            MdlVariantName::PaperKl => MdlVariant::PaperKl,
            MdlVariantName::OfficialJsd => MdlVariant::OfficialJsd,
        }
    }
}

impl ConditioningSpec {
    /// Range checks, naming the key.
    pub fn validate(&self) -> Result<()> {
        let err = |k: &str, why: String| Err(TrainerError::config(k, why));
        if !self.guidance.is_finite() || !self.ref_guidance.is_finite() {
            return err("conditioning.guidance", "must be finite".into());
        }
        Ok(())
    }
}

impl LossSpec {
    /// Range checks, naming the `loss.*` key.
    pub fn validate(&self) -> Result<()> {
        let s = self;
        let err = |k: &str, why: String| Err(TrainerError::config(k, why));
        for (k, v) in [
            ("loss.scal_weight", s.scal_weight),
            ("loss.mdl_weight", s.mdl_weight),
        ] {
            if !non_negative(v) || !v.is_finite() {
                return err(k, format!("{v} must be a finite number >= 0"));
            }
        }
        if s.points_per_ref == 0 {
            return err("loss.points_per_ref", "must be at least 1".into());
        }
        if !positive(s.logit_std) {
            return err(
                "loss.logit_std",
                format!("{} must be positive", s.logit_std),
            );
        }
        if (s.scal_weight > 0.0 || s.mdl_weight > 0.0)
            && s.double_blocks.is_empty()
            && s.single_blocks.is_empty()
        {
            return err("loss.double_blocks", "SCAL/MDL are on but no block is selected (set loss.double_blocks or loss.single_blocks, or the weights to 0)".into());
        }
        Ok(())
    }

    /// The MDL weight at optimizer step `step`: 0 before the ramp, linear over it, then full.
    pub fn mdl_weight_at(&self, step: u64) -> f64 {
        if step < self.mdl_ramp_start {
            0.0
        } else if self.mdl_ramp_steps == 0 {
            self.mdl_weight
        } else {
            let p = (step - self.mdl_ramp_start) as f64 / self.mdl_ramp_steps as f64;
            self.mdl_weight * p.min(1.0)
        }
    }

    /// Which blocks emit attention rows, and how.
    pub fn row_blocks(&self) -> RowBlocks {
        RowBlocks {
            double: self.double_blocks.clone(),
            single: self.single_blocks.clone(),
            plain: self.rows == RowsImpl::Plain,
        }
    }
}

/// What the objective reads from a run config: its `[loss]` and `[conditioning]` sections.
#[derive(Debug, Clone, Copy)]
pub struct ObjectiveSpec<'a> {
    pub loss: &'a LossSpec,
    pub conditioning: &'a ConditioningSpec,
}

impl ObjectiveSpec<'_> {
    /// Whether step `step` needs attention rows (SCAL or MDL is on).
    pub fn needs_rows(&self, step: u64) -> bool {
        self.loss.scal_weight > 0.0 || self.loss.mdl_weight_at(step) > 0.0
    }
}

/// Resolution-dependent shift mu(seq_len): linear through (256, 0.5) and (4096, 1.15).
pub fn shift_mu(seq_len: usize) -> f64 {
    let m = (1.15 - 0.5) / (4096.0 - 256.0);
    let b = 0.5 - m * 256.0;
    m * seq_len as f64 + b
}

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
    /// Per sample: the target token each sampled point must attend to.
    pub tgt_idx: Vec<Vec<u32>>,
    pub segments: Vec<RefSegments>,
    /// Tokens per sample (text + target + references), for throughput.
    pub tokens: usize,
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
    let (n, c) = first.x0.dims2()?;
    let ldt = loss_dtype(dtype);
    let mut xt = Vec::with_capacity(samples.len());
    let mut velocity = Vec::with_capacity(samples.len());
    let mut timestep = Vec::with_capacity(samples.len());
    let mut tgt_idx = Vec::new();
    let mut ref_idx = Vec::new();
    let mut segments = Vec::new();
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
        if with_rows {
            let picked = sample_correspondences(
                s,
                spec.loss.points_per_ref,
                &mut stream(seed, Purpose::Points, &[step, slot]),
            )?;
            segments.push(picked.ref_segments());
            ref_idx.push(picked.ref_idx);
            tgt_idx.push(picked.tgt_idx);
        }
    }
    let b = samples.len();
    let refs = ref_inputs(spec, samples, dtype)?;
    let l = first.txt.dim(0)?;
    let tokens = l + n + refs.as_ref().map_or(0, |r| r.ids.len());
    let inputs = ModelInputs {
        img: Tensor::stack(&xt, 0)?,
        img_ids: grid_ids(first.grid.rows, first.grid.cols, 0),
        txt: Tensor::stack(&samples.iter().map(|s| &s.txt).collect::<Vec<_>>(), 0)?
            .to_dtype(dtype)?,
        txt_ids: text_ids(l),
        pooled: Tensor::stack(&samples.iter().map(|s| &s.pooled).collect::<Vec<_>>(), 0)?
            .to_dtype(dtype)?,
        timestep,
        guidance: vec![spec.conditioning.guidance as f32; b],
        refs,
        isolate_refs: spec.conditioning.isolate_refs,
        row_queries: with_rows.then_some(ref_idx),
    };
    Ok(Prepared {
        inputs,
        velocity: Tensor::stack(&velocity, 0)?,
        tgt_idx,
        segments,
        tokens,
    })
}

/// P correspondence points per reference of `s` (paper eq. 9), drawn from `rng`.
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

/// The references of a batch (clean: t = 0) as model inputs; None without references.
fn ref_inputs(
    spec: &ObjectiveSpec<'_>,
    samples: &[&Sample],
    dtype: DType,
) -> Result<Option<RefInputs>> {
    let Some(first) = samples.first().filter(|s| !s.refs.is_empty()) else {
        return Ok(None);
    };
    let b = samples.len();
    let mut ids = Vec::new();
    let mut lens = Vec::new();
    for (i, r) in first.refs.iter().enumerate() {
        ids.extend(reference_ids(r.grid.rows, r.grid.cols, i));
        lens.push(r.grid.len());
    }
    let per_sample: Vec<Tensor> = samples
        .iter()
        .map(|s| Tensor::cat(&s.refs.iter().map(|r| &r.latent).collect::<Vec<_>>(), 0))
        .collect::<candle_core::Result<_>>()?;
    Ok(Some(RefInputs {
        latents: Tensor::stack(&per_sample, 0)?.to_dtype(dtype)?,
        ids,
        lens,
        timestep: vec![0.0; b],
        guidance: vec![spec.conditioning.ref_guidance as f32; b],
    }))
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
            let b = rows.len() as f64;
            let mut scal = Tensor::zeros((), total.dtype(), total.device())?;
            let mut mdl = Tensor::zeros((), total.dtype(), total.device())?;
            for ((r, t_idx), seg) in rows.iter().zip(&prep.tgt_idx).zip(&prep.segments) {
                let r = r.to_dtype(total.dtype())?;
                scal = (scal + scal_loss(&r, t_idx, seg)?)?;
                mdl = (mdl + mdl_loss(spec.loss.mdl_variant.kernel(), &r, seg)?)?;
            }
            let (scal, mdl) = ((scal / b)?, (mdl / b)?);
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

    #[test]
    fn mdl_ramp() {
        let spec = LossSpec {
            scal_weight: 0.1,
            mdl_weight: 1.0,
            mdl_variant: MdlVariantName::OfficialJsd,
            mdl_ramp_start: 10_000,
            mdl_ramp_steps: 1000,
            ..LossSpec::default()
        };
        assert_eq!(spec.mdl_weight_at(9_999), 0.0);
        assert_eq!(spec.mdl_weight_at(10_500), 0.5);
        assert_eq!(spec.mdl_weight_at(20_000), 1.0);
    }
}
