//! Attention on the CPU one tile of query rows at a time, in the order FlashAttention uses on a
//! GPU: per head and per tile, the scores Q_t K^T, their softmax and the product with V run
//! while the tile is in the core's cache, and the backward recomputes the tile's P from the
//! rows' logsumexp.
//!
//! Composed from candle ops on the CPU (flux's chunked attention with the fused softmax of
//! [`crate::softmax`]), a chunk is a batched product over every head into a [B, H, rows, S]
//! score block, softmax passes over that block, and a second product with V; the backward the
//! same with four products, plus gathers and scatter-adds for the keys a reference's rows see.
//! Here each product is one strided GEMM call (the `gemm` crate, which candle's CPU matmul
//! runs) on the tensors' own memory: K^T, P^T and dS^T are strides, not copies, and a
//! reference's rows take the key ranges they see ([`crate::softmax::seen_key_ranges`]) in
//! place, one product per range, so no masked key is computed and no K or V is gathered.
//!
//! f32 and f64, statistics in the input type (f32 with `softmax`'s polynomial exp, in loops
//! built for AVX2 and FMA where the CPU has them). Heads run in parallel (rayon), each product
//! on one thread.

use std::ops::Range;

use candle_core::{DType, Device, Layout, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{KernelError, Result};
use crate::softmax::{exp_f32, max_scaled_f32, seen_key_ranges, RowFloat, LANES};

const OP: &str = "cpu attention";

/// Bytes of score (and, in the backward, dS) values one tile keeps: within a core's share of
/// the last-level cache, so the softmax and the products after it read the tile from cache.
/// Tiles that fit L2 (128 or 512 KiB) were slower on a 2-core EPYC (512 KiB L2): fewer rows
/// make GEMM calls further below their peak (medium preset, 512 px, two references: attention
/// forward + backward 23.0 s at 128 KiB, 19.8 s at 512 KiB, 18.1 s at 2 MiB; docs/kernels.md).
pub const TILE_BYTES: usize = 2 << 20;
/// Rows below which a tile is not cut further, whatever its keys: a GEMM of fewer rows than its
/// micro-kernel's height wastes lanes.
const MIN_TILE_ROWS: usize = 16;
/// Rows above which a tile is not grown: more rows only add memory.
const MAX_TILE_ROWS: usize = 256;

/// The rows of a tile against `keys` seen keys when each row keeps `bytes_per_key` bytes per
/// key ([`TILE_BYTES`] in all), never more than `cap` (the caller's chunk) nor fewer than one.
pub fn tile_rows(keys: usize, bytes_per_key: usize, cap: usize) -> usize {
    let fit = TILE_BYTES / (keys * bytes_per_key).max(1);
    fit.clamp(MIN_TILE_ROWS, MAX_TILE_ROWS).min(cap).max(1)
}

/// A run of query rows and the key ranges (ascending, disjoint) every one of them sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBlock {
    pub rows: Range<usize>,
    pub keys: Vec<Range<usize>>,
}

impl RowBlock {
    fn key_count(&self) -> usize {
        self.keys.iter().map(|r| r.len()).sum()
    }
}

/// The blocks of `queries` query rows (tokens `0..queries`) against `keys` keys. Without
/// `groups` one block: every row sees every key. With one group id per key (the reference
/// isolation mask), one block per run of rows of one group, with the ranges that group sees.
pub fn row_blocks(groups: Option<&[u32]>, queries: usize, keys: usize) -> Result<Vec<RowBlock>> {
    let Some(groups) = groups else {
        #[allow(clippy::single_range_in_vec_init)] // one range: every key, not 0..keys indices
        return Ok(vec![RowBlock {
            rows: 0..queries,
            keys: vec![0..keys],
        }]);
    };
    if groups.len() != keys {
        return Err(KernelError::Length {
            op: OP,
            arg: "groups",
            found: groups.len(),
            expected: keys,
            expected_from: "the keys of `k`",
        });
    }
    if queries > keys {
        return Err(KernelError::Shape {
            op: OP,
            arg: "q",
            expected: format!("at most {keys} query rows (query row i is token i)"),
            found: vec![queries],
        });
    }
    let mut blocks = Vec::new();
    let mut start = 0;
    while start < queries {
        let g = groups[start];
        let end = start
            + groups[start..queries]
                .iter()
                .take_while(|&&x| x == g)
                .count();
        blocks.push(RowBlock {
            rows: start..end,
            keys: seen_key_ranges(groups, g),
        });
        start = end;
    }
    Ok(blocks)
}

