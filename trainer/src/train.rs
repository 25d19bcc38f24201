//! The training loop, readable top to bottom: connect the ranks and build the run, then per step
//! gather this rank's share of the global batch, compute loss and LoRA gradients (all-reduced
//! bucket by bucket during the backward pass), agree on finiteness and on stopping, clip, AdamW,
//! EMA, log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::checkpoint::{self, Snapshot};
use crate::config::{Config, DeviceName, OnNonFinite};
use crate::data::DataFeed;
use crate::ddp::{self, BucketPlan, Dist, DistError, GradReducer, ReduceOp};
use crate::error::{Result, TrainerError};
use crate::metrics::{MetricsLog, StepMetrics};
use crate::model::grad::{readiness_order, GradSink, NoSink};
use crate::model::lora::LoraSpec;
use crate::model::{Flux, Lora, RowBlocks, Weights};
use crate::objective::{self, DrawAt, LossParts, ObjectiveSpec};
use crate::optim::{clip_global_norm, global_norm, lr_at, AdamW, Ema, OptimSpec};
use crate::synth::Sample;

/// Everything a run holds between steps.
pub struct Run {
    pub cfg: Config,
    pub device: Device,
    pub model: Flux,
    pub lora: Lora,
    pub data: DataFeed,
    /// Every rank's shard position after the last step (agreed with the step's all-reduce).
    pub data_cursors: Vec<datasets::Cursor>,
    pub opt: AdamW,
    pub ema: Option<Ema>,
    pub objective: ObjectiveSpec,
    pub optim: OptimSpec,
    /// The other ranks (a single rank needs none).
    pub dist: Dist,
    /// Gradient buckets for the all-reduce.
    pub plan: BucketPlan,
    /// Set by signal handlers on this rank.
    pub stop_requested: Arc<AtomicBool>,
    /// Set once the ranks agreed, at the end of a step, that some rank was asked to stop.
    pub stop_agreed: bool,
    /// The first step to run (after a resume, the checkpoint's step).
    pub start_step: u64,
    /// Updates skipped for non-finite losses, over the whole run.
    pub skipped: u64,
}

/// What a finished run reports.
pub struct TrainOutcome {
    pub losses: Vec<LossParts>,
    pub skipped: u64,
    pub lora_path: PathBuf,
    pub run_dir: PathBuf,
    /// The run stopped before `train.max_steps` because a rank was signalled.
    pub stopped_by_signal: bool,
    /// This process's rank (only rank 0 writes files).
    pub rank: usize,
    /// The step the run started from (a resumed run: its checkpoint's step).
    pub start_step: u64,
}

/// The device of this rank: CUDA device `ordinal` (LOCAL_RANK) or the CPU.
pub fn device_of(cfg: &Config, ordinal: usize) -> Result<Device> {
    Ok(match cfg.model.device {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda => Device::new_cuda(ordinal).map_err(|e| {
            TrainerError::config(
                "model.device",
                format!("cannot open CUDA device {ordinal}: {e} (build with --features cuda)"),
            )
        })?,
    })
}

/// sha256 of the LoRA weights' bytes, in variable order.
pub fn lora_digest(lora: &Lora) -> Result<Vec<u8>> {
    let mut h = Sha256::new();
    for (name, v) in lora.named_vars() {
        h.update(name.as_bytes());
        let flat = v.as_tensor().flatten_all()?;
        match flat.dtype() {
            DType::F64 => flat
                .to_vec1::<f64>()?
                .iter()
                .for_each(|x| h.update(x.to_le_bytes())),
            _ => flat
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .for_each(|x| h.update(x.to_le_bytes())),
        }
    }
    Ok(h.finalize().to_vec())
}

/// Fails naming every rank whose `value` differs from rank 0's.
/// `value` is only computed when there are other ranks to compare with (a LoRA digest of a
/// FLUX-sized adapter is seconds of hashing).
fn check_same(
    dist: &Dist,
    what: &str,
    value: impl FnOnce() -> Result<Vec<u8>>,
    show: fn(&[u8]) -> String,
) -> Result<()> {
    if dist.world_size() == 1 {
        return Ok(());
    }
    let value = value()?;
    let all = dist.call(move |c| c.all_gather_bytes(&value))?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, v)| *v != &all[0])
        .map(|(r, v)| format!("rank {r} has {}", show(v)))
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(DistError::Mismatch(format!(
        "{what}: rank 0 has {}, {}",
        show(&all[0]),
        differ.join(", ")
    ))
    .into())
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(6).map(|x| format!("{x:02x}")).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).chars().take(12).collect()
}

