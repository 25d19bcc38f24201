//! `trainer pretrain-base`: trains ALL weights of a FLUX architecture with flow matching on
//! the data's targets and captions (no references, no LoRA), and writes the result as a
//! diffusers transformer folder that `model.weights` loads. The same model code as training
//! the LoRA: `Weights::trainable` makes every base tensor a variable, and the frozen-weight
//! ops then give weight gradients.
//!
//! Data parallel like training (`launcher --job pretrain-base`): every rank starts from rank
//! 0's weights, trains on its slice of each global batch (`train.batch_size` samples per rank)
//! and takes the mean gradient over the ranks, so all hold the same weights; rank 0 writes.
//! No block-wise recomputation (meant for small bases: the tiny model a CPU demo needs), no
//! checkpoints: a run is started again from scratch, or continued by naming its output as
//! `model.weights`. Every draw (noise, t) comes from the same seeded streams as training, keyed
//! by the sample's slot in the global batch, so the same config gives the same base.
//!
//! With `optim.ema_decay` > 0 the written base is the exponential moving average of the
//! weights (a diffusion model's samples are much less noisy from the average than from the
//! last step's weights) and the last weights go beside it as `RUN/base-live/`. Every
//! `checkpoint.every` steps the base as it would be written then goes to
//! `RUN/base-steps/step-<N>/`, to watch its samples improve; these are not resumable.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use crate::config::Config;
use crate::data::sample::Sample;
use crate::data::DataFeed;
use crate::ddp::consistency::{broadcast_from_rank0, check_same_config, mean_over_ranks};
use crate::ddp::Dist;
use crate::error::{Result, TrainerError};
use crate::metrics::StepMetrics;
use crate::objective::{self, DrawAt, DropoutSpec, ObjectiveSpec};
use crate::optim::{clip_factor, global_norm, lr_at, AdamW, Ema};
use crate::run::{base_weights, device_of};
use flux::{Flux, Lora, LoraSpec, RowBlocks, Weights};

/// What a finished pretraining reports.
pub struct PretrainOutcome {
    /// L_diff of every step.
    pub losses: Vec<f64>,
    /// The diffusers folder written by rank 0 (`RUN/base`): the EMA of the weights when
    /// `optim.ema_decay` > 0, else the last weights.
    pub base_dir: PathBuf,
    /// The last weights (`RUN/base-live`), written when the base is their EMA.
    pub live_dir: Option<PathBuf>,
    /// The snapshots written every `checkpoint.every` steps (`RUN/base-steps/step-<N>`).
    pub snapshots: Vec<PathBuf>,
    pub skipped: u64,
    /// This process's rank (only rank 0 writes files).
    pub rank: usize,
}

