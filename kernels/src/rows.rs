//! `attention_rows`: for sampled reference tokens, the head-averaged softmax of their queries
//! over the target keys, without materializing any attention map but those P rows:
//!
//! ```text
//! rows[p, j] = 1/H * sum_h softmax_j( scale * <q[h, idx[p], :], k[h, j, :]> )
//! ```
//!
//! `q` [H, N_ref, D] holds every reference query (the op gathers the sampled ones), `k`
//! [H, N_tgt, D] the target keys, `idx` [P] (u32) the sampled reference token indices (repeats
//! allowed). The result is [P, N_tgt] in f32 (f64 for f64 inputs); inputs may be f32, bf16 or
//! f64, and accumulation is in f32 (f64).
//!
//! Forward: a plain CPU loop (also the reference of the CUDA kernel) and, with the `cuda`
//! feature, one NVRTC-compiled kernel that fuses the gather, Q K^T, the stable softmax and the
//! head mean (one thread block per sampled row; the row's logits live in shared memory).
//! Backward: candle ops on the small [H, P, N_tgt] probabilities, recomputed from the inputs,
//! giving dq (scattered back to the sampled positions, repeats summed) and dk.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::error::{KernelError, Result};

const OP: &str = "attention_rows";

/// The rows of the sampled queries; see the module documentation.
pub fn attention_rows(q: &Tensor, k: &Tensor, idx: &Tensor, scale: f64) -> Result<Tensor> {
    let (h, n_ref, d) = dims3(q, "q")?;
    let (hk, n_tgt, dk) = dims3(k, "k")?;
    if hk != h || dk != d {
        return Err(KernelError::Shape {
            op: OP,
            arg: "k",
            expected: format!("[{h}, N_tgt, {d}] (heads and head dim of q)"),
            found: k.dims().to_vec(),
        });
    }
    if idx.rank() != 1 || idx.dtype() != DType::U32 {
        return Err(KernelError::Shape {
            op: OP,
            arg: "idx",
            expected: format!("a 1-D u32 tensor, got {:?}", idx.dtype()),
            found: idx.dims().to_vec(),
        });
    }
    if q.dtype() != k.dtype() {
        return Err(KernelError::Shape {
            op: OP,
            arg: "k",
            expected: format!("dtype {:?} like q, got {:?}", q.dtype(), k.dtype()),
            found: k.dims().to_vec(),
        });
    }
    if !matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F64) {
        return Err(KernelError::Shape {
            op: OP,
            arg: "q",
            expected: format!("f32, bf16 or f64, got {:?}", q.dtype()),
            found: q.dims().to_vec(),
        });
    }
    // Indices are checked on the host: a bad one must be an error, never an out-of-bounds read.
    let host = idx.to_device(&candle_core::Device::Cpu)?.to_vec1::<u32>()?;
    if let Some((position, &i)) = host.iter().enumerate().find(|(_, &i)| i as usize >= n_ref) {
        return Err(KernelError::IndexOutOfRange {
            op: OP,
            arg: "idx",
            index: i as usize,
            position,
            bound: n_ref,
        });
    }
    let out_dtype = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    if host.is_empty() || n_tgt == 0 {
        return Ok(Tensor::zeros((host.len(), n_tgt), out_dtype, q.device())?);
    }
    let op = RowsOp {
        h,
        n_ref,
        n_tgt,
        d,
        scale,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &idx.contiguous()?, op)?)
}

fn dims3(t: &Tensor, arg: &'static str) -> Result<(usize, usize, usize)> {
    t.dims3().map_err(|_| KernelError::Shape {
        op: OP,
        arg,
        expected: "[heads, tokens, head_dim]".into(),
        found: t.dims().to_vec(),
    })
}

#[derive(Debug, Clone, Copy)]
struct RowsOp {
    h: usize,
    n_ref: usize,
    n_tgt: usize,
    d: usize,
    scale: f64,
}

/// What the CPU loop needs of an element type.
trait Elem: Copy {
    fn to_f64(self) -> f64;
}
impl Elem for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl Elem for f64 {
    fn to_f64(self) -> f64 {
        self
    }
}
impl Elem for half::bf16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
}