/// Rank 0's values of `tensors` (all of one dtype) on every rank, in one broadcast.
fn broadcast_from_rank0(dist: &Dist, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    if dist.world_size() == 1 || tensors.is_empty() {
        return Ok(tensors.to_vec());
    }
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let flat = Tensor::cat(&flat, 0)?;
    let got = dist.call(move |c| c.broadcast(&flat, 0))?;
    let mut offset = 0;
    tensors
        .iter()
        .map(|t| {
            let n = t.elem_count();
            let out = got.narrow(0, offset, n)?.reshape(t.shape())?;
            offset += n;
            Ok(out)
        })
        .collect()
}

/// Sets every LoRA variable to rank 0's value, then verifies by hash.
fn sync_lora(dist: &Dist, lora: &Lora, what: &str) -> Result<()> {
    if dist.world_size() == 1 {
        return Ok(());
    }
    let vars = lora_vars(lora);
    let now: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    for (v, t) in vars.iter().zip(broadcast_from_rank0(dist, &now)?) {
        v.set(&t)?;
    }
    check_same(dist, what, || lora_digest(lora), hex_prefix)
}

/// Where a resumed run comes from.
struct ResumeHeader {
    state: checkpoint::State,
    dir: String,
}

/// The frozen base: loaded from `model.weights`, or seeded random weights of `model.preset`.
pub fn base_weights(cfg: &Config, device: &Device) -> Result<(crate::model::FluxConfig, Weights)> {
    let dtype = cfg.model.dtype.dtype();
    if cfg.model.weights.is_empty() {
        let fc = cfg.model.preset.config();
        Ok((
            fc.clone(),
            Weights::random(&fc, cfg.run.seed, dtype, device)?,
        ))
    } else {
        crate::model::weights::load(
            Path::new(&cfg.model.weights),
            dtype,
            device,
            cfg.model.axes_dims,
        )
    }
}

impl Run {
    /// A single-rank run on the configured device.
    pub fn build(cfg: Config) -> Result<Self> {
        let device = device_of(&cfg, 0)?;
        Self::build_with(cfg, Dist::single(), device)
    }

