//! Which checkpoints a run keeps after each save (`checkpoint.keep`).
//!
//! - Only checkpoints of the run's own lineage count and are ever deleted; another run's (a
//!   shared checkpoint folder, an earlier run kept beside this one) are left alone.
//! - A checkpoint counts only once it verifies (every file against the sha256 in its
//!   state.json). One that does not is quarantined, renamed `corrupt-step-N`, never deleted,
//!   so a damaged newest checkpoint can no longer push the last good one out.
//! - Verification reads each checkpoint once per process: a verified one is remembered.
//!
//! So the newest `keep` good checkpoints of the lineage stay, and with them always the newest
//! one that verifies.

use std::collections::HashSet;

use super::{list, peek_state, set_aside, verify};
use crate::error::Result;
use crate::storage::Location;

/// Retention's memory of the checkpoints it has verified.
#[derive(Debug, Default)]
pub struct Retention {
    verified: HashSet<String>,
}

fn quarantine(root: &Location, name: &str, why: &str) -> Result<String> {
    set_aside(root, name, "corrupt", why)
}

impl Retention {
    /// Keeps the newest `keep` (at least 1) verified checkpoints of `lineage` under `root`,
    /// deletes its older ones and quarantines its damaged ones.
    pub fn apply(&mut self, root: &Location, lineage: &str, keep: usize) -> Result<()> {
        let mut kept = 0;
        for (_, name) in list(root)? {
            // A folder without a readable state.json is damage of unknown lineage: set aside
            // rather than counted or deleted.
            let Some(state) = peek_state(root, &name) else {
                quarantine(root, &name, "its state.json cannot be read")?;
                continue;
            };
            if state.lineage != lineage {
                continue;
            }
            if !self.verified.contains(&name) {
                if let Err(e) = verify(root, &name) {
                    quarantine(root, &name, &flux::chain(&e))?;
                    continue;
                }
                self.verified.insert(name.clone());
            }
            kept += 1;
            if kept > keep.max(1) {
                let removed = match root {
                    Location::Local(dir) => std::fs::remove_dir_all(dir.join(&name))
                        .map_err(|e| crate::error::TrainerError::io(&dir.join(&name), e)),
                    Location::Remote(r) => r.delete_dir(&name).map_err(Into::into),
                };
                match removed {
                    Ok(()) => {
                        self.verified.remove(&name);
                    }
                    Err(e) => {
                        tracing::warn!(error = %flux::chain(&e), "could not remove an old checkpoint")
                    }
                }
            }
        }
        Ok(())
    }
}
