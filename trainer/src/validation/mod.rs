//! Validation images during training (`[validation]`): every `every` steps, and after the
//! last one, each (case, seed) of the case list is rendered with the run's own model and LoRA
//! (or its EMA), as `trainer sample` renders it, and rank 0 writes the images and a grid to
//! `RUN/samples/step-NNNNNNNN/` and a line into `metrics.jsonl`.
//!
//! - The ranks share the work: in round `i` rank `r` renders image `i * world + r`, then the
//!   round's PNGs are all-gathered, so each collective waits for one image at most (well
//!   inside `distributed.timeout_s`) and no rank idles while another renders everything.
//!   Only rank 0 writes.
//! - Prompts and references are encoded once, at start (the encoders are dropped after); only
//!   the VAE decoder stays loaded.
//! - With `validation.heldout`, the ranks also measure correspondence accuracy, separation and
//!   identity on that held-out dataset ([`crate::measures`]) with the same LoRA, rank `r`
//!   the samples `r, r + world, ...`; rank 0 gathers the per-sample tallies, sums them in
//!   sample order (the same bits as one process, `trainer eval --heldout`) and writes
//!   `measures.json` next to the images and the `metrics.jsonl` line.
//! - Nothing here draws from a training stream: each image's noise is a function of its seed
//!   alone (`Purpose::Sample`, the measures' `Purpose::Probe`), and the model and LoRA are only
//!   read. A resumed run with validation on trains bit-identically to an uninterrupted one.

pub mod grid;
pub mod spec;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use image::RgbImage;
use serde::Serialize;

use crate::config::Config;
use crate::error::{Result, TrainerError};
use crate::measures::{HeldOut, MeasureSpec, Measures, SampleTally};
use crate::run::Run;
use crate::sample::{Conditioning, RenderOptions, Renderer};
pub use spec::ValidationSpec;

/// A case ready to render: its name (the case's index) and encoded prompt and references.
struct PreparedCase {
    stem: String,
    cond: Conditioning,
}

/// The validation of a run: its cases, encoded, and the decoder.
pub struct Validator {
    spec: ValidationSpec,
    size: usize,
    cases: Vec<PreparedCase>,
    decoder: flux::encoders::VaeDecoder,
    /// The held-out dataset for the measures (every rank loads it; None without one).
    heldout: Option<HeldOut>,
    measure_spec: MeasureSpec,
    seed: u64,
}

/// What one validation wrote (rank 0), as its `metrics.jsonl` line holds it.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationRecord {
    /// Completed steps when rendered (0: before the first).
    pub step: u64,
    pub validation: ValidationFiles,
    /// The held-out measures (`validation.heldout`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measures: Option<Measures>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ValidationFiles {
    /// Paths relative to the run folder.
    pub grid: String,
    pub images: Vec<String>,
    /// "ema" or "live".
    pub lora: &'static str,
    /// Wall seconds of the whole validation.
    pub s: f64,
}

impl Validator {
    /// The validation `cfg` asks for (None when off): the case list read, every reference
    /// loaded and prepared (an unreadable one is named), prompts and references encoded.
    pub fn prepare(cfg: &Config, run: &Run) -> Result<Option<Self>> {
        let spec = cfg.validation.clone();
        if !spec.enabled() {
            return Ok(None);
        }
        let list = Path::new(&spec.cases);
        let cases = crate::sample::read_cases(&spec.cases)?;
        if cases.is_empty() {
            return Err(TrainerError::config(
                "validation.cases",
                format!("{} holds no case", list.display()),
            ));
        }
        let device = &run.device;
        let fc = &run.model.cfg;
        let (mut encoders, decoder) = crate::data::shards::encoders_and_decoder(cfg, fc, device)?;
        // The negative prompt of classifier-free guidance: the empty caption.
        let negative = (spec.true_cfg != 1.0)
            .then(|| crate::sample::NegativePrompt::encode(&mut encoders, "", device))
            .transpose()?;
        let mut prepared = Vec::with_capacity(cases.len());
        for c in &cases {
            let refs = c.refs();
            if refs.len() > crate::config::MAX_REFS {
                return Err(TrainerError::config(
                    "validation.cases",
                    format!(
                        "{}: case {} has {} references, MOSAIC takes at most {}",
                        list.display(),
                        c.stem(),
                        refs.len(),
                        crate::config::MAX_REFS
                    ),
                ));
            }
            let ref_images = refs
                .iter()
                .map(|p| crate::sample::load_reference(p, cfg.data.ref_resolution))
                .collect::<Result<Vec<_>>>()?;
            let (txt, pooled) = encoders.encode_text(&[c.prompt.as_str()])?;
            prepared.push(PreparedCase {
                stem: c.stem(),
                cond: Conditioning {
                    txt: txt.to_device(device)?,
                    pooled: pooled.to_device(device)?,
                    negative: negative.clone(),
                    refs: crate::sample::reference_inputs(
                        &encoders,
                        &ref_images,
                        run.model.dtype(),
                        device,
                    )?,
                    ref_images,
                },
            });
        }
        let heldout = match spec.heldout.as_str() {
            "" => None,
            url => Some(HeldOut::load(cfg, fc, url, device)?),
        };
        Ok(Some(Self {
            heldout,
            measure_spec: MeasureSpec::of(cfg),
            seed: cfg.run.seed,
            size: if spec.size == 0 {
                cfg.data.resolution
            } else {
                spec.size
            },
            spec,
            cases: prepared,
            decoder,
        }))
    }