    /// A run as one rank of `dist`: the configs must match (fingerprint), the LoRA starts from
    /// rank 0's, and each micro-batch of `train.batch_size` samples per rank is this rank's
    /// slice of a global micro-batch of `batch_size * world` samples.
    pub fn build_with(cfg: Config, dist: Dist, device: Device) -> Result<Self> {
        check_same(
            &dist,
            "config fingerprint (start every rank with the same config and --set overrides)",
            || Ok(cfg.fingerprint().into_bytes()),
            text,
        )?;
        let (fc, weights) = base_weights(&cfg, &device)?;
        let rows = RowBlocks {
            double: cfg.loss.double_blocks.clone(),
            single: cfg.loss.single_blocks.clone(),
            plain: cfg.loss.rows == crate::config::RowsImpl::Plain,
        };
        let model = Flux::new(fc.clone(), &weights, rows)?;
        let spec = LoraSpec {
            rank: cfg.lora.rank,
            alpha: cfg.lora.alpha,
            init: cfg.lora.init,
            targets: cfg.lora.targets.clone(),
        };
        let lora_dtype = if cfg.model.dtype.dtype() == candle_core::DType::F64 {
            candle_core::DType::F64
        } else {
            candle_core::DType::F32
        };
        let lora = Lora::new(&fc, &spec, cfg.run.seed, lora_dtype, &device)?;
        if !cfg.lora.init_from.is_empty() {
            let path = Path::new(&cfg.lora.init_from);
            crate::lora_format::apply_to(&lora, &crate::lora_format::load(path)?, path)?;
        }
        // The initialization is seeded and so already identical; the broadcast makes that a
        // guarantee rather than an assumption.
        sync_lora(&dist, &lora, "initial LoRA weights after broadcast")?;
        let data = DataFeed::build(&cfg, &fc, dist.rank(), dist.world_size(), &device)?;
        let vars = lora_vars(&lora);
        let opt = AdamW::new(&vars)?;
        let ema = if cfg.optim.ema_decay > 0.0 {
            Some(Ema::new(cfg.optim.ema_decay, &vars)?)
        } else {
            None
        };
        let o = &cfg.optim;
        let optim = OptimSpec {
            lr: o.lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            grad_clip: (o.grad_clip > 0.0).then_some(o.grad_clip),
            warmup_steps: o.warmup_steps,
            schedule: o.schedule,
            min_lr_ratio: o.min_lr_ratio,
        };
        let bytes: Vec<usize> = vars
            .iter()
            .map(|v| v.as_tensor().elem_count() * v.as_tensor().dtype().size_in_bytes())
            .collect();
        let plan = BucketPlan::new(
            &bytes,
            &readiness_order(&model, &lora),
            (cfg.distributed.bucket_mb * (1 << 20) as f64) as usize,
        );
        Ok(Self {
            objective: ObjectiveSpec::from_config(&cfg),
            optim,
            dist,
            plan,
            stop_requested: Arc::new(AtomicBool::new(false)),
            stop_agreed: false,
            start_step: 0,
            skipped: 0,
            cfg,
            device,
            model,
            lora,
            data,
            data_cursors: Vec::new(),
            opt,
            ema,
        })
    }

