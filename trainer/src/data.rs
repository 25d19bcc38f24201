//! Where a rank's micro-batches come from.
//!
//! - `shards`: SemAlign-MS shards (a folder or an object-store URL) read by the datasets crate:
//!   this rank's part in a seeded order, decoded and transformed on worker threads, then encoded
//!   here (VAE latents, caption embeddings) into model inputs. The position is a per-rank
//!   cursor; the checkpoint keeps every rank's.
//! - `synthetic`: a small dataset generated in memory in latent space (no files, no encoders),
//!   batched globally so results do not depend on the number of ranks; the equivalence tests
//!   of data parallelism use it.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use datasets::encode::{load_encoders, EncoderSpec, EncoderWeights, Encoders, PretrainedSource};
use datasets::plan::plan_epoch;
use datasets::{Cursor as DataCursor, DataReport, Loader as ShardLoader, LoaderOptions, Location};

use crate::config::{Config, DataSource};
use crate::error::{Result, TrainerError};
use crate::loader::{Cursor, Loader};
use crate::synth::{self, RefSample, Sample, SynthSpec};
use flux::config::FluxConfig;
use flux::embed::pack_latents;

pub enum DataFeed {
    Synthetic {
        samples: Vec<Sample>,
        loader: Loader,
    },
    Shards(Box<ShardFeed>),
}

pub struct ShardFeed {
    url: String,
    loc: Location,
    manifest: Arc<datasets::Manifest>,
    opts: LoaderOptions,
    cursor: DataCursor,
    /// Started on first use, so a resume does not read batches it then throws away.
    loader: Option<ShardLoader>,
    spec: EncoderSpec,
    /// None when reading a latent cache (nothing to encode).
    encoders: Option<Encoders>,
    device: Device,
    /// Reports of loaders replaced by a restore, merged into the run's.
    earlier: DataReport,
}

/// The `datasets precompute` command that makes the cache a run with `d` and `spec` reads.
fn precompute_command(d: &crate::config::DataSection, spec: &EncoderSpec) -> String {
    let encoders = match &spec.weights {
        EncoderWeights::TinyRandom { seed } => format!("--seed {seed}"),
        EncoderWeights::Pretrained(src) => match &src.vae {
            Some(vae) => format!("--encoders {} --vae {vae}", src.folder),
            None => format!("--encoders {}", src.folder),
        },
    };
    format!(
        "datasets precompute --data {} --out {} --resolution {} --ref-resolution {} --text-tokens {} --context-dim {} --pooled-dim {}{} {encoders}",
        d.url,
        d.cache,
        d.resolution,
        d.ref_resolution,
        d.text_tokens,
        spec.context_dim,
        spec.pooled_dim,
        if d.aspect_buckets { " --aspect-buckets" } else { "" }
    )
}

/// How this rank reads the shards, from `[data]` and the batch size.
fn loader_options(cfg: &Config, rank: usize, world: usize) -> LoaderOptions {
    let d = &cfg.data;
    LoaderOptions {
        plan: datasets::PlanSpec {
            seed: cfg.run.seed,
            world,
            rank,
            batch_size: cfg.train.batch_size,
            shuffle_rows: d.shuffle_rows,
            buckets: d.aspect_buckets.then_some(d.resolution),
        },
        transform: datasets::TransformSpec {
            resolution: d.resolution,
            ref_resolution: d.ref_resolution,
            aspect_buckets: d.aspect_buckets,
        },
        io_threads: d.io_threads,
        decode_threads: d.decode_threads,
        prefetch_batches: d.prefetch_batches,
        strict: d.strict,
        cached: !d.cache.is_empty(),
    }
}

/// The encoders the run's data need: `data.encoders` (and `data.vae`), else tiny seeded ones.
fn encoder_spec(cfg: &Config, fc: &FluxConfig) -> EncoderSpec {
    let d = &cfg.data;
    EncoderSpec {
        weights: if d.encoders.is_empty() {
            EncoderWeights::TinyRandom { seed: cfg.run.seed }
        } else {
            EncoderWeights::Pretrained(PretrainedSource {
                folder: d.encoders.clone(),
                vae: (!d.vae.is_empty()).then(|| d.vae.clone()),
                cache: datasets::model_files::cache_root(),
            })
        },
        text_tokens: d.text_tokens,
        context_dim: fc.context_dim,
        pooled_dim: fc.pooled_dim,
    }
}

