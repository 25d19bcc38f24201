//! Joint attention softmax(Q K^T / sqrt(d) + mask) V, in two forms with the same values:
//!
//! - [`Attention::Full`] composes candle ops. Its graph keeps the [B, H, S, S] scores and
//!   probabilities of every call until the backward: the reference form.
//! - [`Attention::Chunked`] (the default) is memory-linear. The forward runs over chunks of
//!   query rows and keeps only the output and each row's logsumexp. The backward recomputes
//!   each chunk's probabilities from them (as FlashAttention does, but with candle's matmuls,
//!   so cuBLAS on the GPU). One call holds O(H x chunk x S) attention values at a time instead
//!   of O(H x S x S). On the CPU in f32 and f64 with the fused ops, the whole call runs in
//!   `kernels::cpu_attention` instead: per head and per tile of rows that fits the core's
//!   cache, strided GEMM calls and the softmax in one pass (the chunk caps the tile's rows).
//!
//! The reference isolation mask ([`GroupMask`]) is generated per chunk on the device from one
//! group id per token, so no [S, S] mask is ever stored.
//!
//! Precision for half-precision inputs is FlashAttention's: the products take operands in the
//! inputs' dtype (P and dS rounded to it) with f32 results ([`crate::matmul`]); scores,
//! logsumexp, softmax and row sums are f32 (f64 stays f64); the output has the inputs' dtype.

use std::ops::Range;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D};

use crate::error::Result;
use crate::matmul::matmul_f32_out;
use crate::ops::stats_dtype;

/// How a block computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// Scores and probabilities of all rows at once (kept for the backward).
    Full,
    /// Query rows in chunks of `chunk`, probabilities recomputed in the backward. With
    /// `cpu_tiles`, a CPU call in f32 or f64 with the fused ops runs in
    /// `kernels::cpu_attention`'s cache-sized tiles (at most `chunk` rows each), and other CPU
    /// chunks shrink to keep their scores in cache ([`rows_per_chunk`]); without, every device
    /// takes `chunk` rows through the chunked candle ops (what a GPU memory estimate measures,
    /// and the reference the tiles are tested against).
    Chunked { chunk: usize, cpu_tiles: bool },
}

impl Default for Attention {
    fn default() -> Self {
        Attention::Chunked {
            chunk: DEFAULT_CHUNK,
            cpu_tiles: true,
        }
    }
}

/// Query rows per chunk by default: at FLUX.1-dev width (24 heads) and 1024 px with six
/// references (S = 10752) one f32 [H, chunk, S] buffer is 0.5 GB.
pub const DEFAULT_CHUNK: usize = 512;

/// On the CPU, a chunk's f32 scores [B, H, rows, S] are kept within this many bytes, so the
/// softmax passes and the product with V find them in the last-level cache instead of memory:
/// the medium preset's 512 px step with two references (S = 3136) went from 42 s to 33 s when
/// its chunks shrank from 512 rows (103 MB) to 250 (docs/kernels.md).
pub const CPU_SCORES_BUDGET: usize = 24 << 20;

/// Rows below which a CPU chunk is not cut further: the products lose more than the cache
/// gains (64 rows ran slower than 128 and 256 above).
const CPU_MIN_ROWS: usize = 128;

/// The query rows per chunk for `chunk` requested: on a GPU `chunk`; on the CPU at most
/// `chunk`, fewer when the scores of `batch_heads` x rows x `keys` would exceed
/// [`CPU_SCORES_BUDGET`] (never below [`CPU_MIN_ROWS`], or `chunk` when that is smaller).
pub fn rows_per_chunk(chunk: usize, batch_heads: usize, keys: usize, device: &Device) -> usize {
    if !device.is_cpu() {
        return chunk.max(1);
    }
    let fit = CPU_SCORES_BUDGET / (batch_heads * keys * 4).max(1);
    chunk.min(fit.max(CPU_MIN_ROWS)).max(1)
}

/// Which tokens may attend to which: one group id per token of the joint sequence. Group 0
/// (text and target) sees and is seen by everyone; a token of group g > 0 (reference g) does
/// not see tokens of another group h > 0.
#[derive(Debug, Clone)]
pub struct GroupMask {
    /// [S] u32 group ids on the model's device.
    groups: Tensor,
    /// The same ids on the host, for the CPU's per-group blocks ([`KeyBlock`]).
    ids: Vec<u32>,
}

