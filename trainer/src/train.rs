//! The training loop, readable top to bottom: build the run, then per step gather micro-batches,
//! compute loss and LoRA gradients, check finiteness, clip, AdamW, EMA, log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{Config, DeviceName, OnNonFinite};
use crate::error::{Result, TrainerError};
use crate::loader::Loader;
use crate::metrics::{MetricsLog, StepMetrics};
use crate::model::lora::LoraSpec;
use crate::model::{Flux, Lora, RowBlocks, Weights};
use crate::objective::{self, DrawAt, LossParts, ObjectiveSpec};
use crate::optim::{clip_global_norm, global_norm, lr_at, AdamW, Ema, OptimSpec};
use crate::synth::{self, Sample, SynthSpec};

/// Everything a run holds between steps.
pub struct Run {
    pub cfg: Config,
    pub device: Device,
    pub model: Flux,
    pub lora: Lora,
    pub data: Vec<Sample>,
    pub loader: Loader,
    pub opt: AdamW,
    pub ema: Option<Ema>,
    pub objective: ObjectiveSpec,
    pub optim: OptimSpec,
}

/// What a finished run reports.
pub struct TrainOutcome {
    pub losses: Vec<LossParts>,
    pub skipped: u64,
    pub lora_path: PathBuf,
    pub run_dir: PathBuf,
}