    /// Images per validation: cases x seeds.
    pub fn images(&self) -> usize {
        self.cases.len() * self.spec.seeds.len()
    }

    /// How every validation image of `seed` is rendered.
    fn options(&self, seed: u64) -> RenderOptions {
        RenderOptions {
            width: self.size,
            height: self.size,
            steps: self.spec.steps,
            guidance: self.spec.guidance,
            true_cfg: self.spec.true_cfg,
            seed,
            ref_cache: self.spec.ref_cache,
            start: None,
            init: None,
        }
    }

    /// Renders every (case, seed) after `done` steps, sharing the work between the ranks;
    /// rank 0 writes the files under `run_dir` and returns what it wrote.
    pub fn render(&self, run: &Run, done: u64, run_dir: &Path) -> Result<Option<ValidationRecord>> {
        let t0 = Instant::now();
        let _span = tracing::info_span!("validation", step = done).entered();
        let ema_lora = match (self.spec.ema, &run.ema) {
            (true, Some(e)) => Some(flux::lora::from_adapters(
                &run.model.cfg,
                &flux::lora_format::from_live(&run.lora, Some(&e.shadow)),
                Path::new("(the EMA of the LoRA)"),
                DType::F32,
                &run.device,
            )?),
            _ => None,
        };
        let renderer = Renderer {
            model: &run.model,
            lora: ema_lora.as_ref().unwrap_or(&run.lora).view(false),
            decoder: &self.decoder,
        };
        let (rank, world) = (run.dist.rank(), run.dist.world_size());
        let jobs: Vec<(usize, u64)> = (0..self.cases.len())
            .flat_map(|c| self.spec.seeds.iter().map(move |&s| (c, s)))
            .collect();
        let mut images: Vec<Option<RgbImage>> = vec![None; jobs.len()];
        for round in 0..jobs.len().div_ceil(world) {
            let mine = round * world + rank;
            let png = match jobs.get(mine) {
                Some(&(case, seed)) => {
                    let out = renderer.render(&self.cases[case].cond, &self.options(seed))?;
                    datasets::transform::png(&out.image)
                }
                None => Vec::new(),
            };
            let all = run.dist.call("validation images all-gather", move |c| {
                c.all_gather_bytes(&png)
            })?;
            if rank != 0 {
                continue;
            }
            for (r, bytes) in all.iter().enumerate() {
                let j = round * world + r;
                if j < jobs.len() {
                    let img = image::load_from_memory(bytes)
                        .map_err(|e| TrainerError::Input {
                            name: format!("validation image {j} from rank {r}"),
                            reason: e.to_string(),
                        })?
                        .to_rgb8();
                    images[j] = Some(img);
                }
            }
        }
        let measures = match &self.heldout {
            Some(h) => self.measure(run, renderer.lora, h)?,
            None => None,
        };
        if rank != 0 {
            return Ok(None);
        }
        let images: Vec<RgbImage> = images.into_iter().flatten().collect();
        let files = self.write(&jobs, &images, done, run_dir)?;
        if let Some(m) = &measures {
            write_measures(m, &run_dir.join(&files.grid))?;
        }
        Ok(Some(ValidationRecord {
            measures,
            step: done,
            validation: ValidationFiles {
                lora: if ema_lora.is_some() { "ema" } else { "live" },
                s: t0.elapsed().as_secs_f64(),
                ..files
            },
        }))
    }

