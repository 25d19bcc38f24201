//! The training loop, readable top to bottom: connect the ranks and build the run, resume,
//! then per step train (accumulate, agree, update: `step.rs`), log, maybe checkpoint, and stop
//! where the ranks agreed to; at the end write the data report and the LoRA.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::Checkpointer;
use crate::config::Config;
use crate::ddp::{self, Dist, DistError};
use crate::error::{Result, TrainerError};
use crate::metrics::StepMetrics;
use crate::objective::LossParts;
use crate::run::{device_of, lora_path, Run};
use crate::run_log::RunLog;
use crate::validation::Validator;

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
    /// train.max_steps.
    pub max_steps: u64,
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
    let stop = stop_on_signals(&cfg)?;
    let (dist, device) = connect_from_env(&cfg)?;
    train_with(cfg, dist, device, stop)
}

/// The flag SIGTERM, SIGINT and SIGUSR1 set, with `train.stop_grace_s` to finish the step and
/// save before the process exits with `train.signal_exit_code` regardless.
pub fn stop_on_signals(cfg: &Config) -> Result<Arc<AtomicBool>> {
    let stop = crate::signals::stop_flag()?;
    if cfg.train.stop_grace_s > 0.0 {
        crate::signals::arm_grace(
            stop.clone(),
            std::time::Duration::from_secs_f64(cfg.train.stop_grace_s),
            cfg.train.signal_exit_code,
        );
    }
    Ok(stop)
}

/// This process's rank as the environment describes it (RANK, WORLD_SIZE, ... from `launcher`
/// or another launcher; none means a single rank), connected to its peers, and its device.
pub fn connect_from_env(cfg: &Config) -> Result<(Dist, Device)> {
    let env = rendezvous::RankEnv::from_env().map_err(DistError::from)?;
    let device = device_of(cfg, env.local_rank)?;
    let mut opts = cfg.distributed.options();
    // The launcher's --connect-timeout bounds this rank's wait for its peers too.
    if let Some(s) = env.connect_timeout_s {
        opts.connect_timeout = opts.connect_timeout.min(std::time::Duration::from_secs(s));
    }
    let dist = ddp::connect(&env, &opts, &device)?;
    tracing::info!(
        rank = dist.rank(),
        world_size = dist.world_size(),
        backend = dist.backend(),
        "ranks connected"
    );
    Ok((dist, device))
}

