//! Chunked attention's softmax, fused: CUDA kernels in `attention_softmax.cu` (NVRTC), and
//! parallel loops on the CPU (rayon, statistics in f64).
//!
//! Composed from candle ops, one chunk's softmax is a dozen kernels that each read and write
//! the whole [batch x heads x chunk, S] f32 score block: scale, the mask built and added, max,
//! subtract, exp, sum, divide, cast, and in the backward the same again with dS. On a GPU that
//! traffic, not the products, bounds attention. Here the scale and the reference isolation
//! mask are applied on the fly from one group id per token, and each op reads its inputs once:
//!
//! - [`row_logsumexp`]: per query row, log sum exp(scale x s) over the keys it may see;
//! - [`probs`]: P = exp(scale x s - lse), 0 where blocked, in the dtype of the products that
//!   follow (bf16 in training);
//! - [`softmax_grad`]: dS = P (dP - delta), delta = rowsum(dO * O), in P's dtype.
//!
//! No backward: chunked attention calls them on detached tensors inside its own backward. The
//! same chunked attention composed from candle ops (flux's `attention` module with
//! `model.kernels = "composed"`) is the reference they are tested against.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::ops::Range;

#[cfg(feature = "cuda")]
use candle_core::{
    cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg},
    CudaStorage,
};

#[cfg(feature = "cuda")]
const MODULE: &str = "mosaic_attention_softmax";
const SOURCE: &str = include_str!("attention_softmax.cu");
#[cfg(feature = "cuda")]
const THREADS: u32 = 256;

/// The kernel source, for tools that compile it ahead of time.
pub fn source() -> &'static str {
    SOURCE
}

#[cfg(feature = "cuda")]
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    crate::cuda::compiled(&PTX, SOURCE, "attention softmax")
}

/// The group ids of a CPU storage.
fn group_ids<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("attention softmax: group ids must be contiguous u32"),
    }
}

/// The CPU work, in the scores' float type (f32 for f32 and half inputs, f64 for f64): a row's
/// logsumexp, P from it, and dS. Rows run in parallel (rayon); each row loops over the key
/// ranges it sees ([`Visibility`]), so the loops have no per-key test and vectorize.
pub(crate) trait RowFloat:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Mul<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Add<Output = Self>
{
    const NEG_INF: Self;
    const ZERO: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn of(v: f64) -> Self;
    /// A faster logsumexp over the `seen` key ranges of a row, where the type has one.
    fn fast_lse(_row: &[Self], _scale: Self, _seen: &[Range<usize>]) -> Option<Self> {
        None
    }
}

impl RowFloat for f32 {
    const NEG_INF: Self = f32::NEG_INFINITY;
    const ZERO: Self = 0.0;
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn of(v: f64) -> Self {
        v as f32
    }
    fn fast_lse(row: &[Self], scale: Self, seen: &[Range<usize>]) -> Option<Self> {
        Some(lse_f32(row, scale, seen))
    }
}

impl RowFloat for f64 {
    const NEG_INF: Self = f64::NEG_INFINITY;
    const ZERO: Self = 0.0;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn of(v: f64) -> Self {
        v
    }
}

/// The key ranges each query row sees. A key is blocked for a query only when both are
/// reference tokens of different references (group ids > 0 and unequal): shared tokens (group
/// 0: text and target) see and are seen by every token. Built once per op from the group ids,
/// as the maximal runs of seen keys, so the row loops run over plain slices.
/// The key positions a query row of group `g` sees, as ascending, disjoint ranges: with the
/// reference mask, a row of group 0 (text and target) sees every key, and a row of reference
/// g > 0 sees the keys of group 0 and of its own group. `groups` holds every key's group id.
/// This is the CPU's statement of the rule; the CUDA kernel and `flux`'s dense mask apply the
/// same one on the device.
pub fn seen_key_ranges(groups: &[u32], g: u32) -> Vec<Range<usize>> {
    let mut seen: Vec<Range<usize>> = Vec::new();
    for (j, &gk) in groups.iter().enumerate() {
        if g != 0 && gk != 0 && gk != g {
            continue;
        }
        match seen.last_mut() {
            Some(r) if r.end == j => r.end = j + 1,
            _ => seen.push(j..j + 1),
        }
    }
    seen
}

