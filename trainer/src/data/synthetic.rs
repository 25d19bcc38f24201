//! The `synthetic` source: a small in-memory multi-reference dataset with exact correspondences, generated in
//! latent space (16 channels, 8x below pixels) so the tiny model needs no VAE.
//!
//! Each sample pastes 1..=K subjects (squares and discs with a per-kind colour and gradient
//! texture) at random places and sizes into a target latent; reference k shows subject k alone,
//! centred at 0.9 of its canvas on a plain background (as the official inference pads
//! references). Correspondences map every visible subject point of a reference to the target
//! point with the same subject-local coordinates, in normalised [0, 1] coordinates, and go
//! through the design.md §2 token mapping. Captions are fixed embeddings of the subject kinds.

use candle_core::{Device, Tensor};
use datasets::{map_points_to_tokens, Point4, TokenGrid};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::batches::GlobalBatches;
use super::{RefSample, Sample, Source};
use crate::config::Config;
use crate::error::{Result, TrainerError};
use crate::objective::EmptyCaption;
use datasets::DataReport;
use flux::config::FluxConfig;
use flux::embed::pack_latents;
use flux::rng::{stream, Purpose};

/// Latent channels of the FLUX VAE.
pub const LATENT_CHANNELS: usize = 16;
/// Distinct subject kinds the generator draws from.
const KINDS: usize = 8;

#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    pub samples: usize,
    pub resolution: usize,
    pub ref_resolution: usize,
    pub min_refs: usize,
    pub max_refs: usize,
    pub text_tokens: usize,
    pub context_dim: usize,
    pub pooled_dim: usize,
}

/// Per-kind appearance: base colour and two gradient directions over the subject's extent.
struct Kind {
    base: [f32; LATENT_CHANNELS],
    du: [f32; LATENT_CHANNELS],
    dv: [f32; LATENT_CHANNELS],
    disc: bool,
    text: Vec<f32>,
    pooled: Vec<f32>,
}

fn normal_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            scale * z
        })
        .collect()
}

fn arr(v: Vec<f32>) -> [f32; LATENT_CHANNELS] {
    let mut a = [0f32; LATENT_CHANNELS];
    a.copy_from_slice(&v);
    a
}

