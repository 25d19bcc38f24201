//! Chunked attention's softmax on CUDA, fused (kernels in `attention_softmax.cu`, NVRTC).
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
//! CPU runs the same chunked attention from candle ops (flux's `attention` module), which is
//! the reference these kernels are tested against.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

const MODULE: &str = "mosaic_attention_softmax";
const SOURCE: &str = include_str!("attention_softmax.cu");
const THREADS: u32 = 256;

/// The kernel source, for tools that compile it ahead of time.
pub fn source() -> &'static str {
    SOURCE
}

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    crate::cuda::compiled(&PTX, SOURCE, "attention softmax")
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

fn cpu_refused(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: a CUDA kernel was given CPU tensors (the CPU composes candle ops instead)"
    ))
}

fn launch_err(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// Blocks for an elementwise grid-stride kernel over `n` elements.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
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
    scale: f32,
    has_mask: i32,
}

impl CustomOp2 for RowLse {
    fn name(&self) -> &'static str {
        "attention-row-logsumexp"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cpu_refused(self.name()))
    }

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
        let mut b = f.builder();
        b.arg(&sv)
            .arg(&gv)
            .arg(&out)
            .arg(&l)
            .arg(&n)
            .arg(&q0)
            .arg(&self.scale)
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
            scale: scale as f32,
            has_mask,
        },
    )
}

struct Probs {
    rows_per_chunk: usize,
    q_start: usize,
    scale: f32,
    has_mask: i32,
    dtype: DType,
}

impl CustomOp3 for Probs {
    fn name(&self) -> &'static str {
        "attention-probs"
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
        Err(cpu_refused(self.name()))
    }

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
                    .arg(&self.scale)
                    .arg(&self.has_mask);
                // Safety: argument types and order match the kernel; sizes checked above.
                unsafe { b.launch(grid(n)) }.map_err(launch_err)?;
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
            scale: scale as f32,
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
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cpu_refused(self.name()))
    }

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
                unsafe { b.launch(grid(n)) }.map_err(launch_err)?;
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

    /// The kernels against plain f64 loops, with a mask whose chunk straddles the shared
    /// tokens and a reference, in f32 and bf16. Says it did not run where no CUDA device opens.
    #[test]
    fn cuda_softmax_kernels_match_plain_loops() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("not run: no CUDA device");
            return;
        };
        let (bh, l, s, q_start, scale) = (6usize, 7usize, 40usize, 8usize, 0.3f64);
        let mut groups = vec![0u32; 10];
        for (g, len) in [(1u32, 12usize), (2, 10), (3, 8)] {
            groups.extend(std::iter::repeat_n(g, len));
        }
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
        let on = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &gpu).unwrap();
        let scores = on(&raw, &[2, 3, l, s]);
        let g = Tensor::from_slice(&groups, s, &gpu).unwrap();
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
        let short = Tensor::from_slice(&groups[..30], 30, &gpu).unwrap();
        let bad = Some(RowMask {
            groups: &short,
            q_start,
        });
        assert!(row_logsumexp(&scores, bad, scale).is_err());
    }
}