impl DataFeed {
    pub fn build(
        cfg: &Config,
        fc: &FluxConfig,
        rank: usize,
        world: usize,
        device: &Device,
    ) -> Result<Self> {
        match cfg.data.source {
            DataSource::Synthetic => Self::synthetic(cfg, fc, world, device),
            DataSource::Shards => Self::shards(cfg, fc, rank, world, device),
        }
    }

    /// The in-memory synthetic dataset, in world-size independent global batches.
    fn synthetic(cfg: &Config, fc: &FluxConfig, world: usize, device: &Device) -> Result<Self> {
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
        let samples = synth::generate(&spec, cfg.run.seed, device)?;
        let global = cfg.train.batch_size * world;
        let loader = Loader::new(
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
        Ok(Self::Synthetic { samples, loader })
    }

    /// This rank's part of the shards (or of their latent cache).
    fn shards(
        cfg: &Config,
        fc: &FluxConfig,
        rank: usize,
        world: usize,
        device: &Device,
    ) -> Result<Self> {
        let d = &cfg.data;
        if d.url.is_empty() {
            return Err(TrainerError::config(
                "data.url",
                "is empty; set the folder or s3:// gs:// az:// URL of the shards (`datasets synth --out URL` makes some)",
            ));
        }
        let data_loc = Location::parse(&d.url)?;
        let mut opts = loader_options(cfg, rank, world);
        let spec = encoder_spec(cfg, fc);
        // With a cache, rows are read from it (its layout mirrors the dataset's, so the
        // plan is the same) and no image is decoded or encoded.
        let (loc, manifest) = if d.cache.is_empty() {
            let m = datasets::Manifest::load(&data_loc)?;
            (data_loc, m)
        } else {
            let cache_loc = Location::parse(&d.cache)?;
            let fp = datasets::cache::fingerprint(&spec, &opts.transform)?;
            let m = datasets::cache::open(&cache_loc, &data_loc, &fp).map_err(|e| {
                TrainerError::config(
                    "data.cache",
                    format!(
                        "{e}\n({} makes a matching one)",
                        precompute_command(d, &spec)
                    ),
                )
            })?;
            (cache_loc, m)
        };
        opts.decode_threads = if opts.cached { 1 } else { opts.decode_threads };
        let manifest = Arc::new(manifest);
        opts.check(&manifest, &d.url)
            .map_err(|e| TrainerError::config("data.aspect_buckets", e.to_string()))?;
        if plan_epoch(&manifest, &opts.plan, 0).batches.is_empty() {
            return Err(TrainerError::config(
                "train.batch_size",
                format!(
                    "rank {rank} of {world} gets no batch of {} samples with equal reference counts from the {} rows of {}; lower it or add data",
                    cfg.train.batch_size, manifest.total_rows, d.url
                ),
            ));
        }
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        let encoders = if opts.cached {
            None
        } else {
            Some(load_encoders(&spec, dtype, device)?)
        };
        Ok(Self::Shards(Box::new(ShardFeed {
            url: d.url.clone(),
            loc,
            manifest,
            opts,
            cursor: DataCursor::default(),
            loader: None,
            spec,
            encoders,
            device: device.clone(),
            earlier: DataReport::default(),
        })))
    }

    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Synthetic { samples, .. } => {
                format!("{} synthetic samples in memory", samples.len())
            }
            Self::Shards(f) => format!(
                "{} rows in {} shard(s) at {}, {} {}",
                f.manifest.total_rows,
                f.manifest.shards.len(),
                f.url,
                if f.opts.cached {
                    "latent cache"
                } else {
                    "encoders"
                },
                f.spec.describe()
            ),
        }
    }

    /// The in-memory samples of the synthetic source (tests change them).
    pub fn in_memory(&self) -> Option<&[Sample]> {
        match self {
            Self::Synthetic { samples, .. } => Some(samples),
            Self::Shards(_) => None,
        }
    }

    pub fn in_memory_mut(&mut self) -> Option<&mut Vec<Sample>> {
        match self {
            Self::Synthetic { samples, .. } => Some(samples),
            Self::Shards(_) => None,
        }
    }

    /// This rank's next micro-batch of `batch` samples.
    pub fn next_micro_batch(&mut self, rank: usize, batch: usize) -> Result<Vec<Sample>> {
        match self {
            Self::Synthetic { samples, loader } => {
                let global = loader.next_batch();
                Ok(global[rank * batch..(rank + 1) * batch]
                    .iter()
                    .map(|&i| samples[i].clone())
                    .collect())
            }
            Self::Shards(f) => f.next_micro_batch(),
        }
    }

    /// The synthetic source's global cursor (the default for shards).
    pub fn global_cursor(&self) -> Cursor {
        match self {
            Self::Synthetic { loader, .. } => loader.cursor(),
            Self::Shards(_) => Cursor::default(),
        }
    }

    /// This rank's shard cursor (None for the synthetic source).
    pub fn shard_cursor(&self) -> Option<DataCursor> {
        match self {
            Self::Synthetic { .. } => None,
            Self::Shards(f) => Some(f.cursor),
        }
    }

    /// Restores the synthetic source's global cursor.
    pub fn restore_global(&mut self, cursor: Cursor) {
        if let Self::Synthetic { loader, .. } = self {
            loader.restore(cursor);
        }
    }

    /// Restores this rank's shard position from the cursors of every rank of the checkpointed
    /// run (`old_world` of them). With the same world size each rank continues exactly; with
    /// another, each starts its epoch at the fraction rank 0 had reached (documented in
    /// docs/data.md).
    pub fn restore_shards(&mut self, cursors: &[DataCursor], old_world: usize) -> Result<()> {
        let Self::Shards(f) = self else {
            return Ok(());
        };
        let Some(&first) = cursors.first() else {
            return Ok(());
        };
        let (rank, world) = (f.opts.plan.rank, f.opts.plan.world);
        let cursor = if cursors.len() == world && old_world == world {
            cursors[rank]
        } else {
            let mut old = f.opts.plan;
            old.world = old_world.max(1);
            old.rank = 0;
            let old_batches = plan_epoch(&f.manifest, &old, first.epoch).batches.len();
            let new_batches = plan_epoch(&f.manifest, &f.opts.plan, first.epoch)
                .batches
                .len();
            let c = first.rescale(old_batches, new_batches);
            tracing::warn!(
                was = old_world,
                now = world,
                epoch = c.epoch,
                "resuming with another world size: each rank starts at the fraction of the epoch rank 0 had reached; within this epoch samples may repeat or be missed"
            );
            c
        };
        if let Some(l) = f.loader.take() {
            merge(&mut f.earlier, l.report());
        }
        f.cursor = cursor;
        Ok(())
    }

    /// This rank's data report so far (None for the synthetic source).
    pub fn report(&self) -> Option<DataReport> {
        match self {
            Self::Synthetic { .. } => None,
            Self::Shards(f) => {
                let mut r = f.earlier.clone();
                if let Some(l) = &f.loader {
                    merge(&mut r, l.report());
                }
                Some(r)
            }
        }
    }

    /// Writes this rank's data report into `dir` (shards only) and logs its summary.
    pub fn write_report_into(&self, dir: &std::path::Path, rank: usize) -> Result<()> {
        let Some(report) = self.report() else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        if let Some(path) = self.write_report(dir, rank)? {
            tracing::info!(report = %path.display(), "data: {}", report.summary());
        }
        Ok(())
    }

    /// Writes this rank's data report as JSON into `dir` (shards only).
    pub fn write_report(&self, dir: &std::path::Path, rank: usize) -> Result<Option<PathBuf>> {
        let Some(r) = self.report() else {
            return Ok(None);
        };
        let path = dir.join(format!("data_report.rank{rank}.json"));
        let text = serde_json::to_string_pretty(&r).map_err(|e| TrainerError::Serialize {
            what: "the data report",
            source: Box::new(e),
        })?;
        std::fs::write(&path, text).map_err(|e| TrainerError::io(&path, e))?;
        Ok(Some(path))
    }
}

