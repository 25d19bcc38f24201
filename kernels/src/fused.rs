//! Fused row ops of the FLUX blocks, with their backward: LayerNorm without affine parameters,
//! RMSNorm with a frozen weight (the QK norms), RoPE, and GELU with the tanh approximation.
//!
//! Composed from candle ops, each of these is eight to twelve elementwise kernels forward (an
//! upcast, reductions, broadcasts, a downcast) and more in the backward, each writing a whole
//! activation: on a GPU the QK norms, RoPE and the block norms took about a fifth of a FLUX.1-dev
//! step. Here each is one pass forward and one backward, statistics in f32 (f64 for f64 inputs
//! on the CPU) and each output rounded once. The CPU runs plain loops; CUDA runs the kernels in
//! `fused.cu` (NVRTC) for f32 and bf16. The composed forms in flux's `ops` module are the
//! reference they are tested against (by value and by finite differences there).
//!
//! GELU on the CPU runs in f32 (f64 for f64) over both cores (rayon): candle's is one scalar
//! loop, and its backward a chain of eight ops.
//!
//! Gradients: LayerNorm, RoPE and GELU have one differentiable input. RMSNorm returns no gradient
//! for its weight: FLUX's QK-norm weights belong to the frozen base.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

/// The values of a contiguous CPU storage as f64.
fn values(s: &CpuStorage, l: &Layout, op: &str) -> candle_core::Result<Vec<f64>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].iter().map(|&x| x as f64).collect(),
        CpuStorage::F64(v) => v[a..b].to_vec(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f64()).collect(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f64()).collect(),
        other => candle_core::bail!("{op}: takes floats, not {:?}", other.dtype()),
    })
}

/// `v` as a CPU storage of `dtype`.
fn storage(v: Vec<f64>, dtype: DType) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v.into_iter().map(|x| x as f32).collect()),
        DType::F64 => CpuStorage::F64(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f64).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f64).collect()),
        other => candle_core::bail!("fused op: cannot write {other:?}"),
    })
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// (mean, 1/sqrt(var + eps)) of a row.
fn moments(row: &[f64], eps: f64) -> (f64, f64) {
    let d = row.len() as f64;
    let mean = row.iter().sum::<f64>() / d;
    let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

fn rms_rstd(row: &[f64], eps: f64) -> f64 {
    1.0 / (row.iter().map(|x| x * x).sum::<f64>() / row.len() as f64 + eps).sqrt()
}

/// LayerNorm over the last dim without affine parameters.
struct LayerNorm {
    eps: f64,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l, self.name())?;
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(last_dim(l)) {
            let (mean, rstd) = moments(row, self.eps);
            y.extend(row.iter().map(|v| (v - mean) * rstd));
        }
        Ok((storage(y, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::rows(cuda::Kernel::LayerNormFwd, &[(s, l)], last_dim(l), self.eps)
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &LayerNormBwd { eps: self.eps },
        )?))
    }
}

struct LayerNormBwd {
    eps: f64,
}