/// The float types the tiles run in, with their two row loops.
pub(crate) trait TileFloat:
    RowFloat + WithDType + std::ops::AddAssign + std::ops::MulAssign
{
    /// The softmax of `scale` x `row` in place; returns the row's logsumexp. The exponentials
    /// of the sum are kept and divided by it, so each score takes one exp.
    fn softmax_in_place(row: &mut [Self], scale: Self) -> Self {
        let m = row.iter().fold(
            Self::NEG_INF,
            |m, &x| if x * scale > m { x * scale } else { m },
        );
        let mut sum = Self::ZERO;
        for x in row.iter_mut() {
            *x = (*x * scale - m).exp();
            sum += *x;
        }
        let inv = Self::of(1.0) / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
        m + sum.ln()
    }

    /// The backward's row: P = exp(`scale` x `p` - `lse`) in place of the scores, and
    /// dS = P (dP - `delta`) in place of dP.
    fn probs_and_grad(p: &mut [Self], ds: &mut [Self], scale: Self, lse: Self, delta: Self) {
        for (pv, dv) in p.iter_mut().zip(ds.iter_mut()) {
            *pv = (*pv * scale - lse).exp();
            *dv = *pv * (*dv - delta);
        }
    }
}

impl TileFloat for f64 {}

/// f32 rows in fixed lanes, so the loops vectorize (a float max or sum is otherwise a serial
/// chain the compiler may not reorder), with `softmax`'s polynomial exp. Built twice: for the
/// baseline target and with AVX2 and FMA, chosen at run time (the crate is built for plain
/// x86-64, whose SSE2 vectors hold four floats). The lanes fix the order of the sums, so both
/// builds give the same values.
impl TileFloat for f32 {
    fn softmax_in_place(row: &mut [f32], scale: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // Safety: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { avx2::softmax(row, scale) };
        }
        softmax_f32(row, scale)
    }

    fn probs_and_grad(p: &mut [f32], ds: &mut [f32], scale: f32, lse: f32, delta: f32) {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // Safety: as above.
            return unsafe { avx2::probs_and_grad(p, ds, scale, lse, delta) };
        }
        probs_and_grad_f32(p, ds, scale, lse, delta)
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax(row: &mut [f32], scale: f32) -> f32 {
        super::softmax_f32(row, scale)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn probs_and_grad(
        p: &mut [f32],
        ds: &mut [f32],
        scale: f32,
        lse: f32,
        delta: f32,
    ) {
        super::probs_and_grad_f32(p, ds, scale, lse, delta)
    }
}

#[inline(always)]
fn softmax_f32(row: &mut [f32], scale: f32) -> f32 {
    let m = max_scaled_f32(row, scale, std::slice::from_ref(&(0..row.len())));
    let mut lane_sum = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_f32(c[i] * scale - m);
            lane_sum[i] += c[i];
        }
    }
    let mut tail = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_f32(*x * scale - m);
        tail += *x;
    }
    let sum = lane_sum.iter().sum::<f32>() + tail;
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    m + sum.ln()
}

#[inline(always)]
fn probs_and_grad_f32(p: &mut [f32], ds: &mut [f32], scale: f32, lse: f32, delta: f32) {
    for (pv, dv) in p.iter_mut().zip(ds.iter_mut()) {
        *pv = exp_f32(*pv * scale - lse);
        *dv = *pv * (*dv - delta);
    }
}