pub fn device_of(cfg: &Config) -> Result<Device> {
    Ok(match cfg.model.device {
        DeviceName::Cpu => Device::Cpu,
        DeviceName::Cuda => Device::new_cuda(0).map_err(|e| {
            TrainerError::config(
                "model.device",
                format!("cannot open CUDA device 0: {e} (build with --features cuda)"),
            )
        })?,
    })
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
    pub fn build(cfg: Config) -> Result<Self> {
        let device = device_of(&cfg)?;
        let (fc, weights) = base_weights(&cfg, &device)?;
        let rows = RowBlocks {
            double: cfg.loss.double_blocks.clone(),
            single: cfg.loss.single_blocks.clone(),
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
        let d = &cfg.data;
        let synth_spec = SynthSpec {
            samples: d.samples,
            resolution: d.resolution,
            ref_resolution: d.ref_resolution,
            min_refs: d.min_refs,
            max_refs: d.max_refs,
            text_tokens: d.text_tokens,
            context_dim: fc.context_dim,
            pooled_dim: fc.pooled_dim,
        };
        let data = synth::generate(&synth_spec, cfg.run.seed, &device)?;
        let loader = Loader::new(
            data.iter().map(|s| s.refs.len()).collect(),
            cfg.train.batch_size,
            cfg.run.seed,
        )?;
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
        Ok(Self {
            objective: ObjectiveSpec::from_config(&cfg),
            optim,
            cfg,
            device,
            model,
            lora,
            data,
            loader,
            opt,
            ema,
        })
    }

    /// One optimizer step (over `train.grad_accum` micro-batches).
    pub fn train_step(&mut self, step: u64) -> Result<(StepMetrics, LossParts)> {
        let started = Instant::now();
        let lr = lr_at(&self.optim, step, self.cfg.train.max_steps);
        let accum = self.cfg.train.grad_accum;
        let batch = self.cfg.train.batch_size;
        let with_rows =
            self.objective.scal_weight > 0.0 || self.objective.mdl_weight_at(step) > 0.0;
        let mut grads: Option<Vec<Tensor>> = None;
        let mut parts = LossParts::default();
        let mut tokens = 0usize;
        for micro in 0..accum {
            let idx = self.loader.next_batch();
            let samples: Vec<&Sample> = idx.iter().map(|&i| &self.data[i]).collect();
            let _span = tracing::debug_span!("forward_backward", step, micro).entered();
            let at = DrawAt {
                seed: self.cfg.run.seed,
                step,
                first_slot: (micro * batch) as u64,
            };
            let prep = objective::prepare(
                &self.objective,
                &samples,
                at,
                with_rows,
                self.model.dtype(),
                &self.device,
            )?;
            let (p, g) = objective::loss_and_lora_grads(
                &self.model,
                &self.lora,
                &prep,
                &self.objective,
                step,
                self.cfg.train.checkpointing,
            )?;
            tokens += prep.tokens * samples.len();
            for (a, b) in [
                (&mut parts.total, p.total),
                (&mut parts.diff, p.diff),
                (&mut parts.scal, p.scal),
                (&mut parts.mdl, p.mdl),
            ] {
                *a += b / accum as f64;
            }
            grads = Some(match grads {
                None => g,
                Some(acc) => acc
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads: Vec<Tensor> = grads
            .unwrap_or_default()
            .iter()
            .map(|g| g / accum as f64)
            .collect::<candle_core::Result<_>>()?;
        let norm = match self.optim.grad_clip {
            Some(max) if parts.total.is_finite() => clip_global_norm(&mut grads, max)?,
            _ => global_norm(&grads)?,
        };
        let skipped = !(parts.total.is_finite() && norm.is_finite());
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

    /// Writes the LoRA (or its EMA) with diffusers Flux keys: `transformer.<module>.lora_A.weight`
    /// [r, in] and `lora_B.weight` [out, r]. alpha/r is folded into B so loaders that assume
    /// alpha = r (diffusers, PEFT without a config) apply the trained delta exactly.
    pub fn save_lora(&self, path: &Path, use_ema: bool) -> Result<()> {
        let scale = self.lora.scale();
        let mut out: HashMap<String, Tensor> = HashMap::new();
        let named = self.lora.named_vars();
        for (i, (name, var)) in named.iter().enumerate() {
            let t = match (&self.ema, use_ema) {
                (Some(e), true) => e.shadow[i].clone(),
                _ => var.as_tensor().clone(),
            };
            let (module, which) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
            let t = if which == "lora_B" { (t * scale)? } else { t };
            out.insert(
                format!("transformer.{module}.{which}.weight"),
                t.contiguous()?,
            );
        }
        candle_core::safetensors::save(&out, path)?;
        Ok(())
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

/// Trains as configured and writes `metrics.jsonl`, `config.toml`, `lora.safetensors` (and
/// `lora_ema.safetensors`) under the run directory.
pub fn train(cfg: Config) -> Result<TrainOutcome> {
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir).map_err(|e| TrainerError::io(&run_dir, e))?;
    let resolved = run_dir.join("config.toml");
    std::fs::write(&resolved, toml::to_string(&cfg).unwrap_or_default())
        .map_err(|e| TrainerError::io(&resolved, e))?;
    let mut run = Run::build(cfg)?;
    tracing::info!(
        run_dir = %run_dir.display(),
        lora_params = run.lora.num_params(),
        samples = run.data.len(),
        fingerprint = %run.cfg.fingerprint(),
        "run built"
    );
    let mut metrics = MetricsLog::create(&run_dir.join("metrics.jsonl"))?;
    let max_steps = run.cfg.train.max_steps;
    let bar = progress_bar(max_steps, run.cfg.train.progress);
    let mut losses = Vec::with_capacity(max_steps as usize);
    let mut skipped = 0;
    for step in 0..max_steps {
        let (m, parts) = run.train_step(step)?;
        metrics.write(&m)?;
        skipped += m.skipped as u64;
        if (step + 1) % run.cfg.train.log_every == 0 || step + 1 == max_steps {
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
    }
    bar.finish_and_clear();
    let lora_path = run_dir.join("lora.safetensors");
    run.save_lora(&lora_path, false)?;
    if run.ema.is_some() {
        run.save_lora(&run_dir.join("lora_ema.safetensors"), true)?;
    }
    tracing::info!(lora = %lora_path.display(), skipped, "training finished");
    Ok(TrainOutcome {
        losses,
        skipped,
        lora_path,
        run_dir,
    })
}