struct Visibility {
    /// Every key: rows of group 0, and every row when there is no mask.
    all: Vec<Range<usize>>,
    /// Indexed by group id: the ranges a row of that reference sees.
    by_group: Vec<Vec<Range<usize>>>,
}

impl Visibility {
    fn new(groups: &[u32], keys: usize, masked: bool) -> Self {
        #[allow(clippy::single_range_in_vec_init)] // one range: every key, not 0..keys indices
        let all = vec![0..keys];
        if !masked {
            return Self {
                all,
                by_group: Vec::new(),
            };
        }
        let top = groups.iter().copied().max().unwrap_or(0);
        let by_group = (0..=top).map(|gq| seen_key_ranges(groups, gq)).collect();
        Self { all, by_group }
    }

    /// The ranges a query of group `gq` sees.
    fn row(&self, gq: u32) -> &[Range<usize>] {
        match self.by_group.get(gq as usize) {
            Some(seen) if gq != 0 => seen,
            _ => &self.all,
        }
    }
}

fn row_lse<F: RowFloat>(row: &[F], scale: F, seen: &[Range<usize>]) -> F {
    if let Some(lse) = F::fast_lse(row, scale, seen) {
        return lse;
    }
    let keys = || seen.iter().flat_map(|r| &row[r.clone()]);
    let mut m = F::NEG_INF;
    for &v in keys() {
        let v = v * scale;
        if v > m {
            m = v;
        }
    }
    let mut sum = F::ZERO;
    for &v in keys() {
        sum = sum + (v * scale - m).exp();
    }
    m + sum.ln()
}

/// P over the `seen` ranges of a row; `out` arrives filled with zeros (the blocked keys').
fn row_probs<F: RowFloat, T: Send>(
    row: &[F],
    out: &mut [T],
    scale: F,
    lse: F,
    seen: &[Range<usize>],
    put: impl Fn(F) -> T,
) {
    for r in seen {
        for (o, &v) in out[r.clone()].iter_mut().zip(&row[r.clone()]) {
            *o = put((v * scale - lse).exp());
        }
    }
}

/// Lanes of the f32 row loops: fixed-size inner loops the compiler turns into SIMD (a float
/// sum is otherwise a serial chain: it may not reorder it).
pub(crate) const LANES: usize = 8;

/// e^x in f32 without a libm call, so loops over it vectorize: n = round(x log2 e), the
/// remainder r = x - n ln 2 in two steps (ln 2 split into a short high part and a low part, so
/// n x high is exact), e^r by its Taylor series to degree 7 (|r| <= 0.35: relative error under
/// 1e-8 before rounding), 2^n through the exponent bits. Inputs are clamped to [-87, 88] (e^-87
/// is near the smallest normal f32; softmax arguments are <= 0 here).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 x 2^23: adding and subtracting it rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The largest of `scale` x `row` over the `seen` key ranges, in lanes (f32).
#[inline(always)]
pub(crate) fn max_scaled_f32(row: &[f32], scale: f32, seen: &[Range<usize>]) -> f32 {
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut m = f32::NEG_INFINITY;
    for r in seen {
        let chunks = row[r.clone()].chunks_exact(LANES);
        m = chunks.remainder().iter().fold(m, |m, v| m.max(v * scale));
        for c in chunks {
            for i in 0..LANES {
                lane_max[i] = lane_max[i].max(c[i] * scale);
            }
        }
    }
    lane_max.into_iter().fold(m, f32::max)
}

/// The logsumexp of `scale` x `row` over the `seen` key ranges, in lanes (f32).
fn lse_f32(row: &[f32], scale: f32, seen: &[Range<usize>]) -> f32 {
    let m = max_scaled_f32(row, scale, seen);
    let mut lane_sum = [0f32; LANES];
    let mut tail = 0f32;
    for r in seen {
        let chunks = row[r.clone()].chunks_exact(LANES);
        tail += chunks
            .remainder()
            .iter()
            .map(|v| exp_f32(v * scale - m))
            .sum::<f32>();
        for c in chunks {
            for i in 0..LANES {
                lane_sum[i] += exp_f32(c[i] * scale - m);
            }
        }
    }
    m + (lane_sum.iter().sum::<f32>() + tail).ln()
}

/// Which keys each query row may see: the chunk's first row's token index and the group ids.
#[derive(Clone, Copy)]
pub struct RowMask<'a> {
    /// One u32 group id per token of the joint sequence, on the scores' device.
    pub groups: &'a Tensor,
    /// Token index of the chunk's first query row.
    pub q_start: usize,
}

