//! `trainer denoise-profile`: how well a base denoises the run's data, at the noise levels
//! sampling passes through. It answers "does this base denoise?" with numbers where samples
//! from noise only show that something is wrong (docs/design.md §12).
//!
//! Each profiled sample gets one noise draw `n` (the held-out measures' stream, never a
//! training one), reused at every level so that the levels differ only in t:
//! - at noise level t the sample is noised as training noises it, x_t = (1 - t) x0 + t n, and
//!   one forward gives the velocity error |v - (n - x0)|^2 (L_diff at that t) and the error of
//!   the clean latents one step recovers, x0' = x_t - t v;
//! - at img2img strength s FLUX's sampler runs from part-way, as diffusers'
//!   FluxImg2ImgPipeline does ([`FlowMatchSchedule::img2img`]): start latents
//!   sigma n + (1 - sigma) x0 at the schedule's first kept sigma, then its Euler steps; the
//!   error is that of the latents it ends at. A base that has learnt the data's shapes brings
//!   them back from the middle strengths.
//!
//! Errors are mean squares over every latent channel (as L_diff), averaged over samples. The
//! mean image's error (predicting every sample's x0 by their mean) is the yardstick for the
//! highest levels: at t = 1 the input is pure noise and the best a caption-blind guess can do
//! is that mean.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::data::Sample;
use crate::error::{Result, TrainerError};
use flux::embed::{grid_ids, text_ids, unpack_latents};
use flux::rng::{name_hash, stream, Purpose};
use flux::schedule::{noised, FlowMatchSchedule};
use flux::{Flux, LoraView, ModelInputs};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ProfileSpec {
    /// Noise levels t in (0, 1].
    pub noise_levels: Vec<f64>,
    /// img2img strengths in (0, 1].
    pub strengths: Vec<f64>,
    /// Sampling steps of the full schedule img2img takes its tail of.
    pub steps: usize,
    /// Distilled guidance of every forward (training's `conditioning.guidance`).
    pub guidance: f32,
    /// Seed of the noise draws.
    pub seed: u64,
    /// Samples shown in the sheet (the first ones).
    pub sheet_rows: usize,
}

/// One noise level's errors.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LevelError {
    pub t: f64,
    /// Mean |v - (n - x0)|^2: L_diff at this t.
    pub velocity_mse: f64,
    /// Mean |x_t - t v - x0|^2.
    pub x0_mse: f64,
}

/// One img2img strength's error.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Img2ImgError {
    pub strength: f64,
    /// The noise level sampling starts from (the first sample's: it depends on the token
    /// count).
    pub start_sigma: f64,
    pub steps: usize,
    /// Mean |x_final - x0|^2.
    pub x0_mse: f64,
}

/// The profile of a base on a set of samples.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Profile {
    pub samples: usize,
    /// Mean |mean(x0) - x0|^2 over the samples (None when their shapes differ).
    pub mean_image_mse: Option<f64>,
    pub levels: Vec<LevelError>,
    pub img2img: Vec<Img2ImgError>,
}

/// Latents of the sheet's rows: per shown sample, its clean latent, the one-step x0' of each
/// level, then the img2img result of each strength (packed [1, N, C]).
pub struct SheetLatents {
    pub rows: Vec<Vec<Tensor>>,
    /// Each row's latent size (h, w) in latent pixels, for unpacking.
    pub sizes: Vec<(usize, usize)>,
}

fn bad(name: &str, reason: String) -> TrainerError {
    TrainerError::Input {
        name: name.into(),
        reason,
    }
}

