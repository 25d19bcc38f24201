//! The denoising loop of FLUX sampling: from start latents at sigma 1 to clean latents at 0,
//! one transformer forward and one Euler step per step of a [`FlowMatchSchedule`], with the
//! references (clean, t = 0) and the LoRA on their tokens exactly as in training.
//!
//! Equal to diffusers' FluxPipeline denoising loop on the same transformer, start latents and
//! prompt embeddings (tested at 1, 4 and 8 steps).

use candle_core::Tensor;

use crate::error::Result;
use crate::lora::LoraView;
use crate::schedule::FlowMatchSchedule;
use crate::transformer::{Flux, ModelInputs};

/// Runs `schedule` from `inputs.img` (the start latents, [B, N, C]) with distilled guidance
/// `guidance`; returns the final latents. `inputs`' timesteps and guidance are set here.
pub fn denoise(
    model: &Flux,
    lora: LoraView,
    mut inputs: ModelInputs,
    schedule: &FlowMatchSchedule,
    guidance: f32,
) -> Result<Tensor> {
    let b = inputs.img.dim(0)?;
    inputs.row_queries = None;
    inputs.guidance = vec![guidance; b];
    for i in 0..schedule.steps() {
        let _span = tracing::debug_span!("denoise", step = i).entered();
        inputs.timestep = vec![schedule.model_timestep(i); b];
        let v = model.forward(&inputs, lora)?.pred;
        inputs.img = schedule.step(i, &inputs.img, &v)?;
    }
    Ok(inputs.img)
}
