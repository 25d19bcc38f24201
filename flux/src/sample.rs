//! The denoising loop of FLUX sampling: from start latents at sigma 1 to clean latents at 0,
//! one transformer forward and one Euler step per step of a [`FlowMatchSchedule`], with the
//! references (clean, t = 0) and the LoRA on their tokens exactly as in training.
//!
//! Equal to diffusers' FluxPipeline denoising loop on the same transformer, start latents and
//! prompt embeddings (tested at 1, 4 and 8 steps).

use candle_core::Tensor;

use crate::error::Result;
use crate::lora::LoraView;
use crate::ref_cache::RefKvCache;
use crate::schedule::FlowMatchSchedule;
use crate::transformer::{Flux, ModelInputs};

/// Runs `schedule` from `inputs.img` (the start latents, [B, N, C]) with distilled guidance
/// `guidance`; returns the final latents. `inputs`' timesteps and guidance are set here.
///
/// With `ref_cache`, references attend only to themselves and their keys and values are
/// computed at the first step only ([`crate::ref_cache`]); without it they attend to every
/// token at every step, as in training.
pub fn denoise(
    model: &Flux,
    lora: LoraView,
    mut inputs: ModelInputs,
    schedule: &FlowMatchSchedule,
    guidance: f32,
    ref_cache: bool,
) -> Result<Denoised> {
    let b = inputs.img.dim(0)?;
    inputs.row_queries = None;
    inputs.guidance = vec![guidance; b];
    let mut cache: Option<RefKvCache> = None;
    let mut ref_cache_bytes = 0;
    for i in 0..schedule.steps() {
        let _span = tracing::debug_span!("denoise", step = i).entered();
        inputs.timestep = vec![schedule.model_timestep(i); b];
        let v = match cache.take() {
            Some(kept) => {
                let (out, kept) = model.forward_with_cache(&inputs, lora, kept)?;
                cache = Some(kept);
                out.pred
            }
            None if ref_cache && inputs.refs.is_some() => {
                let (out, kept) = model.forward_filling_cache(&inputs, lora)?;
                inputs.refs = None;
                ref_cache_bytes = kept.bytes();
                cache = Some(kept);
                out.pred
            }
            None => model.forward(&inputs, lora)?.pred,
        };
        inputs.img = schedule.step(i, &inputs.img, &v)?;
    }
    Ok(Denoised {
        latents: inputs.img,
        ref_cache_bytes,
    })
}

/// What [`denoise`] gives.
pub struct Denoised {
    /// The final latents, [B, N, C].
    pub latents: Tensor,
    /// Bytes the reference cache held (0 without it).
    pub ref_cache_bytes: usize,
}
