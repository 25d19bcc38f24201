//! The `shards` source: SemAlign-MS shards (a folder or an object-store URL) read by the
//! datasets crate: this rank's part in a seeded order, decoded and transformed on worker
//! threads, then encoded here (VAE latents, caption embeddings) into model inputs, or read
//! from a latent cache. The position is a per-rank cursor; the checkpoint keeps every rank's.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use datasets::encode::{load_encoders, EncoderSpec, EncoderWeights, Encoders, PretrainedSource};
use datasets::plan::plan_epoch;
use datasets::{Cursor, DataReport, Loader, LoaderOptions, Location};
use flux::config::FluxConfig;
use flux::embed::pack_latents;

use super::{RefSample, Sample, Source};
use crate::config::Config;
use crate::error::{Result, TrainerError};
use crate::objective::EmptyCaption;

/// This rank's reader of the shards.
pub struct ShardFeed {
    url: String,
    loc: Location,
    manifest: Arc<datasets::Manifest>,
    opts: LoaderOptions,
    pub(super) cursor: Cursor,
    /// Started on first use, so a resume does not read batches it then throws away.
    loader: Option<Loader>,
    spec: EncoderSpec,
    /// None when reading a latent cache (nothing to encode).
    encoders: Option<Encoders>,
    device: Device,
    /// Reports of loaders replaced by a restore, merged into the run's.
    earlier: DataReport,
    /// With text dropout: the embeddings of "" (encoded here, or the cache's).
    empty_caption: Option<EmptyCaption>,
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
pub(crate) fn encoder_spec(cfg: &Config, fc: &FluxConfig) -> EncoderSpec {
    let d = &cfg.data;
    EncoderSpec {
        weights: if d.encoders.is_empty() {
            EncoderWeights::TinyRandom {
                seed: d.encoder_seed.unwrap_or(cfg.run.seed),
            }
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

/// The run's encoders and VAE decoder (as `encoder_spec` says) on `device`, computing in f32
/// on a CPU and bf16 elsewhere.
pub(crate) fn encoders_and_decoder(
    cfg: &Config,
    fc: &FluxConfig,
    device: &Device,
) -> Result<(Encoders, flux::encoders::VaeDecoder)> {
    let spec = encoder_spec(cfg, fc);
    Ok((
        datasets::encode::load_encoders(&spec, encoder_dtype(device), device)?,
        vae_decoder(cfg, fc, device)?,
    ))
}

/// f32 on a CPU, bf16 elsewhere.
fn encoder_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// The run's VAE decoder alone (no text encoders), as [`encoders_and_decoder`] loads it.
pub(crate) fn vae_decoder(
    cfg: &Config,
    fc: &FluxConfig,
    device: &Device,
) -> Result<flux::encoders::VaeDecoder> {
    let spec = encoder_spec(cfg, fc);
    Ok(datasets::encode::load_vae_decoder(
        &spec,
        encoder_dtype(device),
        device,
    )?)
}

/// The empty caption's embeddings stored in the latent cache at `cache`.
fn cached_empty_caption(
    cfg: &Config,
    spec: &EncoderSpec,
    cache: &Location,
    device: &Device,
) -> Result<EmptyCaption> {
    let tensor = |s: &datasets::cache::Stored| -> Result<Tensor> {
        Ok(Tensor::from_vec(
            s.values.clone(),
            s.shape.as_slice(),
            device,
        )?)
    };
    match datasets::cache::read_empty_caption(cache)? {
        Some((txt, pooled)) => Ok(EmptyCaption {
            txt: tensor(&txt)?,
            pooled: tensor(&pooled)?,
        }),
        None => Err(TrainerError::config(
            "data.cache",
            format!(
                "{} has no {} (it predates condition dropout), which data.drop_text and data.drop_both need; make it again with {}",
                cfg.data.cache,
                datasets::cache::EMPTY_CAPTION,
                precompute_command(&cfg.data, spec)
            ),
        )),
    }
}

impl ShardFeed {
    /// This rank's part of the shards (or of their latent cache).
    pub fn build(
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
                        "{}\n({} makes a matching one)",
                        e.message(),
                        precompute_command(d, &spec)
                    ),
                )
            })?;
            (cache_loc, m)
        };
        opts.decode_threads = if opts.cached { 1 } else { opts.decode_threads };
        let manifest = Arc::new(manifest);
        opts.check(&manifest, &d.url)
            .map_err(|e| TrainerError::config("data.aspect_buckets", e.message()))?;
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
        let mut encoders = if opts.cached {
            None
        } else {
            Some(load_encoders(&spec, dtype, device)?)
        };
        let empty_caption = if !cfg.data.dropout().drops_text() {
            None
        } else if let Some(enc) = encoders.as_mut() {
            let (txt, pooled) = enc.encode_text(&[""])?;
            Some(EmptyCaption {
                txt: txt.get(0)?,
                pooled: pooled.get(0)?,
            })
        } else {
            Some(cached_empty_caption(cfg, &spec, &loc, device)?)
        };
        Ok(Self {
            url: d.url.clone(),
            loc,
            manifest,
            opts,
            cursor: Cursor::default(),
            loader: None,
            spec,
            encoders,
            device: device.clone(),
            earlier: DataReport::default(),
            empty_caption,
        })
    }

    fn next_batch_of_rank(&mut self) -> Result<Vec<Sample>> {
        if self.loader.is_none() {
            self.loader = Some(Loader::start(
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
        let Some(enc) = self.encoders.as_mut() else {
            return Err(TrainerError::Input {
                name: "encoders".into(),
                reason: "not built (reading a latent cache)".into(),
            });
        };
        encode_samples(enc, decoded, &self.device)
    }
}

/// VAE latents and caption embeddings of decoded samples of equal reference count, on
/// `device`.
pub(crate) fn encode_samples(
    enc: &mut Encoders,
    decoded: &[datasets::Decoded],
    device: &Device,
) -> Result<Vec<Sample>> {
    let targets: Vec<&datasets::Pixels> = decoded.iter().map(|d| &d.target).collect();
    let x0 = packed(enc, &targets, device)?;
    let captions: Vec<&str> = decoded.iter().map(|d| d.caption.as_str()).collect();
    let (txt, pooled) = enc.encode_text(&captions)?;
    let k = decoded.first().map_or(0, |d| d.refs.len());
    let mut ref_latents = Vec::with_capacity(k);
    for r in 0..k {
        let imgs: Vec<&datasets::Pixels> = decoded.iter().map(|d| &d.refs[r].pixels).collect();
        ref_latents.push(packed(enc, &imgs, device)?);
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

impl ShardFeed {
    /// Counts and ids from before a resume, which this rank's report continues.
    pub fn continue_report(&mut self, before: DataReport) {
        let mut r = before;
        r.merge(std::mem::take(&mut self.earlier));
        self.earlier = r;
    }

    /// Restores this rank's position from the cursors of every rank of the checkpointed run
    /// (`old_world` of them). With the same world size each rank continues exactly; with
    /// another, each starts its epoch at the fraction rank 0 had reached (docs/data.md).
    pub fn restore(&mut self, cursors: &[Cursor], old_world: usize) {
        let f = self;
        let Some(&first) = cursors.first() else {
            return;
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
            f.earlier.merge(l.report());
        }
        f.cursor = cursor;
    }
}

impl Source for ShardFeed {
    fn describe(&self) -> String {
        format!(
            "{} rows in {} shard(s) at {}, {} {}",
            self.manifest.total_rows,
            self.manifest.shards.len(),
            self.url,
            if self.opts.cached {
                "latent cache"
            } else {
                "encoders"
            },
            self.spec.describe()
        )
    }

    fn next_micro_batch(&mut self, _rank: usize, _batch: usize) -> Result<Vec<Sample>> {
        self.next_batch_of_rank()
    }

    fn empty_caption(&self) -> Option<&EmptyCaption> {
        self.empty_caption.as_ref()
    }

    fn report(&self) -> Option<DataReport> {
        let mut r = self.earlier.clone();
        if let Some(l) = &self.loader {
            r.merge(l.report());
        }
        Some(r)
    }
}

/// Packed latents [B, tokens, 64] of images of one size.
fn packed(enc: &Encoders, images: &[&datasets::Pixels], device: &Device) -> Result<Tensor> {
    let z = enc.encode_images(images)?;
    Ok(pack_latents(&z.to_device(device)?)?)
}