    /// One optimizer step (over `train.grad_accum` micro-batches on every rank).
    pub fn train_step(&mut self, step: u64) -> Result<(StepMetrics, LossParts)> {
        let started = Instant::now();
        let lr = lr_at(&self.optim, step, self.cfg.train.max_steps);
        let accum = self.cfg.train.grad_accum;
        let batch = self.cfg.train.batch_size;
        let (rank, world) = (self.dist.rank(), self.dist.world_size());
        let with_rows =
            self.objective.scal_weight > 0.0 || self.objective.mdl_weight_at(step) > 0.0;
        let mut sum: Option<Vec<Tensor>> = None;
        let mut grads: Vec<Tensor> = Vec::new();
        let mut parts = LossParts::default();
        let mut tokens = 0usize;
        for micro in 0..accum {
            let owned = self.data.next_micro_batch(rank, batch)?;
            let samples: Vec<&Sample> = owned.iter().collect();
            let _span = tracing::debug_span!("forward_backward", step, micro).entered();
            // Draws are keyed by the sample's slot in the step's global batch, so they do not
            // depend on how the batch is split over ranks.
            let at = DrawAt {
                seed: self.cfg.run.seed,
                step,
                first_slot: ((micro * world + rank) * batch) as u64,
            };
            let prep = objective::prepare(
                &self.objective,
                &samples,
                at,
                with_rows,
                self.model.dtype(),
                &self.device,
            )?;
            // Non-final micro-steps accumulate locally with no communication; on the final one
            // each bucket is averaged over micro-steps and ranks as soon as the backward pass
            // has finished it.
            let mut reducer = (micro + 1 == accum)
                .then(|| GradReducer::new(&self.plan, &self.dist, sum.take(), 1.0 / accum as f64));
            let mut local = NoSink;
            let (p, g) = objective::loss_and_lora_grads_into(
                &self.model,
                &self.lora,
                &prep,
                &self.objective,
                step,
                self.cfg.train.checkpointing,
                match reducer.as_mut() {
                    Some(r) => r as &mut dyn GradSink,
                    None => &mut local,
                },
            )?;
            match reducer {
                Some(r) => grads = r.finish(&g)?,
                None => {
                    sum = Some(match sum.take() {
                        None => g,
                        Some(acc) => acc
                            .iter()
                            .zip(&g)
                            .map(|(a, b)| a + b)
                            .collect::<candle_core::Result<_>>()?,
                    })
                }
            }
            tokens += prep.tokens * samples.len() * world;
            for (a, b) in [
                (&mut parts.total, p.total),
                (&mut parts.diff, p.diff),
                (&mut parts.scal, p.scal),
                (&mut parts.mdl, p.mdl),
            ] {
                *a += b / accum as f64;
            }
        }
        // One small all-reduce per step: the mean losses, whether any rank saw a non-finite
        // loss, and whether any rank was asked to stop. Every rank then decides the same.
        // With shards each rank also puts its data cursor in its own slots, so every rank
        // learns all of them (a checkpoint keeps them) at no extra round trip.
        let local_stop = self.stop_requested.load(Ordering::SeqCst);
        let mut values = vec![
            parts.total,
            parts.diff,
            parts.scal,
            parts.mdl,
            f64::from(u8::from(!parts.total.is_finite())),
            f64::from(u8::from(local_stop)),
        ];
        let shard_cursor = self.data.shard_cursor();
        if let Some(c) = shard_cursor {
            let mut slots = vec![0f64; 2 * world];
            slots[2 * rank] = c.epoch as f64;
            slots[2 * rank + 1] = c.batch as f64;
            values.extend(slots);
        }
        let flags = Tensor::new(values.as_slice(), &self.device)?;
        let agreed = self
            .dist
            .call(move |c| c.all_reduce(&flags, ReduceOp::Sum))?
            .to_vec1::<f64>()?;
        let w = world as f64;
        parts = LossParts {
            total: agreed[0] / w,
            diff: agreed[1] / w,
            scal: agreed[2] / w,
            mdl: agreed[3] / w,
        };
        let any_nonfinite_loss = agreed[4] > 0.0;
        self.stop_agreed = agreed[5] > 0.0;
        if shard_cursor.is_some() {
            self.data_cursors = agreed[6..]
                .chunks(2)
                .map(|c| datasets::Cursor {
                    epoch: c[0] as u64,
                    batch: c[1] as usize,
                })
                .collect();
        }
        let norm = match self.optim.grad_clip {
            Some(max) if !any_nonfinite_loss => clip_global_norm(&mut grads, max)?,
            _ => global_norm(&grads)?,
        };
        let skipped = any_nonfinite_loss || !norm.is_finite();
        if skipped {
            let what = format!("loss {}, grad norm {norm}", parts.total);
            match self.cfg.train.on_nonfinite {
                OnNonFinite::Stop => return Err(TrainerError::NonFinite { step, what }),
                OnNonFinite::Skip => {
                    tracing::warn!(step, %what, "non-finite loss or gradient: update skipped, weights unchanged")
                }
            }
        } else {
            let _span = tracing::debug_span!("optimizer", step).entered();
            let vars = lora_vars(&self.lora);
            self.opt.step(&self.optim, &vars, &grads, lr)?;
            if let Some(ema) = &mut self.ema {
                ema.update(&vars)?;
            }
        }
        let every = self.cfg.distributed.check_weights_every;
        if every > 0 && (step + 1).is_multiple_of(every) {
            check_same(
                &self.dist,
                &format!("LoRA weights after step {}", step + 1),
                || lora_digest(&self.lora),
                hex_prefix,
            )?;
        }
        let secs = started.elapsed().as_secs_f64();
        let m = StepMetrics {
            step: step + 1,
            loss: parts.total,
            loss_diff: parts.diff,
            loss_scal: parts.scal,
            loss_mdl: parts.mdl,
            grad_norm: norm,
            lr,
            s_per_step: secs,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            skipped,
        };
        Ok((m, parts))
    }

