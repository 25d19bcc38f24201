//! Whether MOSAIC's losses do what they claim, measured on a held-out dataset (scenes of
//! subjects training never shows, with exact correspondences; `datasets synth` writes one):
//!
//! - correspondence accuracy and separation ([`attention`]): the target is noised to each of
//!   `validation.measure_t` and one forward returns the attention rows of every correspondence
//!   pair's reference token, averaged over the loss's blocks and the heads (the rows SCAL and
//!   MDL train);
//! - identity ([`identity`]): the target is noised to `validation.identity_t` and denoised
//!   with the references, and again with the references zeroed; each generated image is
//!   compared with the references at the correspondence points, in pixel space.
//!
//! [`shapes`] measures a base rather than a LoRA: which shape and colour a picture of one
//! subject shows (`trainer shapes`).
//!
//! Nothing here draws from a training stream (noise comes from `Purpose::Probe` keyed by the
//! held-out sample's position), and the model and LoRA are only read, so measuring during
//! training leaves the run bit-identical.

pub mod attention;
pub mod identity;
pub mod shapes;

use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::config::Config;
use crate::data::sample::Sample;
use crate::error::{Result, TrainerError};
use attention::AttentionTally;
use flux::embed::{grid_ids, text_ids};
use flux::rng::{stream, Purpose};
use flux::{Flux, LoraView, ModelInputs, RefInputs};

/// What the measures need of the run's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureSpec {
    /// Noise levels the attention measures average over.
    pub measure_t: Vec<f64>,
    /// Identity: the noise level the target starts from, and the denoising steps to 0.
    pub identity_t: f64,
    pub identity_steps: usize,
    pub guidance: f32,
    pub ref_guidance: f32,
    pub isolate_refs: bool,
}

impl MeasureSpec {
    pub fn of(cfg: &Config) -> Self {
        Self {
            measure_t: cfg.validation.measure_t.clone(),
            identity_t: cfg.validation.identity_t,
            identity_steps: cfg.validation.identity_steps,
            guidance: cfg.conditioning.guidance as f32,
            ref_guidance: cfg.conditioning.ref_guidance as f32,
            isolate_refs: cfg.conditioning.isolate_refs,
        }
    }
}

/// One held-out scene: its model inputs and its decoded images and points.
pub struct HeldOutSample {
    pub sample: Sample,
    pub decoded: datasets::Decoded,
    /// The target and each reference through the codec, decoded once at load (what identity
    /// compares with at every validation).
    clean: identity::Image,
    references: Vec<identity::Image>,
}

/// The held-out dataset, read and encoded once.
pub struct HeldOut {
    pub url: String,
    pub samples: Vec<HeldOutSample>,
    /// Rows the loader skipped as unusable (counted, never silently dropped).
    pub skipped: u64,
    decoder: flux::encoders::VaeDecoder,
}

impl HeldOut {
    /// Reads every row of the dataset at `url` (in the order of its files), decoded at the
    /// run's resolutions and encoded with the run's encoders.
    pub fn load(cfg: &Config, fc: &flux::FluxConfig, url: &str, device: &Device) -> Result<Self> {
        let d = &cfg.data;
        let opts = datasets::LoaderOptions {
            plan: datasets::PlanSpec {
                seed: 0,
                world: 1,
                rank: 0,
                batch_size: 1,
                shuffle_rows: 1,
                buckets: d.aspect_buckets.then_some(d.resolution),
            },
            transform: datasets::TransformSpec {
                resolution: d.resolution,
                ref_resolution: d.ref_resolution,
                aspect_buckets: d.aspect_buckets,
            },
            io_threads: 2,
            decode_threads: 1,
            prefetch_batches: 2,
            strict: d.strict,
            cached: false,
        };
        let mut loader = datasets::Loader::open(url, opts, datasets::Cursor::default())
            .map_err(|e| TrainerError::config("validation.heldout", format!("{url}: {e}")))?;
        let total = loader.manifest().total_rows;
        let (mut enc, decoder) = crate::data::shards::encoders_and_decoder(cfg, fc, device)?;
        let mut samples = Vec::with_capacity(total);
        loop {
            let b = loader.next_batch()?;
            if b.cursor.epoch > 0 && b.index == 0 {
                break;
            }
            for decoded in b.samples.into_iter().filter(|s| !s.refs.is_empty()) {
                let sample = crate::data::shards::encode_samples(
                    &mut enc,
                    std::slice::from_ref(&decoded),
                    device,
                )?
                .remove(0);
                let (clean, references) = identity::through_codec(&sample, &decoder)?;
                samples.push(HeldOutSample {
                    sample,
                    decoded,
                    clean,
                    references,
                });
            }
            if b.cursor.epoch > 0 {
                break;
            }
        }
        if samples.is_empty() {
            return Err(TrainerError::config(
                "validation.heldout",
                format!("{url} holds no usable sample with references"),
            ));
        }
        Ok(Self {
            url: url.to_string(),
            samples,
            skipped: loader.report().skipped_total as u64,
            decoder,
        })
    }
}