impl GroupMask {
    /// `shared` leading tokens in group 0, then one group per entry of `ref_lens`.
    pub fn references(shared: usize, ref_lens: &[usize], device: &Device) -> Result<Self> {
        let mut ids = vec![0u32; shared];
        for (g, &len) in ref_lens.iter().enumerate() {
            ids.extend(std::iter::repeat_n(g as u32 + 1, len));
        }
        let n = ids.len();
        Ok(Self {
            groups: Tensor::from_slice(&ids, n, device)?,
            ids,
        })
    }

    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.groups.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The additive mask of query rows `start..start + len` against every key, [len, S], with
    /// 0 where attention is allowed and -inf where it is not.
    pub fn rows(&self, start: usize, len: usize, dtype: DType) -> Result<Tensor> {
        let s = self.len();
        let q = self.groups.narrow(0, start, len)?.unsqueeze(1)?;
        let k = self.groups.unsqueeze(0)?;
        let q_ref = q.gt(0u32)?.broadcast_as((len, s))?;
        let k_ref = k.gt(0u32)?.broadcast_as((len, s))?;
        let other = q.broadcast_ne(&k)?;
        let blocked = ((other * q_ref)? * k_ref)?;
        let device = self.groups.device();
        let neg = Tensor::new(f32::NEG_INFINITY, device)?
            .to_dtype(dtype)?
            .broadcast_as((len, s))?;
        let zero = Tensor::zeros((), dtype, device)?.broadcast_as((len, s))?;
        Ok(blocked.where_cond(&neg, &zero)?)
    }
}

/// softmax(Q K^T / sqrt(d) + mask) V for `q`, `k`, `v` [B, H, S, hd].
pub fn attention(
    q_bhsd: &Tensor,
    k_bhsd: &Tensor,
    v_bhsd: &Tensor,
    mask: Option<&GroupMask>,
    kind: Attention,
) -> Result<Tensor> {
    match kind {
        Attention::Full => full(q_bhsd, k_bhsd, v_bhsd, mask),
        Attention::Chunked { chunk, cpu_tiles } => {
            let rows = if cpu_tiles {
                let (b, h, _, _) = q_bhsd.dims4()?;
                rows_per_chunk(chunk, b * h, k_bhsd.dim(2)?, q_bhsd.device())
            } else {
                chunk
            };
            chunked_call(q_bhsd, k_bhsd, v_bhsd, mask, rows.max(1), cpu_tiles)
        }
    }
}

/// The reference form: every score at once, the backward through candle's graph.
pub fn full(
    q_bhsd: &Tensor,
    k_bhsd: &Tensor,
    v_bhsd: &Tensor,
    mask: Option<&GroupMask>,
) -> Result<Tensor> {
    let dtype = q_bhsd.dtype();
    let cdt = stats_dtype(dtype);
    let (_, _, s, d) = q_bhsd.dims4()?;
    let q = q_bhsd.to_dtype(cdt)?;
    let k = k_bhsd.to_dtype(cdt)?;
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.rows(0, s, cdt)?)?;
    }
    let probs = crate::ops::softmax_last(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(&v_bhsd.contiguous()?)?)
}

/// A run of query rows and the keys they attend to. On a GPU, with the composed ops, or without
/// a mask, one block holds every row and every key, and the softmax applies the mask. On the
/// CPU with the fused ops and half-precision inputs (f32 and f64 run in `kernels::cpu_attention`,
/// whose tiles take the same key ranges in place) each run of rows of one group is a block: shared rows see every key, and a reference's rows see only the
/// shared keys and their own, gathered into a smaller K and V, so neither the products nor the
/// softmax spend work on keys the mask would zero (a third of a reference row's keys with two
/// references). The values are the same: blocked keys contribute exactly zero either way.
struct KeyBlock {
    rows: Range<usize>,
    /// The keys seen, as indices into the sequence; `None`: all of them.
    keys: Option<Tensor>,
    /// K and V [B, H, keys, hd] of those keys (the whole tensors when `keys` is `None`).
    k: Tensor,
    v: Tensor,
    /// Whether the softmax must apply the group mask (the block mixes groups).
    masked: bool,
}

