//! A run's state in and out of checkpoints: the snapshot a save copies off the live state, and
//! resuming (rank 0 finds and verifies the checkpoint, every rank receives rank 0's state).

use candle_core::{Tensor, Var};

use super::{Loaded, Snapshot, State};
use crate::ddp::consistency::{broadcast_from_rank0, check_lora};
use crate::ddp::DistError;
use crate::error::{Result, TrainerError};
use crate::run::Run;

/// Where a resumed run comes from.
struct ResumeHeader {
    state: State,
    dir: String,
}

impl Run {
    /// Everything a checkpoint after `steps` completed steps holds, copied off the live state.
    pub fn snapshot(
        &self,
        steps: u64,
        data_reports: Vec<datasets::DataReport>,
    ) -> Result<Snapshot> {
        let named = self.lora.named_vars();
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let lora = super::detached(named.iter().map(|(n, v)| (n.clone(), v.as_tensor())))?;
        let mut moments = super::detached(
            names
                .iter()
                .zip(&self.opt.m)
                .map(|(n, t)| (format!("{n}.exp_avg"), t)),
        )?;
        moments.extend(super::detached(
            names
                .iter()
                .zip(&self.opt.v)
                .map(|(n, t)| (format!("{n}.exp_avg_sq"), t)),
        )?);
        let mut files = vec![(super::LORA_FILE, lora), (super::OPTIMIZER_FILE, moments)];
        if let Some(ema) = &self.ema {
            files.push((
                super::EMA_FILE,
                super::detached(names.iter().cloned().zip(&ema.shadow))?,
            ));
        }
        Ok(Snapshot {
            state: State {
                format: super::FORMAT,
                step: steps,
                cursor: self.data.global_cursor(),
                data_cursors: self.data_cursors.clone(),
                world_size: self.dist.world_size(),
                global_batch: self.cfg.train.batch_size * self.dist.world_size(),
                fingerprint: self.cfg.fingerprint()?,
                seed: self.cfg.run.seed,
                rng: super::RNG_SCHEME.into(),
                adam_t: self.opt.t,
                skipped: self.skipped,
                files: Default::default(),
                lineage: self.lineage.clone(),
                data_reports,
            },
            config_toml: self.cfg.to_toml()?,
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
            Some(super::load_folder(&c.resume_from)?)
        } else {
            super::latest_valid(&self.cfg.checkpoint_location()?)?
        };
        if let Some(l) = &loaded {
            let current = self.cfg.to_toml()?;
            let diff = super::config_differences(&l.config_toml, &current);
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
        let header = match &loaded {
            Some(l) => {
                serde_json::to_vec(&(l.dir.display().to_string(), &l.state)).map_err(|e| {
                    TrainerError::Serialize {
                        what: "the checkpoint header",
                        source: Box::new(e),
                    }
                })?
            }
            None => Vec::new(),
        };
        let all = self.dist.call("resume header all-gather", move |c| {
            c.all_gather_bytes(&header)
        })?;
        if all[0].is_empty() {
            return Ok(None);
        }
        let (dir, state): (String, State) = serde_json::from_slice(&all[0])
            .map_err(|e| DistError::Mismatch(format!("resume header from rank 0: {e}")))?;
        let header = ResumeHeader { state, dir };
        self.apply(&header, loaded.as_ref())?;
        Ok(Some(header.dir))
    }

    /// Sets LoRA, optimizer, EMA, step and data position from rank 0's checkpoint.
    fn apply(&mut self, h: &ResumeHeader, loaded: Option<&Loaded>) -> Result<()> {
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
            broadcast_from_rank0(&self.dist, "LoRA broadcast", &local)
        };
        let live: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        for (v, t) in vars.iter().zip(pick(super::LORA_FILE, "", &live)?) {
            v.set(&t)?;
        }
        let m = pick(super::OPTIMIZER_FILE, ".exp_avg", &self.opt.m)?;
        let v = pick(super::OPTIMIZER_FILE, ".exp_avg_sq", &self.opt.v)?;
        let ema = match &self.ema {
            Some(e) => Some(pick(super::EMA_FILE, "", &e.shadow)?),
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
            .restore_shards(&h.state.data_cursors, h.state.world_size);
        self.data
            .restore_reports(&h.state.data_reports, self.dist.rank(), world);
        self.data_cursors = h.state.data_cursors.clone();
        self.start_step = h.state.step;
        self.skipped = h.state.skipped;
        self.lineage = h.state.lineage.clone();
        check_lora(&self.dist, &self.lora, "after resuming")?;
        tracing::info!(from = %h.dir, step = h.state.step, "resumed");
        Ok(())
    }
}
