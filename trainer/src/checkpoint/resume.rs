//! A run's state in and out of checkpoints: the snapshot a save copies off the live state, and
//! resuming (rank 0 finds and verifies the checkpoint, every rank receives rank 0's state).
//! Shared by LoRA training ([`Run`]) and base pretraining (`crate::pretrain`), which differ
//! only in what their variables are ([`Trainables`]).

use candle_core::{Tensor, Var};

use super::{Loaded, Snapshot, State};
use crate::config::Config;
use crate::data::DataFeed;
use crate::ddp::consistency::{broadcast_from_rank0, check_lora};
use crate::ddp::{Dist, DistError};
use crate::error::{Result, TrainerError};
use crate::optim::{AdamW, Ema};
use crate::run::Run;
use flux::Lora;

/// The variables a run trains (a LoRA's, or every tensor of a base), by the names the
/// checkpoint stores them under in `file`; their AdamW moments go to `optimizer.safetensors`
/// as `<name>.exp_avg` and `<name>.exp_avg_sq`, their EMA shadows to `ema.safetensors`.
pub struct Trainables<'a> {
    pub file: &'static str,
    pub named: Vec<(String, &'a Var)>,
}

type Files = Vec<(&'static str, Vec<(String, Tensor)>)>;

impl Trainables<'_> {
    /// The checkpoint files of the variables, their moments and EMA shadows, copied off the
    /// live state.
    fn files(&self, opt: &AdamW, ema: Option<&Ema>) -> Result<Files> {
        let names: Vec<&String> = self.named.iter().map(|(n, _)| n).collect();
        let values = super::detached(self.named.iter().map(|(n, v)| (n.clone(), v.as_tensor())))?;
        let suffixed = |suffix: &str, ts: &[Tensor]| {
            super::detached(
                names
                    .iter()
                    .zip(ts)
                    .map(|(n, t)| (format!("{n}{suffix}"), t)),
            )
        };
        let mut moments = suffixed(".exp_avg", &opt.m)?;
        moments.extend(suffixed(".exp_avg_sq", &opt.v)?);
        let mut files = vec![(self.file, values), (super::OPTIMIZER_FILE, moments)];
        if let Some(ema) = ema {
            files.push((super::EMA_FILE, suffixed("", &ema.shadow)?));
        }
        Ok(files)
    }

    /// Sets the variables, moments and shadows to rank 0's checkpoint: rank 0 reads them from
    /// `loaded`, every other rank receives them.
    fn restore(
        &self,
        dist: &Dist,
        loaded: Option<&Loaded>,
        opt: &mut AdamW,
        ema: Option<&mut Ema>,
        adam_t: u64,
    ) -> Result<()> {
        let pick = |file: &str, suffix: &str, live: &[Tensor]| -> Result<Vec<Tensor>> {
            let local = match loaded {
                Some(l) => self
                    .named
                    .iter()
                    .zip(live)
                    .map(|((n, _), like)| l.tensor(file, &format!("{n}{suffix}"), like))
                    .collect::<Result<Vec<_>>>()?,
                None => live.to_vec(),
            };
            broadcast_from_rank0(dist, "checkpoint broadcast", &local)
        };
        let live: Vec<Tensor> = self
            .named
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        for ((_, v), t) in self.named.iter().zip(pick(self.file, "", &live)?) {
            v.set(&t)?;
        }
        let m = pick(super::OPTIMIZER_FILE, ".exp_avg", &opt.m)?;
        let v = pick(super::OPTIMIZER_FILE, ".exp_avg_sq", &opt.v)?;
        if let Some(e) = ema {
            e.shadow = pick(super::EMA_FILE, "", &e.shadow)?;
        }
        opt.m = m;
        opt.v = v;
        opt.t = adam_t;
        Ok(())
    }
}

/// Where a run is, besides its tensors and data feed: what a checkpoint records with them and
/// a resume restores.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// Every rank's shard position after the last step (agreed with the step's all-reduce).
    pub data_cursors: Vec<datasets::Cursor>,
    /// The first step to run (after a resume, the checkpoint's step).
    pub start_step: u64,
    /// Updates skipped for non-finite losses, over the whole run.
    pub skipped: u64,
    /// The run's lineage ([`State::lineage`]): fresh at a start, the checkpoint's after a
    /// resume.
    pub lineage: String,
}

impl Ledger {
    /// A run starting from scratch.
    pub fn fresh() -> Self {
        Self {
            data_cursors: Vec::new(),
            start_step: 0,
            skipped: 0,
            lineage: format!(
                "{:016x}{:08x}",
                rand::random::<u64>(),
                crate::run_dir::holder::now_s() as u32
            ),
        }
    }

    fn of(state: &State) -> Self {
        Self {
            data_cursors: state.data_cursors.clone(),
            start_step: state.step,
            skipped: state.skipped,
            lineage: state.lineage.clone(),
        }
    }
}

/// What a checkpoint records of a run besides its tensors.
pub struct Progress<'a> {
    pub cfg: &'a Config,
    pub dist: &'a Dist,
    pub data: &'a DataFeed,
    pub ledger: &'a Ledger,
}