impl KeyBlock {
    /// `acc` [B, H, S, hd] plus a block's gradient for its keys [B, H, keys, hd].
    fn add_to(&self, acc: Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        match &self.keys {
            None => acc + grad,
            Some(idx) => acc.index_add(idx, grad, 2),
        }
    }
}

/// The inputs of one chunked call, detached from the graph, and the softmax of a chunk.
///
/// The softmax runs in the fused ops of `kernels::softmax` (CUDA kernels for f32 and bf16,
/// parallel loops on the CPU), which apply the scale and the mask on the fly; with
/// `model.kernels = "composed"` (or f16/f64 on CUDA) it composes candle ops, the reference.
/// Both give P in the inputs' dtype and dS = P (dP - delta) from that rounded P.
struct Operands {
    /// The inputs' dtype.
    dtype: DType,
    scale: f64,
    /// K [B, H, S, hd] in the inputs' dtype, contiguous: products read K^T as a view.
    k: Tensor,
    mask: Option<GroupMask>,
    /// The fused softmax applies: enabled, and on the CPU or (f32, bf16) on CUDA.
    fused: bool,
    /// The whole call runs in `kernels::cpu_attention`'s tiles: fused ops enabled, on the CPU,
    /// f32 or f64 (half inputs on the CPU keep the chunks, whose products round P to them).
    tiled: bool,
}

impl Operands {
    fn new(
        k_bhsd: &Tensor,
        dtype: DType,
        mask: Option<&GroupMask>,
        cpu_tiles: bool,
    ) -> Result<Self> {
        let d = k_bhsd.dim(3)?;
        let (enabled, cpu) = (crate::fused::enabled(), k_bhsd.device().is_cpu());
        Ok(Self {
            dtype,
            scale: 1.0 / (d as f64).sqrt(),
            k: k_bhsd.detach().contiguous()?,
            mask: mask.cloned(),
            fused: enabled && (cpu || matches!(dtype, DType::F32 | DType::BF16)),
            tiled: cpu_tiles && enabled && cpu && matches!(dtype, DType::F32 | DType::F64),
        })
    }

    /// Q K^T of query rows `start..start + len` against the block's keys, [B, H, len, keys],
    /// unscaled, in the compute dtype (f32 for half inputs, whose product runs in their own
    /// dtype).
    fn products(
        &self,
        q_bhsd: &Tensor,
        block: &KeyBlock,
        start: usize,
        len: usize,
    ) -> Result<Tensor> {
        matmul_f32_out(&q_bhsd.narrow(2, start, len)?, &block.k.t()?)
    }

    /// Scaled and masked scores from `products` (the composed path).
    fn scores(
        &self,
        products: Tensor,
        block: &KeyBlock,
        start: usize,
        len: usize,
    ) -> Result<Tensor> {
        let scores = (products * self.scale)?;
        Ok(match &self.mask {
            Some(m) if block.masked => {
                scores.broadcast_add(&m.rows(start, len, scores.dtype())?)?
            }
            _ => scores,
        })
    }

    /// The group ids of the mask, for `kernels::cpu_attention`.
    fn group_ids(&self) -> Option<&[u32]> {
        self.mask.as_ref().map(|m| m.ids.as_slice())
    }

    /// The blocks of the `rows` query rows and the keys they see ([`KeyBlock`]). Query row i
    /// is token i (with cached references the queries are the leading shared tokens and the
    /// keys go on).
    fn blocks(&self, rows: usize, v: &Tensor) -> Result<Vec<KeyBlock>> {
        let s = self.k.dim(2)?;
        let whole = |rows: Range<usize>, masked| KeyBlock {
            rows,
            keys: None,
            k: self.k.clone(),
            v: v.clone(),
            masked,
        };
        let Some(mask) = self.mask.as_ref() else {
            return Ok(vec![whole(0..rows, false)]);
        };
        if !(self.fused && self.k.device().is_cpu()) || rows > mask.ids.len() {
            return Ok(vec![whole(0..rows, true)]);
        }
        let mut blocks = Vec::new();
        // The same runs of rows and seen key ranges the CPU tiles take.
        for b in kernels::cpu_attention::row_blocks(Some(&mask.ids[..s]), rows, s)? {
            #[allow(clippy::single_range_in_vec_init)] // one range: every key
            if b.keys == [0..s] {
                blocks.push(whole(b.rows, false));
                continue;
            }
            let seen: Vec<u32> = b.keys.into_iter().flatten().map(|j| j as u32).collect();
            let n = seen.len();
            let idx = Tensor::from_vec(seen, n, self.k.device())?;
            blocks.push(KeyBlock {
                rows: b.rows,
                k: self.k.index_select(&idx, 2)?,
                v: v.index_select(&idx, 2)?,
                keys: Some(idx),
                masked: false,
            });
        }
        Ok(blocks)
    }