impl Kind {
    fn inside(&self, u: f32, v: f32) -> bool {
        (0.0..1.0).contains(&u)
            && (0.0..1.0).contains(&v)
            && (!self.disc || (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25)
    }

    fn value(&self, u: f32, v: f32, ch: usize) -> f32 {
        self.base[ch] + self.du[ch] * (u - 0.5) + self.dv[ch] * (v - 0.5)
    }
}

/// A subject placed on a canvas: top-left corner and side, in latent pixels.
#[derive(Clone, Copy)]
struct Placement {
    kind: usize,
    x: f32,
    y: f32,
    size: f32,
}

impl Placement {
    fn local(&self, px: f32, py: f32) -> (f32, f32) {
        ((px - self.x) / self.size, (py - self.y) / self.size)
    }
}

/// Renders subjects (later ones on top) over `background`; returns the latent [C, h, w] values
/// and, per pixel, the index of the visible subject.
fn render(
    kinds: &[Kind],
    placed: &[Placement],
    h: usize,
    w: usize,
    background: &[f32; LATENT_CHANNELS],
    noise: &mut impl FnMut() -> f32,
) -> (Vec<f32>, Vec<Option<usize>>) {
    let mut data = vec![0f32; LATENT_CHANNELS * h * w];
    let mut label = vec![None; h * w];
    for py in 0..h {
        for px in 0..w {
            let (cx, cy) = (px as f32 + 0.5, py as f32 + 0.5);
            let mut top = None;
            for (i, p) in placed.iter().enumerate() {
                let (u, v) = p.local(cx, cy);
                if kinds[p.kind].inside(u, v) {
                    top = Some(i);
                }
            }
            label[py * w + px] = top;
            for ch in 0..LATENT_CHANNELS {
                let value = match top {
                    Some(i) => {
                        let p = placed[i];
                        let (u, v) = p.local(cx, cy);
                        kinds[p.kind].value(u, v, ch)
                    }
                    None => background[ch],
                };
                data[ch * h * w + py * w + px] = value + noise();
            }
        }
    }
    (data, label)
}

fn packed(data: Vec<f32>, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let t = Tensor::from_vec(data, (1, LATENT_CHANNELS, h, w), device)?;
    Ok(pack_latents(&t)?.squeeze(0)?)
}

/// Generates the dataset and the embeddings of its empty caption (padding only, pooled 0: the
/// mean of no subject); the same (spec, seed) always gives the same samples.
pub fn generate(
    spec: &SynthSpec,
    seed: u64,
    device: &Device,
) -> Result<(Vec<Sample>, EmptyCaption)> {
    let mut rng = stream(seed, Purpose::Dataset, &[0]);
    let kinds: Vec<Kind> = (0..KINDS)
        .map(|k| Kind {
            base: arr(normal_vec(&mut rng, LATENT_CHANNELS, 1.0)),
            du: arr(normal_vec(&mut rng, LATENT_CHANNELS, 0.8)),
            dv: arr(normal_vec(&mut rng, LATENT_CHANNELS, 0.8)),
            disc: k % 2 == 1,
            text: normal_vec(&mut rng, spec.context_dim, 1.0),
            pooled: normal_vec(&mut rng, spec.pooled_dim, 1.0),
        })
        .collect();
    // Real VAE latents are not zero-mean either: a shared background offset is the first thing
    // a model learns.
    let target_bg = arr(normal_vec(&mut rng, LATENT_CHANNELS, 1.0));
    let ref_bg = [1.5f32; LATENT_CHANNELS];
    let pad_token = normal_vec(&mut rng, spec.context_dim, 0.1);

    let (h, w) = (spec.resolution / 8, spec.resolution / 8);
    let (hr, wr) = (spec.ref_resolution / 8, spec.ref_resolution / 8);
    let tgt_grid = TokenGrid::for_pixels(spec.resolution, spec.resolution);
    let ref_grid = TokenGrid::for_pixels(spec.ref_resolution, spec.ref_resolution);
    let mut out = Vec::with_capacity(spec.samples);
    for index in 0..spec.samples {
        let mut rng = stream(seed, Purpose::Dataset, &[1 + index as u64]);
        let k = rng.random_range(spec.min_refs..=spec.max_refs);
        let mut order: Vec<usize> = (0..KINDS).collect();
        order.shuffle(&mut rng);
        let placed: Vec<Placement> = order[..k]
            .iter()
            .map(|&kind| {
                let size = rng.random_range(0.3..0.6) * h as f32;
                Placement {
                    kind,
                    x: rng.random_range(0.0..(w as f32 - size)),
                    y: rng.random_range(0.0..(h as f32 - size)),
                    size,
                }
            })
            .collect();
        let mut noise = || {
            let z: f32 = StandardNormal.sample(&mut rng);
            0.05 * z
        };
        let (tgt_data, label) = render(&kinds, &placed, h, w, &target_bg, &mut noise);
        let mut refs = Vec::with_capacity(k);
        for (i, p) in placed.iter().enumerate() {
            let size = 0.9 * hr as f32;
            let centred = Placement {
                kind: p.kind,
                x: (wr as f32 - size) / 2.0,
                y: (hr as f32 - size) / 2.0,
                size,
            };
            let (ref_data, ref_label) = render(&kinds, &[centred], hr, wr, &ref_bg, &mut noise);
            let points = corresponding_points(&centred, p, &ref_label, &label, i, (hr, wr), (h, w));
            refs.push(RefSample {
                latent: packed(ref_data, hr, wr, device)?,
                grid: ref_grid,
                pairs: map_points_to_tokens(&points, ref_grid, tgt_grid)?,
            });
        }
        let (txt, pooled) = caption(spec, &kinds, &placed, &pad_token);
        out.push(Sample {
            x0: packed(tgt_data, h, w, device)?,
            grid: tgt_grid,
            txt: Tensor::from_vec(txt, (spec.text_tokens, spec.context_dim), device)?,
            pooled: Tensor::from_vec(pooled, spec.pooled_dim, device)?,
            refs,
        });
    }
    let (txt, pooled) = caption(spec, &kinds, &[], &pad_token);
    let empty = EmptyCaption {
        txt: Tensor::from_vec(txt, (spec.text_tokens, spec.context_dim), device)?,
        pooled: Tensor::from_vec(pooled, spec.pooled_dim, device)?,
    };
    Ok((out, empty))
}

/// Points (ref_x, ref_y, tgt_x, tgt_y), normalised, of every reference cell of subject `i`
/// (rendered `centred` on an (hr, wr) grid) whose place in the target (at `p` on an (h, w)
/// grid) is visible there.
fn corresponding_points(
    centred: &Placement,
    p: &Placement,
    ref_label: &[Option<usize>],
    label: &[Option<usize>],
    i: usize,
    (hr, wr): (usize, usize),
    (h, w): (usize, usize),
) -> Vec<Point4> {
    let mut points = Vec::new();
    for ry in 0..hr {
        for rx in 0..wr {
            if ref_label[ry * wr + rx].is_none() {
                continue;
            }
            let (u, v) = centred.local(rx as f32 + 0.5, ry as f32 + 0.5);
            let (tx, ty) = (p.x + u * p.size, p.y + v * p.size);
            let (txi, tyi) = (tx.floor() as usize, ty.floor() as usize);
            if txi < w && tyi < h && label[tyi * w + txi] == Some(i) {
                points.push([
                    (rx as f32 + 0.5) / wr as f32,
                    (ry as f32 + 0.5) / hr as f32,
                    tx / w as f32,
                    ty / h as f32,
                ]);
            }
        }
    }
    points
}

/// The caption embeddings of a scene: one token per subject (its kind's embedding), padded;
/// the pooled embedding is the mean of the subjects' pooled embeddings.
fn caption(
    spec: &SynthSpec,
    kinds: &[Kind],
    placed: &[Placement],
    pad_token: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut txt = Vec::with_capacity(spec.text_tokens * spec.context_dim);
    for t in 0..spec.text_tokens {
        match placed.get(t) {
            Some(p) => txt.extend_from_slice(&kinds[p.kind].text),
            None => txt.extend_from_slice(pad_token),
        }
    }
    let mut pooled = vec![0f32; spec.pooled_dim];
    for p in placed {
        for (a, b) in pooled.iter_mut().zip(&kinds[p.kind].pooled) {
            *a += b / placed.len() as f32;
        }
    }
    (txt, pooled)
}

/// The in-memory dataset and its global batches (world-size independent: each rank takes its
/// slice of every global micro-batch).
pub struct InMemory {
    pub samples: Vec<Sample>,
    pub batches: GlobalBatches,
    pub empty_caption: EmptyCaption,
}

impl InMemory {
    /// The in-memory synthetic dataset, in world-size independent global batches.
    pub fn build(cfg: &Config, fc: &FluxConfig, world: usize, device: &Device) -> Result<Self> {
        let d = &cfg.data;
        let spec = SynthSpec {
            samples: d.samples,
            resolution: d.resolution,
            ref_resolution: d.ref_resolution,
            min_refs: d.min_refs,
            max_refs: d.max_refs,
            text_tokens: d.text_tokens,
            context_dim: fc.context_dim,
            pooled_dim: fc.pooled_dim,
        };
        let (samples, empty_caption) = generate(&spec, cfg.run.seed, device)?;
        let global = cfg.train.batch_size * world;
        let batches = GlobalBatches::new(
            samples.iter().map(|s| s.refs.len()).collect(),
            global,
            cfg.run.seed,
        )
        .map_err(|e| match e {
            TrainerError::Config { .. } if world > 1 => TrainerError::config(
                "train.batch_size",
                format!(
                    "{} per rank x {world} ranks = {global} samples per micro-batch is larger than every group of samples with equal reference counts; lower it or raise data.samples",
                    cfg.train.batch_size
                ),
            ),
            other => other,
        })?;
        Ok(Self {
            samples,
            batches,
            empty_caption,
        })
    }
}

impl Source for InMemory {
    fn describe(&self) -> String {
        format!("{} synthetic samples in memory", self.samples.len())
    }

