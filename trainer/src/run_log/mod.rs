//! What rank 0 logs as a run goes: `metrics.jsonl` (every step, every validation), TensorBoard
//! event files when `[logging] tensorboard = true`, and the curves' chart (`metrics.png`) at
//! the end when `[logging] chart = true`.

use std::path::{Path, PathBuf};

use crate::error::{Result, TrainerError};
use crate::metrics::{MetricsLog, StepMetrics};
use crate::tensorboard::{step_scalars, EventWriter};
use crate::validation::ValidationRecord;
pub use spec::LoggingSpec;

pub mod spec;

pub struct RunLog {
    metrics: MetricsLog,
    tb: Option<EventWriter>,
    chart: bool,
    run_dir: PathBuf,
}

impl RunLog {
    /// The logs of a new run, or of one resumed after `start_step` steps (metrics.jsonl keeps
    /// its lines up to that step; TensorBoard drops later ones).
    pub fn open(
        spec: &LoggingSpec,
        run_dir: &Path,
        resumed: bool,
        start_step: u64,
    ) -> Result<Self> {
        let metrics = MetricsLog::open(&run_dir.join("metrics.jsonl"), resumed, start_step)?;
        let tb = spec
            .tensorboard
            .then(|| EventWriter::create(&run_dir.join("tb"), start_step + 1))
            .transpose()?;
        Ok(Self {
            metrics,
            tb,
            chart: spec.chart,
            run_dir: run_dir.to_path_buf(),
        })
    }

    pub fn step(&mut self, m: &StepMetrics) -> Result<()> {
        self.metrics.write(m)?;
        if let Some(tb) = &mut self.tb {
            tb.scalars(m.step, &step_scalars(m))?;
        }
        Ok(())
    }

    /// A validation's line, and its grid as a TensorBoard image.
    pub fn validation(&mut self, record: &ValidationRecord) -> Result<()> {
        self.metrics.write(record)?;
        if let Some(tb) = &mut self.tb {
            let path = self.run_dir.join(&record.validation.grid);
            let png = std::fs::read(&path).map_err(|e| TrainerError::io(&path, e))?;
            let (w, h) =
                image::image_dimensions(&path).map_err(|e| TrainerError::read(&path, e))?;
            tb.image(record.step, "validation/grid", png, w, h)?;
            tb.scalars(record.step, &[("validation/seconds", record.validation.s)])?;
            if let Some(m) = &record.measures {
                tb.scalars(record.step, &measure_scalars(m))?;
            }
        }
        Ok(())
    }

    /// At the end of training: the chart, when asked for. A chart that cannot be drawn is
    /// a warning, not a failed run.
    pub fn finish(&self) {
        if !self.chart {
            return;
        }
        let out = self.run_dir.join("metrics.png");
        match crate::charts::plot_run(&self.run_dir, &out) {
            Ok(()) => {
                tracing::info!(chart = %out.display(), "loss chart (trainer plot draws it again)")
            }
            Err(e) => tracing::warn!("no loss chart: {}", flux::chain(&e)),
        }
    }
}

/// The held-out measures as TensorBoard scalars.
fn measure_scalars(m: &crate::measures::Measures) -> Vec<(&'static str, f64)> {
    vec![
        (
            "measures/correspondence_accuracy",
            m.correspondence_accuracy,
        ),
        ("measures/correspondence_chance", m.correspondence_chance),
        ("measures/separation", m.separation),
        ("measures/separation_chance", m.separation_chance),
        ("measures/identity", m.identity),
        ("measures/identity_refs_zeroed", m.identity_refs_zeroed),
    ]
}