impl RowsOp {
    /// rows[p, j], accumulated in f64 (exact enough to be the reference of every other path).
    fn cpu_rows<T: Elem>(&self, q: &[T], k: &[T], idx: &[u32]) -> Vec<f64> {
        let (h, n_ref, n_tgt, d) = (self.h, self.n_ref, self.n_tgt, self.d);
        let mut out = vec![0f64; idx.len() * n_tgt];
        let mut logits = vec![0f64; n_tgt];
        for (p, &i) in idx.iter().enumerate() {
            let row = &mut out[p * n_tgt..(p + 1) * n_tgt];
            for head in 0..h {
                let qv = &q[(head * n_ref + i as usize) * d..][..d];
                let kh = &k[head * n_tgt * d..][..n_tgt * d];
                let mut max = f64::NEG_INFINITY;
                for (j, l) in logits.iter_mut().enumerate() {
                    let kv = &kh[j * d..][..d];
                    let dot: f64 = qv
                        .iter()
                        .zip(kv)
                        .map(|(a, b)| a.to_f64() * b.to_f64())
                        .sum();
                    *l = dot * self.scale;
                    // NaN must reach the output: max() would skip it.
                    if *l > max || l.is_nan() {
                        max = *l;
                    }
                }
                let mut sum = 0f64;
                for l in logits.iter_mut() {
                    *l = (*l - max).exp();
                    sum += *l;
                }
                for (o, e) in row.iter_mut().zip(&logits) {
                    *o += e / sum / h as f64;
                }
            }
        }
        out
    }
}

impl CustomOp3 for RowsOp {
    fn name(&self) -> &'static str {
        OP
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
        fn slice<'a, T>(s: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(&s[a..b]),
                None => candle_core::bail!("{OP}: non-contiguous input"),
            }
        }
        let idx = match s3 {
            CpuStorage::U32(v) => slice(v, l3)?,
            _ => candle_core::bail!("{OP}: idx must be u32"),
        };
        let p = idx.len();
        let shape = Shape::from((p, self.n_tgt));
        Ok(match (s1, s2) {
            (CpuStorage::F32(q), CpuStorage::F32(k)) => {
                let r = self.cpu_rows(slice(q, l1)?, slice(k, l2)?, idx);
                (
                    CpuStorage::F32(r.into_iter().map(|x| x as f32).collect()),
                    shape,
                )
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k)) => {
                let r = self.cpu_rows(slice(q, l1)?, slice(k, l2)?, idx);
                (
                    CpuStorage::F32(r.into_iter().map(|x| x as f32).collect()),
                    shape,
                )
            }
            (CpuStorage::F64(q), CpuStorage::F64(k)) => (
                CpuStorage::F64(self.cpu_rows(slice(q, l1)?, slice(k, l2)?, idx)),
                shape,
            ),
            _ => candle_core::bail!("{OP}: q and k must both be f32, bf16 or f64"),
        })
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
        crate::cuda::rows_fwd(
            self.h, self.n_ref, self.n_tgt, self.d, self.scale, s1, l1, s2, l2, s3, l3,
        )
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        idx: &Tensor,
        _rows: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let acc = if q.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        // Detached: q and k are tracked Vars, and a graph built here would keep every per-head
        // temporary alive as long as the gradients.
        let (qa, ka) = (q.detach().to_dtype(acc)?, k.detach().to_dtype(acc)?);
        // rows = mean_h s_h, so d rows / d z_h = (1/H) s_h * (g - <g, s_h>). One head at a
        // time, so the temporaries are [P, N_tgt], not [H, P, N_tgt].
        let g = (grad.detach().to_dtype(acc)? / self.h as f64)?;
        let mut dqs = Vec::with_capacity(self.h);
        let mut dks = Vec::with_capacity(self.h);
        for head in 0..self.h {
            let (qh, kh) = (qa.get(head)?, ka.get(head)?); // [N_ref, D], [N_tgt, D]
            let q_sel = qh.index_select(idx, 0)?; // [P, D]
            let z = (q_sel.matmul(&kh.t()?)? * self.scale)?; // [P, N]
            let s = candle_nn_free_softmax(&z)?;
            let inner = (&g * &s)?.sum_keepdim(D::Minus1)?;
            let dz = (&s * g.broadcast_sub(&inner)?)?;
            let dq_sel = (dz.matmul(&kh)? * self.scale)?; // [P, D]
            dks.push((dz.t()?.matmul(&q_sel)? * self.scale)?); // [N, D]
            dqs.push(qh.zeros_like()?.index_add(idx, &dq_sel, 0)?);
        }
        let (dq, dk) = (Tensor::stack(&dqs, 0)?, Tensor::stack(&dks, 0)?);
        Ok((
            Some(dq.to_dtype(q.dtype())?),
            Some(dk.to_dtype(k.dtype())?),
            None,
        ))
    }
}

