//! The denoising loop of FLUX sampling: from start latents at sigma 1 to clean latents at 0,
//! one transformer forward (two with classifier-free guidance) and one Euler step per step of
//! a [`FlowMatchSchedule`], with the references (clean, t = 0) and the LoRA on their tokens
//! exactly as in training.
//!
//! Equal to diffusers' FluxPipeline denoising loop on the same transformer, start latents and
//! prompt embeddings (tested at 1, 4 and 8 steps).

use candle_core::Tensor;

use crate::embed::text_ids;
use crate::error::{FluxError, Result};
use crate::lora::LoraView;
use crate::ref_cache::RefKvCache;
use crate::schedule::FlowMatchSchedule;
use crate::transformer::{Flux, ModelInputs};

/// Classifier-free guidance on the prompt (diffusers' FluxPipeline `true_cfg_scale` with a
/// `negative_prompt`): every step runs the model a second time with the negative prompt's
/// embeddings and moves along `neg + scale * (pos - neg)`. A base trained with caption dropout
/// (`data.drop_text`) learnt the empty caption as its unconditional branch, which is then the
/// negative prompt to use. The references, when there are any, condition both forwards; with
/// the reference cache each prompt keeps its own, since the references' modulation reads the
/// prompt's pooled embedding.
#[derive(Debug, Clone)]
pub struct PromptGuidance {
    /// The negative prompt's T5 embeddings [B, L, ctx] and CLIP pooled [B, pooled].
    pub txt: Tensor,
    pub pooled: Tensor,
    /// 1 gives the prompt's own velocity (and is not run); FLUX.1-dev's usual is 1.
    pub scale: f32,
}

/// Runs `schedule` from `inputs.img` (the start latents, [B, N, C]) with distilled guidance
/// `guidance`; returns the final latents. `inputs`' timesteps and guidance are set here.
///
/// With `ref_cache`, references attend only to themselves and their keys and values are
/// computed at the first step only ([`crate::ref_cache`]); without it they attend to every
/// token at every step, as in training.
pub fn denoise(
    model: &Flux,
    lora: LoraView,
    inputs: ModelInputs,
    schedule: &FlowMatchSchedule,
    guidance: f32,
    ref_cache: bool,
) -> Result<Denoised> {
    denoise_guided(model, lora, inputs, schedule, guidance, ref_cache, None)
}

/// [`denoise`], with classifier-free guidance on the prompt when `prompt_guidance` is given
/// with a scale other than 1.
pub fn denoise_guided(
    model: &Flux,
    lora: LoraView,
    mut inputs: ModelInputs,
    schedule: &FlowMatchSchedule,
    guidance: f32,
    ref_cache: bool,
    prompt_guidance: Option<&PromptGuidance>,
) -> Result<Denoised> {
    let b = inputs.img.dim(0)?;
    inputs.row_queries = None;
    inputs.guidance = vec![guidance; b];
    let fresh = || RefState {
        cache: None,
        bytes: 0,
        use_cache: ref_cache,
    };
    let mut negative = match prompt_guidance.filter(|g| g.scale != 1.0) {
        Some(g) => Some((negative_inputs(&inputs, g)?, g.scale as f64, fresh())),
        None => None,
    };
    let mut refs = fresh();
    for i in 0..schedule.steps() {
        let _span = tracing::debug_span!("denoise", step = i).entered();
        inputs.timestep = vec![schedule.model_timestep(i); b];
        let v = refs.velocity(model, lora, &mut inputs)?;
        let v = match negative.as_mut() {
            Some((neg, scale, neg_refs)) => {
                neg.img = inputs.img.clone();
                neg.timestep = inputs.timestep.clone();
                let v_neg = neg_refs.velocity(model, lora, neg)?;
                (&v_neg + ((v - &v_neg)? * *scale)?)?
            }
            None => v,
        };
        inputs.img = schedule.step(i, &inputs.img, &v)?;
    }
    let neg_bytes = negative.map_or(0, |(_, _, r)| r.bytes);
    Ok(Denoised {
        latents: inputs.img,
        ref_cache_bytes: refs.bytes + neg_bytes,
    })
}

