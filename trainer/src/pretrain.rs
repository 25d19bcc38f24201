//! `trainer pretrain-base`: trains ALL weights of a FLUX architecture with flow matching on
//! the data's targets and captions (no references, no LoRA), and writes the result as a
//! diffusers transformer folder that `model.weights` loads. The same model code as training
//! the LoRA: `Weights::trainable` makes every base tensor a variable, and the frozen-weight
//! ops then give weight gradients.
//!
//! Data parallel like training (`launcher --job pretrain-base`): every rank starts from rank
//! 0's weights, trains on its slice of each global batch (`train.batch_size` samples per rank)
//! and takes the mean gradient over the ranks, so all hold the same weights; rank 0 writes.
//! No block-wise recomputation (meant for small bases: the tiny model a CPU demo needs). Every
//! draw (noise, t) comes from the same seeded streams as training, keyed by the sample's slot
//! in the global batch, so the same config gives the same base.
//!
//! Resumable exactly as training is (docs/checkpoints.md): every `checkpoint.every` steps, at
//! the end and on SIGTERM, SIGINT or SIGUSR1 (after the step; the process then exits with
//! `train.signal_exit_code`) a checkpoint holds the weights (`base.safetensors`, by diffusers
//! name), AdamW's moments, the EMA, the step and the data position; started again, the run
//! continues from it and ends with the bits of an uninterrupted run. The run folder is taken
//! and checked as training's (`--no-resume`, `--overwrite`, `--resume DIR`).
//!
//! With `optim.ema_decay` > 0 the written base is the exponential moving average of the
//! weights (a diffusion model's samples are much less noisy from the average than from the
//! last step's weights) and the last weights go beside it as `RUN/base-live/`. Every
//! `checkpoint.every` steps the base as it would be written then also goes to
//! `RUN/base-steps/step-<N>/`, to watch its samples improve.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use crate::checkpoint::{self, Checkpointed, Checkpointer, Ledger, Progress, Trainables};
use crate::config::Config;
use crate::data::sample::Sample;
use crate::data::DataFeed;
use crate::ddp::consistency::{broadcast_from_rank0, check_same_config, mean_over_ranks};
use crate::ddp::Dist;
use crate::error::Result;
use crate::metrics::StepMetrics;
use crate::objective::{self, DrawAt, DropoutSpec, LossParts, ObjectiveSpec};
use crate::optim::{clip_factor, global_norm, lr_at, AdamW, Ema};
use crate::run::{base_weights, device_of};
use crate::step::StepAgreement;
use flux::{Flux, Lora, LoraSpec, RowBlocks, Weights};

/// What a finished (or stopped) pretraining reports.
pub struct PretrainOutcome {
    /// L_diff of every step this process ran.
    pub losses: Vec<f64>,
    /// The diffusers folder written by rank 0 (`RUN/base`): the EMA of the weights when
    /// `optim.ema_decay` > 0, else the last weights.
    pub base_dir: PathBuf,
    /// The last weights (`RUN/base-live`), written when the base is their EMA.
    pub live_dir: Option<PathBuf>,
    /// The snapshots written every `checkpoint.every` steps (`RUN/base-steps/step-<N>`).
    pub snapshots: Vec<PathBuf>,
    /// Updates skipped for non-finite losses, over the whole run (resumes included).
    pub skipped: u64,
    /// This process's rank (only rank 0 writes files).
    pub rank: usize,
    /// The step this process started at (after a resume, the checkpoint's).
    pub start_step: u64,
    pub max_steps: u64,
    /// A signal stopped the run before `max_steps`; its checkpoint is saved.
    pub stopped_by_signal: bool,
}

/// The base's variables, sorted by name, with the model that reads them.
struct Trainable {
    model: Flux,
    vars: Vec<(String, Var)>,
    fc: flux::FluxConfig,
}

impl Trainable {
    /// The variables as a checkpoint stores them: by diffusers name in `base.safetensors`.
    fn trainables(&self) -> Trainables<'_> {
        Trainables {
            file: checkpoint::BASE_FILE,
            named: self.vars.iter().map(|(n, v)| (n.clone(), v)).collect(),
        }
    }
}

/// The base as variables, every rank starting from rank 0's weights.
fn trainable(cfg: &Config, dist: &Dist, device: &candle_core::Device) -> Result<Trainable> {
    let (fc, start) = base_weights(cfg, device)?;
    let dtype = match cfg.model.dtype.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let (weights, vars) = start.trainable(dtype)?;
    // A random start is seeded and a loaded one the same file, so the ranks already agree;
    // the broadcast makes that a guarantee rather than an assumption.
    if dist.world_size() > 1 {
        let now: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        for ((_, v), t) in
            vars.iter()
                .zip(broadcast_from_rank0(dist, "base weights broadcast", &now)?)
        {
            v.set(&t)?;
        }
    }
    let mut model = Flux::new(fc.clone(), &weights, RowBlocks::default())?;
    model.attention = cfg.model.attention();
    Ok(Trainable { model, vars, fc })
}

