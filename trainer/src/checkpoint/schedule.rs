//! When a run saves: every `checkpoint.every` steps, and once at the end (or at a stop) when
//! the last step is not saved yet. Every rank follows the schedule, because a save gathers
//! every rank's data report into the checkpoint (so reports add up across resumes); only rank
//! 0 writes (the weights are identical on every rank), in the background, so that the loop
//! waits only for the copy.

use datasets::DataReport;

use crate::config::Config;
use crate::data::DataFeed;
use crate::ddp::{Dist, DistError};
use crate::error::{Result, TrainerError};
use crate::optim::{AdamW, Ema};
use crate::storage::Location;

use super::{Progress, Snapshot, Trainables, Writer};

/// A run that checkpoints: LoRA training ([`crate::run::Run`]) or base pretraining.
pub trait Checkpointed {
    /// What a checkpoint records of the run besides its tensors.
    fn progress(&self) -> Progress<'_>;
    /// The trained variables, their optimizer and their EMA, if any.
    fn trained(&self) -> (Trainables<'_>, &AdamW, Option<&Ema>);

    fn dist(&self) -> &Dist {
        self.progress().dist
    }
    fn data(&self) -> &DataFeed {
        self.progress().data
    }

    /// Everything a checkpoint after `steps` completed steps holds, with every rank's data
    /// report, copied off the live state.
    fn snapshot(&self, steps: u64, reports: Vec<DataReport>) -> Result<Snapshot> {
        let (trainables, opt, ema) = self.trained();
        self.progress()
            .snapshot(steps, reports, &trainables, opt, ema)
    }
}

impl Checkpointed for crate::run::Run {
    fn progress(&self) -> Progress<'_> {
        Progress {
            cfg: &self.cfg,
            dist: &self.dist,
            data: &self.data,
            ledger: &self.ledger,
        }
    }
    fn trained(&self) -> (Trainables<'_>, &AdamW, Option<&Ema>) {
        (
            super::resume::lora_trainables(&self.lora),
            &self.opt,
            self.ema.as_ref(),
        )
    }
}

/// The saving schedule, on every rank.
pub struct Checkpointer {
    root: Location,
    every: u64,
    keep: usize,
    /// Rank 0's writer; None on the other ranks.
    writer: Option<Writer>,
    /// The run's last step (`train.max_steps`), which [`Self::finish`] saves.
    last: u64,
    /// Steps covered by the newest save (or the resumed checkpoint).
    saved_at: u64,
}

/// Every rank's data report, in rank order (empty where the source reads no files).
fn gather_reports(run: &impl Checkpointed) -> Result<Vec<DataReport>> {
    let mine = match run.data().report() {
        Some(r) => serde_json::to_vec(&r).map_err(|e| TrainerError::Serialize {
            what: "a data report",
            source: Box::new(e),
        })?,
        None => Vec::new(),
    };
    let all = run
        .dist()
        .call("data report all-gather", move |c| c.all_gather_bytes(&mine))?;
    if all.iter().all(Vec::is_empty) {
        return Ok(Vec::new());
    }
    all.iter()
        .enumerate()
        .map(|(rank, bytes)| {
            serde_json::from_slice(bytes).map_err(|e| {
                DistError::Mismatch(format!("the data report of rank {rank}: {e}")).into()
            })
        })
        .collect()
}

impl Checkpointer {
    /// The schedule of `cfg`, on rank `rank`, starting after `start_step` completed steps.
    pub fn new(cfg: &Config, rank: usize, start_step: u64) -> Result<Self> {
        Ok(Self {
            root: cfg.checkpoint_location()?,
            every: cfg.checkpoint.every,
            keep: cfg.checkpoint.keep,
            writer: (rank == 0).then(Writer::default),
            last: cfg.train.max_steps,
            saved_at: start_step,
        })
    }

    /// After `done` completed steps: saves when the period says so (not at the last step,
    /// which [`Self::finish`] saves).
    pub fn after_step(&mut self, run: &impl Checkpointed, done: u64) -> Result<()> {
        if self.every > 0 && done.is_multiple_of(self.every) && done < self.last {
            self.save(run, done)?;
        }
        Ok(())
    }

    /// At the end or at a stop: saves `done` steps unless already saved, and waits for every
    /// background write.
    pub fn finish(&mut self, run: &impl Checkpointed, done: u64) -> Result<()> {
        if done > self.saved_at {
            self.save(run, done)?;
        }
        match &mut self.writer {
            Some(w) => w.wait().map(|_| ()),
            None => Ok(()),
        }
    }

    fn save(&mut self, run: &impl Checkpointed, done: u64) -> Result<()> {
        let reports = gather_reports(run)?;
        if let Some(w) = &mut self.writer {
            w.save(self.root.clone(), run.snapshot(done, reports)?, self.keep)?;
        }
        self.saved_at = done;
        Ok(())
    }
}