/// Trains as one rank of `dist`. Rank 0 writes `metrics.jsonl`, `config.toml`,
/// `lora.safetensors` (and `lora_ema.safetensors`) and the checkpoints under the run
/// directory; the weights are identical on every rank, so no other rank waits on those writes.
pub fn train_with(
    cfg: Config,
    dist: Dist,
    device: Device,
    stop: Arc<AtomicBool>,
) -> Result<TrainOutcome> {
    let run_dir = cfg.run_dir();
    let (rank, leader) = (dist.rank(), dist.rank() == 0);
    let _ownership = take_run_folder(&cfg, &dist)?;
    if leader {
        write_resolved_config(&cfg, &run_dir)?;
    }
    let mut run = Run::build_with(cfg, dist, device)?;
    run.stop_requested = stop;
    let resumed = run.resume()?.is_some();
    log_built(&run, &run_dir)?;
    let mut log = leader
        .then(|| RunLog::open(&run.cfg.logging, &run_dir, resumed, run.ledger.start_step))
        .transpose()?;
    let mut checkpointer = Checkpointer::new(&run.cfg, rank, run.ledger.start_step)?;
    let max_steps = run.cfg.train.max_steps;
    let validator = Validator::prepare(&run.cfg, &run)?;
    if run.ledger.start_step == 0 && run.cfg.validation.at_start {
        validate(validator.as_ref(), &run, 0, &mut log)?;
    }
    let bar = progress_bar(max_steps, run.cfg.train.progress && leader);
    bar.set_position(run.ledger.start_step.min(max_steps));
    let mut losses = Vec::with_capacity(max_steps as usize);
    let mut stopped_by_signal = false;
    crate::signals::mark_stepping();
    for step in run.ledger.start_step..max_steps {
        let (m, parts) = run.train_step(step)?;
        run.ledger.skipped += m.skipped as u64;
        losses.push(parts);
        if let Some(log) = &mut log {
            log.step(&m)?;
        }
        checkpointer.after_step(&run, step + 1)?;
        if run.cfg.validation.due(step + 1, max_steps) && !run.stop_agreed {
            validate(validator.as_ref(), &run, step + 1, &mut log)?;
        }
        if leader && ((step + 1) % run.cfg.train.log_every == 0 || step + 1 == max_steps) {
            log_step(&m);
        }
        bar.set_message(format!("loss {:.4}", m.loss));
        bar.inc(1);
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
    run.data.write_report_into(&run_dir, rank)?;
    let done = run.ledger.start_step + losses.len() as u64;
    let lora_path = lora_path(&run_dir);
    checkpointer.finish(&run, done)?;
    if let Some(log) = &log {
        log.finish();
    }
    if leader {
        run.save_loras(&run_dir)?;
        tracing::info!(lora = %lora_path.display(), skipped = run.ledger.skipped, "training finished");
    }
    Ok(TrainOutcome {
        losses,
        skipped: run.ledger.skipped,
        lora_path,
        run_dir,
        stopped_by_signal,
        rank,
        start_step: run.ledger.start_step,
        max_steps,
    })
}

/// Renders the validation images after `done` steps (every rank its share); rank 0 logs
/// where they are.
fn validate(
    validator: Option<&Validator>,
    run: &Run,
    done: u64,
    log: &mut Option<RunLog>,
) -> Result<()> {
    let Some(v) = validator else { return Ok(()) };
    if let Some(record) = v.render(run, done, &run.cfg.run_dir())? {
        tracing::info!(
            step = done,
            grid = %record.validation.grid,
            s = record.validation.s,
            "validation images"
        );
        if let Some(m) = &record.measures {
            tracing::info!(
                step = done,
                correspondence_accuracy = m.correspondence_accuracy,
                chance = m.correspondence_chance,
                separation = m.separation,
                identity = m.identity,
                identity_refs_zeroed = m.identity_refs_zeroed,
                "held-out measures"
            );
        }
        if let Some(log) = log {
            log.validation(&record)?;
        }
    }
    Ok(())
}

/// Rank 0 takes the run folder and checks that the start loses nothing there
/// ([`crate::run_dir`]); every rank learns the verdict, so a refusal stops them all at once.
pub(crate) fn take_run_folder(
    cfg: &Config,
    dist: &Dist,
) -> Result<Option<crate::run_dir::Ownership>> {
    let verdict = (dist.rank() == 0).then(|| {
        let held = crate::run_dir::take(cfg, crate::run_dir::lease::LeaseTiming::default())?;
        crate::run_dir::prepare(cfg)?;
        Ok::<_, TrainerError>(held)
    });
    let refusal = match &verdict {
        Some(Err(e)) => flux::chain(e).into_bytes(),
        _ => Vec::new(),
    };
    let all = dist.call("run folder check", move |c| c.all_gather_bytes(&refusal))?;
    match verdict {
        Some(v) => v.map(Some),
        None if all[0].is_empty() => Ok(None),
        None => Err(DistError::Mismatch(format!(
            "rank 0 refused to start: {}",
            String::from_utf8_lossy(&all[0])
        ))
        .into()),
    }
}

/// Writes the resolved config as `config.toml` in the run folder.
pub(crate) fn write_resolved_config(cfg: &Config, run_dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(run_dir).map_err(|e| TrainerError::io(run_dir, e))?;
    let resolved = run_dir.join("config.toml");
    std::fs::write(&resolved, cfg.to_toml()?).map_err(|e| TrainerError::io(&resolved, e))
}

fn log_built(run: &Run, run_dir: &std::path::Path) -> Result<()> {
    if run.cfg.data.source == crate::config::DataSource::Synthetic && run.dist.rank() == 0 {
        tracing::warn!(
            "training on {} generated synthetic samples (data.source = \"synthetic\"), not on a dataset; for real data set data.source = \"shards\" and data.url",
            run.cfg.data.samples
        );
    }
    tracing::info!(
        run_dir = %run_dir.display(),
        lora_params = run.lora.num_params(),
        data = %run.data.describe(),
        buckets = run.plan.buckets.len(),
        fingerprint = %run.cfg.fingerprint()?,
        "run built"
    );
    if run.dist.rank() == 0 {
        run.cfg.loss.log_recipe();
    }
    Ok(())
}

fn log_step(m: &StepMetrics) {
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