    fn next_micro_batch(&mut self, rank: usize, batch: usize) -> Result<Vec<Sample>> {
        let global = self.batches.next_batch();
        Ok(global[rank * batch..(rank + 1) * batch]
            .iter()
            .map(|&i| self.samples[i].clone())
            .collect())
    }

    fn report(&self) -> Option<DataReport> {
        None
    }

    fn empty_caption(&self) -> Option<&EmptyCaption> {
        Some(&self.empty_caption)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SynthSpec {
        SynthSpec {
            samples: 6,
            resolution: 128,
            ref_resolution: 64,
            min_refs: 1,
            max_refs: 3,
            text_tokens: 4,
            context_dim: 8,
            pooled_dim: 4,
        }
    }

    #[test]
    fn samples_are_deterministic_and_shaped() {
        let (a, _) = generate(&spec(), 7, &Device::Cpu).unwrap();
        let (b, _) = generate(&spec(), 7, &Device::Cpu).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                x.x0.to_vec2::<f32>().unwrap(),
                y.x0.to_vec2::<f32>().unwrap()
            );
            assert_eq!(x.refs.len(), y.refs.len());
        }
        let s = &a[0];
        assert_eq!(s.x0.dims(), &[64, 64]);
        assert_eq!(s.refs[0].latent.dims(), &[16, 64]);
        assert!((1..=3).contains(&s.refs.len()));
    }

    #[test]
    fn correspondences_link_matching_subject_pixels() {
        let (samples, empty) = generate(&spec(), 3, &Device::Cpu).unwrap();
        assert_eq!(empty.txt.dims(), samples[0].txt.dims());
        assert_eq!(empty.pooled.dims(), samples[0].pooled.dims());
        let pooled: Vec<f32> = empty.pooled.to_vec1().unwrap();
        assert!(pooled.iter().all(|&v| v == 0.0), "no subject, no pooled");
        let mut total = 0;
        for s in &samples {
            for r in &s.refs {
                for p in &r.pairs {
                    assert!((p.ref_token as usize) < r.grid.len());
                    assert!((p.tgt_token as usize) < s.grid.len());
                }
                // One pair per reference token at most.
                let mut seen: Vec<u32> = r.pairs.iter().map(|p| p.ref_token).collect();
                seen.sort();
                seen.dedup();
                assert_eq!(seen.len(), r.pairs.len());
                total += r.pairs.len();
            }
        }
        assert!(total > 0, "the generator must produce correspondences");
    }
}