    fn row_mask(&self, block: &KeyBlock, start: usize) -> Option<kernels::softmax::RowMask<'_>> {
        self.mask
            .as_ref()
            .filter(|_| block.masked)
            .map(|m| kernels::softmax::RowMask {
                groups: &m.groups,
                q_start: start,
            })
    }

    /// P in the inputs' dtype and each row's logsumexp [B, H, len, 1] (compute dtype) of query
    /// rows `start..start + len`.
    fn forward_probs(
        &self,
        q_bhsd: &Tensor,
        block: &KeyBlock,
        start: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let products = self.products(q_bhsd, block, start, len)?;
        let _phase = crate::profile::phase("op: attention softmax", products.device());
        if self.fused {
            let mask = self.row_mask(block, start);
            let lse = kernels::softmax::row_logsumexp(&products, mask, self.scale)?;
            let p = kernels::softmax::probs(&products, &lse, mask, self.scale, self.dtype)?;
            return Ok((p, lse));
        }
        let scores = self.scores(products, block, start, len)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let p = e.broadcast_div(&sum)?.to_dtype(self.dtype)?;
        Ok((p, (max + sum.log()?)?))
    }

    /// P of query rows `start..start + len` recomputed from their logsumexp [B, H, len, 1].
    fn probs(
        &self,
        q_bhsd: &Tensor,
        block: &KeyBlock,
        (start, len): (usize, usize),
        lse: &Tensor,
    ) -> Result<Tensor> {
        let products = self.products(q_bhsd, block, start, len)?;
        let _phase = crate::profile::phase("op: attention softmax", products.device());
        if self.fused {
            return Ok(kernels::softmax::probs(
                &products,
                lse,
                self.row_mask(block, start),
                self.scale,
                self.dtype,
            )?);
        }
        let scores = self.scores(products, block, start, len)?;
        Ok(scores.broadcast_sub(lse)?.exp()?.to_dtype(self.dtype)?)
    }

    /// dS = P (dP - delta) in the inputs' dtype, for P in that dtype, dP [B, H, len, S] and
    /// delta [B, H, len, 1] in the compute dtype.
    fn softmax_grad(&self, p: &Tensor, dp: &Tensor, delta: &Tensor) -> Result<Tensor> {
        let _phase = crate::profile::phase("op: attention softmax", p.device());
        if self.fused {
            return Ok(kernels::softmax::softmax_grad(p, dp, delta)?);
        }
        let ds = p.to_dtype(dp.dtype())? * dp.broadcast_sub(delta)?;
        Ok(ds?.to_dtype(self.dtype)?)
    }
}

/// (start, len) of each chunk of at most `chunk` rows of `rows`.
fn chunks(rows: Range<usize>, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let end = rows.end;
    rows.step_by(chunk)
        .map(move |start| (start, chunk.min(end - start)))
}

/// The memory-linear form (module docs) in chunks of `chunk` rows on every device, as a GPU
/// runs it: [`Attention::Chunked`] without `cpu_tiles`.
pub fn chunked(
    q_bhsd: &Tensor,
    k_bhsd: &Tensor,
    v_bhsd: &Tensor,
    mask: Option<&GroupMask>,
    chunk: usize,
) -> Result<Tensor> {
    chunked_call(q_bhsd, k_bhsd, v_bhsd, mask, chunk, false)
}