impl CustomOp2 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (values(s1, l1, self.name())?, values(s2, l2, self.name())?);
        let d = last_dim(l1);
        let mut dx = Vec::with_capacity(x.len());
        for (row, grow) in x.chunks(d).zip(g.chunks(d)) {
            let (mean, rstd) = moments(row, self.eps);
            let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
            let mg = grow.iter().sum::<f64>() / d as f64;
            let mgx = grow.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            dx.extend(
                grow.iter()
                    .zip(&xhat)
                    .map(|(gj, xj)| rstd * (gj - mg - xj * mgx)),
            );
        }
        Ok((storage(dx, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::rows(
            cuda::Kernel::LayerNormBwd,
            &[(s1, l1), (s2, l2)],
            last_dim(l1),
            self.eps,
        )
    }
}

/// LayerNorm over the last dim of `x` without affine parameters, fused (module docs).
pub fn layer_norm(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(LayerNorm { eps })
}

/// RMSNorm over the last dim with a frozen weight.
struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (values(s1, l1, self.name())?, values(s2, l2, self.name())?);
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(last_dim(l1)) {
            let rstd = rms_rstd(row, self.eps);
            y.extend(row.iter().zip(&w).map(|(v, wj)| v * rstd * wj));
        }
        Ok((storage(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::rows(
            cuda::Kernel::RmsNormFwd,
            &[(s1, l1), (s2, l2)],
            last_dim(l1),
            self.eps,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s1, l1, self.name())?;
        let w = values(s2, l2, self.name())?;
        let g = values(s3, l3, self.name())?;
        let d = last_dim(l1);
        let mut dx = Vec::with_capacity(x.len());
        for (row, grow) in x.chunks(d).zip(g.chunks(d)) {
            let rstd = rms_rstd(row, self.eps);
            let m = row
                .iter()
                .zip(grow)
                .zip(&w)
                .map(|((xj, gj), wj)| wj * gj * xj * rstd)
                .sum::<f64>()
                / d as f64;
            dx.extend(
                row.iter()
                    .zip(grow)
                    .zip(&w)
                    .map(|((xj, gj), wj)| rstd * (wj * gj - xj * rstd * m)),
            );
        }
        Ok((storage(dx, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::rows(
            cuda::Kernel::RmsNormBwd,
            &[(s1, l1), (s2, l2), (s3, l3)],
            last_dim(l1),
            self.eps,
        )
    }
}

/// RMSNorm over the last dim of `x` with weight `w` [D] (frozen: no gradient), fused.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [d] {
        candle_core::bail!("fused rms norm: weight {:?} for rows of {d}", w.dims());
    }
    x.contiguous()?
        .apply_op2(&w.to_dtype(x.dtype())?.contiguous()?, RmsNorm { eps })
}

/// RoPE on consecutive pairs of the last dim; `sign` -1 rotates back (its own backward).
struct Rope {
    sign: f64,
}

impl Rope {
    fn check(l: &Layout, lc: &Layout) -> candle_core::Result<(usize, usize)> {
        let dims = l.dims();
        let (s, hd) = match dims {
            [.., s, hd] if hd % 2 == 0 => (*s, *hd),
            _ => candle_core::bail!("fused rope: input {dims:?} needs [.., S, even head dim]"),
        };
        if lc.dims() != [s, hd / 2] {
            candle_core::bail!(
                "fused rope: angle tables {:?} for input {dims:?} (expected [{s}, {}])",
                lc.dims(),
                hd / 2
            );
        }
        Ok((s, hd / 2))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (s, k) = Self::check(l1, l2)?;
        let x = values(s1, l1, self.name())?;
        let (cos, sin) = (values(s2, l2, self.name())?, values(s3, l3, self.name())?);
        let mut y = vec![0f64; x.len()];
        for (p, (pair, out)) in x.chunks(2).zip(y.chunks_mut(2)).enumerate() {
            let a = ((p / k) % s) * k + p % k;
            let (c, sn) = (cos[a], self.sign * sin[a]);
            out[0] = pair[0] * c - pair[1] * sn;
            out[1] = pair[1] * c + pair[0] * sn;
        }
        Ok((storage(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (s, k) = Self::check(l1, l2)?;
        cuda::rope(s1, l1, s2, l2, s3, l3, s, k, self.sign)
    }

    fn bwd(
        &self,
        _: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rope { sign: -self.sign };
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

/// RoPE on consecutive pairs (x_2k, x_2k+1) of the last dim of `x` [.., S, hd] with angle
/// tables `cos`, `sin` [S, hd/2], fused; the tables get no gradient. On CUDA the tables are
/// read as f32.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let table_dtype = if x.device().is_cuda() {
        DType::F32
    } else {
        cos.dtype()
    };
    let (cos, sin) = (
        cos.to_dtype(table_dtype)?.contiguous()?,
        sin.to_dtype(table_dtype)?.contiguous()?,
    );
    x.contiguous()?.apply_op3(&cos, &sin, Rope { sign: 1.0 })
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)

/// GELU (tanh approximation) and its derivative at `v`, in f64. With u = c v (1 + 0.044715 v^2),
/// 0.5 v (1 + tanh u) = v s for s = sigmoid(2u), and 1 - tanh^2 u = 4 s (1 - s): one exp and
/// one division instead of a tanh, which the CPU's libm computes several times slower.
fn gelu_f64(v: f64) -> (f64, f64) {
    let s = 1.0 / (1.0 + (-2.0 * GELU_C * v * (1.0 + 0.044715 * v * v)).exp());
    let d = s + 2.0 * v * s * (1.0 - s) * GELU_C * (1.0 + 3.0 * 0.044715 * v * v);
    (v * s, d)
}

/// The same in f32 (what f32, bf16 and f16 inputs compute in).
fn gelu_f32(v: f32) -> (f32, f32) {
    let c = GELU_C as f32;
    let s = 1.0 / (1.0 + (-2.0 * c * v * (1.0 + 0.044715 * v * v)).exp());
    let d = s + 2.0 * v * s * (1.0 - s) * c * (1.0 + 3.0 * 0.044715 * v * v);
    (v * s, d)
}

/// Elementwise over `x` (and `dy` for the backward), in parallel chunks: GELU when `dy` is
/// None, else dy x GELU'(x).
fn gelu_cpu(
    x: &CpuStorage,
    lx: &Layout,
    dy: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<CpuStorage> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let range = |l: &Layout| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fused gelu: input must be contiguous".into()))
    };
    let (a, b) = range(lx)?;
    macro_rules! run {
        ($xs:expr, $gs:expr, $f:expr, $to:expr, $from:expr) => {{
            let xs = &$xs[a..b];
            let mut out = vec![$from(0.0); xs.len()];
            match $gs {
                None => out
                    .par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK))
                    .for_each(|(o, x)| {
                        for (o, &x) in o.iter_mut().zip(x) {
                            *o = $from($f($to(x)).0);
                        }
                    }),
                Some(gs) => out
                    .par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
                    .for_each(|(o, (x, g))| {
                        for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                            *o = $from($f($to(x)).1 * $to(g));
                        }
                    }),
            }
            out
        }};
    }
    let grad = |l: &Layout| -> candle_core::Result<(usize, usize)> { range(l) };
    Ok(match (x, dy) {
        (CpuStorage::F32(v), None) => {
            CpuStorage::F32(run!(v, None::<&[f32]>, gelu_f32, |x: f32| x, |x: f32| x))
        }
        (CpuStorage::F32(v), Some((CpuStorage::F32(g), lg))) => {
            let (c, d) = grad(lg)?;
            CpuStorage::F32(run!(v, Some(&g[c..d]), gelu_f32, |x: f32| x, |x: f32| x))
        }
        (CpuStorage::F64(v), None) => {
            CpuStorage::F64(run!(v, None::<&[f64]>, gelu_f64, |x: f64| x, |x: f64| x))
        }
        (CpuStorage::F64(v), Some((CpuStorage::F64(g), lg))) => {
            let (c, d) = grad(lg)?;
            CpuStorage::F64(run!(v, Some(&g[c..d]), gelu_f64, |x: f64| x, |x: f64| x))
        }
        (CpuStorage::BF16(v), None) => CpuStorage::BF16(run!(
            v,
            None::<&[half::bf16]>,
            gelu_f32,
            |x: half::bf16| x.to_f32(),
            half::bf16::from_f32
        )),
        (CpuStorage::BF16(v), Some((CpuStorage::BF16(g), lg))) => {
            let (c, d) = grad(lg)?;
            CpuStorage::BF16(run!(
                v,
                Some(&g[c..d]),
                gelu_f32,
                |x: half::bf16| x.to_f32(),
                half::bf16::from_f32
            ))
        }
        (CpuStorage::F16(v), None) => CpuStorage::F16(run!(
            v,
            None::<&[half::f16]>,
            gelu_f32,
            |x: half::f16| x.to_f32(),
            half::f16::from_f32
        )),
        (CpuStorage::F16(v), Some((CpuStorage::F16(g), lg))) => {
            let (c, d) = grad(lg)?;
            CpuStorage::F16(run!(
                v,
                Some(&g[c..d]),
                gelu_f32,
                |x: half::f16| x.to_f32(),
                half::f16::from_f32
            ))
        }
        (x, _) => candle_core::bail!("fused gelu: takes one float dtype, got {:?}", x.dtype()),
    })
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((gelu_cpu(s, l, None)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::elementwise("gelu_fwd", &[(s, l)])
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluBwd)?))
    }
}

struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((gelu_cpu(s1, l1, Some((s2, l2)))?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::elementwise("gelu_bwd", &[(s1, l1), (s2, l2)])
    }
}

/// GELU with the tanh approximation (candle's `gelu`), fused forward and backward.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Layout, Shape};

    const MODULE: &str = "mosaic_fused";
    const SOURCE: &str = include_str!("fused.cu");

    fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        crate::cuda::compiled(&PTX, SOURCE, "fused row")
    }

    #[derive(Clone, Copy)]
    pub(super) enum Kernel {
        LayerNormFwd,
        LayerNormBwd,
        RmsNormFwd,
        RmsNormBwd,
    }

    impl Kernel {
        fn name(self) -> &'static str {
            match self {
                Kernel::LayerNormFwd => "layer_norm_fwd",
                Kernel::LayerNormBwd => "layer_norm_bwd",
                Kernel::RmsNormFwd => "rms_norm_fwd",
                Kernel::RmsNormBwd => "rms_norm_bwd",
            }
        }
    }

    fn offsets(l: &Layout) -> candle_core::Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fused op: input must be contiguous".into()))
    }

    fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
        match dtype {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            other => candle_core::bail!("fused op on CUDA: takes f32 or bf16, not {other:?}"),
        }
    }

    /// A row kernel: one block per row of `d`, output shaped like the first input.
    pub(super) fn rows(
        kernel: Kernel,
        inputs: &[(&CudaStorage, &Layout)],
        d: usize,
        eps: f64,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (first, l0) = inputs[0];
        let n = l0.shape().elem_count();
        let dtype = first.dtype();
        let dev = first.device().clone();
        let name = format!("{}_{}", kernel.name(), suffix(dtype)?);
        let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
        let threads: u32 = if d >= 1024 { 256 } else { 128 };
        let cfg = LaunchConfig {
            grid_dim: ((n / d) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: threads * 4,
        };
        let (d_i, eps_f) = (d as i32, eps as f32);
        macro_rules! run {
            ($t:ty) => {{
                let views = inputs
                    .iter()
                    .map(|(s, l)| {
                        if s.dtype() != dtype {
                            candle_core::bail!("fused op: inputs of mixed dtypes");
                        }
                        let (a, b) = offsets(l)?;
                        Ok(s.as_cuda_slice::<$t>()?.slice(a..b))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                // Safety: the kernel writes every element of every row.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let mut b = f.builder();
                for v in &views {
                    b.arg(v);
                }
                b.arg(&out).arg(&d_i).arg(&eps_f);
                // Safety: inputs in the kernel's order (x, then w and/or dy), each contiguous
                // with n elements (w: d), as the callers build them.
                unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }};
        }
        let out = match dtype {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        };
        Ok((out, l0.shape().clone()))
    }

    /// An elementwise kernel `name_{f32,bf16}(inputs..., out, n)` over contiguous inputs of one
    /// size and dtype; the output is shaped like the first.
    pub(super) fn elementwise(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (first, l0) = inputs[0];
        let n = l0.shape().elem_count();
        let dtype = first.dtype();
        let dev = first.device().clone();
        let f =
            dev.get_or_load_custom_func(&format!("{name}_{}", suffix(dtype)?), MODULE, ptx()?)?;
        let cfg = crate::cuda::grid_stride(n);
        let n_i = n as i64;
        macro_rules! run {
            ($t:ty) => {{
                let views = inputs
                    .iter()
                    .map(|(s, l)| {
                        let (a, b) = offsets(l)?;
                        if s.dtype() != dtype || b - a != n {
                            candle_core::bail!("fused {name}: inputs differ in dtype or size");
                        }
                        Ok(s.as_cuda_slice::<$t>()?.slice(a..b))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                // Safety: the kernel writes every element.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let mut b = f.builder();
                for v in &views {
                    b.arg(v);
                }
                b.arg(&out).arg(&n_i);
                // Safety: contiguous inputs of n elements in the kernel's order.
                unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }};
        }
        let out = match dtype {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        };
        Ok((out, l0.shape().clone()))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope(
        x: &CudaStorage,
        lx: &Layout,
        cos: &CudaStorage,
        lc: &Layout,
        sin: &CudaStorage,
        ls: &Layout,
        s: usize,
        k: usize,
        sign: f64,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = lx.shape().elem_count();
        let dev = x.device().clone();
        let name = format!("rope_{}", suffix(x.dtype())?);
        let f = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
        let (c0, c1) = offsets(lc)?;
        let (s0, s1) = offsets(ls)?;
        let (x0, x1) = offsets(lx)?;
        let cv = cos.as_cuda_slice::<f32>()?.slice(c0..c1);
        let sv = sin.as_cuda_slice::<f32>()?.slice(s0..s1);
        let pairs = (n / 2) as i64;
        let (s_i, k_i, sign_f) = (s as i32, k as i32, sign as f32);
        let cfg = crate::cuda::grid_stride(n / 2);
        macro_rules! run {
            ($t:ty) => {{
                let xv = x.as_cuda_slice::<$t>()?.slice(x0..x1);
                // Safety: the kernel writes both elements of every pair.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let mut b = f.builder();
                b.arg(&xv).arg(&cv).arg(&sv).arg(&out);
                b.arg(&pairs).arg(&s_i).arg(&k_i).arg(&sign_f);
                // Safety: x has n elements, the tables S x K f32 (checked by the caller).
                unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
                CudaStorage::wrap_cuda_slice(out, dev)
            }};
        }
        let out = match x.dtype() {
            DType::F32 => run!(f32),
            _ => run!(half::bf16),
        };
        Ok((out, lx.shape().clone()))
    }
}