/// The measures of one model and LoRA on the held-out dataset.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Measures {
    pub samples: usize,
    pub pairs: usize,
    /// Share of pairs whose row peaks within one token of their target token...
    pub correspondence_accuracy: f64,
    /// ...and that share for uniform attention.
    pub correspondence_chance: f64,
    /// Share of a reference's mass on subjects that lands on its own subject (samples with two
    /// or more references)...
    pub separation: f64,
    /// ...and that share for uniform attention.
    pub separation_chance: f64,
    /// 1 - mean |RGB difference| / 2 (RGB in [-1, 1]) between the denoised target and the
    /// references at the correspondence points, both through the codec: with the references...
    pub identity: f64,
    /// ...with them zeroed...
    pub identity_refs_zeroed: f64,
    /// ...and for the clean target itself (the most a sample can reach).
    pub identity_ceiling: f64,
    pub skipped: u64,
}

/// `trainer eval --heldout`: the run's base (`cfg`) with the LoRA at `lora` (none: the base
/// alone) measured on the held-out dataset at `url`.
pub fn eval_heldout(
    cfg: &Config,
    url: &str,
    lora: Option<&std::path::Path>,
    device: &Device,
) -> Result<Measures> {
    let (fc, weights) = crate::run::base_weights(cfg, device)?;
    let mut model = Flux::new(fc.clone(), &weights, cfg.loss.row_blocks(&fc))?;
    model.attention = cfg.model.attention();
    let lora = crate::sample::load_lora(&fc, lora, device)?;
    let heldout = HeldOut::load(cfg, &fc, url, device)?;
    measure(
        &model,
        lora.view(false),
        &heldout,
        &MeasureSpec::of(cfg),
        cfg.run.seed,
    )
}

/// Measures `model` with `lora` on `heldout`.
pub fn measure(
    model: &Flux,
    lora: LoraView,
    heldout: &HeldOut,
    spec: &MeasureSpec,
    seed: u64,
) -> Result<Measures> {
    let all: Vec<usize> = (0..heldout.samples.len()).collect();
    let tallies = tally_samples(model, lora, heldout, spec, seed, &all)?;
    Ok(summarize(heldout, spec, &tallies))
}

/// What one held-out sample adds to the measures' sums. Ranks measure disjoint samples and
/// gather these; summed in sample order they give the same bits whatever the world size.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleTally {
    pub attention: AttentionTally,
    pub identity: identity::IdentityTally,
}

impl SampleTally {
    /// Fields of one tally on the wire.
    const WORDS: usize = 10;

