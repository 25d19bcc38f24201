//! The reference K/V cache of sampling (the official inference's `kv_cache` mode).
//!
//! References are clean (t = 0) at every denoising step. If they also attend only to
//! themselves (not to text, target or other references), their tokens never change from one
//! step to the next: each block's reference keys (after RoPE) and values can be computed once,
//! at the first step, and read back at every later one, where only text and target tokens run
//! through the blocks. Text and target still attend to the references, as in training.
//!
//! Without the cache, references attend to text and target as in training, so their keys and
//! values change with the target at every step and the whole sequence runs every time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::Tensor;

use crate::error::{FluxError, Result};

/// Each block's reference keys (after RoPE) and values, [B, H, M, hd], in block order.
pub struct RefKvCache {
    blocks: Vec<(Tensor, Tensor)>,
    /// Tokens of each reference, in order.
    lens: Vec<usize>,
}

impl RefKvCache {
    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Reference tokens held per block.
    pub fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// What a forward does with the reference keys and values (one per forward, in `BlockCtx`).
#[derive(Default)]
pub enum RefKv {
    /// References attend to every token (training, uncached sampling).
    #[default]
    Off,
    /// First cached step: each reference attends only to its own tokens; every block keeps
    /// its reference keys and values.
    Fill {
        lens: Vec<usize>,
        kept: Mutex<Vec<(Tensor, Tensor)>>,
    },
    /// Later cached steps: no reference tokens run; text and target attend to the kept keys
    /// and values of block `next`.
    Read {
        cache: RefKvCache,
        next: AtomicUsize,
    },
}

fn poisoned() -> FluxError {
    FluxError::Input {
        name: "reference cache".into(),
        reason: "a block panicked while filling it".into(),
    }
}

impl RefKv {
    pub fn fill(lens: &[usize]) -> Self {
        RefKv::Fill {
            lens: lens.to_vec(),
            kept: Mutex::new(Vec::new()),
        }
    }

    pub fn read(cache: RefKvCache) -> Self {
        RefKv::Read {
            cache,
            next: AtomicUsize::new(0),
        }
    }

    /// The cache a `Fill` forward made, checked to hold one entry per block.
    pub fn into_cache(self, blocks: usize) -> Result<RefKvCache> {
        match self {
            RefKv::Fill { lens, kept } => {
                let blocks_kept = kept.into_inner().map_err(|_| poisoned())?;
                if blocks_kept.len() != blocks {
                    return Err(FluxError::Input {
                        name: "reference cache".into(),
                        reason: format!("{} blocks kept of {blocks}", blocks_kept.len()),
                    });
                }
                Ok(RefKvCache {
                    blocks: blocks_kept,
                    lens,
                })
            }
            _ => Err(FluxError::Input {
                name: "reference cache".into(),
                reason: "the forward did not fill a cache".into(),
            }),
        }
    }

    /// Checks a `Read` forward used every block's entry once; gives the cache back.
    pub fn into_read_cache(self) -> Result<RefKvCache> {
        match self {
            RefKv::Read { cache, next } => {
                let used = next.into_inner();
                if used != cache.blocks.len() {
                    return Err(FluxError::Input {
                        name: "reference cache".into(),
                        reason: format!("{used} blocks read of {}", cache.blocks.len()),
                    });
                }
                Ok(cache)
            }
            _ => Err(FluxError::Input {
                name: "reference cache".into(),
                reason: "the forward did not read a cache".into(),
            }),
        }
    }

    /// The next block's kept keys and values (a `Read` forward).
    pub(crate) fn next_read(&self) -> Result<Option<(Tensor, Tensor)>> {
        match self {
            RefKv::Read { cache, next } => {
                let i = next.fetch_add(1, Ordering::SeqCst);
                cache
                    .blocks
                    .get(i)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| FluxError::Input {
                        name: "reference cache".into(),
                        reason: format!("holds {} blocks, block {i} asked", cache.blocks.len()),
                    })
            }
            _ => Ok(None),
        }
    }

    /// Keeps one block's reference keys and values (a `Fill` forward).
    pub(crate) fn keep(&self, k: Tensor, v: Tensor) -> Result<()> {
        if let RefKv::Fill { kept, .. } = self {
            kept.lock().map_err(|_| poisoned())?.push((k, v));
        }
        Ok(())
    }