fn contiguous(op: &str, arg: &str, l: &Layout) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{op}: `{arg}` must be contiguous, got strides {:?}",
            l.stride()
        ))
    })
}

#[cfg(feature = "cuda")]
fn launch_err(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// The mask's group ids, or one dummy id when every row sees every key.
fn groups_or_dummy(
    scores: &Tensor,
    mask: Option<RowMask>,
) -> candle_core::Result<(Tensor, usize, i32)> {
    match mask {
        Some(m) => {
            let r = scores.rank();
            let (rows, keys, ids) = (scores.dim(r - 2)?, scores.dim(r - 1)?, m.groups.dims1()?);
            if ids != keys || m.q_start + rows > ids {
                candle_core::bail!(
                    "attention softmax: {ids} group ids, but {keys} keys and query rows {}..{}",
                    m.q_start,
                    m.q_start + rows
                );
            }
            Ok((m.groups.clone(), m.q_start, 1))
        }
        None => Ok((Tensor::zeros(1, DType::U32, scores.device())?, 0, 0)),
    }
}

struct RowLse {
    rows_per_chunk: usize,
    q_start: usize,
    scale: f64,
    has_mask: i32,
}

impl CustomOp2 for RowLse {
    fn name(&self) -> &'static str {
        "attention-row-logsumexp"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let groups = group_ids(g, lg)?;
        let keys = ls.dims()[ls.dims().len() - 1].max(1);
        let (l, q0, masked) = (self.rows_per_chunk.max(1), self.q_start, self.has_mask != 0);
        let seen = Visibility::new(groups, keys, masked);
        let (a, b) = contiguous(self.name(), "scores", ls)?;
        macro_rules! run {
            ($v:expr, $f:ty) => {{
                let x: &[$f] = &$v[a..b];
                let scale = <$f as RowFloat>::of(self.scale);
                let mut lse = vec![<$f as RowFloat>::ZERO; x.len() / keys];
                lse.par_iter_mut()
                    .zip(x.par_chunks(keys))
                    .enumerate()
                    .for_each(|(r, (out, row))| {
                        let gq = if masked { groups[q0 + r % l] } else { 0 };
                        *out = row_lse(row, scale, seen.row(gq));
                    });
                lse
            }};
        }
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(run!(v, f32)),
            CpuStorage::F64(v) => CpuStorage::F64(run!(v, f64)),
            other => candle_core::bail!(
                "{}: scores are f32 or f64, not {:?}",
                self.name(),
                other.dtype()
            ),
        };
        let mut shape = ls.dims().to_vec();
        *shape.last_mut().expect("scores have dims") = 1;
        Ok((out, Shape::from(shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (i0, i1) = contiguous(self.name(), "scores", ls)?;
        let (g0, g1) = contiguous(self.name(), "groups", lg)?;
        let dims = ls.dims();
        let keys = dims[dims.len() - 1];
        let rows = ls.shape().elem_count() / keys.max(1);
        let dev = s.device().clone();
        // Safety: the kernel writes one value per row, every row.
        let out = unsafe { dev.alloc::<f32>(rows)? };
        let f = dev.get_or_load_custom_func("row_logsumexp", MODULE, ptx()?)?;
        let (sv, gv) = (
            s.as_cuda_slice::<f32>()?.slice(i0..i1),
            g.as_cuda_slice::<u32>()?.slice(g0..g1),
        );
        let (l, n, q0) = (self.rows_per_chunk as i32, keys as i32, self.q_start as i32);
        // Kernel arguments are read through pointers at the launch: bind them to locals.
        let scale_f32 = self.scale as f32;
        let mut b = f.builder();
        b.arg(&sv)
            .arg(&gv)
            .arg(&out)
            .arg(&l)
            .arg(&n)
            .arg(&q0)
            .arg(&scale_f32)
            .arg(&self.has_mask);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: THREADS * 4,
        };
        // Safety: argument types and order match the kernel; group ids were checked to cover
        // every key and every row's token on the host.
        unsafe { b.launch(cfg) }.map_err(launch_err)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("scores have dims") = 1;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(shape)))
    }
}

