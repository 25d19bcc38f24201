//! Where a rank's micro-batches come from: a [`Source`] of [`Sample`]s in latent space.
//!
//! - `shards` ([`shards`]): SemAlign-MS shards (a folder or an object-store URL) read by the
//!   datasets crate, encoded here or read from a latent cache; a per-rank cursor.
//! - `synthetic` ([`synthetic`]): a small dataset generated in memory in latent space (no
//!   files, no encoders), batched globally ([`batches`]) so results do not depend on the
//!   number of ranks; the equivalence tests of data parallelism use it.

pub mod batches;
pub mod sample;
pub mod shards;
pub mod synthetic;

use std::path::Path;

use candle_core::Device;
use datasets::{Cursor, DataReport};
use flux::config::FluxConfig;

use crate::config::{Config, DataSource};
use crate::error::{Result, TrainerError};
use crate::objective::EmptyCaption;
pub use sample::{RefSample, Sample};
use shards::ShardFeed;
use synthetic::InMemory;

/// What the loop needs of a data source.
pub trait Source {
    /// For logs.
    fn describe(&self) -> String;
    /// This rank's next micro-batch of `batch` samples.
    fn next_micro_batch(&mut self, rank: usize, batch: usize) -> Result<Vec<Sample>>;
    /// The data report so far: samples read, skipped and why (None where nothing is read from
    /// files).
    fn report(&self) -> Option<DataReport>;
    /// The embeddings of the empty caption, which condition dropout feeds for a dropped
    /// caption (None when the source was built without them: no text dropout).
    fn empty_caption(&self) -> Option<&EmptyCaption>;
}

/// The run's source, as configured by `data.source`.
pub enum DataFeed {
    Synthetic(InMemory),
    Shards(Box<ShardFeed>),
}

impl DataFeed {
    pub fn build(
        cfg: &Config,
        fc: &FluxConfig,
        rank: usize,
        world: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(match cfg.data.source {
            DataSource::Synthetic => {
                if rank == 0 && !cfg.data.url.is_empty() {
                    // `source` defaults to the in-memory scenes: say so when a URL is set.
                    tracing::warn!(
                        url = %cfg.data.url,
                        "data.source = \"synthetic\": training on {} in-memory scenes, not on data.url (set data.source = \"shards\" to read it)",
                        cfg.data.samples
                    );
                }
                Self::Synthetic(InMemory::build(cfg, fc, world, device)?)
            }
            DataSource::Shards => {
                Self::Shards(Box::new(ShardFeed::build(cfg, fc, rank, world, device)?))
            }
        })
    }

    fn source(&self) -> &dyn Source {
        match self {
            Self::Synthetic(s) => s,
            Self::Shards(f) => f.as_ref(),
        }
    }

    /// For logs.
    pub fn describe(&self) -> String {
        self.source().describe()
    }

    /// This rank's next micro-batch of `batch` samples.
    pub fn next_micro_batch(&mut self, rank: usize, batch: usize) -> Result<Vec<Sample>> {
        match self {
            Self::Synthetic(s) => s.next_micro_batch(rank, batch),
            Self::Shards(f) => f.next_micro_batch(rank, batch),
        }
    }

    /// The embeddings of the empty caption, where the source has them.
    pub fn empty_caption(&self) -> Option<&EmptyCaption> {
        self.source().empty_caption()
    }

    /// This rank's data report so far (None for the synthetic source).
    pub fn report(&self) -> Option<DataReport> {
        self.source().report()
    }

    /// The in-memory samples of the synthetic source (tests change them).
    pub fn in_memory(&self) -> Option<&[Sample]> {
        match self {
            Self::Synthetic(s) => Some(&s.samples),
            Self::Shards(_) => None,
        }
    }

    pub fn in_memory_mut(&mut self) -> Option<&mut Vec<Sample>> {
        match self {
            Self::Synthetic(s) => Some(&mut s.samples),
            Self::Shards(_) => None,
        }
    }

    /// The synthetic source's global cursor (the default for shards).
    pub fn global_cursor(&self) -> Cursor {
        match self {
            Self::Synthetic(s) => s.batches.cursor(),
            Self::Shards(_) => Cursor::default(),
        }
    }

    /// This rank's shard cursor (None for the synthetic source).
    pub fn shard_cursor(&self) -> Option<Cursor> {
        match self {
            Self::Synthetic(_) => None,
            Self::Shards(f) => Some(f.cursor),
        }
    }

    /// Restores the synthetic source's global cursor.
    pub fn restore_global(&mut self, cursor: Cursor) {
        if let Self::Synthetic(s) = self {
            s.batches.restore(cursor);
        }
    }

    /// Restores this rank's shard position (see [`ShardFeed::restore`]).
    pub fn restore_shards(&mut self, cursors: &[Cursor], old_world: usize) {
        if let Self::Shards(f) = self {
            f.restore(cursors, old_world);
        }
    }

    /// Continues this rank's data report from a checkpoint's (`reports` by old rank). With
    /// fewer ranks than before, rank 0 also takes the reports of the ranks that are gone.
    pub fn restore_reports(&mut self, reports: &[DataReport], rank: usize, world: usize) {
        if let Self::Shards(f) = self {
            let mut mine = reports.get(rank).cloned().unwrap_or_default();
            if rank == 0 {
                for r in reports.iter().skip(world) {
                    mine.merge(r.clone());
                }
            }
            f.continue_report(mine);
        }
    }

    /// Writes this rank's data report as JSON into `dir` (shards only) and logs its summary.
    pub fn write_report_into(&self, dir: &Path, rank: usize) -> Result<()> {
        let Some(report) = self.report() else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        let path = dir.join(format!("data_report.rank{rank}.json"));
        let text = serde_json::to_string_pretty(&report).map_err(|e| TrainerError::Serialize {
            what: "the data report",
            source: Box::new(e),
        })?;
        std::fs::write(&path, text).map_err(|e| TrainerError::io(&path, e))?;
        tracing::info!(report = %path.display(), "data: {}", report.summary());
        Ok(())
    }
}