    /// `tallies` as little-endian 64-bit words, floats as their bits: exact for every value,
    /// a NaN of a diverged model included (JSON would write it as null and fail to read it).
    pub fn encode(tallies: &[SampleTally]) -> Vec<u8> {
        let mut out = Vec::with_capacity(tallies.len() * Self::WORDS * 8);
        for t in tallies {
            let (a, i) = (&t.attention, &t.identity);
            let words = [
                a.pairs as u64,
                a.hits as u64,
                a.chance.to_bits(),
                a.separation_rows as u64,
                a.separation.to_bits(),
                a.separation_chance.to_bits(),
                i.points as u64,
                i.with_refs.to_bits(),
                i.refs_zeroed.to_bits(),
                i.ceiling.to_bits(),
            ];
            for w in words {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// The tallies [`SampleTally::encode`] wrote; None for bytes it cannot have written.
    pub fn decode(bytes: &[u8]) -> Option<Vec<SampleTally>> {
        if !bytes.len().is_multiple_of(Self::WORDS * 8) {
            return None;
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let count = |w: u64| usize::try_from(w).ok();
        words
            .chunks_exact(Self::WORDS)
            .map(|w| {
                Some(SampleTally {
                    attention: AttentionTally {
                        pairs: count(w[0])?,
                        hits: count(w[1])?,
                        chance: f64::from_bits(w[2]),
                        separation_rows: count(w[3])?,
                        separation: f64::from_bits(w[4]),
                        separation_chance: f64::from_bits(w[5]),
                    },
                    identity: identity::IdentityTally {
                        points: count(w[6])?,
                        with_refs: f64::from_bits(w[7]),
                        refs_zeroed: f64::from_bits(w[8]),
                        ceiling: f64::from_bits(w[9]),
                    },
                })
            })
            .collect()
    }
}

/// The tallies of the held-out samples at positions `which` (each sample's noise is keyed by
/// its position, so a sample measures the same wherever it is measured).
pub fn tally_samples(
    model: &Flux,
    lora: LoraView,
    heldout: &HeldOut,
    spec: &MeasureSpec,
    seed: u64,
    which: &[usize],
) -> Result<Vec<SampleTally>> {
    let _span = tracing::info_span!("measures", samples = which.len()).entered();
    which
        .iter()
        .map(|&i| {
            let s = heldout.samples.get(i).ok_or_else(|| TrainerError::Input {
                name: heldout.url.clone(),
                reason: format!(
                    "held-out sample {i} asked for, {} loaded",
                    heldout.samples.len()
                ),
            })?;
            let mut attention = AttentionTally::default();
            for (j, &t) in spec.measure_t.iter().enumerate() {
                let noise = noise_like(&s.sample.x0, seed, &[i as u64, j as u64])?;
                attention.merge(&attention_of(model, lora, s, spec, t, &noise)?);
            }
            let noise = noise_like(&s.sample.x0, seed, &[i as u64, u64::MAX])?;
            let identity = identity::of_sample(model, lora, s, spec, &noise, &heldout.decoder)?;
            Ok(SampleTally {
                attention,
                identity,
            })
        })
        .collect()
}

/// The measures of `heldout` from the tallies of all its samples, in sample order.
pub fn summarize(heldout: &HeldOut, spec: &MeasureSpec, tallies: &[SampleTally]) -> Measures {
    let mut tally = AttentionTally::default();
    let mut ident = identity::IdentityTally::default();
    for t in tallies {
        tally.merge(&t.attention);
        ident.merge(&t.identity);
    }
    Measures {
        samples: heldout.samples.len(),
        pairs: tally.pairs / spec.measure_t.len().max(1),
        correspondence_accuracy: tally.accuracy(),
        correspondence_chance: tally.accuracy_chance(),
        separation: tally.separation(),
        separation_chance: tally.separation_chance(),
        identity: ident.with_refs(),
        identity_refs_zeroed: ident.refs_zeroed(),
        identity_ceiling: ident.ceiling(),
        skipped: heldout.skipped,
    }
}

/// Standard normal noise shaped as `x` (in f32), from the probe stream keyed by `key`.
fn noise_like(x: &Tensor, seed: u64, key: &[u64]) -> Result<Tensor> {
    let mut rng = stream(seed, Purpose::Probe, key);
    let v: Vec<f32> = (0..x.elem_count())
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Ok(Tensor::from_vec(v, x.dims(), x.device())?)
}

/// (1 - t) x0 + t noise, in `dtype`, with a batch dimension.
fn noised(x0: &Tensor, noise: &Tensor, t: f64, dtype: DType) -> Result<Tensor> {
    Ok(flux::schedule::noised(x0, noise, t)?
        .unsqueeze(0)?
        .to_dtype(dtype)?)
}

/// The model inputs of held-out sample `s` at noisy target `img`; its references zeroed when
/// `zero_refs`.
fn inputs_of(
    s: &Sample,
    img: Tensor,
    spec: &MeasureSpec,
    t: f64,
    zero_refs: bool,
    dtype: DType,
) -> Result<ModelInputs> {
    let (ids, lens) = s.ref_positions();
    let latents = s.ref_latents(zero_refs)?;
    let l = s.txt.dim(0)?;
    Ok(ModelInputs {
        img,
        img_ids: grid_ids(s.grid.rows, s.grid.cols, 0),
        txt: s.txt.unsqueeze(0)?.to_dtype(dtype)?,
        txt_ids: text_ids(l),
        pooled: s.pooled.unsqueeze(0)?.to_dtype(dtype)?,
        timestep: vec![t as f32],
        guidance: vec![spec.guidance],
        refs: Some(RefInputs {
            latents: latents.unsqueeze(0)?.to_dtype(dtype)?,
            ids,
            lens,
            timestep: vec![0.0],
            guidance: vec![spec.ref_guidance],
        }),
        isolate_refs: spec.isolate_refs,
        row_queries: None,
    })
}

/// The attention measures of one held-out sample at noise level `t`.
fn attention_of(
    model: &Flux,
    lora: LoraView,
    s: &HeldOutSample,
    spec: &MeasureSpec,
    t: f64,
    noise: &Tensor,
) -> Result<AttentionTally> {
    let sample = &s.sample;
    let img = noised(&sample.x0, noise, t, model.dtype())?;
    let mut inputs = inputs_of(sample, img, spec, t, false, model.dtype())?;
    let mut queries = Vec::new();
    let mut offset = 0u32;
    for r in &sample.refs {
        queries.extend(r.pairs.iter().map(|p| offset + p.ref_token));
        offset += r.grid.len() as u32;
    }
    if queries.is_empty() {
        return Ok(AttentionTally::default());
    }
    inputs.row_queries = Some(vec![queries]);
    let out = model.forward(&inputs, lora)?;
    let rows = out
        .rows
        .and_then(|mut r| r.pop())
        .ok_or_else(|| TrainerError::Input {
            name: "loss.double_blocks / loss.single_blocks".into(),
            reason: "select no block: the attention measures read the rows of the loss's blocks"
                .into(),
        })?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let mut rows = rows.into_iter();
    let per_ref: Vec<Vec<Vec<f32>>> = sample
        .refs
        .iter()
        .map(|r| rows.by_ref().take(r.pairs.len()).collect())
        .collect();
    let targets: Vec<Vec<u32>> = sample
        .refs
        .iter()
        .map(|r| r.pairs.iter().map(|p| p.tgt_token).collect())
        .collect();
    Ok(attention::tally(&per_ref, &targets, sample.grid))
}

/// The measures as a small text table.
pub fn table(m: &Measures) -> String {
    format!(
        "held-out samples {}, pairs {}{}\n\
         correspondence accuracy  {:.3}  (chance {:.3})\n\
         separation               {:.3}  (uniform {:.3})\n\
         identity                 {:.3}  (references zeroed {:.3}, ceiling {:.3})\n",
        m.samples,
        m.pairs,
        if m.skipped > 0 {
            format!(", {} unusable rows skipped", m.skipped)
        } else {
            String::new()
        },
        m.correspondence_accuracy,
        m.correspondence_chance,
        m.separation,
        m.separation_chance,
        m.identity,
        m.identity_refs_zeroed,
        m.identity_ceiling,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_cross_the_wire_bit_for_bit() {
        let t = |x: f64, n: usize| SampleTally {
            attention: AttentionTally {
                pairs: n,
                hits: n / 2,
                chance: x,
                separation_rows: n + 1,
                separation: x / 3.0,
                separation_chance: -x,
            },
            identity: identity::IdentityTally {
                points: n * 7,
                with_refs: x * 1e-300,
                refs_zeroed: f64::INFINITY,
                ceiling: 0.1 + 0.2,
            },
        };
        let mut nan = t(f64::NAN, 3);
        nan.identity.with_refs = -f64::NAN;
        let tallies = vec![
            t(0.123_456_789_012_345_67, 1115),
            nan,
            SampleTally::default(),
        ];
        let back = SampleTally::decode(&SampleTally::encode(&tallies)).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in tallies.iter().zip(&back) {
            assert_eq!(SampleTally::encode(&[*a]), SampleTally::encode(&[*b]));
        }
        assert_eq!(back[0], tallies[0]);
        assert!(back[1].attention.chance.is_nan());
        assert_eq!(SampleTally::decode(&[]), Some(vec![]));
        assert_eq!(SampleTally::decode(&[0u8; 79]), None, "a torn tally");
    }
}
