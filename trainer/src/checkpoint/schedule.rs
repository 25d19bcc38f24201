//! When a run saves: every `checkpoint.every` steps, and once at the end (or at a stop) when
//! the last step is not saved yet. Only rank 0 saves (the weights are identical on every rank);
//! saves are written in the background so that the loop waits only for the copy.

use crate::error::Result;
use crate::run::Run;
use crate::storage::Location;

use super::Writer;

/// Rank 0's saving schedule.
pub struct Checkpointer {
    root: Location,
    every: u64,
    keep: usize,
    writer: Writer,
    /// Steps covered by the newest save (or the resumed checkpoint).
    saved_at: u64,
}

impl Checkpointer {
    /// The schedule of `run`'s config, starting after `run.start_step`.
    pub fn new(run: &Run) -> Result<Self> {
        Ok(Self {
            root: run.cfg.checkpoint_location()?,
            every: run.cfg.checkpoint.every,
            keep: run.cfg.checkpoint.keep,
            writer: Writer::default(),
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
        self.writer.wait().map(|_| ())
    }

    fn save(&mut self, run: &Run, done: u64) -> Result<()> {
        self.writer
            .save(self.root.clone(), run.snapshot(done)?, self.keep)?;
        self.saved_at = done;
        Ok(())
    }
}