/// Per query row of `scores` [..., L, S] (f32, contiguous, raw products Q K^T), the logsumexp
/// of `scale` x scores over the keys the row may see, [..., L, 1].
pub fn row_logsumexp(
    scores: &Tensor,
    mask: Option<RowMask>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (groups, q_start, has_mask) = groups_or_dummy(scores, mask)?;
    scores.apply_op2_no_bwd(
        &groups,
        &RowLse {
            rows_per_chunk: scores.dim(scores.rank() - 2)?,
            q_start,
            scale,
            has_mask,
        },
    )
}

struct Probs {
    rows_per_chunk: usize,
    q_start: usize,
    scale: f64,
    has_mask: i32,
    dtype: DType,
}

impl CustomOp3 for Probs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        lse: &CpuStorage,
        ll: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let groups = group_ids(g, lg)?;
        let keys = ls.dims()[ls.dims().len() - 1].max(1);
        let (l, q0, masked) = (self.rows_per_chunk.max(1), self.q_start, self.has_mask != 0);
        let seen = Visibility::new(groups, keys, masked);
        let (a, b) = contiguous(self.name(), "scores", ls)?;
        let (c, d) = contiguous(self.name(), "lse", ll)?;
        if d - c != (b - a) / keys {
            candle_core::bail!(
                "{}: {} logsumexps for {} rows",
                self.name(),
                d - c,
                (b - a) / keys
            );
        }
        macro_rules! run {
            ($x:expr, $lse:expr, $f:ty, $t:ty, $put:expr) => {{
                let (x, lse): (&[$f], &[$f]) = (&$x[a..b], &$lse[c..d]);
                let scale = <$f as RowFloat>::of(self.scale);
                let mut p: Vec<$t> = Vec::with_capacity(x.len());
                p.resize(x.len(), $put(<$f as RowFloat>::ZERO));
                p.par_chunks_mut(keys)
                    .zip(x.par_chunks(keys))
                    .enumerate()
                    .for_each(|(r, (out, row))| {
                        let gq = if masked { groups[q0 + r % l] } else { 0 };
                        row_probs(row, out, scale, lse[r], seen.row(gq), $put);
                    });
                p
            }};
        }
        let out = match (s, lse, self.dtype) {
            (CpuStorage::F32(x), CpuStorage::F32(e), DType::F32) => {
                CpuStorage::F32(run!(x, e, f32, f32, |v: f32| v))
            }
            (CpuStorage::F32(x), CpuStorage::F32(e), DType::BF16) => {
                CpuStorage::BF16(run!(x, e, f32, half::bf16, half::bf16::from_f32))
            }
            (CpuStorage::F32(x), CpuStorage::F32(e), DType::F16) => {
                CpuStorage::F16(run!(x, e, f32, half::f16, half::f16::from_f32))
            }
            (CpuStorage::F64(x), CpuStorage::F64(e), DType::F64) => {
                CpuStorage::F64(run!(x, e, f64, f64, |v: f64| v))
            }
            (x, e, dt) => candle_core::bail!(
                "{}: scores {:?} and logsumexps {:?} for P in {dt:?}",
                self.name(),
                x.dtype(),
                e.dtype()
            ),
        };
        Ok((out, ls.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        lse: &CudaStorage,
        ll: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (i0, i1) = contiguous(self.name(), "scores", ls)?;
        let (l0, l1) = contiguous(self.name(), "lse", ll)?;
        let (g0, g1) = contiguous(self.name(), "groups", lg)?;
        let n = ls.shape().elem_count();
        let keys = ls.dims()[ls.dims().len() - 1];
        if l1 - l0 != n / keys.max(1) {
            candle_core::bail!(
                "{}: {} logsumexps for {} rows",
                self.name(),
                l1 - l0,
                n / keys.max(1)
            );
        }
        let dev = s.device().clone();
        let sv = s.as_cuda_slice::<f32>()?.slice(i0..i1);
        let lv = lse.as_cuda_slice::<f32>()?.slice(l0..l1);
        let gv = g.as_cuda_slice::<u32>()?.slice(g0..g1);
        let scale_f32 = self.scale as f32;
        let (n_i, l, k, q0) = (
            n as i64,
            self.rows_per_chunk as i32,
            keys as i32,
            self.q_start as i32,
        );
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                // Safety: the kernel writes every element.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let f = dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
                let mut b = f.builder();
                b.arg(&sv).arg(&lv).arg(&gv).arg(&out);
                b.arg(&n_i)
                    .arg(&l)
                    .arg(&k)
                    .arg(&q0)
                    .arg(&scale_f32)
                    .arg(&self.has_mask);
                // Safety: argument types and order match the kernel; sizes checked above.
                unsafe { b.launch(crate::cuda::grid_stride(n)) }.map_err(launch_err)?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }};
        }
        let out = match self.dtype {
            DType::F32 => run!(f32, "probs_f32"),
            DType::BF16 => run!(half::bf16, "probs_bf16"),
            other => candle_core::bail!("{}: writes f32 or bf16, not {other:?}", self.name()),
        };
        Ok((out, ls.shape().clone()))
    }
}