    /// Everything a checkpoint after `steps` completed steps holds, copied off the live state.
    pub fn snapshot(&self, steps: u64) -> Result<Snapshot> {
        let named = self.lora.named_vars();
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let lora = checkpoint::detached(named.iter().map(|(n, v)| (n.clone(), v.as_tensor())))?;
        let mut moments = checkpoint::detached(
            names
                .iter()
                .zip(&self.opt.m)
                .map(|(n, t)| (format!("{n}.exp_avg"), t)),
        )?;
        moments.extend(checkpoint::detached(
            names
                .iter()
                .zip(&self.opt.v)
                .map(|(n, t)| (format!("{n}.exp_avg_sq"), t)),
        )?);
        let mut files = vec![
            (checkpoint::LORA_FILE, lora),
            (checkpoint::OPTIMIZER_FILE, moments),
        ];
        if let Some(ema) = &self.ema {
            files.push((
                checkpoint::EMA_FILE,
                checkpoint::detached(names.iter().cloned().zip(&ema.shadow))?,
            ));
        }
        Ok(Snapshot {
            state: checkpoint::State {
                format: checkpoint::FORMAT,
                step: steps,
                cursor: self.data.global_cursor(),
                data_cursors: self.data_cursors.clone(),
                world_size: self.dist.world_size(),
                global_batch: self.cfg.train.batch_size * self.dist.world_size(),
                fingerprint: self.cfg.fingerprint(),
                seed: self.cfg.run.seed,
                rng: checkpoint::RNG_SCHEME.into(),
                adam_t: self.opt.t,
                skipped: self.skipped,
                files: Default::default(),
            },
            config_toml: toml::to_string(&self.cfg).unwrap_or_default(),
            files,
        })
    }

    /// Continues from a checkpoint, as configured (`checkpoint.resume`, `resume_from`): rank 0
    /// finds and verifies it, every rank gets rank 0's state. Returns the folder resumed from.
    pub fn resume(&mut self) -> Result<Option<String>> {
        let c = &self.cfg.checkpoint;
        let loaded = if self.dist.rank() != 0 || (!c.resume && c.resume_from.is_empty()) {
            None
        } else if !c.resume_from.is_empty() {
            Some(checkpoint::load_folder(&c.resume_from)?)
        } else {
            checkpoint::latest_valid(&self.cfg.checkpoint_location()?)?
        };
        if let Some(l) = &loaded {
            let current = toml::to_string(&self.cfg).unwrap_or_default();
            let diff = checkpoint::config_differences(&l.config_toml, &current);
            if !diff.is_empty() {
                return Err(TrainerError::Checkpoint {
                    path: l.dir.clone(),
                    reason: format!(
                        "was written with another config; these fields differ:\n  {}\n(use the same config, start a new run with another run.dir, or checkpoint.resume = false)",
                        diff.join("\n  ")
                    ),
                });
            }
        }
        // Every rank learns whether and from what rank 0 resumes (this also stops a rank that
        // could not load from racing ahead alone).
        let header = loaded
            .as_ref()
            .map(|l| {
                serde_json::to_vec(&(l.dir.display().to_string(), &l.state)).unwrap_or_default()
            })
            .unwrap_or_default();
        let all = self.dist.call(move |c| c.all_gather_bytes(&header))?;
        if all[0].is_empty() {
            return Ok(None);
        }
        let (dir, state): (String, checkpoint::State) = serde_json::from_slice(&all[0])
            .map_err(|e| DistError::Mismatch(format!("resume header from rank 0: {e}")))?;
        let header = ResumeHeader { state, dir };
        self.apply(&header, loaded.as_ref())?;
        Ok(Some(header.dir))
    }