/// The memory-linear form; with `cpu_tiles` f32 and f64 on the CPU run in
/// `kernels::cpu_attention` (tiles of at most `chunk` rows).
fn chunked_call(
    q_bhsd: &Tensor,
    k_bhsd: &Tensor,
    v_bhsd: &Tensor,
    mask: Option<&GroupMask>,
    chunk: usize,
    cpu_tiles: bool,
) -> Result<Tensor> {
    let _phase = crate::profile::phase("op: attention forward", q_bhsd.device());
    let dtype = q_bhsd.dtype();
    let ops = Operands::new(k_bhsd, dtype, mask, cpu_tiles)?;
    let q = q_bhsd.detach().contiguous()?;
    let v = v_bhsd.detach().contiguous()?;
    let (out, lse) = if ops.tiled {
        let groups = ops.group_ids();
        kernels::cpu_attention::forward(&q, &ops.k, &v, groups, ops.scale, chunk)?
    } else {
        let mut outs = Vec::new();
        let mut lses = Vec::new();
        for block in ops.blocks(q.dim(2)?, &v)? {
            for (start, len) in chunks(block.rows.clone(), chunk) {
                // P in the inputs' dtype for its product with V, as FlashAttention does.
                let (p, lse) = ops.forward_probs(&q, &block, start, len)?;
                outs.push(matmul_f32_out(&p, &block.v)?.to_dtype(dtype)?);
                lses.push(lse);
            }
        }
        (Tensor::cat(&outs, 2)?.contiguous()?, Tensor::cat(&lses, 2)?)
    };
    let op = ChunkedAttention {
        ops,
        chunk,
        lse,
        out: Mutex::new(Some(out)),
    };
    Ok(q_bhsd.apply_op3(k_bhsd, v_bhsd, op)?)
}

/// The graph node of a chunked call. The forward was computed before the node was made (with
/// candle ops, on any device); the node hands that output over once and keeps the logsumexp
/// for the backward.
struct ChunkedAttention {
    ops: Operands,
    chunk: usize,
    /// [B, H, S, 1] logsumexp of each row's masked, scaled scores (compute dtype).
    lse: Tensor,
    /// The output, taken by the forward.
    out: Mutex<Option<Tensor>>,
}

impl ChunkedAttention {
    fn take_out(&self) -> candle_core::Result<Tensor> {
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("chunked attention: poisoned lock".into()))?
            .take();
        out.ok_or_else(|| candle_core::Error::Msg("chunked attention: forward ran twice".into()))
    }
}