impl ProfileSpec {
    /// Every level and strength in (0, 1], at least one step.
    pub fn check(&self) -> Result<()> {
        for (name, values) in [("--t", &self.noise_levels), ("--strength", &self.strengths)] {
            if let Some(v) = values.iter().find(|v| !(**v > 0.0 && **v <= 1.0)) {
                return Err(bad(name, format!("{v}: must be in (0, 1]")));
            }
        }
        if self.steps == 0 {
            return Err(bad("--steps", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// The noise of sample `k` of a profile seeded `seed`, shaped like `like`.
pub fn noise_of(seed: u64, k: usize, like: &Tensor) -> Result<Tensor> {
    let mut rng = stream(
        seed,
        Purpose::Probe,
        &[name_hash("denoise-profile"), k as u64],
    );
    let v: Vec<f32> = (0..like.elem_count())
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, like.shape(), like.device())?)
}

/// Mean square of `a - b`, in f64.
fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    Ok(d.sqr()?
        .mean_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// The model inputs of one sample at latents `img` ([1, N, C]), without references.
fn inputs_of(s: &Sample, img: Tensor, dtype: DType) -> Result<ModelInputs> {
    Ok(ModelInputs {
        img: img.to_dtype(dtype)?,
        img_ids: grid_ids(s.grid.rows, s.grid.cols, 0),
        txt_ids: text_ids(s.txt.dim(0)?),
        txt: s.txt.unsqueeze(0)?.to_dtype(dtype)?,
        pooled: s.pooled.unsqueeze(0)?.to_dtype(dtype)?,
        timestep: vec![],
        guidance: vec![],
        refs: None,
        isolate_refs: true,
        row_queries: None,
    })
}

/// Profiles `model` on `samples` (no references, so a LoRA, which MOSAIC puts on reference
/// tokens only, changes nothing: `lora` is the empty one).
pub fn measure(
    model: &Flux,
    lora: LoraView,
    samples: &[Sample],
    spec: &ProfileSpec,
) -> Result<(Profile, SheetLatents)> {
    spec.check()?;
    if samples.is_empty() {
        return Err(bad("--samples", "the data gave no sample".into()));
    }
    // Reported: the first sample's tails (the shift, so each start sigma, depends on a
    // sample's token count; with aspect buckets the others may start elsewhere).
    let tails = img2img_tails(spec, samples[0].grid.len())?;
    let dtype = model.dtype();
    let mut level_sums = vec![(0.0, 0.0); spec.noise_levels.len()];
    let mut img2img_sums = vec![0.0; spec.strengths.len()];
    let mut sheet = SheetLatents {
        rows: Vec::new(),
        sizes: Vec::new(),
    };
    for (k, s) in samples.iter().enumerate() {
        let x0 = s.x0.unsqueeze(0)?.to_dtype(DType::F32)?;
        let n = noise_of(spec.seed, k, &x0)?;
        let mut row = vec![x0.clone()];
        for (sum, &t) in level_sums.iter_mut().zip(&spec.noise_levels) {
            let xt = noised(&x0, &n, t)?;
            let mut inp = inputs_of(s, xt.clone(), dtype)?;
            inp.timestep = vec![t as f32];
            inp.guidance = vec![spec.guidance];
            let v = model.forward(&inp, lora)?.pred.to_dtype(DType::F32)?;
            sum.0 += mse(&v, &(&n - &x0)?)?;
            let x0_hat = (xt - (v * t)?)?;
            sum.1 += mse(&x0_hat, &x0)?;
            row.push(x0_hat);
        }
        let own_tails = img2img_tails(spec, s.grid.len())?;
        let per_strength = img2img_sums.iter_mut().zip(&own_tails);
        for (sum, tail) in per_strength {
            let start = tail.start_latents(&x0, &n)?;
            let inp = inputs_of(s, start, dtype)?;
            let out = flux::sample::denoise(model, lora, inp, tail, spec.guidance, false)?
                .latents
                .to_dtype(DType::F32)?;
            *sum += mse(&out, &x0)?;
            row.push(out);
        }
        if k < spec.sheet_rows {
            sheet.rows.push(row);
            sheet.sizes.push((s.grid.rows * 2, s.grid.cols * 2));
        }
    }
    let count = samples.len() as f64;
    let profile = Profile {
        samples: samples.len(),
        mean_image_mse: mean_image_mse(samples)?,
        levels: spec
            .noise_levels
            .iter()
            .zip(&level_sums)
            .map(|(&t, (v, x))| LevelError {
                t,
                velocity_mse: v / count,
                x0_mse: x / count,
            })
            .collect(),
        img2img: spec
            .strengths
            .iter()
            .zip(tails.iter().zip(&img2img_sums))
            .map(|(&strength, (tail, sum))| Img2ImgError {
                strength,
                start_sigma: tail.sigmas[0] as f64,
                steps: tail.steps(),
                x0_mse: sum / count,
            })
            .collect(),
    };
    Ok((profile, sheet))
}

/// The schedule tails img2img runs at each strength for a target of `tokens` tokens.
fn img2img_tails(spec: &ProfileSpec, tokens: usize) -> Result<Vec<FlowMatchSchedule>> {
    let full = FlowMatchSchedule::flux(spec.steps, tokens);
    spec.strengths
        .iter()
        .map(|&s| crate::sample::img2img_schedule(&full, s))
        .collect()
}

/// Mean |mean(x0) - x0|^2 over `samples`, when they all have one shape.
fn mean_image_mse(samples: &[Sample]) -> Result<Option<f64>> {
    let shape = samples[0].x0.dims();
    if samples.iter().any(|s| s.x0.dims() != shape) {
        return Ok(None);
    }
    let all = Tensor::stack(
        &samples
            .iter()
            .map(|s| s.x0.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?;
    let mean = all.mean_keepdim(0)?.broadcast_as(all.shape())?;
    Ok(Some(mse(&all, &mean)?))
}

/// The sheet: per shown sample one row, the clean image then one tile per level and per
/// strength, decoded with `decoder`.
pub fn sheet(latents: &SheetLatents, decoder: &flux::encoders::VaeDecoder) -> Result<RgbImage> {
    let mut images = Vec::with_capacity(latents.rows.len());
    for (row, &(h, w)) in latents.rows.iter().zip(&latents.sizes) {
        let decoded = row
            .iter()
            .map(|x| crate::sample::to_rgb(&decoder.decode(&unpack_latents(x, h, w)?)?))
            .collect::<Result<Vec<_>>>()?;
        images.push(decoded);
    }
    let tile = images
        .first()
        .and_then(|r| r.first())
        .map_or(64, |i| i.height());
    let rows: Vec<crate::validation::grid::GridRow> = images
        .iter()
        .map(|r| crate::validation::grid::GridRow {
            refs: &r[..1],
            samples: r[1..].iter().collect(),
        })
        .collect();
    Ok(crate::validation::grid::grid(&rows, tile))
}

/// The profile as a markdown table, levels then strengths.
pub fn table(p: &Profile) -> String {
    let mut out = format!(
        "{} samples; the mean image's error: {}\n\n| t | L_diff (velocity MSE) | x0 MSE, one step |\n|---|---|---|\n",
        p.samples,
        p.mean_image_mse
            .map_or("- (sizes differ)".into(), |m| format!("{m:.4}"))
    );
    for l in &p.levels {
        out += &format!("| {} | {:.4} | {:.4} |\n", l.t, l.velocity_mse, l.x0_mse);
    }
    out += "\n| img2img strength | start sigma | steps | x0 MSE at the end |\n|---|---|---|---|\n";
    for i in &p.img2img {
        out += &format!(
            "| {} | {:.3} | {} | {:.4} |\n",
            i.strength, i.start_sigma, i.steps, i.x0_mse
        );
    }
    out
}

/// The next `count` samples of a one-rank `data` whose batches hold `batch_size`.
pub fn first_samples(
    data: &mut crate::data::DataFeed,
    count: usize,
    batch_size: usize,
) -> Result<Vec<Sample>> {
    let mut samples = Vec::with_capacity(count);
    while samples.len() < count {
        let mut batch = data.next_micro_batch(0, batch_size.max(1))?;
        batch.truncate(count - samples.len());
        samples.extend(batch);
    }
    Ok(samples)
}

/// Loads the run's base and `count` samples of its data (rank 0's first micro-batches), then
/// profiles.
pub fn run(
    cfg: &crate::config::Config,
    count: usize,
    spec: &ProfileSpec,
    device: &Device,
) -> Result<(Profile, RgbImage)> {
    spec.check()?;
    if count == 0 {
        return Err(bad("--samples", "must be at least 1".into()));
    }
    let (fc, weights) = crate::run::base_weights(cfg, device)?;
    let model = Flux::new(fc.clone(), &weights, flux::RowBlocks::default())?;
    let lora = crate::sample::load_lora(&fc, None, device)?;
    let mut data = crate::data::DataFeed::build(cfg, &fc, 0, 1, device)?;
    let samples = first_samples(&mut data, count, cfg.train.batch_size)?;
    let (profile, latents) = measure(&model, lora.view(false), &samples, spec)?;
    let decoder = crate::data::shards::vae_decoder(cfg, &fc, device)?;
    Ok((profile, sheet(&latents, &decoder)?))
}