/// One step: the loss and every variable's gradient (zeros for one the loss does not reach).
fn loss_and_grads(
    t: &Trainable,
    lora: &Lora,
    samples: &[&Sample],
    spec: &ObjectiveSpec<'_>,
    at: DrawAt,
) -> Result<(f64, Vec<Tensor>)> {
    let mut prep = objective::prepare(spec, samples, at, false, t.model.dtype(), t.model.device())?;
    // A base learns to denoise the target from its caption alone.
    prep.inputs.refs = None;
    let pred = t.model.forward(&prep.inputs, lora.view(false))?.pred;
    let loss = (pred.to_dtype(prep.velocity.dtype())? - &prep.velocity)?
        .sqr()?
        .mean_all()?;
    let store = loss.backward()?;
    let grads = t
        .vars
        .iter()
        .map(|(_, v)| match store.get(v) {
            Some(g) => Ok(g.clone()),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((value, grads))
}

/// A pretraining in progress on one rank: the base, its optimizer and EMA, the data, and what
/// a checkpoint records besides.
struct Pretraining {
    cfg: Config,
    dist: Dist,
    t: Trainable,
    /// The empty LoRA the model's forward takes (MOSAIC's LoRA is on reference tokens only).
    lora: Lora,
    data: DataFeed,
    opt: AdamW,
    ema: Option<Ema>,
    ledger: Ledger,
    stop_requested: Arc<AtomicBool>,
    /// Set once the ranks agreed, at the end of a step, that some rank was asked to stop.
    stop_agreed: bool,
}

impl Pretraining {
    /// The base as one rank of `dist`, from `model.weights` or the preset's seeded init.
    fn build(cfg: Config, dist: Dist, device: &candle_core::Device) -> Result<Self> {
        let t = trainable(&cfg, &dist, device)?;
        let no_lora = LoraSpec {
            targets: Vec::new(),
            ..Default::default()
        };
        let lora = Lora::new(&t.fc, &no_lora, 0, DType::F32, device)?;
        let data = DataFeed::build(&cfg, &t.fc, dist.rank(), dist.world_size(), device)?;
        let var_refs: Vec<&Var> = t.vars.iter().map(|(_, v)| v).collect();
        let opt = AdamW::new(&var_refs)?;
        let ema = Ema::for_spec(&cfg.optim, &var_refs)?;
        Ok(Self {
            cfg,
            dist,
            t,
            lora,
            data,
            opt,
            ema,
            ledger: Ledger::fresh(),
            stop_requested: Arc::new(AtomicBool::new(false)),
            stop_agreed: false,
        })
    }

    /// Continues from the configured checkpoint, if there is one; whether it did.
    fn resume(&mut self) -> Result<bool> {
        let Some(found) = checkpoint::find(&self.cfg, &self.dist)? else {
            return Ok(false);
        };
        self.ledger = found.restore(
            &self.cfg,
            &self.dist,
            &self.t.trainables(),
            &mut self.opt,
            self.ema.as_mut(),
            &mut self.data,
        )?;
        Ok(true)
    }

    /// One optimizer step of the whole base: this rank's slice of the global batch, the
    /// gradient averaged over the ranks, one small all-reduce in which the ranks agree on the
    /// loss, a stop and the data cursors, clipping, AdamW (skipped when the loss or the
    /// gradient is not finite; every rank sees the same mean, so all skip together), the EMA.
    fn step(&mut self, step: u64) -> Result<StepMetrics> {
        let started = Instant::now();
        let (rank, world, batch) = (
            self.dist.rank(),
            self.dist.world_size(),
            self.cfg.train.batch_size,
        );
        let owned = self.data.next_micro_batch(rank, batch)?;
        let samples: Vec<&Sample> = owned.iter().collect();
        let spec = ObjectiveSpec {
            loss: &self.cfg.loss,
            conditioning: &self.cfg.conditioning,
            // Caption dropout (`data.drop_text`, `data.drop_both`) teaches the base the empty
            // caption, the unconditional branch of classifier-free guidance (`--true-cfg`);
            // there are no references to drop.
            dropout: DropoutSpec {
                refs: 0.0,
                ..self.cfg.data.dropout()
            },
            empty_caption: self.data.empty_caption(),
        };
        // Draws are keyed by the sample's slot in the global batch, as in training.
        let at = DrawAt {
            seed: self.cfg.run.seed,
            step,
            first_slot: (rank * batch) as u64,
        };
        let (loss, grads) = loss_and_grads(&self.t, &self.lora, &samples, &spec, at)?;
        let grads = mean_over_ranks(&self.dist, "gradient all-reduce", &grads)?;
        let parts = LossParts {
            total: loss,
            diff: loss,
            scal: 0.0,
            mdl: 0.0,
        };
        let agreed = StepAgreement::reach(
            &self.dist,
            self.t.model.device(),
            &parts,
            self.stop_requested.load(Ordering::SeqCst),
            self.data.shard_cursor(),
        )?;
        self.stop_agreed = agreed.any_stop;
        if let Some(cursors) = agreed.cursors {
            self.ledger.data_cursors = cursors;
        }
        let loss = agreed.losses.total;
        let (lr, norm, skipped) = self.update(step, loss, &grads)?;
        let secs = started.elapsed().as_secs_f64();
        let tokens = world
            * samples
                .iter()
                .map(|s| s.x0.dim(0).unwrap_or(0))
                .sum::<usize>();
        Ok(StepMetrics {
            step: step + 1,
            loss,
            loss_diff: loss,
            loss_scal: 0.0,
            loss_mdl: 0.0,
            grad_norm: norm,
            lr,
            s_per_step: secs,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            skipped,
        })
    }

    /// Clipping and AdamW with the mean gradient `grads`, then the EMA; skipped (and counted)
    /// when the loss or the gradient is not finite. Returns the lr, the gradient norm and
    /// whether the update was skipped.
    fn update(&mut self, step: u64, loss: f64, grads: &[Tensor]) -> Result<(f64, f64, bool)> {
        let norm = global_norm(grads)?;
        let lr = lr_at(&self.cfg.optim, step, self.cfg.train.max_steps);
        let skipped = !(loss.is_finite() && norm.is_finite());
        if skipped {
            tracing::warn!(
                step = step + 1,
                loss,
                norm,
                "non-finite loss or gradient: update skipped"
            );
            self.ledger.skipped += 1;
            return Ok((lr, norm, true));
        }
        let vars: Vec<&Var> = self.t.vars.iter().map(|(_, v)| v).collect();
        self.opt.step(
            &self.cfg.optim,
            &vars,
            grads,
            lr,
            clip_factor(norm, self.cfg.optim.clip()),
        )?;
        if let Some(e) = self.ema.as_mut() {
            e.update(&vars, step)?;
        }
        Ok((lr, norm, false))
    }

    /// The base as it is written: the EMA when there is one, else the live weights.
    fn written_values(&self, use_ema: bool) -> Vec<&Tensor> {
        match (&self.ema, use_ema) {
            (Some(e), true) => e.shadow.iter().collect(),
            _ => self.t.vars.iter().map(|(_, v)| v.as_tensor()).collect(),
        }
    }

    /// Writes the base (the EMA when there is one, else the live weights, or the live ones
    /// when not `use_ema`) as a diffusers transformer folder.
    fn save(&self, dir: &Path, use_ema: bool) -> Result<()> {
        let tensors = self
            .t
            .vars
            .iter()
            .zip(self.written_values(use_ema))
            .map(|((n, _), v)| Ok((n.clone(), v.to_dtype(DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights::from_tensors(tensors).save_diffusers(&self.t.fc, dir)?)
    }

    /// Every `checkpoint.every` steps before the last, the base as it would be written now
    /// to `RUN/base-steps/step-<N>/` (rank 0); where it went.
    fn snapshot_base(&self, run_dir: &Path, done: u64) -> Result<Option<PathBuf>> {
        let every = self.cfg.checkpoint.every;
        let due = every > 0 && done.is_multiple_of(every) && done < self.cfg.train.max_steps;
        if !due || self.dist.rank() != 0 {
            return Ok(None);
        }
        let dir = run_dir
            .join("base-steps")
            .join(checkpoint::step_dir_name(done));
        self.save(&dir, true)?;
        tracing::info!(step = done, base = %dir.display(), "snapshot of the base written");
        Ok(Some(dir))
    }

    /// Writes `RUN/base` and, with an EMA, the last weights as `RUN/base-live` (rank 0).
    fn write_base(&self, run_dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
        let base_dir = run_dir.join("base");
        let live_dir = self.ema.is_some().then(|| run_dir.join("base-live"));
        if self.dist.rank() == 0 {
            self.save(&base_dir, true)?;
            if let Some(dir) = &live_dir {
                self.save(dir, false)?;
            }
            tracing::info!(
                base = %base_dir.display(),
                ema = self.ema.is_some(),
                "base written (load it as model.weights)"
            );
        }
        Ok((base_dir, live_dir))
    }
}

impl Checkpointed for Pretraining {
    fn progress(&self) -> Progress<'_> {
        Progress {
            cfg: &self.cfg,
            dist: &self.dist,
            data: &self.data,
            ledger: &self.ledger,
        }
    }
    fn trained(&self) -> (Trainables<'_>, &AdamW, Option<&Ema>) {
        (self.t.trainables(), &self.opt, self.ema.as_ref())
    }
}

/// Trains the whole base as `cfg` says (model, data, optim, train.max_steps and batch_size,
/// loss.logit_* for t) on one rank; writes `RUN/base/`, `RUN/metrics.jsonl` and
/// `RUN/metrics.png`, and checkpoints under `RUN/checkpoints/`.
pub fn pretrain(cfg: Config) -> Result<PretrainOutcome> {
    let device = device_of(&cfg, 0)?;
    pretrain_with(
        cfg,
        Dist::single(),
        device,
        Arc::new(AtomicBool::new(false)),
    )
}

/// [`pretrain`] as the rank the environment describes (`launcher --job pretrain-base`; none
/// means a single rank), stopping cleanly on SIGTERM, SIGINT or SIGUSR1.
pub fn pretrain_from_env(cfg: Config) -> Result<PretrainOutcome> {
    let stop = crate::train::stop_on_signals(&cfg)?;
    let (dist, device) = crate::train::connect_from_env(&cfg)?;
    pretrain_with(cfg, dist, device, stop)
}

/// [`pretrain`] as one rank of `dist`: the configs must match (fingerprint); rank 0 writes.
/// Once `stop` is set on any rank, every rank stops after the step and rank 0 saves.
pub fn pretrain_with(
    cfg: Config,
    dist: Dist,
    device: candle_core::Device,
    stop: Arc<AtomicBool>,
) -> Result<PretrainOutcome> {
    check_same_config(&dist, &cfg)?;
    let (rank, leader) = (dist.rank(), dist.rank() == 0);
    let run_dir = cfg.run_dir();
    let _ownership = crate::train::take_run_folder(&cfg, &dist)?;
    if leader {
        crate::train::write_resolved_config(&cfg, &run_dir)?;
    }
    flux::fused::set_enabled(cfg.model.kernels == crate::config::KernelsName::Fused);
    let mut p = Pretraining::build(cfg, dist, &device)?;
    p.stop_requested = stop;
    let resumed = p.resume()?;
    let mut log = leader
        .then(|| {
            crate::run_log::RunLog::open(&p.cfg.logging, &run_dir, resumed, p.ledger.start_step)
        })
        .transpose()?;
    tracing::info!(
        parameters = p.t.vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        run_dir = %run_dir.display(),
        ranks = p.dist.world_size(),
        start_step = p.ledger.start_step,
        "pretraining the whole base"
    );
    let mut checkpointer = Checkpointer::new(&p.cfg, rank, p.ledger.start_step)?;
    let max_steps = p.cfg.train.max_steps;
    let mut losses = Vec::with_capacity(max_steps.saturating_sub(p.ledger.start_step) as usize);
    let mut snapshots = Vec::new();
    let mut stopped_by_signal = false;
    crate::signals::mark_stepping();
    for step in p.ledger.start_step..max_steps {
        let m = p.step(step)?;
        if let Some(log) = log.as_mut() {
            log.step(&m)?;
        }
        if leader && ((step + 1) % p.cfg.train.log_every == 0 || step + 1 == max_steps) {
            tracing::info!(
                step = m.step,
                loss = m.loss,
                grad_norm = m.grad_norm,
                lr = m.lr,
                "pretrain step"
            );
        }
        losses.push(m.loss);
        checkpointer.after_step(&p, m.step)?;
        snapshots.extend(p.snapshot_base(&run_dir, m.step)?);
        if p.stop_agreed && m.step < max_steps {
            tracing::warn!(
                step = m.step,
                "stop requested by a signal: every rank stops after this step and rank 0 saves"
            );
            stopped_by_signal = true;
            break;
        }
    }
    p.data.write_report_into(&run_dir, rank)?;
    let done = p.ledger.start_step + losses.len() as u64;
    checkpointer.finish(&p, done)?;
    let (base_dir, live_dir) = p.write_base(&run_dir)?;
    if let Some(log) = log {
        log.finish();
    }
    Ok(PretrainOutcome {
        losses,
        base_dir,
        live_dir,
        snapshots,
        skipped: p.ledger.skipped,
        rank,
        start_step: p.ledger.start_step,
        max_steps,
        stopped_by_signal,
    })
}