/// Softmax over the last dim from basic ops (values only: this runs inside a backward).
fn candle_nn_free_softmax(z: &Tensor) -> candle_core::Result<Tensor> {
    let max = z.max_keepdim(D::Minus1)?;
    let e = z.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// The same rows composed from candle ops (materializing [H, P, N_tgt]): the reference the
/// op is tested against, and the trainer's `loss.rows = "plain"`.
pub fn attention_rows_plain(q: &Tensor, k: &Tensor, idx: &Tensor, scale: f64) -> Result<Tensor> {
    let acc = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    if idx.dim(0)? == 0 {
        return Ok(Tensor::zeros((0, k.dim(1)?), acc, q.device())?);
    }
    let q_sel = q.to_dtype(acc)?.index_select(idx, 1)?;
    let z = (q_sel.matmul(&k.to_dtype(acc)?.t()?)? * scale)?;
    let max = z.max_keepdim(D::Minus1)?.detach();
    let e = z.broadcast_sub(&max)?.exp()?;
    let s = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(s.mean(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: (usize, usize, usize), seed: u64, dtype: DType) -> Tensor {
        // A small LCG keeps the test independent of candle's RNG.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn idx(v: &[u32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The CUDA forward (NVRTC kernel) and the composed backward on a GPU against the CPU op,
    /// at FLUX.1-dev's head count and head dim. Built with the `cuda` feature; says it did not
    /// run where no CUDA device opens.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_rows_and_gradients_match_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("not run: no CUDA device");
            return;
        };
        let (h, n_ref, n_tgt, d) = (24, 1024, 1031, 128);
        let picked: Vec<u32> = (0..150u32).map(|i| (i * 37) % n_ref as u32).collect();
        let scale = 1.0 / (d as f64).sqrt();
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let q = randn((h, n_ref, d), 7, dt);
            let k = randn((h, n_tgt, d), 8, dt);
            let cpu = attention_rows(&q, &k, &idx(&picked), scale).unwrap();
            let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
            let got = attention_rows(&on_gpu(&q), &on_gpu(&k), &on_gpu(&idx(&picked)), scale)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let diff = max_diff(&cpu, &got);
            eprintln!("rows {dt:?}: max |cuda - cpu| = {diff:.3e} (bound {tol:.0e})");
            assert!(diff < tol, "{dt:?}: {diff}");
        }
        // Gradients of a weighted sum of the rows, f32.
        let w = randn((1, 150, n_tgt), 9, DType::F32).squeeze(0).unwrap();
        let grads = |dev: &Device| {
            let q = Var::from_tensor(&randn((h, n_ref, d), 7, DType::F32).to_device(dev).unwrap())
                .unwrap();
            let k = Var::from_tensor(&randn((h, n_tgt, d), 8, DType::F32).to_device(dev).unwrap())
                .unwrap();
            let rows = attention_rows(
                q.as_tensor(),
                k.as_tensor(),
                &idx(&picked).to_device(dev).unwrap(),
                scale,
            )
            .unwrap();
            let loss = (rows * w.to_device(dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let take = |v: &Var| {
                g.get(v.as_tensor())
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
            };
            (take(&q), take(&k))
        };
        let (cq, ck) = grads(&Device::Cpu);
        let (gq, gk) = grads(&gpu);
        let (dq, dk) = (max_diff(&cq, &gq), max_diff(&ck, &gk));
        eprintln!("gradients f32: max |cuda - cpu| dq = {dq:.3e}, dk = {dk:.3e} (bound 1e-5)");
        assert!(dq < 1e-5 && dk < 1e-5, "dq {dq}, dk {dk}");
    }

    #[test]
    fn matches_the_plain_composition_in_every_dtype() {
        // N_tgt 37: not a multiple of any block size; a repeated index.
        let i = idx(&[0, 5, 5, 11]);
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6), (DType::BF16, 1e-6)] {
            let q = randn((3, 12, 16), 1, dt);
            let k = randn((3, 37, 16), 2, dt);
            let fused = attention_rows(&q, &k, &i, 0.25).unwrap();
            let plain = attention_rows_plain(&q, &k, &i, 0.25).unwrap();
            assert_eq!(fused.dims(), &[4, 37]);
            assert!(max_diff(&fused, &plain) < tol, "{dt:?}");
            let sums = fused.sum(1).unwrap();
            assert!(
                max_diff(
                    &sums,
                    &Tensor::ones(4, fused.dtype(), &Device::Cpu).unwrap()
                ) < 1e-5
            );
        }
    }

    #[test]
    fn large_target_counts_and_no_points() {
        for n in [1024, 4096] {
            let q = randn((2, 8, 8), 3, DType::F32);
            let k = randn((2, n, 8), 4, DType::F32);
            let i = idx(&[7, 0]);
            let d = max_diff(
                &attention_rows(&q, &k, &i, 0.3).unwrap(),
                &attention_rows_plain(&q, &k, &i, 0.3).unwrap(),
            );
            assert!(d < 1e-6, "N_tgt {n}: {d}");
        }
        let q = randn((2, 8, 8), 3, DType::F32);
        let k = randn((2, 5, 8), 4, DType::F32);
        let none = attention_rows(&q, &k, &idx(&[]), 0.3).unwrap();
        assert_eq!(none.dims(), &[0, 5]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let q = Var::from_tensor(&randn((2, 6, 4), 5, DType::F64)).unwrap();
        let k = Var::from_tensor(&randn((2, 9, 4), 6, DType::F64)).unwrap();
        let i = idx(&[1, 4, 4]);
        let w = randn((1, 3, 9), 7, DType::F64).squeeze(0).unwrap();
        let loss = |q: &Tensor, k: &Tensor| -> Tensor {
            (attention_rows(q, k, &i, 0.7).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(q.as_tensor(), k.as_tensor()).backward().unwrap();
        let eps = 1e-6;
        for (var, which) in [(&q, 0), (&k, 1)] {
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for e in 0..base.len() {
                let bump = |delta: f64| {
                    let mut v = base.clone();
                    v[e] += delta;
                    let t = Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap();
                    let l = if which == 0 {
                        loss(&t, k.as_tensor())
                    } else {
                        loss(q.as_tensor(), &t)
                    };
                    l.to_scalar::<f64>().unwrap()
                };
                let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g[e]).abs() < 1e-7 * (1.0 + fd.abs()),
                    "{} element {e}: autograd {} vs finite difference {fd}",
                    if which == 0 { "q" } else { "k" },
                    g[e]
                );
            }
        }
        // Unsampled query rows get exactly zero gradient; the repeated one gets both shares.
        let gq = grads.get(q.as_tensor()).unwrap();
        assert_eq!(
            gq.narrow(1, 0, 1)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn bad_arguments_are_named_and_nan_propagates() {
        let q = randn((2, 6, 4), 5, DType::F32);
        let k = randn((2, 9, 4), 6, DType::F32);
        let e = attention_rows(&q, &k, &idx(&[6]), 1.0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("`idx`") && e.contains("index 6") && e.contains("bound is 6"),
            "{e}"
        );
        let k3 = randn((3, 9, 4), 6, DType::F32);
        let e = attention_rows(&q, &k3, &idx(&[0]), 1.0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`k`"), "{e}");
        let kd = randn((2, 9, 5), 6, DType::F32);
        assert!(attention_rows(&q, &kd, &idx(&[0]), 1.0).is_err());
        let e = attention_rows(&q, &k, &Tensor::new(&[0i64], &Device::Cpu).unwrap(), 1.0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`idx`"), "{e}");
        // A NaN in q reaches the row as NaN, not as a finite number.
        let mut v = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = f32::NAN;
        let qn = Tensor::from_vec(v, (2, 6, 4), &Device::Cpu).unwrap();
        let r = attention_rows(&qn, &k, &idx(&[0, 1]), 1.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(r[0].iter().all(|x| x.is_nan()), "{:?}", r[0]);
        assert!(r[1].iter().all(|x| x.is_finite()));
    }
}