impl Progress<'_> {
    /// The checkpoint after `steps` completed steps of `trainables`, optimizer `opt` and `ema`,
    /// with every rank's data report.
    pub fn snapshot(
        &self,
        steps: u64,
        data_reports: Vec<datasets::DataReport>,
        trainables: &Trainables<'_>,
        opt: &AdamW,
        ema: Option<&Ema>,
    ) -> Result<Snapshot> {
        Ok(Snapshot {
            state: State {
                format: super::FORMAT,
                step: steps,
                cursor: self.data.global_cursor(),
                data_cursors: self.ledger.data_cursors.clone(),
                world_size: self.dist.world_size(),
                global_batch: self.cfg.train.batch_size * self.dist.world_size(),
                fingerprint: self.cfg.fingerprint()?,
                seed: self.cfg.run.seed,
                rng: super::RNG_SCHEME.into(),
                adam_t: opt.t,
                skipped: self.ledger.skipped,
                files: Default::default(),
                lineage: self.ledger.lineage.clone(),
                data_reports,
            },
            config_toml: self.cfg.to_toml()?,
            files: trainables.files(opt, ema)?,
        })
    }
}

/// The checkpoint a run resumes from: its folder and state on every rank, its files on rank 0.
pub struct Found {
    pub dir: String,
    pub state: State,
    pub loaded: Option<Loaded>,
}

impl Found {
    /// Sets `trainables`, `opt` and `ema` to the checkpoint's, and puts `data` where its run
    /// was; returns the run's ledger.
    pub fn restore(
        &self,
        cfg: &Config,
        dist: &Dist,
        trainables: &Trainables<'_>,
        opt: &mut AdamW,
        ema: Option<&mut Ema>,
        data: &mut DataFeed,
    ) -> Result<Ledger> {
        let h = &self.state;
        trainables.restore(dist, self.loaded.as_ref(), opt, ema, h.adam_t)?;
        let world = dist.world_size();
        let global = cfg.train.batch_size * world;
        let mut cursor = h.cursor;
        if h.global_batch != global {
            // Another world size (or batch size): keep the epoch and about the number of its
            // samples already consumed; not bit-identical to any uninterrupted run.
            let consumed = cursor.batch * h.global_batch;
            cursor.batch = consumed.div_ceil(global);
            tracing::warn!(
                was = h.world_size,
                now = world,
                epoch = cursor.epoch,
                "resuming with another global batch ({} -> {global} samples): the data order continues approximately",
                h.global_batch
            );
        }
        data.restore_global(cursor);
        data.restore_shards(&h.data_cursors, h.world_size);
        data.restore_reports(&h.data_reports, dist.rank(), world);
        tracing::info!(from = %self.dir, step = h.step, "resumed");
        Ok(Ledger::of(h))
    }
}

/// The checkpoint to continue from, as `cfg` says (`checkpoint.resume`, `resume_from`): rank 0
/// finds it, verifies it and checks that it was written with this config; every rank learns
/// its folder and state (which also stops a rank that could not load from racing ahead alone).
pub fn find(cfg: &Config, dist: &Dist) -> Result<Option<Found>> {
    let c = &cfg.checkpoint;
    let loaded = if dist.rank() != 0 || (!c.resume && c.resume_from.is_empty()) {
        None
    } else if !c.resume_from.is_empty() {
        Some(super::load_folder(&c.resume_from)?)
    } else {
        super::latest_valid(&cfg.checkpoint_location()?)?
    };
    if let Some(l) = &loaded {
        let diff = super::config_differences(&l.config_toml, &cfg.to_toml()?);
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
    let header = match &loaded {
        Some(l) => serde_json::to_vec(&(l.dir.display().to_string(), &l.state)).map_err(|e| {
            TrainerError::Serialize {
                what: "the checkpoint header",
                source: Box::new(e),
            }
        })?,
        None => Vec::new(),
    };
    let all = dist.call("resume header all-gather", move |c| {
        c.all_gather_bytes(&header)
    })?;
    if all[0].is_empty() {
        return Ok(None);
    }
    let (dir, state): (String, State) = serde_json::from_slice(&all[0])
        .map_err(|e| DistError::Mismatch(format!("resume header from rank 0: {e}")))?;
    Ok(Some(Found { dir, state, loaded }))
}

/// A LoRA's variables as a checkpoint stores them: in `lora.safetensors`.
pub(super) fn lora_trainables(lora: &Lora) -> Trainables<'_> {
    Trainables {
        file: super::LORA_FILE,
        named: lora.named_vars(),
    }
}

impl Run {
    /// Continues from a checkpoint, as configured (`checkpoint.resume`, `resume_from`): rank 0
    /// finds and verifies it, every rank gets rank 0's state. Returns the folder resumed from.
    pub fn resume(&mut self) -> Result<Option<String>> {
        let Some(found) = find(&self.cfg, &self.dist)? else {
            return Ok(None);
        };
        self.ledger = found.restore(
            &self.cfg,
            &self.dist,
            &lora_trainables(&self.lora),
            &mut self.opt,
            self.ema.as_mut(),
            &mut self.data,
        )?;
        check_lora(&self.dist, &self.lora, "after resuming")?;
        Ok(Some(found.dir))
    }
}