/// The base's variables, sorted by name, with the model that reads them.
struct Trainable {
    model: Flux,
    vars: Vec<(String, Var)>,
    fc: flux::FluxConfig,
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

/// One optimizer step of the whole base: this rank's slice of the global batch, the loss and
/// gradient averaged over the ranks, clipping, AdamW (skipped when the loss or the gradient is
/// not finite; every rank sees the same mean, so all skip together).
fn train_step(
    t: &Trainable,
    lora: &Lora,
    data: &mut DataFeed,
    opt: &mut AdamW,
    cfg: &Config,
    dist: &Dist,
    step: u64,
) -> Result<StepMetrics> {
    let started = Instant::now();
    let (rank, world, batch) = (dist.rank(), dist.world_size(), cfg.train.batch_size);
    let owned = data.next_micro_batch(rank, batch)?;
    let samples: Vec<&Sample> = owned.iter().collect();
    let spec = ObjectiveSpec {
        loss: &cfg.loss,
        conditioning: &cfg.conditioning,
        // Caption dropout (`data.drop_text`, `data.drop_both`) teaches the base the empty
        // caption, the unconditional branch of classifier-free guidance (`--true-cfg`); there
        // are no references to drop.
        dropout: DropoutSpec {
            refs: 0.0,
            ..cfg.data.dropout()
        },
        empty_caption: data.empty_caption(),
    };
    // Draws are keyed by the sample's slot in the global batch, as in training.
    let at = DrawAt {
        seed: cfg.run.seed,
        step,
        first_slot: (rank * batch) as u64,
    };
    let (loss, grads) = loss_and_grads(t, lora, &samples, &spec, at)?;
    let grads = mean_over_ranks(dist, "gradient all-reduce", &grads)?;
    let device = t.model.device();
    let loss = mean_over_ranks(dist, "loss all-reduce", &[Tensor::new(&[loss], device)?])?[0]
        .to_vec1::<f64>()?[0];
    let norm = global_norm(&grads)?;
    let lr = lr_at(&cfg.optim, step, cfg.train.max_steps);
    let skipped = !(loss.is_finite() && norm.is_finite());
    if skipped {
        tracing::warn!(
            step = step + 1,
            loss,
            norm,
            "non-finite loss or gradient: update skipped"
        );
    } else {
        let vars: Vec<&Var> = t.vars.iter().map(|(_, v)| v).collect();
        opt.step(
            &cfg.optim,
            &vars,
            &grads,
            lr,
            clip_factor(norm, cfg.optim.clip()),
        )?;
    }
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

/// Writes `values` (one per variable, in the variables' order) as a diffusers transformer
/// folder.
fn save(t: &Trainable, values: &[&Tensor], dir: &std::path::Path) -> Result<()> {
    let tensors = t
        .vars
        .iter()
        .zip(values)
        .map(|((n, _), v)| Ok((n.clone(), v.to_dtype(DType::F32)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Weights::from_tensors(tensors).save_diffusers(&t.fc, dir)?)
}

/// The base as it is written: the EMA when there is one, else the live weights.
fn written_values<'a>(t: &'a Trainable, ema: Option<&'a Ema>) -> Vec<&'a Tensor> {
    match ema {
        Some(e) => e.shadow.iter().collect(),
        None => t.vars.iter().map(|(_, v)| v.as_tensor()).collect(),
    }
}

/// Trains the whole base as `cfg` says (model, data, optim, train.max_steps and batch_size,
/// loss.logit_* for t) on one rank; writes `RUN/base/`, `RUN/metrics.jsonl` and
/// `RUN/metrics.png`.
pub fn pretrain(cfg: Config) -> Result<PretrainOutcome> {
    let device = device_of(&cfg, 0)?;
    pretrain_with(cfg, Dist::single(), device)
}

/// [`pretrain`] as the rank the environment describes (`launcher --job pretrain-base`; none
/// means a single rank).
pub fn pretrain_from_env(cfg: Config) -> Result<PretrainOutcome> {
    let (dist, device) = crate::train::connect_from_env(&cfg)?;
    pretrain_with(cfg, dist, device)
}

/// Rank 0's metrics log in a new run folder.
fn open_log(cfg: &Config) -> Result<crate::run_log::RunLog> {
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).map_err(|e| TrainerError::io(&run_dir, e))?;
    crate::run_log::RunLog::open(&cfg.logging, &run_dir, false, 0)
}

/// Where the base (`RUN/base`) and, with an EMA, the last weights (`RUN/base-live`) go;
/// written when `leader`.
fn write_base(
    t: &Trainable,
    ema: Option<&Ema>,
    run_dir: &std::path::Path,
    leader: bool,
) -> Result<(PathBuf, Option<PathBuf>)> {
    let base_dir = run_dir.join("base");
    let live_dir = ema.is_some().then(|| run_dir.join("base-live"));
    if leader {
        save(t, &written_values(t, ema), &base_dir)?;
        if let Some(dir) = &live_dir {
            save(t, &written_values(t, None), dir)?;
        }
        tracing::info!(
            base = %base_dir.display(),
            ema = ema.is_some(),
            "base written (load it as model.weights)"
        );
    }
    Ok((base_dir, live_dir))
}

/// [`pretrain`] as one rank of `dist`: the configs must match (fingerprint); rank 0 writes.
pub fn pretrain_with(
    cfg: Config,
    dist: Dist,
    device: candle_core::Device,
) -> Result<PretrainOutcome> {
    check_same_config(&dist, &cfg)?;
    let (rank, leader) = (dist.rank(), dist.rank() == 0);
    flux::fused::set_enabled(cfg.model.kernels == crate::config::KernelsName::Fused);
    let t = trainable(&cfg, &dist, &device)?;
    let no_lora = LoraSpec {
        targets: Vec::new(),
        ..Default::default()
    };
    let lora = Lora::new(&t.fc, &no_lora, 0, DType::F32, &device)?;
    let mut data = DataFeed::build(&cfg, &t.fc, rank, dist.world_size(), &device)?;
    let var_refs: Vec<&Var> = t.vars.iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(&var_refs)?;
    let mut ema = if cfg.optim.ema_decay > 0.0 {
        Some(Ema::new(cfg.optim.ema_decay, &var_refs)?)
    } else {
        None
    };
    let run_dir = cfg.run_dir();
    let mut log = leader.then(|| open_log(&cfg)).transpose()?;
    tracing::info!(
        parameters = t.vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        run_dir = %run_dir.display(),
        ranks = dist.world_size(),
        "pretraining the whole base"
    );
    let max_steps = cfg.train.max_steps;
    let mut losses = Vec::with_capacity(max_steps as usize);
    let mut skipped = 0;
    let mut snapshots = Vec::new();
    for step in 0..max_steps {
        let m = train_step(&t, &lora, &mut data, &mut opt, &cfg, &dist, step)?;
        if let Some(log) = log.as_mut() {
            log.step(&m)?;
        }
        if leader && ((step + 1) % cfg.train.log_every == 0 || step + 1 == max_steps) {
            tracing::info!(
                step = m.step,
                loss = m.loss,
                grad_norm = m.grad_norm,
                lr = m.lr,
                "pretrain step"
            );
        }
        skipped += m.skipped as u64;
        losses.push(m.loss);
        if let Some(e) = ema.as_mut() {
            if !m.skipped {
                e.update(&var_refs)?;
            }
        }
        let every = cfg.checkpoint.every;
        if leader && every > 0 && m.step % every == 0 && m.step < max_steps {
            let dir = run_dir
                .join("base-steps")
                .join(format!("step-{:08}", m.step));
            save(&t, &written_values(&t, ema.as_ref()), &dir)?;
            tracing::info!(step = m.step, base = %dir.display(), "snapshot of the base written");
            snapshots.push(dir);
        }
    }
    let (base_dir, live_dir) = write_base(&t, ema.as_ref(), &run_dir, leader)?;
    if let Some(log) = log {
        log.finish();
    }
    Ok(PretrainOutcome {
        losses,
        base_dir,
        live_dir,
        snapshots,
        skipped,
        rank,
    })
}