    /// Sets LoRA, optimizer, EMA, step and data position from rank 0's checkpoint.
    fn apply(&mut self, h: &ResumeHeader, loaded: Option<&checkpoint::Loaded>) -> Result<()> {
        let named = self.lora.named_vars();
        let vars: Vec<&Var> = named.iter().map(|(_, v)| *v).collect();
        let pick = |file: &str, suffix: &str, live: &[Tensor]| -> Result<Vec<Tensor>> {
            let local = match loaded {
                Some(l) => named
                    .iter()
                    .zip(live)
                    .map(|((n, _), like)| l.tensor(file, &format!("{n}{suffix}"), like))
                    .collect::<Result<Vec<_>>>()?,
                None => live.to_vec(),
            };
            broadcast_from_rank0(&self.dist, &local)
        };
        let live: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        for (v, t) in vars.iter().zip(pick(checkpoint::LORA_FILE, "", &live)?) {
            v.set(&t)?;
        }
        let m = pick(checkpoint::OPTIMIZER_FILE, ".exp_avg", &self.opt.m)?;
        let v = pick(checkpoint::OPTIMIZER_FILE, ".exp_avg_sq", &self.opt.v)?;
        let ema = match &self.ema {
            Some(e) => Some(pick(checkpoint::EMA_FILE, "", &e.shadow)?),
            None => None,
        };
        self.opt.m = m;
        self.opt.v = v;
        self.opt.t = h.state.adam_t;
        if let (Some(e), Some(shadow)) = (&mut self.ema, ema) {
            e.shadow = shadow;
        }
        let world = self.dist.world_size();
        let global = self.cfg.train.batch_size * world;
        let mut cursor = h.state.cursor;
        if h.state.global_batch != global {
            // Another world size (or batch size): keep the epoch and about the number of its
            // samples already consumed; not bit-identical to any uninterrupted run.
            let consumed = cursor.batch * h.state.global_batch;
            cursor.batch = consumed.div_ceil(global);
            tracing::warn!(
                was = h.state.world_size,
                now = world,
                epoch = cursor.epoch,
                "resuming with another global batch ({} -> {global} samples): the data order continues approximately",
                h.state.global_batch
            );
        }
        self.data.restore_global(cursor);
        self.data
            .restore_shards(&h.state.data_cursors, h.state.world_size)?;
        self.data_cursors = h.state.data_cursors.clone();
        self.start_step = h.state.step;
        self.skipped = h.state.skipped;
        check_same(
            &self.dist,
            "LoRA weights after resuming",
            || lora_digest(&self.lora),
            hex_prefix,
        )?;
        tracing::info!(from = %h.dir, step = h.state.step, "resumed");
        Ok(())
    }

    /// Writes the LoRA (or its EMA) with diffusers Flux keys: `transformer.<module>.lora_A.weight`
    /// [r, in] and `lora_B.weight` [out, r]. alpha/r is folded into B so loaders that assume
    /// alpha = r (diffusers, PEFT without a config) apply the trained delta exactly.
    pub fn save_lora(&self, path: &Path, use_ema: bool) -> Result<()> {
        let shadow = match (&self.ema, use_ema) {
            (Some(e), true) => Some(e.shadow.as_slice()),
            _ => None,
        };
        let adapters = crate::lora_format::from_live(&self.lora, shadow);
        let tensors = crate::lora_format::to_prefixed(&adapters, "transformer.", DType::F32)?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::lora_format::write_safetensors(path, &tensors, meta)
    }
}

pub fn lora_vars(lora: &Lora) -> Vec<&Var> {
    lora.named_vars().into_iter().map(|(_, v)| v).collect()
}

