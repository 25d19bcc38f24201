//! The process-wide choice between the fused kernels (the default: `kernels::fused` row ops,
//! the fused attention softmax on CUDA, the in-place optimizer kernels) and the composed candle
//! ops they are tested against. The trainer sets it from `model.kernels` when it builds a run;
//! "composed" is the escape hatch when a kernel is suspected, and the bench's comparison.
//! Process-wide because one process trains one model, and the ops are reached from places
//! (autograd backward, the optimizer) that have no model handle.

use std::sync::atomic::{AtomicBool, Ordering};

static COMPOSED: AtomicBool = AtomicBool::new(false);

/// Use the fused kernels (`true`, the default) or the composed ops.
pub fn set_enabled(fused: bool) {
    COMPOSED.store(!fused, Ordering::Relaxed);
}

/// Whether the fused kernels are in use.
pub fn enabled() -> bool {
    !COMPOSED.load(Ordering::Relaxed)
}
