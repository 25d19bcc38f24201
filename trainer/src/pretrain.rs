//! `trainer pretrain-base`: trains ALL weights of a FLUX architecture with flow matching on
//! the data's targets and captions (no references, no LoRA), and writes the result as a
//! diffusers transformer folder that `model.weights` loads. The same model code as training
//! the LoRA: `Weights::trainable` makes every base tensor a variable, and the frozen-weight
//! ops then give weight gradients.
//!
//! One process, one device; no block-wise recomputation (meant for small bases: the tiny
//! model a CPU demo needs), no checkpoints: a run is started again from scratch, or continued
//! by naming its output as `model.weights`. Every draw (noise, t) comes from the same seeded
//! streams as training, so the same config gives the same base.
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
    /// The diffusers folder written (`RUN/base`): the EMA of the weights when
    /// `optim.ema_decay` > 0, else the last weights.
    pub base_dir: PathBuf,
    /// The last weights (`RUN/base-live`), written when the base is their EMA.
    pub live_dir: Option<PathBuf>,
    /// The snapshots written every `checkpoint.every` steps (`RUN/base-steps/step-<N>`).
    pub snapshots: Vec<PathBuf>,
    pub skipped: u64,
}

/// The base's variables, sorted by name, with the model that reads them.
struct Trainable {
    model: Flux,
    vars: Vec<(String, Var)>,
    fc: flux::FluxConfig,
}

fn trainable(cfg: &Config, device: &candle_core::Device) -> Result<Trainable> {
    let (fc, start) = base_weights(cfg, device)?;
    let dtype = match cfg.model.dtype.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let (weights, vars) = start.trainable(dtype)?;
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

/// One optimizer step of the whole base: the loss, clipping, AdamW (skipped when the loss or
/// the gradient is not finite).
fn train_step(
    t: &Trainable,
    lora: &Lora,
    data: &mut DataFeed,
    opt: &mut AdamW,
    cfg: &Config,
    step: u64,
) -> Result<StepMetrics> {
    let started = Instant::now();
    let owned = data.next_micro_batch(0, cfg.train.batch_size)?;
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
    let at = DrawAt {
        seed: cfg.run.seed,
        step,
        first_slot: 0,
    };
    let (loss, grads) = loss_and_grads(t, lora, &samples, &spec, at)?;
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
    let tokens: usize = samples.iter().map(|s| s.x0.dim(0).unwrap_or(0)).sum();
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
/// loss.logit_* for t); writes `RUN/base/`, `RUN/metrics.jsonl` and `RUN/metrics.png`.
pub fn pretrain(cfg: Config) -> Result<PretrainOutcome> {
    let device = device_of(&cfg, 0)?;
    flux::fused::set_enabled(cfg.model.kernels == crate::config::KernelsName::Fused);
    let t = trainable(&cfg, &device)?;
    let no_lora = LoraSpec {
        targets: Vec::new(),
        ..Default::default()
    };
    let lora = Lora::new(&t.fc, &no_lora, 0, DType::F32, &device)?;
    let mut data = DataFeed::build(&cfg, &t.fc, 0, 1, &device)?;
    let var_refs: Vec<&Var> = t.vars.iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(&var_refs)?;
    let mut ema = if cfg.optim.ema_decay > 0.0 {
        Some(Ema::new(cfg.optim.ema_decay, &var_refs)?)
    } else {
        None
    };
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).map_err(|e| TrainerError::io(&run_dir, e))?;
    let mut log = crate::run_log::RunLog::open(&cfg.logging, &run_dir, false, 0)?;
    tracing::info!(
        parameters = t.vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        run_dir = %run_dir.display(),
        "pretraining the whole base"
    );
    let max_steps = cfg.train.max_steps;
    let mut losses = Vec::with_capacity(max_steps as usize);
    let mut skipped = 0;
    let mut snapshots = Vec::new();
    for step in 0..max_steps {
        let m = train_step(&t, &lora, &mut data, &mut opt, &cfg, step)?;
        log.step(&m)?;
        if (step + 1) % cfg.train.log_every == 0 || step + 1 == max_steps {
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
        if every > 0 && m.step % every == 0 && m.step < max_steps {
            let dir = run_dir
                .join("base-steps")
                .join(format!("step-{:08}", m.step));
            save(&t, &written_values(&t, ema.as_ref()), &dir)?;
            tracing::info!(step = m.step, base = %dir.display(), "snapshot of the base written");
            snapshots.push(dir);
        }
    }
    let base_dir = run_dir.join("base");
    save(&t, &written_values(&t, ema.as_ref()), &base_dir)?;
    let live_dir = match ema {
        Some(_) => {
            let dir = run_dir.join("base-live");
            save(&t, &written_values(&t, None), &dir)?;
            Some(dir)
        }
        None => None,
    };
    log.finish();
    tracing::info!(
        base = %base_dir.display(),
        ema = cfg.optim.ema_decay > 0.0,
        "base written (load it as model.weights)"
    );
    Ok(PretrainOutcome {
        losses,
        base_dir,
        live_dir,
        snapshots,
        skipped,
    })
}