/// P = exp(`scale` x scores - lse) for `scores` [..., L, S] (f32, raw products) and `lse`
/// [..., L, 1] from [`row_logsumexp`], 0 where the mask blocks, in `dtype` (f32 or bf16).
pub fn probs(
    scores: &Tensor,
    lse: &Tensor,
    mask: Option<RowMask>,
    scale: f64,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let (groups, q_start, has_mask) = groups_or_dummy(scores, mask)?;
    scores.apply_op3_no_bwd(
        &lse.contiguous()?,
        &groups,
        &Probs {
            rows_per_chunk: scores.dim(scores.rank() - 2)?,
            q_start,
            scale,
            has_mask,
            dtype,
        },
    )
}

struct SoftmaxGrad;

impl CustomOp3 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "attention-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        lp: &Layout,
        dp: &CpuStorage,
        ldp: &Layout,
        delta: &CpuStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = contiguous(self.name(), "p", lp)?;
        let (c, d) = contiguous(self.name(), "dp", ldp)?;
        let (e, f) = contiguous(self.name(), "delta", ld)?;
        let keys = lp.dims()[lp.dims().len() - 1].max(1);
        if b - a != d - c || f - e != (b - a) / keys {
            candle_core::bail!(
                "{}: p {:?}, dp {:?} and {} row sums do not agree",
                self.name(),
                lp.dims(),
                ldp.dims(),
                f - e
            );
        }
        macro_rules! run {
            ($p:expr, $dp:expr, $delta:expr, $t:ty, $f:ty, $get:expr, $put:expr) => {{
                let (pv, dpv, dv): (&[$t], &[$f], &[$f]) = (&$p[a..b], &$dp[c..d], &$delta[e..f]);
                let mut ds: Vec<$t> = Vec::with_capacity(pv.len());
                ds.resize(pv.len(), $put(0.0));
                ds.par_chunks_mut(keys)
                    .zip(pv.par_chunks(keys).zip(dpv.par_chunks(keys)))
                    .enumerate()
                    .for_each(|(r, (out, (pr, dr)))| {
                        for ((o, &x), &y) in out.iter_mut().zip(pr).zip(dr) {
                            *o = $put($get(x) * (y - dv[r]));
                        }
                    });
                ds
            }};
        }
        let out = match (p, dp, delta) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(z)) => {
                CpuStorage::F32(run!(x, y, z, f32, f32, |v: f32| v, |v: f32| v))
            }
            (CpuStorage::BF16(x), CpuStorage::F32(y), CpuStorage::F32(z)) => {
                CpuStorage::BF16(run!(
                    x,
                    y,
                    z,
                    half::bf16,
                    f32,
                    |v: half::bf16| v.to_f32(),
                    half::bf16::from_f32
                ))
            }
            (CpuStorage::F16(x), CpuStorage::F32(y), CpuStorage::F32(z)) => CpuStorage::F16(run!(
                x,
                y,
                z,
                half::f16,
                f32,
                |v: half::f16| v.to_f32(),
                half::f16::from_f32
            )),
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(z)) => {
                CpuStorage::F64(run!(x, y, z, f64, f64, |v: f64| v, |v: f64| v))
            }
            (x, y, z) => candle_core::bail!(
                "{}: P {:?}, dP {:?} and delta {:?} do not go together",
                self.name(),
                x.dtype(),
                y.dtype(),
                z.dtype()
            ),
        };
        Ok((out, lp.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        lp: &Layout,
        dp: &CudaStorage,
        ldp: &Layout,
        delta: &CudaStorage,
        ld: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (p0, p1) = contiguous(self.name(), "p", lp)?;
        let (q0, q1) = contiguous(self.name(), "dp", ldp)?;
        let (d0, d1) = contiguous(self.name(), "delta", ld)?;
        let n = lp.shape().elem_count();
        let keys = lp.dims()[lp.dims().len() - 1];
        if lp.shape() != ldp.shape() || d1 - d0 != n / keys.max(1) {
            candle_core::bail!(
                "{}: p {:?}, dp {:?} and {} row sums do not agree",
                self.name(),
                lp.dims(),
                ldp.dims(),
                d1 - d0
            );
        }
        let dev = p.device().clone();
        let dpv = dp.as_cuda_slice::<f32>()?.slice(q0..q1);
        let dv = delta.as_cuda_slice::<f32>()?.slice(d0..d1);
        let (n_i, k) = (n as i64, keys as i32);
        macro_rules! run {
            ($t:ty, $name:literal) => {{
                let pv = p.as_cuda_slice::<$t>()?.slice(p0..p1);
                // Safety: the kernel writes every element.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let f = dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
                let mut b = f.builder();
                b.arg(&pv).arg(&dpv).arg(&dv).arg(&out).arg(&n_i).arg(&k);
                // Safety: argument types and order match the kernel; sizes checked above.
                unsafe { b.launch(crate::cuda::grid_stride(n)) }.map_err(launch_err)?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }};
        }
        let out = match p.dtype() {
            DType::F32 => run!(f32, "softmax_grad_f32"),
            DType::BF16 => run!(half::bf16, "softmax_grad_bf16"),
            other => candle_core::bail!("{}: takes f32 or bf16 P, not {other:?}", self.name()),
        };
        Ok((out, lp.shape().clone()))
    }
}