fn merge(into: &mut DataReport, r: DataReport) {
    for (k, n) in r.skipped_by_kind {
        *into.skipped_by_kind.entry(k).or_default() += n;
    }
    into.skipped_total += r.skipped_total;
    into.batches_dropped += r.batches_dropped;
    into.samples_read += r.samples_read;
    into.tail_rows_dropped.extend(r.tail_rows_dropped);
    into.skipped.extend(r.skipped);
}

impl ShardFeed {
    fn next_micro_batch(&mut self) -> Result<Vec<Sample>> {
        if self.loader.is_none() {
            self.loader = Some(ShardLoader::start(
                self.loc.clone(),
                self.manifest.clone(),
                self.opts.clone(),
                self.cursor,
            )?);
        }
        let Some(loader) = self.loader.as_mut() else {
            return Err(TrainerError::Input {
                name: "data".into(),
                reason: "loader not started".into(),
            });
        };
        let b = loader.next_batch()?;
        self.cursor = b.cursor;
        if self.opts.cached {
            self.cached_samples(&b.cached)
        } else {
            self.encode(&b.samples)
        }
    }

    /// Model inputs from cached latents and embeddings.
    fn cached_samples(&self, cached: &[datasets::cache::CachedSample]) -> Result<Vec<Sample>> {
        let tensor = |s: &datasets::cache::Stored| -> Result<Tensor> {
            Ok(Tensor::from_vec(
                s.values.clone(),
                s.shape.as_slice(),
                &self.device,
            )?)
        };
        let packed = |s: &datasets::cache::Stored| -> Result<Tensor> {
            Ok(pack_latents(&tensor(s)?.unsqueeze(0)?)?.squeeze(0)?)
        };
        let grid = |(rows, cols): (u32, u32)| datasets::TokenGrid {
            rows: rows as usize,
            cols: cols as usize,
        };
        cached
            .iter()
            .map(|c| {
                Ok(Sample {
                    x0: packed(&c.target)?,
                    grid: grid(c.grid),
                    txt: tensor(&c.txt)?,
                    pooled: tensor(&c.pooled)?,
                    refs: c
                        .refs
                        .iter()
                        .zip(&c.pairs)
                        .map(|(r, pairs)| {
                            Ok(RefSample {
                                latent: packed(r)?,
                                grid: grid(c.ref_grid),
                                pairs: pairs
                                    .iter()
                                    .map(|&(ref_token, tgt_token)| datasets::TokenPair {
                                        ref_token,
                                        tgt_token,
                                    })
                                    .collect(),
                            })
                        })
                        .collect::<Result<_>>()?,
                })
            })
            .collect()
    }

