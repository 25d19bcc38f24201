//! The FLUX.1 transformer with MOSAIC's reference tokens: embeddings, the block stack and the
//! output layer (design.md §3.3-3.5, §4). The model knows nothing of ranks, files or losses.
//!
//! Shape legend: B batch, L text tokens, N target tokens, M reference tokens (all references
//! concatenated), D hidden, C packed latent channels (64).

use candle_core::{DType, Device, Tensor};

use crate::attention::{Attention, GroupMask};
use crate::blocks::{BlockCtx, DoubleBlock, Linear, SingleBlock, Streams};
use crate::config::{FluxConfig, TIME_FEATURES};
use crate::embed::{rope_tables, timestep_features};
use crate::error::{FluxError, Result, Setting};
use crate::lora::LoraView;
use crate::ops::{layer_norm, modulate};
use crate::ref_cache::{RefKv, RefKvCache};
use crate::weights::Weights;

/// The reference images of a batch, already packed and concatenated along tokens.
#[derive(Clone)]
pub struct RefInputs {
    /// [B, M, C]
    pub latents: Tensor,
    /// Position ids of the M tokens (offset rule of design.md §4.1).
    pub ids: Vec<[f32; 3]>,
    /// Tokens of each reference, in order; they sum to M.
    pub lens: Vec<usize>,
    /// Per batch element; MOSAIC uses 0 (clean references).
    pub timestep: Vec<f32>,
    pub guidance: Vec<f32>,
}

/// What one forward needs. Timesteps are sigma in [0, 1] (the model multiplies by 1000).
#[derive(Clone)]
pub struct ModelInputs {
    /// [B, N, C] noisy target latent.
    pub img: Tensor,
    pub img_ids: Vec<[f32; 3]>,
    /// [B, L, context_dim]
    pub txt: Tensor,
    pub txt_ids: Vec<[f32; 3]>,
    /// [B, pooled_dim]
    pub pooled: Tensor,
    pub timestep: Vec<f32>,
    pub guidance: Vec<f32>,
    pub refs: Option<RefInputs>,
    /// Keep references from attending to each other (the official group mask).
    pub isolate_refs: bool,
    /// Per batch element, indices into the reference tokens whose attention rows to return.
    pub row_queries: Option<Vec<Vec<u32>>>,
}

/// Which blocks emit attention rows for the losses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowBlocks {
    pub double: Vec<usize>,
    pub single: Vec<usize>,
    /// Compose candle ops (the reference) instead of the fused `kernels::attention_rows`.
    pub plain: bool,
}

impl RowBlocks {
    pub fn count(&self) -> usize {
        self.double.len() + self.single.len()
    }
}

/// A position in the block stack: doubles first, then singles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockId {
    Double(usize),
    Single(usize),
}

pub struct Flux {
    pub cfg: FluxConfig,
    dtype: DType,
    device: Device,
    x_embedder: Linear,
    context_embedder: Linear,
    time_1: Linear,
    time_2: Linear,
    guidance: Option<(Linear, Linear)>,
    text_1: Linear,
    text_2: Linear,
    norm_out: Linear,
    proj_out: Linear,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    pub row_blocks: RowBlocks,
    /// How the blocks compute attention (chunked by default).
    pub attention: Attention,
}

/// Output of a full forward.
pub struct ForwardOut {
    /// [B, N, C]
    pub pred: Tensor,
    /// Per batch element, the attention rows averaged over the selected blocks, [P_b, N].
    pub rows: Option<Vec<Tensor>>,
}