    /// The held-out measures with `lora`, shared between the ranks: rank 0 returns them,
    /// the others None.
    fn measure(
        &self,
        run: &Run,
        lora: flux::LoraView,
        heldout: &HeldOut,
    ) -> Result<Option<Measures>> {
        let (rank, world) = (run.dist.rank(), run.dist.world_size());
        let n = heldout.samples.len();
        let mine: Vec<usize> = scenes_of(rank, world, n).collect();
        let tallies = crate::measures::tally_samples(
            &run.model,
            lora,
            heldout,
            &self.measure_spec,
            self.seed,
            &mine,
        )?;
        let bytes = SampleTally::encode(&tallies);
        let all = run.dist.call("held-out measures all-gather", move |c| {
            c.all_gather_bytes(&bytes)
        })?;
        if rank != 0 {
            return Ok(None);
        }
        let mut by_sample = vec![None; n];
        for (r, bytes) in all.iter().enumerate() {
            let part = SampleTally::decode(bytes).ok_or_else(|| TrainerError::Input {
                name: format!("held-out measures from rank {r}"),
                reason: format!("{} bytes are not whole tallies", bytes.len()),
            })?;
            for (i, t) in scenes_of(r, world, n).zip(part) {
                by_sample[i] = Some(t);
            }
        }
        let tallies = by_sample
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.ok_or_else(|| TrainerError::Input {
                    name: "held-out measures".into(),
                    reason: format!("no rank measured sample {i}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(crate::measures::summarize(
            heldout,
            &self.measure_spec,
            &tallies,
        )))
    }

    /// Writes each image and the grid under `run_dir/samples/step-NNNNNNNN/`.
    fn write(
        &self,
        jobs: &[(usize, u64)],
        images: &[RgbImage],
        done: u64,
        run_dir: &Path,
    ) -> Result<ValidationFiles> {
        let rel_dir = PathBuf::from("samples").join(format!("step-{done:08}"));
        let dir = run_dir.join(&rel_dir);
        std::fs::create_dir_all(&dir).map_err(|e| TrainerError::io(&dir, e))?;
        let save = |img: &RgbImage, name: &str| -> Result<String> {
            let path = dir.join(name);
            img.save_with_format(&path, image::ImageFormat::Png)
                .map_err(|e| TrainerError::read(&path, e))?;
            Ok(rel_dir.join(name).display().to_string())
        };
        let mut names = Vec::with_capacity(images.len());
        for (&(case, seed), img) in jobs.iter().zip(images) {
            names.push(save(
                img,
                &format!("{}-seed{seed}.png", self.cases[case].stem),
            )?);
        }
        let seeds = self.spec.seeds.len();
        let rows: Vec<grid::GridRow> = self
            .cases
            .iter()
            .enumerate()
            .map(|(c, case)| grid::GridRow {
                refs: &case.cond.ref_images,
                samples: images[c * seeds..(c + 1) * seeds].iter().collect(),
            })
            .collect();
        let grid_path = save(&grid::grid(&rows, self.size as u32), "grid.png")?;
        Ok(ValidationFiles {
            grid: grid_path,
            images: names,
            lora: "live",
            s: 0.0,
        })
    }
}

/// `m` as `measures.json` beside `grid`.
fn write_measures(m: &Measures, grid: &Path) -> Result<()> {
    let path = grid.with_file_name("measures.json");
    let text = serde_json::to_vec_pretty(m).map_err(|e| TrainerError::Input {
        name: path.display().to_string(),
        reason: e.to_string(),
    })?;
    std::fs::write(&path, text).map_err(|e| TrainerError::io(&path, e))
}

/// The held-out scenes (of `n`) rank `rank` of `world` measures: rank, rank + world, ...; rank 0
/// puts the gathered tallies back in scene order by the same rule.
fn scenes_of(rank: usize, world: usize, n: usize) -> impl Iterator<Item = usize> {
    (rank..n).step_by(world)
}
