//! One JSON object per optimizer step in `metrics.jsonl`, flushed as written; validations add
//! their own lines (`{"step", "validation": {...}}`, no `loss`).

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::error::{Result, TrainerError};

#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub loss_diff: f64,
    pub loss_scal: f64,
    pub loss_mdl: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub s_per_step: f64,
    pub tokens_per_s: f64,
    /// The update was skipped because the loss or gradient was not finite.
    pub skipped: bool,
}

pub struct MetricsLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl MetricsLog {
    /// The log of a new run (`resumed` false) or of a resumed one continuing after `step`.
    pub fn open(path: &Path, resumed: bool, step: u64) -> Result<Self> {
        if resumed {
            Self::resume(path, step)
        } else {
            Self::create(path)
        }
    }

    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path).map_err(|e| TrainerError::io(path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Continues the log of a run resumed after `step` steps: lines of later steps (written
    /// after that checkpoint by the interrupted run) are dropped, the rest kept.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let old = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(TrainerError::io(path, e)),
        };
        let kept: String = old
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, kept).map_err(|e| TrainerError::io(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainerError::io(path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `m` (a step's metrics, or another record with a `step`) as one line.
    pub fn write<T: Serialize>(&mut self, m: &T) -> Result<()> {
        let line = serde_json::to_string(m).map_err(|e| TrainerError::Serialize {
            what: "a metrics line",
            source: Box::new(e),
        })?;
        writeln!(self.file, "{line}").map_err(|e| TrainerError::io(&self.path, e))?;
        self.file
            .flush()
            .map_err(|e| TrainerError::io(&self.path, e))
    }
}