impl Flux {
    pub fn new(cfg: FluxConfig, weights: &Weights, row_blocks: RowBlocks) -> Result<Self> {
        cfg.validate()?;
        for &i in &row_blocks.double {
            if i >= cfg.num_double {
                return Err(FluxError::setting(
                    Setting::RowDoubleBlocks,
                    format!(
                        "block {i} does not exist (the model has {})",
                        cfg.num_double
                    ),
                ));
            }
        }
        for &i in &row_blocks.single {
            if i >= cfg.num_single {
                return Err(FluxError::setting(
                    Setting::RowSingleBlocks,
                    format!(
                        "block {i} does not exist (the model has {})",
                        cfg.num_single
                    ),
                ));
            }
        }
        let l = |n: &str| Linear::load(weights, n);
        let any = weights.get("x_embedder.weight")?;
        Ok(Self {
            dtype: any.dtype(),
            device: any.device().clone(),
            x_embedder: l("x_embedder")?,
            context_embedder: l("context_embedder")?,
            time_1: l("time_text_embed.timestep_embedder.linear_1")?,
            time_2: l("time_text_embed.timestep_embedder.linear_2")?,
            guidance: if cfg.guidance_embeds {
                Some((
                    l("time_text_embed.guidance_embedder.linear_1")?,
                    l("time_text_embed.guidance_embedder.linear_2")?,
                ))
            } else {
                None
            },
            text_1: l("time_text_embed.text_embedder.linear_1")?,
            text_2: l("time_text_embed.text_embedder.linear_2")?,
            norm_out: l("norm_out.linear")?,
            proj_out: l("proj_out")?,
            double: (0..cfg.num_double)
                .map(|i| DoubleBlock::load(weights, i, cfg.num_heads))
                .collect::<Result<_>>()?,
            single: (0..cfg.num_single)
                .map(|i| SingleBlock::load(weights, i, cfg.num_heads))
                .collect::<Result<_>>()?,
            row_blocks,
            attention: Attention::default(),
            cfg,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All blocks in execution order.
    pub fn block_ids(&self) -> Vec<BlockId> {
        (0..self.double.len())
            .map(BlockId::Double)
            .chain((0..self.single.len()).map(BlockId::Single))
            .collect()
    }

    fn emits_rows(&self, id: BlockId) -> bool {
        match id {
            BlockId::Double(i) => self.row_blocks.double.contains(&i),
            BlockId::Single(i) => self.row_blocks.single.contains(&i),
        }
    }

    /// temb = TE(1000 t) + GE(1000 g) + TXT(pooled), [B, D] (design.md §3.3).
    fn conditioning(&self, timestep: &[f32], guidance: &[f32], pooled: &Tensor) -> Result<Tensor> {
        let scaled: Vec<f32> = timestep.iter().map(|t| t * 1000.0).collect();
        let feats =
            timestep_features(&scaled, TIME_FEATURES, &self.device)?.to_dtype(self.dtype)?;
        let mut temb = self
            .time_2
            .apply(&self.time_1.apply(&feats, None)?.silu()?, None)?;
        if let Some((g1, g2)) = &self.guidance {
            let scaled: Vec<f32> = guidance.iter().map(|g| g * 1000.0).collect();
            let feats =
                timestep_features(&scaled, TIME_FEATURES, &self.device)?.to_dtype(self.dtype)?;
            temb = (temb + g2.apply(&g1.apply(&feats, None)?.silu()?, None)?)?;
        }
        let text = self
            .text_2
            .apply(&self.text_1.apply(pooled, None)?.silu()?, None)?;
        Ok((temb + text)?)
    }

    /// Everything the blocks share that carries no trainable weight.
    pub fn prepare(&self, inp: &ModelInputs) -> Result<BlockCtx> {
        let b = inp.img.dim(0)?;
        for (name, len) in [
            ("timestep", inp.timestep.len()),
            ("guidance", inp.guidance.len()),
            ("pooled_projections", inp.pooled.dim(0)?),
            ("encoder_hidden_states", inp.txt.dim(0)?),
        ] {
            if len != b {
                return Err(FluxError::Input {
                    name: name.into(),
                    reason: format!("batch {len} does not match hidden_states batch {b}"),
                });
            }
        }
        let temb = self.conditioning(&inp.timestep, &inp.guidance, &inp.pooled)?;
        let mut ids: Vec<[f32; 3]> = inp.txt_ids.iter().chain(&inp.img_ids).copied().collect();
        let (temb_ref_act, mask) = match &inp.refs {
            Some(r) => {
                ids.extend_from_slice(&r.ids);
                let t = self.conditioning(&r.timestep, &r.guidance, &inp.pooled)?;
                let mask = if inp.isolate_refs && r.lens.len() > 1 {
                    Some(GroupMask::references(
                        inp.txt_ids.len() + inp.img_ids.len(),
                        &r.lens,
                        &self.device,
                    )?)
                } else {
                    None
                };
                (Some(t.silu()?), mask)
            }
            None => (None, None),
        };
        let (cos, sin) = rope_tables(&ids, self.cfg.axes_dims, self.cfg.theta, &self.device)?;
        let row_queries = match &inp.row_queries {
            Some(q) if self.row_blocks.count() > 0 && inp.refs.is_some() => Some(
                q.iter()
                    .map(|idx| Tensor::from_slice(idx, idx.len(), &self.device))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ),
            _ => None,
        };
        Ok(BlockCtx {
            temb_act: temb.silu()?,
            temb_ref_act,
            cos,
            sin,
            mask,
            row_queries,
            plain_rows: self.row_blocks.plain,
            attention: self.attention,
            ref_kv: RefKv::Off,
        })
    }

    /// Token embeddings of the three streams; references go through the LoRA.
    pub fn embed(&self, inp: &ModelInputs, lora: LoraView) -> Result<Streams> {
        Ok(Streams {
            txt: self.context_embedder.apply(&inp.txt, None)?,
            tgt: self.x_embedder.apply(&inp.img, None)?,
            refs: match &inp.refs {
                Some(r) => Some(self.x_embedder.apply(&r.latents, Some(lora))?),
                None => None,
            },
        })
    }

    /// One block; returns its rows when it is selected and rows were requested.
    pub fn run_block(
        &self,
        id: BlockId,
        s: &Streams,
        ctx: &BlockCtx,
        lora: LoraView,
    ) -> Result<(Streams, Option<Vec<Tensor>>)> {
        let emit = self.emits_rows(id);
        match id {
            BlockId::Double(i) => self.double[i].forward(s, ctx, lora, emit),
            BlockId::Single(i) => self.single[i].forward(s, ctx, lora, emit),
        }
    }

    /// norm_out (scale first, then shift) and proj_out on the target tokens, [B, N, C].
    pub fn head(&self, tgt: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        let m = self.norm_out.apply(&ctx.temb_act, None)?.chunk(2, 1)?;
        let h = modulate(&layer_norm(tgt, 1e-6)?, &m[1], &m[0])?;
        self.proj_out.apply(&h, None)
    }

    /// The whole model in one graph (no checkpointing).
    pub fn forward(&self, inp: &ModelInputs, lora: LoraView) -> Result<ForwardOut> {
        let ctx = self.prepare(inp)?;
        self.forward_with(inp, lora, &ctx)
    }

    /// The first step of sampling with the reference cache ([`crate::ref_cache`]): references
    /// attend only to their own tokens, and every block's reference keys and values are kept.
    pub fn forward_filling_cache(
        &self,
        inp: &ModelInputs,
        lora: LoraView,
    ) -> Result<(ForwardOut, RefKvCache)> {
        let Some(refs) = &inp.refs else {
            return Err(FluxError::Input {
                name: "reference cache".into(),
                reason: "there are no references to cache".into(),
            });
        };
        let mut ctx = self.prepare(inp)?;
        ctx.ref_kv = RefKv::fill(&refs.lens);
        let out = self.forward_with(inp, lora, &ctx)?;
        let cache = ctx
            .ref_kv
            .into_cache(self.double.len() + self.single.len())?;
        Ok((out, cache))
    }

    /// A later step with the reference cache: `inp` has no references; text and target
    /// attend to the cached ones. Gives the cache back for the next step.
    pub fn forward_with_cache(
        &self,
        inp: &ModelInputs,
        lora: LoraView,
        cache: RefKvCache,
    ) -> Result<(ForwardOut, RefKvCache)> {
        if inp.refs.is_some() {
            return Err(FluxError::Input {
                name: "reference cache".into(),
                reason: "the inputs hold references as well as their cache".into(),
            });
        }
        let mut ctx = self.prepare(inp)?;
        ctx.ref_kv = RefKv::read(cache);
        let out = self.forward_with(inp, lora, &ctx)?;
        Ok((out, ctx.ref_kv.into_read_cache()?))
    }

    fn forward_with(
        &self,
        inp: &ModelInputs,
        lora: LoraView,
        ctx: &BlockCtx,
    ) -> Result<ForwardOut> {
        let mut s = self.embed(inp, lora)?;
        let mut acc = RowAccumulator::default();
        for id in self.block_ids() {
            let (next, rows) = self.run_block(id, &s, ctx, lora)?;
            acc.add(rows)?;
            s = next;
        }
        Ok(ForwardOut {
            pred: self.head(&s.tgt, ctx)?,
            rows: acc.mean()?,
        })
    }
}

/// Sums per-block rows and averages them over the selected blocks (paper eq. 8).
#[derive(Default)]
pub struct RowAccumulator {
    sum: Option<Vec<Tensor>>,
    count: usize,
}

impl RowAccumulator {
    pub fn add(&mut self, rows: Option<Vec<Tensor>>) -> Result<()> {
        let Some(rows) = rows else { return Ok(()) };
        self.count += 1;
        self.sum = Some(match self.sum.take() {
            None => rows,
            Some(acc) => acc
                .iter()
                .zip(&rows)
                .map(|(a, r)| a + r)
                .collect::<candle_core::Result<_>>()?,
        });
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn mean(self) -> Result<Option<Vec<Tensor>>> {
        let n = self.count as f64;
        match self.sum {
            None => Ok(None),
            Some(s) => Ok(Some(
                s.iter()
                    .map(|t| t / n)
                    .collect::<candle_core::Result<_>>()?,
            )),
        }
    }
}
