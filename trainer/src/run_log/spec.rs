//! The `[logging]` table.

use serde::{Deserialize, Serialize};

/// The `[logging]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSpec {
    /// Write TensorBoard event files under `RUN/tb/`: the step scalars and the validation
    /// grids.
    pub tensorboard: bool,
    /// Draw `RUN/metrics.png` (as `trainer plot`) when training ends.
    pub chart: bool,
}

impl Default for LoggingSpec {
    fn default() -> Self {
        Self {
            tensorboard: false,
            chart: true,
        }
    }
}
