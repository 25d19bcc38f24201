//! When a run saves: every `checkpoint.every` steps, and once at the end (or at a stop) when
//! the last step is not saved yet. Every rank follows the schedule, because a save gathers
//! every rank's data report into the checkpoint (so reports add up across resumes); only rank
//! 0 writes (the weights are identical on every rank), in the background, so that the loop
//! waits only for the copy.

use datasets::DataReport;

use crate::ddp::DistError;
use crate::error::{Result, TrainerError};
use crate::run::Run;
use crate::storage::Location;

use super::Writer;

/// The saving schedule, on every rank.
pub struct Checkpointer {
    root: Location,
    every: u64,
    keep: usize,
    /// Rank 0's writer; None on the other ranks.
    writer: Option<Writer>,
    /// Steps covered by the newest save (or the resumed checkpoint).
    saved_at: u64,
}

/// Every rank's data report, in rank order (empty where the source reads no files).
fn gather_reports(run: &Run) -> Result<Vec<DataReport>> {
    let mine = match run.data.report() {
        Some(r) => serde_json::to_vec(&r).map_err(|e| TrainerError::Serialize {
            what: "a data report",
            source: Box::new(e),
        })?,
        None => Vec::new(),
    };
    let all = run
        .dist
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
    /// The schedule of `run`'s config, starting after `run.start_step`.
    pub fn new(run: &Run) -> Result<Self> {
        Ok(Self {
            root: run.cfg.checkpoint_location()?,
            every: run.cfg.checkpoint.every,
            keep: run.cfg.checkpoint.keep,
            writer: (run.dist.rank() == 0).then(Writer::default),
            saved_at: run.start_step,
        })
    }

    /// After `done` completed steps: saves when the period says so (not at the last step,
    /// which [`Self::finish`] saves).
    pub fn after_step(&mut self, run: &Run, done: u64) -> Result<()> {
        let last = run.cfg.train.max_steps;
        if self.every > 0 && done.is_multiple_of(self.every) && done < last {
            self.save(run, done)?;
        }
        Ok(())
    }

    /// At the end or at a stop: saves `done` steps unless already saved, and waits for every
    /// background write.
    pub fn finish(&mut self, run: &Run, done: u64) -> Result<()> {
        if done > self.saved_at {
            self.save(run, done)?;
        }
        match &mut self.writer {
            Some(w) => w.wait().map(|_| ()),
            None => Ok(()),
        }
    }

    fn save(&mut self, run: &Run, done: u64) -> Result<()> {
        let reports = gather_reports(run)?;
        if let Some(w) = &mut self.writer {
            w.save(self.root.clone(), run.snapshot(done, reports)?, self.keep)?;
        }
        self.saved_at = done;
        Ok(())
    }
}