/// dS = P (dP - delta) for `p` [..., L, S] (f32 or bf16), `dp` [..., L, S] f32 and `delta`
/// [..., L, 1] f32, in P's dtype.
pub fn softmax_grad(p: &Tensor, dp: &Tensor, delta: &Tensor) -> candle_core::Result<Tensor> {
    p.apply_op3_no_bwd(&dp.contiguous()?, &delta.contiguous()?, &SoftmaxGrad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    /// The vectorizable exp against f64's over the softmax range and beyond.
    #[test]
    fn exp_f32_is_within_two_ulps_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let e = (x as f32 as f64).exp();
            let rel = ((exp_f32(x as f32) as f64) - e).abs() / e;
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(-1000.0) >= 0.0);
    }

    /// The CPU loops against plain f64 loops (`check_on`).
    #[test]
    fn softmax_ops_match_plain_loops_on_the_cpu() {
        check_on(&Device::Cpu, &reference_groups());
    }

    /// Group ids in any order (not runs of shared tokens then one run per reference) give the
    /// same softmax as the plain loops: the CPU's key ranges are built from the ids.
    #[test]
    fn interleaved_groups_match_plain_loops_on_the_cpu() {
        let groups: Vec<u32> = (0..40u32)
            .map(|j| [0, 2, 1, 2, 0, 3, 3, 1, 2][j as usize % 9])
            .collect();
        check_on(&Device::Cpu, &groups);
    }

    /// The ranges against the rule tested key by key, and merged: ascending, disjoint, not
    /// touching.
    #[test]
    fn seen_key_ranges_cover_exactly_the_visible_keys() {
        let groups = [0u32, 0, 1, 1, 2, 0, 2, 1, 3, 3];
        assert_eq!(seen_key_ranges(&groups, 0), vec![0..10]);
        assert_eq!(seen_key_ranges(&groups, 1), vec![0..4, 5..6, 7..8]);
        assert_eq!(seen_key_ranges(&groups, 2), vec![0..2, 4..7]);
        for g in 0..5u32 {
            let ranges = seen_key_ranges(&groups, g);
            let listed: Vec<usize> = ranges.iter().cloned().flatten().collect();
            let visible: Vec<usize> = (0..groups.len())
                .filter(|&j| g == 0 || groups[j] == 0 || groups[j] == g)
                .collect();
            assert_eq!(listed, visible, "group {g}");
            assert!(
                ranges.windows(2).all(|w| w[0].end < w[1].start),
                "{ranges:?}"
            );
        }
        assert!(seen_key_ranges(&[], 1).is_empty());
    }

    /// 10 shared tokens, then references of 12, 10 and 8 tokens.
    fn reference_groups() -> Vec<u32> {
        let mut groups = vec![0u32; 10];
        for (g, len) in [(1u32, 12usize), (2, 10), (3, 8)] {
            groups.extend(std::iter::repeat_n(g, len));
        }
        groups
    }

    /// The CUDA kernels against plain f64 loops. Says it did not run where no CUDA device
    /// opens.
    #[test]
    fn cuda_softmax_kernels_match_plain_loops() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("not run: no CUDA device");
            return;
        };
        check_on(&gpu, &reference_groups());
    }

    /// The three ops on `gpu` (any device) against plain f64 loops, with 40 keys of `groups`
    /// and a chunk of query rows 8..15 (with the reference groups, it straddles the shared
    /// tokens and a reference), in f32 and bf16.
    fn check_on(gpu: &Device, groups: &[u32]) {
        let (bh, l, s, q_start, scale) = (6usize, 7usize, 40usize, 8usize, 0.3f64);
        assert_eq!(groups.len(), s);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let raw: Vec<f32> = (0..bh * l * s)
            .map(|_| rng.random_range(-6.0..6.0))
            .collect();
        let dp: Vec<f32> = (0..bh * l * s)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let delta: Vec<f32> = (0..bh * l).map(|_| rng.random_range(-1.0..1.0)).collect();
        // Reference.
        let blocked = |i: usize, j: usize| {
            let (gq, gk) = (groups[q_start + i], groups[j]);
            gq > 0 && gk > 0 && gq != gk
        };
        let mut lse_ref = vec![0f64; bh * l];
        let mut p_ref = vec![0f64; bh * l * s];
        for r in 0..bh * l {
            let i = r % l;
            let row = &raw[r * s..(r + 1) * s];
            let sum: f64 = (0..s)
                .filter(|&j| !blocked(i, j))
                .map(|j| (row[j] as f64 * scale).exp())
                .sum();
            lse_ref[r] = sum.ln();
            for j in 0..s {
                if !blocked(i, j) {
                    p_ref[r * s + j] = (row[j] as f64 * scale - lse_ref[r]).exp();
                }
            }
        }
        let on = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, gpu).unwrap();
        let scores = on(&raw, &[2, 3, l, s]);
        let g = Tensor::from_slice(groups, s, gpu).unwrap();
        let mask = Some(RowMask {
            groups: &g,
            q_start,
        });
        let back = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let lse = row_logsumexp(&scores, mask, scale).unwrap();
        assert_eq!(lse.dims(), &[2, 3, l, 1]);
        let worst = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        let d = worst(&back(&lse), &lse_ref);
        eprintln!("row logsumexp: max |cuda - f64| = {d:.2e}");
        assert!(d < 1e-5, "lse {d}");
        for (dt, tol) in [(DType::F32, 1e-6), (DType::BF16, 4e-3)] {
            let p = probs(&scores, &lse, mask, scale, dt).unwrap();
            assert_eq!(p.dtype(), dt);
            let pv = back(&p);
            let d = worst(&pv, &p_ref);
            eprintln!("probs {dt:?}: max |cuda - f64| = {d:.2e} (bound {tol:.0e})");
            assert!(d < tol, "probs {dt:?}: {d}");
            // dS from the P the kernel rounded, as the composed path does.
            let ds = softmax_grad(&p, &on(&dp, &[2, 3, l, s]), &on(&delta, &[2, 3, l, 1])).unwrap();
            let ds_ref: Vec<f64> = (0..bh * l * s)
                .map(|e| pv[e] * (dp[e] as f64 - delta[e / s] as f64))
                .collect();
            let d = worst(&back(&ds), &ds_ref);
            eprintln!("softmax grad {dt:?}: max |cuda - f64| = {d:.2e} (bound {tol:.0e})");
            assert!(d < tol, "dS {dt:?}: {d}");
        }
        // Without a mask every key counts.
        let lse = row_logsumexp(&scores, None, scale).unwrap();
        let first: f64 = raw[..s]
            .iter()
            .map(|&x| (x as f64 * scale).exp())
            .sum::<f64>()
            .ln();
        assert!((back(&lse)[0] - first).abs() < 1e-5);
        // Group ids that do not cover the keys are refused.
        let short = Tensor::from_slice(&groups[..30], 30, gpu).unwrap();
        let bad = Some(RowMask {
            groups: &short,
            q_start,
        });
        assert!(row_logsumexp(&scores, bad, scale).is_err());
    }
}