    /// The reference lengths of a `Fill` forward.
    pub(crate) fn fill_lens(&self) -> Option<&[usize]> {
        match self {
            RefKv::Fill { lens, .. } => Some(lens),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use crate::embed::{grid_ids, reference_ids, text_ids};
    use crate::test_util::{max_diff, uniform};
    use crate::{Flux, FluxConfig, Lora, LoraSpec, ModelInputs, RefInputs, RowBlocks, Weights};

    const REF_SIDES: [usize; 2] = [3, 2];

    fn model() -> (Flux, Lora) {
        let cfg = FluxConfig::tiny();
        let w = Weights::random(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
        let lora = Lora::new(&cfg, &LoraSpec::default(), 5, DType::F64, &Device::Cpu).unwrap();
        // B is zero at init; a non-zero one makes the reference branch differ from the base.
        for (i, (_, ad)) in lora.adapters().enumerate() {
            ad.b.set(&uniform(ad.b.dims(), 100 + i as u64, 0.2))
                .unwrap();
        }
        (Flux::new(cfg, &w, RowBlocks::default()).unwrap(), lora)
    }

    /// A 4x4 target, 5 text tokens and references of 3x3 and 2x2 tokens; `seed` draws the
    /// target latents.
    fn inputs(seed: u64, with_refs: bool) -> ModelInputs {
        let mut lens = Vec::new();
        let mut ids = Vec::new();
        for (k, &s) in REF_SIDES.iter().enumerate() {
            ids.extend(reference_ids(s, s, k));
            lens.push(s * s);
        }
        let m: usize = lens.iter().sum();
        ModelInputs {
            img: uniform(&[1, 16, 64], seed, 1.0),
            img_ids: grid_ids(4, 4, 0),
            txt: uniform(&[1, 5, 32], 11, 1.0),
            txt_ids: text_ids(5),
            pooled: uniform(&[1, 16], 12, 1.0),
            timestep: vec![0.7],
            guidance: vec![3.5],
            refs: with_refs.then(|| RefInputs {
                latents: uniform(&[1, m, 64], 13, 1.0),
                ids,
                lens,
                timestep: vec![0.0],
                guidance: vec![1.0],
            }),
            isolate_refs: true,
            row_queries: None,
        }
    }

    #[test]
    fn a_step_reading_the_cache_equals_the_step_that_filled_it() {
        let (model, lora) = model();
        let (filled, cache) = model
            .forward_filling_cache(&inputs(1, true), lora.view(false))
            .unwrap();
        assert_eq!(cache.blocks(), 4);
        assert_eq!(cache.tokens(), 13);
        let (read, cache) = model
            .forward_with_cache(&inputs(1, false), lora.view(false), cache)
            .unwrap();
        let err = max_diff(&filled.pred, &read.pred);
        assert!(err < 1e-12, "{err}");
        // The cache is reusable: a second step reads every block again.
        model
            .forward_with_cache(&inputs(2, false), lora.view(false), cache)
            .unwrap();
    }

    #[test]
    fn cached_references_see_only_themselves() {
        let (model, lora) = model();
        let (a_out, a) = model
            .forward_filling_cache(&inputs(1, true), lora.view(false))
            .unwrap();
        let (_, b) = model
            .forward_filling_cache(&inputs(2, true), lora.view(false))
            .unwrap();
        // Another target leaves every block's reference keys and values as they were.
        for ((ka, va), (kb, vb)) in a.blocks.iter().zip(&b.blocks) {
            assert_eq!(max_diff(ka, kb), 0.0);
            assert_eq!(max_diff(va, vb), 0.0);
        }
        // Without the cache references attend to text and target (as in training), so the
        // prediction differs; the references still act on it through the target's attention.
        let trained = model.forward(&inputs(1, true), lora.view(false)).unwrap();
        let alone = model.forward(&inputs(1, false), lora.view(false)).unwrap();
        assert!(max_diff(&a_out.pred, &trained.pred) > 1e-4);
        assert!(max_diff(&a_out.pred, &alone.pred) > 1e-4);
    }

    #[test]
    fn a_cache_is_refused_where_it_does_not_fit() {
        let (model, lora) = model();
        let err = model
            .forward_filling_cache(&inputs(1, false), lora.view(false))
            .err()
            .unwrap();
        assert!(err.to_string().contains("no references"), "{err}");
        let (_, cache) = model
            .forward_filling_cache(&inputs(1, true), lora.view(false))
            .unwrap();
        let err = model
            .forward_with_cache(&inputs(1, true), lora.view(false), cache)
            .err()
            .unwrap();
        assert!(err.to_string().contains("as well as their cache"), "{err}");
    }
}