fn progress_bar(steps: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Trains as configured on one rank (no environment read, no signal handlers).
pub fn train(cfg: Config) -> Result<TrainOutcome> {
    let device = device_of(&cfg, 0)?;
    train_with(
        cfg,
        Dist::single(),
        device,
        Arc::new(AtomicBool::new(false)),
    )
}

/// Trains as the rank the environment describes (RANK, WORLD_SIZE, ... from `launcher` or
/// another launcher; none means a single rank), stopping cleanly on SIGTERM, SIGINT or SIGUSR1.
pub fn train_from_env(cfg: Config) -> Result<TrainOutcome> {
    let env = launcher::RankEnv::from_env().map_err(DistError::from)?;
    let device = device_of(&cfg, env.local_rank)?;
    let stop = crate::signals::stop_flag()?;
    if cfg.train.stop_grace_s > 0.0 {
        crate::signals::arm_grace(
            stop.clone(),
            std::time::Duration::from_secs_f64(cfg.train.stop_grace_s),
            cfg.train.signal_exit_code,
        );
    }
    let dist = ddp::connect(&env, &cfg.distributed.options(), &device)?;
    tracing::info!(
        rank = dist.rank(),
        world_size = dist.world_size(),
        backend = dist.backend(),
        "ranks connected"
    );
    train_with(cfg, dist, device, stop)
}

/// Trains as one rank of `dist`. Rank 0 writes `metrics.jsonl`, `config.toml`,
/// `lora.safetensors` (and `lora_ema.safetensors`) under the run directory; the weights are
/// identical on every rank, so no other rank waits on those writes.
pub fn train_with(
    cfg: Config,
    dist: Dist,
    device: Device,
    stop: Arc<AtomicBool>,
) -> Result<TrainOutcome> {
    let run_dir = cfg.run_dir();
    let leader = dist.rank() == 0;
    if leader {
        std::fs::create_dir_all(&run_dir).map_err(|e| TrainerError::io(&run_dir, e))?;
        let resolved = run_dir.join("config.toml");
        std::fs::write(&resolved, toml::to_string(&cfg).unwrap_or_default())
            .map_err(|e| TrainerError::io(&resolved, e))?;
    }
    let rank = dist.rank();
    let mut run = Run::build_with(cfg, dist, device)?;
    run.stop_requested = stop;
    let resumed = run.resume()?;
    tracing::info!(
        run_dir = %run_dir.display(),
        lora_params = run.lora.num_params(),
        data = %run.data.describe(),
        buckets = run.plan.buckets.len(),
        fingerprint = %run.cfg.fingerprint(),
        "run built"
    );
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut metrics = match (leader, resumed.is_some()) {
        (false, _) => None,
        (true, false) => Some(MetricsLog::create(&metrics_path)?),
        (true, true) => Some(MetricsLog::resume(&metrics_path, run.start_step)?),
    };
    let max_steps = run.cfg.train.max_steps;
    let ckpt_root = run.cfg.checkpoint_location()?;
    let (every, keep) = (run.cfg.checkpoint.every, run.cfg.checkpoint.keep);
    let mut writer = checkpoint::Writer::default();
    let bar = progress_bar(max_steps, run.cfg.train.progress && leader);
    bar.set_position(run.start_step.min(max_steps));
    let mut losses = Vec::with_capacity(max_steps as usize);
    let mut stopped_by_signal = false;
    let mut saved_at = run.start_step;
    for step in run.start_step..max_steps {
        let (m, parts) = run.train_step(step)?;
        if let Some(log) = &mut metrics {
            log.write(&m)?;
        }
        run.skipped += m.skipped as u64;
        if leader && every > 0 && (step + 1).is_multiple_of(every) && step + 1 < max_steps {
            // The loop waits only for the copy; the files are written in the background.
            writer.save(ckpt_root.clone(), run.snapshot(step + 1)?, keep)?;
            saved_at = step + 1;
        }
        if leader && ((step + 1) % run.cfg.train.log_every == 0 || step + 1 == max_steps) {
            tracing::info!(
                step = m.step,
                loss = m.loss,
                diff = m.loss_diff,
                scal = m.loss_scal,
                mdl = m.loss_mdl,
                grad_norm = m.grad_norm,
                lr = m.lr,
                s_per_step = m.s_per_step,
                "step"
            );
        }
        bar.set_message(format!("loss {:.4}", m.loss));
        bar.inc(1);
        losses.push(parts);
        if run.stop_agreed && step + 1 < max_steps {
            tracing::warn!(
                step = step + 1,
                "stop requested by a signal: every rank stops after this step and rank 0 saves"
            );
            stopped_by_signal = true;
            break;
        }
    }
    bar.finish_and_clear();
    if let Some(report) = run.data.report() {
        std::fs::create_dir_all(&run_dir).map_err(|e| TrainerError::io(&run_dir, e))?;
        if let Some(path) = run.data.write_report(&run_dir, rank)? {
            tracing::info!(report = %path.display(), "data: {}", report.summary());
        }
    }
    let done = run.start_step + losses.len() as u64;
    let lora_path = run_dir.join("lora.safetensors");
    let skipped = run.skipped;
    if leader {
        if done > saved_at {
            writer.save(ckpt_root.clone(), run.snapshot(done)?, keep)?;
        }
        writer.wait()?;
        run.save_lora(&lora_path, false)?;
        if run.ema.is_some() {
            run.save_lora(&run_dir.join("lora_ema.safetensors"), true)?;
        }
        tracing::info!(lora = %lora_path.display(), skipped, "training finished");
    }
    Ok(TrainOutcome {
        losses,
        skipped,
        lora_path,
        run_dir,
        stopped_by_signal,
        rank,
        start_step: run.start_step,
    })
}