    /// VAE latents and caption embeddings of decoded samples of equal reference count.
    fn encode(&mut self, decoded: &[datasets::Decoded]) -> Result<Vec<Sample>> {
        let device = self.device.clone();
        let Some(enc) = self.encoders.as_mut() else {
            return Err(TrainerError::Input {
                name: "encoders".into(),
                reason: "not built (reading a latent cache)".into(),
            });
        };
        let targets: Vec<&datasets::Pixels> = decoded.iter().map(|d| &d.target).collect();
        let x0 = packed(enc, &targets, &device)?;
        let captions: Vec<&str> = decoded.iter().map(|d| d.caption.as_str()).collect();
        let (txt, pooled) = enc.encode_text(&captions)?;
        let k = decoded.first().map_or(0, |d| d.refs.len());
        let mut ref_latents = Vec::with_capacity(k);
        for r in 0..k {
            let imgs: Vec<&datasets::Pixels> = decoded.iter().map(|d| &d.refs[r].pixels).collect();
            ref_latents.push(packed(enc, &imgs, &device)?);
        }
        decoded
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Ok(Sample {
                    x0: x0.get(i)?,
                    grid: d.grid,
                    txt: txt.get(i)?,
                    pooled: pooled.get(i)?,
                    refs: d
                        .refs
                        .iter()
                        .zip(&ref_latents)
                        .map(|(r, lat)| {
                            Ok(RefSample {
                                latent: lat.get(i)?,
                                grid: r.grid,
                                pairs: r.pairs.clone(),
                            })
                        })
                        .collect::<Result<_>>()?,
                })
            })
            .collect()
    }
}

/// Packed latents [B, tokens, 64] of images of one size.
fn packed(enc: &Encoders, images: &[&datasets::Pixels], device: &Device) -> Result<Tensor> {
    let z = enc.encode_images(images)?;
    Ok(pack_latents(&z.to_device(device)?)?)
}