/// A matrix inside a slice: element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<'a, F> {
    data: &'a [F],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, F> Mat<'a, F> {
    /// `rows` x `cols`, row-major with row stride `rs`, from the start of `data`.
    fn rows(data: &'a [F], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose: the same memory, strides swapped.
    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst` (row-major, row stride `dst_rs`, from its start) = `a` `b` x `beta`, added to what
/// `dst` holds when `accumulate`.
fn product<F: TileFloat>(
    dst: &mut [F],
    dst_rs: usize,
    a: Mat<F>,
    b: Mat<F>,
    accumulate: bool,
    beta: F,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Internal invariants (the callers derive every size from checked shapes); they keep the
    // unsafe call below inside the slices.
    assert!(
        b.rows == k
            && a.fits()
            && b.fits()
            && (m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len()),
        "{OP}: product operands out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(F::ZERO);
            }
        }
        return;
    }
    let alpha = if accumulate { F::of(1.0) } else { F::ZERO };
    // Safety: the assert above keeps every element gemm reads (a, b) or writes (dst) inside
    // its slice; `dst` is borrowed mutably, so it overlaps neither operand. f32 and f64 (the
    // only `TileFloat`s) are types gemm takes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            alpha,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `dst` [rows of `a`, seen keys] = `a` M_seen^T, M [keys, d] row-major (K for the scores, V
/// for dP): one product per seen key range, side by side in `dst`'s row of `width` values.
fn against_keys<F: TileFloat>(
    dst: &mut [F],
    width: usize,
    a: Mat<F>,
    m: &[F],
    d: usize,
    seen: &[Range<usize>],
) {
    let mut col = 0;
    for r in seen {
        let mr = Mat::rows(&m[r.start * d..r.end * d], r.len(), d, d).t();
        product(&mut dst[col..], width, a, mr, false, F::of(1.0));
        col += r.len();
    }
}

/// One head's Q [queries, d] and K, V [keys, d].
#[derive(Clone, Copy)]
struct Head<'a, F> {
    q: &'a [F],
    k: &'a [F],
    v: &'a [F],
    d: usize,
}

/// The settings every head shares.
struct Plan<'a, F> {
    blocks: &'a [RowBlock],
    scale: F,
    cap: usize,
}

/// One head's output [queries, d] (arrives zeroed) and each row's logsumexp of its scaled
/// scores.
fn head_forward<F: TileFloat>(h: Head<F>, plan: &Plan<F>, out: &mut [F], lse: &mut [F]) {
    let (d, scale) = (h.d, plan.scale);
    let mut s: Vec<F> = Vec::new();
    for b in plan.blocks {
        let nk = b.key_count();
        if nk == 0 {
            lse[b.rows.clone()].fill(F::NEG_INF);
            continue;
        }
        let tile = tile_rows(nk, std::mem::size_of::<F>(), plan.cap);
        for start in b.rows.clone().step_by(tile) {
            let tr = tile.min(b.rows.end - start);
            let n = tr * nk;
            s.resize(n, F::ZERO);
            let qt = Mat::rows(&h.q[start * d..(start + tr) * d], tr, d, d);
            against_keys(&mut s[..n], nk, qt, h.k, d, &b.keys);
            for (i, row) in s[..n].chunks_exact_mut(nk).enumerate() {
                lse[start + i] = F::softmax_in_place(row, scale);
            }
            let ot = &mut out[start * d..(start + tr) * d];
            let mut col = 0;
            for r in &b.keys {
                let p = Mat::rows(&s[col..n], tr, r.len(), nk);
                let vr = Mat::rows(&h.v[r.start * d..r.end * d], r.len(), d, d);
                product(ot, d, p, vr, true, F::of(1.0));
                col += r.len();
            }
        }
    }
}

/// One head's gradients: dQ [queries, d] and dK, dV [keys, d], arriving zeroed.
struct HeadGrads<'a, F> {
    dq: &'a mut [F],
    dk: &'a mut [F],
    dv: &'a mut [F],
}

/// The forward's output and logsumexp of one head, and the output's gradient.
#[derive(Clone, Copy)]
struct Saved<'a, F> {
    o: &'a [F],
    g: &'a [F],
    lse: &'a [F],
}

/// Per tile: P = exp(scale S - lse); dP = dO V^T; dS = P (dP - rowsum(dO O));
/// dQ += scale dS K; dK += scale dS^T Q; dV += P^T dO, each per seen key range.
fn head_backward<F: TileFloat>(h: Head<F>, saved: Saved<F>, plan: &Plan<F>, grads: HeadGrads<F>) {
    let (d, scale) = (h.d, plan.scale);
    let (mut p, mut ds): (Vec<F>, Vec<F>) = (Vec::new(), Vec::new());
    for b in plan.blocks {
        let nk = b.key_count();
        if nk == 0 {
            continue;
        }
        // Two buffers (P and dS) share the tile's bytes.
        let tile = tile_rows(nk, 2 * std::mem::size_of::<F>(), plan.cap);
        for start in b.rows.clone().step_by(tile) {
            let tr = tile.min(b.rows.end - start);
            let n = tr * nk;
            p.resize(n, F::ZERO);
            ds.resize(n, F::ZERO);
            let rows = start * d..(start + tr) * d;
            let qt = Mat::rows(&h.q[rows.clone()], tr, d, d);
            let gt = Mat::rows(&saved.g[rows.clone()], tr, d, d);
            against_keys(&mut p[..n], nk, qt, h.k, d, &b.keys);
            against_keys(&mut ds[..n], nk, gt, h.v, d, &b.keys);
            for i in 0..tr {
                let at = (start + i) * d..(start + i + 1) * d;
                let delta = saved.g[at.clone()]
                    .iter()
                    .zip(&saved.o[at])
                    .fold(F::ZERO, |acc, (&x, &y)| acc + x * y);
                let l = saved.lse[start + i];
                let row = i * nk..(i + 1) * nk;
                F::probs_and_grad(&mut p[row.clone()], &mut ds[row], scale, l, delta);
            }
            let mut col = 0;
            for r in &b.keys {
                let (len, keys) = (r.len(), r.start * d..r.end * d);
                let dsr = Mat::rows(&ds[col..n], tr, len, nk);
                let pr = Mat::rows(&p[col..n], tr, len, nk);
                let kr = Mat::rows(&h.k[keys.clone()], len, d, d);
                product(&mut grads.dq[rows.clone()], d, dsr, kr, true, scale);
                product(&mut grads.dk[keys.clone()], d, dsr.t(), qt, true, scale);
                product(&mut grads.dv[keys], d, pr.t(), gt, true, F::of(1.0));
                col += len;
            }
        }
    }
}

/// q [B, H, Sq, d] and k, v [B, H, Sk, d], checked to agree, as (heads, Sq, Sk, d).
fn dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let shape_err = |arg, expected: String, t: &Tensor| KernelError::Shape {
        op: OP,
        arg,
        expected,
        found: t.dims().to_vec(),
    };
    let (b, h, sq, d) = q
        .dims4()
        .map_err(|_| shape_err("q", "[batch, heads, queries, head dim]".into(), q))?;
    let (kb, kh, sk, kd) = k
        .dims4()
        .map_err(|_| shape_err("k", "[batch, heads, keys, head dim]".into(), k))?;
    if (kb, kh, kd) != (b, h, d) {
        return Err(shape_err("k", format!("[{b}, {h}, keys, {d}] as q"), k));
    }
    if v.dims() != k.dims() {
        return Err(shape_err("v", format!("{:?} as k", k.dims()), v));
    }
    // Devices: `values` names a tensor that is not on the CPU.
    for (arg, t) in [("k", k), ("v", v)] {
        if t.dtype() != q.dtype() {
            return Err(KernelError::Candle(candle_core::Error::Msg(format!(
                "{OP}: `{arg}` is {:?}, q is {:?}",
                t.dtype(),
                q.dtype()
            ))));
        }
    }
    Ok((b * h, sq, sk, d))
}

/// A contiguous CPU tensor's values.
fn values<'a, F: WithDType>(storage: &'a Storage, layout: &Layout, arg: &str) -> Result<&'a [F]> {
    let msg =
        |m: String| KernelError::Candle(candle_core::Error::Msg(format!("{OP}: `{arg}` {m}")));
    let Storage::Cpu(cpu) = storage else {
        return Err(msg("is not on the CPU".into()));
    };
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| {
        msg(format!(
            "must be contiguous, got strides {:?}",
            layout.stride()
        ))
    })?;
    Ok(&cpu.as_slice::<F>()?[a..b])
}

/// Runs `f` on the values of `tensors`, in their order.
fn with_values<F: WithDType, R, const N: usize>(
    tensors: [(&Tensor, &str); N],
    f: impl FnOnce([&[F]; N]) -> R,
) -> Result<R> {
    let guards = tensors.map(|(t, _)| t.storage_and_layout());
    let mut slices: [&[F]; N] = [&[]; N];
    for (i, ((storage, layout), (_, arg))) in guards.iter().zip(&tensors).enumerate() {
        slices[i] = values(storage, layout, arg)?;
    }
    Ok(f(slices))
}

fn forward_typed<F: TileFloat>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    blocks: &[RowBlock],
    scale: f64,
    cap: usize,
) -> Result<(Tensor, Tensor)> {
    let (heads, sq, sk, d) = dims(q, k, v)?;
    let plan = Plan {
        blocks,
        scale: F::of(scale),
        cap,
    };
    let (out, lse) = with_values([(q, "q"), (k, "k"), (v, "v")], |[q, k, v]: [&[F]; 3]| {
        let mut out = vec![F::ZERO; heads * sq * d];
        let mut lse = vec![F::ZERO; heads * sq];
        if sq > 0 && d > 0 {
            out.par_chunks_mut(sq * d)
                .zip(lse.par_chunks_mut(sq))
                .enumerate()
                .for_each(|(i, (o, l))| {
                    let h = Head {
                        q: &q[i * sq * d..(i + 1) * sq * d],
                        k: &k[i * sk * d..(i + 1) * sk * d],
                        v: &v[i * sk * d..(i + 1) * sk * d],
                        d,
                    };
                    head_forward(h, &plan, o, l);
                });
        }
        (out, lse)
    })?;
    let (b, h) = (q.dim(0)?, q.dim(1)?);
    Ok((
        Tensor::from_vec(out, (b, h, sq, d), &Device::Cpu)?,
        Tensor::from_vec(lse, (b, h, sq, 1), &Device::Cpu)?,
    ))
}

fn backward_typed<F: TileFloat>(
    [q, k, v]: [&Tensor; 3],
    [o, g, lse]: [&Tensor; 3],
    blocks: &[RowBlock],
    scale: f64,
    cap: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (heads, sq, sk, d) = dims(q, k, v)?;
    for (arg, t, want) in [("out", o, q.dims()), ("grad", g, q.dims())] {
        if t.dims() != want {
            return Err(KernelError::Shape {
                op: OP,
                arg,
                expected: format!("{want:?} as q"),
                found: t.dims().to_vec(),
            });
        }
    }
    if lse.elem_count() != heads * sq {
        return Err(KernelError::Shape {
            op: OP,
            arg: "lse",
            expected: format!("{heads} x {sq} values, one per query row"),
            found: lse.dims().to_vec(),
        });
    }
    let plan = Plan {
        blocks,
        scale: F::of(scale),
        cap,
    };
    let tensors = [
        (q, "q"),
        (k, "k"),
        (v, "v"),
        (o, "out"),
        (g, "grad"),
        (lse, "lse"),
    ];
    let (dq, dk, dv) = with_values(tensors, |[q, k, v, o, g, lse]: [&[F]; 6]| {
        let mut dq = vec![F::ZERO; heads * sq * d];
        let mut dk = vec![F::ZERO; heads * sk * d];
        let mut dv = vec![F::ZERO; heads * sk * d];
        if sq > 0 && sk > 0 && d > 0 {
            dq.par_chunks_mut(sq * d)
                .zip(dk.par_chunks_mut(sk * d).zip(dv.par_chunks_mut(sk * d)))
                .enumerate()
                .for_each(|(i, (dq, (dk, dv)))| {
                    let rows = i * sq * d..(i + 1) * sq * d;
                    let keys = i * sk * d..(i + 1) * sk * d;
                    let h = Head {
                        q: &q[rows.clone()],
                        k: &k[keys.clone()],
                        v: &v[keys],
                        d,
                    };
                    let saved = Saved {
                        o: &o[rows.clone()],
                        g: &g[rows],
                        lse: &lse[i * sq..(i + 1) * sq],
                    };
                    head_backward(h, saved, &plan, HeadGrads { dq, dk, dv });
                });
        }
        (dq, dk, dv)
    })?;
    let (b, h) = (q.dim(0)?, q.dim(1)?);
    Ok((
        Tensor::from_vec(dq, (b, h, sq, d), &Device::Cpu)?,
        Tensor::from_vec(dk, (b, h, sk, d), &Device::Cpu)?,
        Tensor::from_vec(dv, (b, h, sk, d), &Device::Cpu)?,
    ))
}

fn unsupported(dtype: DType) -> KernelError {
    KernelError::Candle(candle_core::Error::Msg(format!(
        "{OP}: f32 or f64 inputs, not {dtype:?}"
    )))
}

/// softmax(Q K^T x `scale` + mask) V for contiguous CPU tensors q [B, H, Sq, d] and k, v
/// [B, H, Sk, d] (f32 or f64), query row i being token i, `groups` one id per key (the
/// reference isolation mask; `None`: every row sees every key). Tiles hold at most `cap`
/// rows. Returns the output [B, H, Sq, d] and each row's logsumexp [B, H, Sq, 1], which
/// [`backward`] takes.
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: Option<&[u32]>,
    scale: f64,
    cap: usize,
) -> Result<(Tensor, Tensor)> {
    let blocks = row_blocks(groups, q.dim(2)?, k.dim(2)?)?;
    match q.dtype() {
        DType::F32 => forward_typed::<f32>(q, k, v, &blocks, scale, cap),
        DType::F64 => forward_typed::<f64>(q, k, v, &blocks, scale, cap),
        other => Err(unsupported(other)),
    }
}

/// The gradients (dq, dk, dv) of [`forward`]'s output for its gradient `grad` [B, H, Sq, d],
/// from its output `out` and logsumexp `lse` (all contiguous).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    grad: &Tensor,
    lse: &Tensor,
    groups: Option<&[u32]>,
    scale: f64,
    cap: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let blocks = row_blocks(groups, q.dim(2)?, k.dim(2)?)?;
    let inputs = [q, k, v];
    let saved = [out, grad, lse];
    match q.dtype() {
        DType::F32 => backward_typed::<f32>(inputs, saved, &blocks, scale, cap),
        DType::F64 => backward_typed::<f64>(inputs, saved, &blocks, scale, cap),
        other => Err(unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn uniform(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Independent slow attention and its gradients for the loss sum(out * w), in f64 loops
    /// over every (row, key) pair with the mask tested per key.
    struct Slow {
        out: Vec<f64>,
        dq: Vec<f64>,
        dk: Vec<f64>,
        dv: Vec<f64>,
    }

    fn slow([q, k, v, w]: [&Tensor; 4], groups: Option<&[u32]>, scale: f64) -> Slow {
        let (b, h, sq, d) = q.dims4().unwrap();
        let sk = k.dim(2).unwrap();
        let [q, k, v, w] = [q, k, v, w].map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap());
        let seen = |i: usize, j: usize| match groups {
            None => true,
            Some(g) => g[i] == 0 || g[j] == 0 || g[i] == g[j],
        };
        let mut r = Slow {
            out: vec![0.0; b * h * sq * d],
            dq: vec![0.0; b * h * sq * d],
            dk: vec![0.0; b * h * sk * d],
            dv: vec![0.0; b * h * sk * d],
        };
        for hd in 0..b * h {
            let (qo, ko) = (hd * sq * d, hd * sk * d);
            for i in 0..sq {
                let s: Vec<f64> = (0..sk)
                    .map(|j| {
                        if !seen(i, j) {
                            return f64::NEG_INFINITY;
                        }
                        scale
                            * (0..d)
                                .map(|c| q[qo + i * d + c] * k[ko + j * d + c])
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                for c in 0..d {
                    r.out[qo + i * d + c] = (0..sk).map(|j| p[j] * v[ko + j * d + c]).sum();
                }
                // dO = w; dP_j = w_i . v_j; dS_j = P_j (dP_j - sum_l P_l dP_l).
                let dp: Vec<f64> = (0..sk)
                    .map(|j| (0..d).map(|c| w[qo + i * d + c] * v[ko + j * d + c]).sum())
                    .collect();
                let mean: f64 = (0..sk).map(|j| p[j] * dp[j]).sum();
                for j in 0..sk {
                    let ds = p[j] * (dp[j] - mean);
                    for c in 0..d {
                        r.dq[qo + i * d + c] += scale * ds * k[ko + j * d + c];
                        r.dk[ko + j * d + c] += scale * ds * q[qo + i * d + c];
                        r.dv[ko + j * d + c] += p[j] * w[qo + i * d + c];
                    }
                }
            }
        }
        r
    }

    fn max_abs(a: &Tensor, b: &[f64]) -> f64 {
        let a = a
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// Shared tokens, then references of `refs` tokens: group ids.
    fn groups(shared: usize, refs: &[usize]) -> Vec<u32> {
        let mut g = vec![0u32; shared];
        for (i, &n) in refs.iter().enumerate() {
            g.extend(std::iter::repeat_n(i as u32 + 1, n));
        }
        g
    }

    /// Every output and gradient against the slow loops, in f64 and f32, with and without the
    /// mask, with fewer queries than keys (cached references), and with tiles of 1, 3 and 64
    /// rows (tiles that straddle nothing, end inside a block, or hold whole blocks).
    #[test]
    fn outputs_and_gradients_match_slow_loops() {
        let g = groups(5, &[4, 6, 3]);
        let sk = g.len();
        for (sq, masked) in [(sk, true), (sk, false), (7, true)] {
            let shape_q = [2, 3, sq, 8];
            let shape_k = [2, 3, sk, 8];
            let (q, k, v, w) = (
                uniform(&shape_q, 1),
                uniform(&shape_k, 2),
                uniform(&shape_k, 3),
                uniform(&shape_q, 4),
            );
            let mask = masked.then_some(g.as_slice());
            let scale = 0.35;
            let want = slow([&q, &k, &v, &w], mask, scale);
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
                let [q, k, v, w] = [&q, &k, &v, &w].map(|t| t.to_dtype(dtype).unwrap());
                for cap in [1, 3, 64] {
                    let (out, lse) = forward(&q, &k, &v, mask, scale, cap).unwrap();
                    assert_eq!(lse.dims(), &[2, 3, sq, 1]);
                    let (dq, dk, dv) =
                        backward(&q, &k, &v, &out, &w, &lse, mask, scale, cap).unwrap();
                    for (name, got, want) in [
                        ("out", &out, &want.out),
                        ("dq", &dq, &want.dq),
                        ("dk", &dk, &want.dk),
                        ("dv", &dv, &want.dv),
                    ] {
                        let diff = max_abs(got, want);
                        assert!(
                            diff < tol,
                            "{dtype:?} sq {sq} masked {masked} cap {cap} {name}: {diff}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // key ranges, not index lists
    fn blocks_follow_the_groups() {
        let g = groups(2, &[2, 1]);
        let blocks = row_blocks(Some(&g), 5, 5).unwrap();
        assert_eq!(
            blocks,
            vec![
                RowBlock {
                    rows: 0..2,
                    keys: vec![0..5]
                },
                RowBlock {
                    rows: 2..4,
                    keys: vec![0..4]
                },
                RowBlock {
                    rows: 4..5,
                    keys: vec![0..2, 4..5]
                },
            ]
        );
        // Cached references: only the shared rows are queries.
        assert_eq!(row_blocks(Some(&g), 2, 5).unwrap(), blocks[..1].to_vec());
        assert_eq!(
            row_blocks(None, 3, 5).unwrap(),
            vec![RowBlock {
                rows: 0..3,
                keys: vec![0..5]
            }]
        );
    }

    #[test]
    fn wrong_arguments_are_named() {
        let q = uniform(&[1, 2, 4, 8], 1);
        let k = uniform(&[1, 2, 5, 8], 2);
        let err = |r: Result<(Tensor, Tensor)>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let e = err(forward(&q, &k, &k, Some(&[0, 0, 1]), 1.0, 8));
        assert!(
            e.contains("`groups` has length 3") && e.contains("implies 5"),
            "{e}"
        );
        let e = err(forward(&k, &q, &q, Some(&[0; 4]), 1.0, 8));
        assert!(
            e.contains("`q`") && e.contains("at most 4 query rows"),
            "{e}"
        );
        let e = err(forward(&q, &k, &q, None, 1.0, 8));
        assert!(e.contains("`v`"), "{e}");
        let wide = uniform(&[1, 2, 5, 4], 3);
        let e = err(forward(&q, &wide, &wide, None, 1.0, 8));
        assert!(e.contains("`k`") && e.contains("[1, 2, keys, 8]"), "{e}");
        let half = q.to_dtype(DType::BF16).unwrap();
        let e = err(forward(&half, &half, &half, None, 1.0, 8));
        assert!(e.contains("f32 or f64"), "{e}");
        let t = q.t().unwrap();
        let e = err(forward(&t, &t, &t, None, 1.0, 8));
        assert!(e.contains("contiguous"), "{e}");
    }

    /// The AVX2 build of the f32 row loops and the baseline one give the same bits (the lanes
    /// fix the order of every sum), and the softmax agrees with exp(scale x - lse) in f64.
    #[test]
    fn f32_row_loops_agree_across_builds() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for n in [1usize, 7, 8, 13, 100, 1000] {
            let row: Vec<f32> = (0..n).map(|_| rng.random_range(-30.0..30.0)).collect();
            let (mut a, mut b) = (row.clone(), row.clone());
            let la = <f32 as TileFloat>::softmax_in_place(&mut a, 0.125);
            let lb = softmax_f32(&mut b, 0.125);
            assert_eq!(
                (
                    la.to_bits(),
                    a.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                ),
                (
                    lb.to_bits(),
                    b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                ),
                "n {n}"
            );
            let m = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64 * 0.125));
            let lse = m + row
                .iter()
                .map(|&x| (x as f64 * 0.125 - m).exp())
                .sum::<f64>()
                .ln();
            assert!((la as f64 - lse).abs() < 1e-5, "n {n}: {la} vs {lse}");
            for (&x, &p) in row.iter().zip(&a) {
                let want = (x as f64 * 0.125 - lse).exp();
                assert!(
                    (p as f64 - want).abs() < 1e-6 * (1.0 + want),
                    "n {n}: {p} vs {want}"
                );
            }
            let dp: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut pa, mut da, mut pb, mut db) = (row.clone(), dp.clone(), row.clone(), dp);
            <f32 as TileFloat>::probs_and_grad(&mut pa, &mut da, 0.125, la, 0.3);
            probs_and_grad_f32(&mut pb, &mut db, 0.125, la, 0.3);
            assert_eq!(pa, pb);
            assert_eq!(da, db);
        }
    }

    #[test]
    fn tiles_fit_the_budget_within_their_bounds() {
        assert_eq!(tile_rows(3136, 4, 512), TILE_BYTES / (3136 * 4));
        assert!(tile_rows(3136, 4, 512) * 3136 * 4 <= TILE_BYTES);
        assert_eq!(tile_rows(1_000_000, 8, 512), MIN_TILE_ROWS);
        assert_eq!(tile_rows(10, 4, 512), MAX_TILE_ROWS);
        assert_eq!(tile_rows(10, 4, 5), 5);
        assert_eq!(tile_rows(0, 4, 0), 1);
    }
}