/// The output's storage, which must be contiguous from offset 0 (a fresh `cat`).
fn whole_storage(t: &Tensor) -> candle_core::Result<(Storage, Shape)> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("chunked attention: output is not a fresh contiguous tensor");
    }
    Ok((storage.try_clone(layout)?, layout.shape().clone()))
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match whole_storage(&self.take_out()?)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("chunked attention: output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match whole_storage(&self.take_out()?)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("chunked attention: output is not on the GPU"),
        }
    }

    /// Per chunk: P = exp(scores - lse); dV += P^T dO; dS = P * (dO V^T - rowsum(dO * O));
    /// dQ = dS K * scale; dK += dS^T Q * scale.
    fn bwd(
        &self,
        q: &Tensor,
        _k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _phase = crate::profile::phase("op: attention backward", q.device());
        let to_candle = |e: crate::FluxError| candle_core::Error::Msg(format!("{e}"));
        let mm = |a: &Tensor, b: &Tensor| matmul_f32_out(a, b).map_err(to_candle);
        let dtype = self.ops.dtype;
        let cdt = stats_dtype(dtype);
        // Products take operands in the inputs' dtype (P and dS are cast to it, as in
        // FlashAttention) and give compute-dtype results; sums and the softmax stay in the
        // compute dtype.
        let (q, k, v) = (
            q.detach().contiguous()?,
            &self.ops.k,
            v.detach().contiguous()?,
        );
        if self.ops.tiled {
            let (o, g) = (res.detach().contiguous()?, grad_res.contiguous()?);
            let groups = self.ops.group_ids();
            let (dq, dk, dv) = kernels::cpu_attention::backward(
                &q,
                k,
                &v,
                &o,
                &g,
                &self.lse,
                groups,
                self.ops.scale,
                self.chunk,
            )
            .map_err(|e| to_candle(e.into()))?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let (o, g) = (res.detach().to_dtype(cdt)?, grad_res.contiguous()?);
        let mut dq = Vec::new();
        let mut dk = k.zeros_like()?.to_dtype(cdt)?;
        let mut dv = dk.clone();
        for block in self.ops.blocks(q.dim(2)?, &v).map_err(to_candle)? {
            let (bk, bv) = (&block.k, &block.v);
            let mut bdk = bk.zeros_like()?.to_dtype(cdt)?;
            let mut bdv = bdk.clone();
            for (start, len) in chunks(block.rows.clone(), self.chunk) {
                let lse = self.lse.narrow(2, start, len)?;
                let p = (self.ops)
                    .probs(&q, &block, (start, len), &lse)
                    .map_err(to_candle)?;
                let gc = g.narrow(2, start, len)?;
                let delta =
                    (gc.to_dtype(cdt)? * o.narrow(2, start, len)?)?.sum_keepdim(D::Minus1)?;
                bdv = (bdv + mm(&p.t()?, &gc)?)?;
                let ds = self
                    .ops
                    .softmax_grad(&p, &mm(&gc, &bv.t()?)?, &delta)
                    .map_err(to_candle)?;
                let qc = q.narrow(2, start, len)?;
                dq.push((mm(&ds, bk)? * self.ops.scale)?);
                bdk = (bdk + (mm(&ds.t()?, &qc)? * self.ops.scale)?)?;
            }
            dk = block.add_to(dk, &bdk)?;
            dv = block.add_to(dv, &bdv)?;
        }
        Ok((
            Some(Tensor::cat(&dq, 2)?.to_dtype(dtype)?),
            Some(dk.to_dtype(dtype)?),
            Some(dv.to_dtype(dtype)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::test_util::{max_diff, rel_diff};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::test_util::uniform(shape, seed, 2.0)
    }

    /// Independent slow attention: per row, a masked softmax in plain f64 loops.
    fn slow(q: &Tensor, k: &Tensor, v: &Tensor, groups: &[u32]) -> Vec<f64> {
        let (b, h, s, d) = q.dims4().unwrap();
        let [q, k, v] = [q, k, v].map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap());
        let mut out = vec![0.0; b * h * s * d];
        for bh in 0..b * h {
            let base = bh * s * d;
            for i in 0..s {
                let allowed = |j: usize| groups[i] == 0 || groups[j] == 0 || groups[i] == groups[j];
                let sc: Vec<f64> = (0..s)
                    .map(|j| {
                        if !allowed(j) {
                            return f64::NEG_INFINITY;
                        }
                        (0..d)
                            .map(|c| q[base + i * d + c] * k[base + j * d + c])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[base + i * d + c] =
                        (0..s).map(|j| e[j] / z * v[base + j * d + c]).sum::<f64>();
                }
            }
        }
        out
    }

    struct Case {
        q: Var,
        k: Var,
        v: Var,
        w: Tensor,
        groups: Vec<u32>,
        mask: GroupMask,
    }

    /// Two batch elements, 3 heads, 4 shared tokens then references of 5 and 4 tokens.
    fn case() -> Case {
        let (shared, refs) = (4, [5usize, 4]);
        let s = shared + refs.iter().sum::<usize>();
        let shape = [2, 3, s, 8];
        let mask = GroupMask::references(shared, &refs, &Device::Cpu).unwrap();
        let groups = mask.groups.to_vec1::<u32>().unwrap();
        Case {
            q: Var::from_tensor(&randn(&shape, 1)).unwrap(),
            k: Var::from_tensor(&randn(&shape, 2)).unwrap(),
            v: Var::from_tensor(&randn(&shape, 3)).unwrap(),
            w: randn(&shape, 4),
            groups,
            mask,
        }
    }

    fn loss_and_grads(c: &Case, kind: Attention) -> (Tensor, Vec<Tensor>) {
        let o = attention(
            c.q.as_tensor(),
            c.k.as_tensor(),
            c.v.as_tensor(),
            Some(&c.mask),
            kind,
        )
        .unwrap();
        let grads = (&o * &c.w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = [&c.q, &c.k, &c.v]
            .iter()
            .map(|x| grads.get(x.as_tensor()).unwrap().clone())
            .collect();
        (o, g)
    }

    /// CPU chunks shrink to keep their scores in cache, within the requested rows and not
    /// below the floor; small problems keep the requested chunk.
    #[test]
    fn cpu_chunks_keep_their_scores_within_the_budget() {
        let cpu = Device::Cpu;
        // Medium preset, 512 px with two references: 8 heads x 3136 keys.
        let rows = rows_per_chunk(512, 8, 3136, &cpu);
        assert_eq!(rows, CPU_SCORES_BUDGET / (8 * 3136 * 4));
        assert!(rows * 8 * 3136 * 4 <= CPU_SCORES_BUDGET && rows > 128);
        // 256 px: the whole 832-row block fits, the request stands.
        assert_eq!(rows_per_chunk(512, 8, 832, &cpu), 512);
        assert_eq!(rows_per_chunk(7, 8, 3136, &cpu), 7);
        // FLUX.1-dev width at 1024 px: the floor.
        assert_eq!(rows_per_chunk(512, 24, 10752, &cpu), 128);
        assert_eq!(rows_per_chunk(0, 1, 1, &cpu), 1);
    }

    #[test]
    fn group_mask_blocks_only_other_references() {
        let m = GroupMask::references(2, &[1, 2], &Device::Cpu).unwrap();
        let rows: Vec<Vec<f32>> = m.rows(1, 3, DType::F32).unwrap().to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(rows[0], vec![0.0; 5]); // shared token sees all
        assert_eq!(rows[1], vec![0.0, 0.0, 0.0, inf, inf]); // reference 1
        assert_eq!(rows[2], vec![0.0, 0.0, inf, 0.0, 0.0]); // reference 2
    }

    #[test]
    fn full_and_chunked_match_a_slow_reference() {
        let c = case();
        let expect = slow(c.q.as_tensor(), c.k.as_tensor(), c.v.as_tensor(), &c.groups);
        for kind in [
            Attention::Full,
            Attention::Chunked {
                chunk: 1,
                cpu_tiles: false,
            },
            Attention::Chunked {
                chunk: 4,
                cpu_tiles: false,
            },
            Attention::Chunked {
                chunk: 5,
                cpu_tiles: false,
            },
            Attention::Chunked {
                chunk: 13,
                cpu_tiles: false,
            },
            Attention::Chunked {
                chunk: 100,
                cpu_tiles: false,
            },
            // The CPU tiles (kernels::cpu_attention), tiles capped at 1, 5 and the default 512 rows.
            Attention::Chunked {
                chunk: 1,
                cpu_tiles: true,
            },
            Attention::Chunked {
                chunk: 5,
                cpu_tiles: true,
            },
            Attention::default(),
        ] {
            let (o, _) = loss_and_grads(&c, kind);
            let got = o.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let diff = got
                .iter()
                .zip(&expect)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-12, "{kind:?}: {diff}");
        }
    }

    #[test]
    fn chunked_gradients_equal_full_for_odd_chunks() {
        let c = case();
        let (_, full) = loss_and_grads(&c, Attention::Full);
        for chunk in [1, 3, 7, 13, 64] {
            for cpu_tiles in [false, true] {
                let (_, got) = loss_and_grads(&c, Attention::Chunked { chunk, cpu_tiles });
                for (name, (a, b)) in ["q", "k", "v"].iter().zip(got.iter().zip(&full)) {
                    let d = max_diff(a, b);
                    assert!(d < 1e-10, "chunk {chunk}, tiles {cpu_tiles}, d{name}: {d}");
                }
            }
        }
    }

    #[test]
    fn chunked_gradients_match_finite_differences() {
        for cpu_tiles in [false, true] {
            gradients_match_finite_differences(Attention::Chunked {
                chunk: 5,
                cpu_tiles,
            });
        }
    }

    fn gradients_match_finite_differences(kind: Attention) {
        let c = case();
        let (_, grads) = loss_and_grads(&c, kind);
        let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            let o = attention(q, k, v, Some(&c.mask), kind).unwrap();
            (o * &c.w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let eps = 1e-6;
        let vars = [&c.q, &c.k, &c.v];
        for (which, g) in grads.iter().enumerate() {
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for idx in [0usize, 17, 101, 300, g.len() - 1] {
                let bump = |sign: f64| {
                    let mut x = vars[which]
                        .as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap();
                    x[idx] += sign * eps;
                    let t = Tensor::from_vec(x, vars[which].shape(), &Device::Cpu).unwrap();
                    let mut args: Vec<Tensor> =
                        vars.iter().map(|v| v.as_tensor().detach()).collect();
                    args[which] = t;
                    loss(&args[0], &args[1], &args[2])
                };
                let fd = (bump(1.0) - bump(-1.0)) / (2.0 * eps);
                assert!(
                    (fd - g[idx]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{kind:?} input {which} element {idx}: fd {fd} vs {}",
                    g[idx]
                );
            }
        }
    }

    #[test]
    fn bf16_chunked_is_close_to_full() {
        let c = case();
        let [q, k, v] = [&c.q, &c.k, &c.v].map(|x| x.as_tensor().to_dtype(DType::BF16).unwrap());
        let a = full(&q, &k, &v, Some(&c.mask)).unwrap();
        let b = chunked(&q, &k, &v, Some(&c.mask), 4).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert!(max_diff(&a, &b) < 2e-2);
    }

    /// bf16 chunked attention (products of bf16 operands, P and dS rounded to bf16 as in
    /// FlashAttention) against f64 full attention of the same rounded inputs: the output and
    /// the three input gradients within bf16's precision.
    #[test]
    fn bf16_chunked_gradients_are_close_to_f64() {
        let c = case();
        let half = [&c.q, &c.k, &c.v]
            .map(|x| Var::from_tensor(&x.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap());
        let exact = half
            .each_ref()
            .map(|x| Var::from_tensor(&x.as_tensor().to_dtype(DType::F64).unwrap()).unwrap());
        let run = |vars: &[Var; 3], o: Tensor| {
            let o = o.to_dtype(DType::F64).unwrap();
            let g = (&o * &c.w).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|x| g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap())
                .collect();
            (o, grads)
        };
        let [q, k, v] = half.each_ref().map(|x| x.as_tensor());
        let (o16, g16) = run(&half, chunked(q, k, v, Some(&c.mask), 4).unwrap());
        let [q, k, v] = exact.each_ref().map(|x| x.as_tensor());
        let (o64, g64) = run(&exact, full(q, k, v, Some(&c.mask)).unwrap());
        assert!(
            rel_diff(&o64, &o16) < 1e-2,
            "output {}",
            rel_diff(&o64, &o16)
        );
        for (name, a, b) in [
            ("dq", &g64[0], &g16[0]),
            ("dk", &g64[1], &g16[1]),
            ("dv", &g64[2], &g16[2]),
        ] {
            let d = rel_diff(a, b);
            eprintln!("bf16 chunked {name}: max |bf16 - f64| / max |f64| = {d:.2e}");
            assert!(d < 1e-2, "{name}: {d}");
        }
    }

    /// Chunked attention on a GPU against the CPU at FLUX.1-dev's head count and head dim,
    /// with three references isolated, a chunk that does not divide S, forward and the three
    /// input gradients, in f32 and bf16. Built with the `cuda` feature; says it did not run
    /// where no CUDA device opens.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_chunked_attention_matches_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("not run: no CUDA device");
            return;
        };
        let (shared, refs) = (640, [256usize, 256, 256]);
        let s = shared + refs.iter().sum::<usize>();
        let shape = [1, 24, s, 128];
        let run = |dev: &Device, dt: DType| {
            let mask = GroupMask::references(shared, &refs, dev).unwrap();
            let vars: Vec<Var> = (1..=3)
                .map(|seed| {
                    let t = (randn(&shape, seed) * 0.5).unwrap();
                    Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(dev).unwrap()).unwrap()
                })
                .collect();
            let w = randn(&shape, 4)
                .to_dtype(dt)
                .unwrap()
                .to_device(dev)
                .unwrap();
            let o = chunked(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                Some(&mask),
                300,
            )
            .unwrap();
            let g = (&o * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![o];
            out.extend(vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
            out.into_iter()
                .map(|t| {
                    t.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
            let (cpu, cuda) = (run(&Device::Cpu, dt), run(&gpu, dt));
            for (name, (a, b)) in ["out", "dq", "dk", "dv"].iter().zip(cpu.iter().zip(&cuda)) {
                let d = crate::test_util::rel_diff(a, b);
                eprintln!("chunked attention {dt:?} {name}: max |cuda - cpu| / max |cpu| = {d:.3e} (bound {tol:.0e})");
                assert!(d < tol, "{dt:?} {name}: {d}");
            }
        }
    }
}