/// The inputs of the negative prompt's forward: `inputs` with its text replaced.
fn negative_inputs(inputs: &ModelInputs, g: &PromptGuidance) -> Result<ModelInputs> {
    let (b, dim) = (inputs.txt.dim(0)?, inputs.txt.dim(2)?);
    if g.txt.rank() != 3 || g.txt.dim(0)? != b || g.txt.dim(2)? != dim {
        return Err(FluxError::Input {
            name: "negative prompt".into(),
            reason: format!(
                "embeddings {:?} do not match the prompt's {:?} (batch and width)",
                g.txt.dims(),
                inputs.txt.dims()
            ),
        });
    }
    if g.pooled.dims() != inputs.pooled.dims() {
        return Err(FluxError::Input {
            name: "negative prompt".into(),
            reason: format!(
                "pooled embedding {:?} does not match the prompt's {:?}",
                g.pooled.dims(),
                inputs.pooled.dims()
            ),
        });
    }
    let mut neg = inputs.clone();
    neg.txt = g.txt.to_dtype(inputs.txt.dtype())?;
    neg.pooled = g.pooled.to_dtype(inputs.pooled.dtype())?;
    neg.txt_ids = text_ids(g.txt.dim(1)?);
    Ok(neg)
}

/// The references' side of one prompt's forwards: with the cache, the first forward fills it
/// (and drops the references from its inputs) and every later one reads it.
struct RefState {
    cache: Option<RefKvCache>,
    bytes: usize,
    use_cache: bool,
}

impl RefState {
    fn velocity(
        &mut self,
        model: &Flux,
        lora: LoraView,
        inputs: &mut ModelInputs,
    ) -> Result<Tensor> {
        Ok(match self.cache.take() {
            Some(kept) => {
                let (out, kept) = model.forward_with_cache(inputs, lora, kept)?;
                self.cache = Some(kept);
                out.pred
            }
            None if self.use_cache && inputs.refs.is_some() => {
                let (out, kept) = model.forward_filling_cache(inputs, lora)?;
                inputs.refs = None;
                self.bytes = kept.bytes();
                self.cache = Some(kept);
                out.pred
            }
            None => model.forward(inputs, lora)?.pred,
        })
    }
}

/// What [`denoise`] gives.
pub struct Denoised {
    /// The final latents, [B, N, C].
    pub latents: Tensor,
    /// Bytes the reference cache held (0 without it).
    pub ref_cache_bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn inputs(b: usize, l: usize, ctx: usize, pooled: usize) -> ModelInputs {
        let dev = Device::Cpu;
        ModelInputs {
            img: Tensor::zeros((b, 4, 64), DType::F32, &dev).unwrap(),
            img_ids: crate::embed::grid_ids(2, 2, 0),
            txt: Tensor::zeros((b, l, ctx), DType::F32, &dev).unwrap(),
            txt_ids: text_ids(l),
            pooled: Tensor::zeros((b, pooled), DType::F32, &dev).unwrap(),
            timestep: vec![1.0; b],
            guidance: vec![1.0; b],
            refs: None,
            isolate_refs: false,
            row_queries: None,
        }
    }

    fn guidance(b: usize, l: usize, ctx: usize, pooled: usize) -> PromptGuidance {
        let g = inputs(b, l, ctx, pooled);
        PromptGuidance {
            txt: (g.txt + 1.0).unwrap(),
            pooled: (g.pooled + 1.0).unwrap(),
            scale: 3.0,
        }
    }

    #[test]
    fn the_negative_prompt_replaces_the_text_of_a_matching_shape() {
        let prompt = inputs(2, 8, 32, 16);
        // Another caption length is fine: the text ids follow it.
        let neg = negative_inputs(&prompt, &guidance(2, 5, 32, 16)).unwrap();
        assert_eq!(neg.txt.dims(), &[2, 5, 32]);
        assert_eq!(neg.txt_ids.len(), 5);
        let ones = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(ones(&neg.txt).iter().all(|v| *v == 1.0));
        assert!(ones(&neg.pooled).iter().all(|v| *v == 1.0));
        assert_eq!(neg.img_ids, prompt.img_ids);
        // Another batch, width or pooled width is refused, naming the negative prompt.
        for (g, what) in [
            (guidance(1, 8, 32, 16), "batch and width"),
            (guidance(2, 8, 16, 16), "batch and width"),
            (guidance(2, 8, 32, 8), "pooled embedding"),
        ] {
            let e = negative_inputs(&prompt, &g).err().unwrap().to_string();
            assert!(e.contains("negative prompt") && e.contains(what), "{e}");
        }
    }
}
