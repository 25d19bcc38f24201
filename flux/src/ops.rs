//! Ops that are safe to train through (design.md §8).
//!
//! - `frozen_linear`: y = x W^T (+ b) whose backward computes only dL/dx. A plain matmul would
//!   also compute and store dL/dW for every frozen weight (24 GB of useless work on FLUX.1-dev).
//! - `layer_norm`, `rms_norm`, `softmax`: composed of primitive ops, so they have a backward;
//!   candle's fast fused versions have none and silently drop gradients.
//!
//! Shape legend: `x_bsd` batch, tokens, features; `q_bhsd` batch, heads, tokens, head dim.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

use crate::error::Result;

/// x W^T with W frozen: the backward returns a gradient for x only.
struct FrozenMatmul;

/// How the storage matmul sees x W^T: x as a 2-D [m, k] matrix, W^T as [k, n].
struct MatmulPlan {
    out_shape: Shape,
    bmnk: (usize, usize, usize, usize),
    lhs: Layout,
    rhs: Layout,
}

impl FrozenMatmul {
    fn plan(l1: &Layout, l2: &Layout) -> candle_core::Result<MatmulPlan> {
        if !l1.is_contiguous() {
            candle_core::bail!(
                "frozen-linear: input must be contiguous, got strides {:?}",
                l1.stride()
            );
        }
        let (n, k_w) = l2.shape().dims2()?;
        let k = *l1.dims().last().unwrap_or(&0);
        if k != k_w {
            candle_core::bail!(
                "frozen-linear: input features {k} do not match weight {:?} (out, in)",
                l2.dims()
            );
        }
        let m = l1.shape().elem_count() / k.max(1);
        let mut out_dims = l1.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok(MatmulPlan {
            out_shape: Shape::from(out_dims),
            bmnk: (1, m, n, k),
            lhs: Layout::contiguous_with_offset((m, k), l1.start_offset()),
            rhs: l2.transpose(0, 1)?,
        })
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = Self::plan(l1, l2)?;
        Ok((s1.matmul(s2, p.bmnk, &p.lhs, &p.rhs)?, p.out_shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let p = Self::plan(l1, l2)?;
        Ok((s1.matmul(s2, p.bmnk, &p.lhs, &p.rhs)?, p.out_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _phase = crate::profile::phase("op: frozen linear backward", x.device());
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let gx = grad_res.reshape((m, n))?.matmul(w)?.reshape(x.shape())?;
        Ok((Some(gx), None))
    }
}

/// y = x W^T + b for a frozen weight `w_oi` [out, in] and bias [out]: the backward gives the
/// input's gradient only. A weight that is a variable (the whole base trained, as
/// `trainer pretrain-base` does) takes candle's matmul instead, whose backward gives the
/// weight's gradient too.
pub fn frozen_linear(x: &Tensor, w_oi: &Tensor, b_o: Option<&Tensor>) -> Result<Tensor> {
    let _phase = crate::profile::phase("op: frozen linear forward", x.device());
    let x = x.contiguous()?;
    let y = if w_oi.is_variable() {
        // As one 2-D product: a batched `broadcast_matmul` would broadcast W over the batch,
        // and the backward of that broadcast sums W's gradient over it slowly (`repeat_rows`).
        let (n, k) = w_oi.dims2()?;
        let mut out = x.dims().to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        x.reshape((x.elem_count() / k.max(1), k))?
            .matmul(&w_oi.t()?)?
            .reshape(out)?
    } else {
        x.apply_op2(w_oi, FrozenMatmul)?
    };
    Ok(match b_o {
        Some(b) if b.track_op() => (&y + repeat_to(b, y.shape())?)?,
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `v` [..., 1, D] repeated `n` times along its second last dim, [..., n, D], as the product
/// of a column of ones and `v`: the values of `broadcast_as`, but a backward (the sum over the
/// repeated rows) that is a matrix product. candle's backward of a broadcast sums any dims but
/// the last ones with a per-element index loop on one core; with the whole base trained (a
/// weight, bias, modulation and gate gradient in every block) that loop took a third of a CPU
/// pretraining step. For tensors that carry gradients; others broadcast for free.
pub(crate) fn repeat_rows(v: &Tensor, n: usize) -> Result<Tensor> {
    let mut ones_shape = v.dims().to_vec();
    let rank = ones_shape.len();
    if rank < 2 || ones_shape[rank - 2] != 1 {
        return Err(candle_core::Error::Msg(format!(
            "repeat_rows takes [..., 1, D], not {:?}",
            v.dims()
        ))
        .into());
    }
    ones_shape[rank - 2] = n;
    ones_shape[rank - 1] = 1;
    let ones = Tensor::ones(ones_shape, v.dtype(), v.device())?;
    Ok(ones.matmul(&v.contiguous()?)?)
}

/// The vector `v_d` [D] repeated over every row of `shape` [..., D], through [`repeat_rows`].
fn repeat_to(v_d: &Tensor, shape: &Shape) -> Result<Tensor> {
    let d = v_d.elem_count();
    let rows = shape.elem_count() / d.max(1);
    Ok(repeat_rows(&v_d.reshape((1, d))?, rows)?.reshape(shape)?)
}

/// `v_bd` [B, D] for each of the `n` tokens of a [B, n, D] tensor, to broadcast against it:
/// [B, n, D] through [`repeat_rows`] when `v_bd` carries gradients, [B, 1, D] otherwise.
pub(crate) fn per_token(v_bd: &Tensor, n: usize) -> Result<Tensor> {
    let v = v_bd.unsqueeze(1)?;
    if v.track_op() {
        repeat_rows(&v, n)
    } else {
        Ok(v)
    }
}

/// The dtype normalisation statistics are computed in: f32 for half types, else the input's.
pub(crate) fn stats_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Whether the fused row ops (`kernels::fused`) take `x`: when they are enabled
/// ([`crate::fused`]), every float dtype on the CPU, f32 and bf16 on CUDA. Otherwise the
/// composed forms below run.
fn fused_applies(x: &Tensor) -> bool {
    crate::fused::enabled()
        && (x.device().is_cpu() || matches!(x.dtype(), DType::F32 | DType::BF16))
}

/// LayerNorm over the last dim without affine parameters (FLUX's norm1/norm2/norm_out): one
/// fused op with a backward.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let _phase = crate::profile::phase("op: norms forward", x.device());
    if fused_applies(x) {
        return Ok(kernels::fused::layer_norm(x, eps)?);
    }
    layer_norm_composed(x, eps)
}

/// RMSNorm over the last dim with a learned weight (the QK norms): x / sqrt(mean(x^2) + eps) * w,
/// one fused op whose backward gives no weight gradient (the QK-norm weights are frozen base
/// weights); a weight that is a variable takes the composed form, which gives it.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let _phase = crate::profile::phase("op: norms forward", x.device());
    if fused_applies(x) && !w.is_variable() {
        return Ok(kernels::fused::rms_norm(x, w, eps)?);
    }
    rms_norm_composed(x, w, eps)
}

/// GELU with the tanh approximation (FLUX's feed-forward and single-block MLP): one fused op
/// with a backward, or candle's `gelu` (the reference) when the fused ops do not apply.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let _phase = crate::profile::phase("op: gelu forward", x.device());
    if fused_applies(x) {
        return Ok(kernels::fused::gelu(x)?);
    }
    Ok(x.gelu()?)
}

/// LayerNorm composed of candle ops: the reference of the fused op, and its fallback.
pub(crate) fn layer_norm_composed(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(stats_dtype(dtype))?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.to_dtype(dtype)?)
}

/// RMSNorm composed of candle ops: the reference of the fused op, and its fallback.
pub(crate) fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(stats_dtype(dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    if w.track_op() {
        return Ok((&y * repeat_to(w, y.shape())?)?);
    }
    Ok(y.broadcast_mul(w)?)
}

/// Softmax over the last dim, with a backward.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// x * (1 + scale) + shift, with `scale`/`shift` [B, D] broadcast over tokens of `x_bsd`.
pub fn modulate(x_bsd: &Tensor, shift_bd: &Tensor, scale_bd: &Tensor) -> Result<Tensor> {
    let _phase = crate::profile::phase("op: modulate, gate forward", x_bsd.device());
    let n = x_bsd.dim(1)?;
    let scale = (per_token(scale_bd, n)? + 1.0)?;
    Ok(x_bsd
        .broadcast_mul(&scale)?
        .broadcast_add(&per_token(shift_bd, n)?)?)
}

/// Rotates consecutive pairs (x_2k, x_2k+1) of the last dim by angles with `cos_sk`/`sin_sk`
/// [S, hd/2] (design.md §3.4), in f32 (or f64), cast back to the input dtype: one fused op
/// whose backward rotates the gradient back.
pub fn apply_rope(q_bhsd: &Tensor, cos_sk: &Tensor, sin_sk: &Tensor) -> Result<Tensor> {
    let _phase = crate::profile::phase("op: rope forward", q_bhsd.device());
    if fused_applies(q_bhsd) {
        return Ok(kernels::fused::rope(q_bhsd, cos_sk, sin_sk)?);
    }
    rope_composed(q_bhsd, cos_sk, sin_sk)
}

/// RoPE composed of candle ops: the reference of the fused op, and its fallback.
pub(crate) fn rope_composed(q_bhsd: &Tensor, cos_sk: &Tensor, sin_sk: &Tensor) -> Result<Tensor> {
    let dtype = q_bhsd.dtype();
    let (b, h, s, d) = q_bhsd.dims4()?;
    let x = q_bhsd
        .to_dtype(stats_dtype(dtype))?
        .reshape((b, h, s, d / 2, 2))?;
    let x0 = x.narrow(4, 0, 1)?;
    let x1 = x.narrow(4, 1, 1)?;
    let cos = cos_sk.to_dtype(x.dtype())?.reshape((s, d / 2, 1))?;
    let sin = sin_sk.to_dtype(x.dtype())?.reshape((s, d / 2, 1))?;
    let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let r1 = (x1.broadcast_mul(&cos)? + x0.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[r0, r1], 4)?
        .reshape((b, h, s, d))?
        .to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::test_util::max_diff;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::test_util::uniform(shape, seed, 1.0)
    }

    #[test]
    fn frozen_linear_matches_matmul_and_has_no_weight_gradient() {
        let x = Var::from_tensor(&randn(&[2, 3, 4], 1)).unwrap();
        // A frozen weight is a plain tensor: the custom op, whose backward computes the
        // input's gradient only.
        let w = Var::from_tensor(&randn(&[5, 4], 2)).unwrap();
        let frozen_w = w.as_tensor().detach();
        let b = randn(&[5], 3);
        let y = frozen_linear(x.as_tensor(), &frozen_w, Some(&b)).unwrap();
        let reference = x
            .as_tensor()
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let diff = max_diff(&y, &reference);
        assert!(diff < 1e-12);
        let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "a frozen weight must get no gradient"
        );
        let gx = grads.get(x.as_tensor()).unwrap();
        let ref_grads = reference
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx_ref = ref_grads.get(x.as_tensor()).unwrap();
        let diff = max_diff(gx, gx_ref);
        assert!(diff < 1e-12);
        // A weight that is a variable (a base being trained) gets matmul's gradient.
        let y = frozen_linear(x.as_tensor(), w.as_tensor(), Some(&b)).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gw = grads
            .get(w.as_tensor())
            .expect("a variable weight gets a gradient");
        assert!(max_diff(gw, ref_grads.get(w.as_tensor()).unwrap()) < 1e-12);
    }

    /// Gradients of sum(f^2) for the variables, by candle's backward.
    fn grads_of(f: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
        let grads = f.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter()
            .map(|v| grads.get(v.as_tensor()).unwrap().clone())
            .collect()
    }

    #[test]
    fn repeated_rows_give_the_values_and_gradients_of_a_broadcast() {
        let x = randn(&[3, 7, 5], 5);
        let v = Var::from_tensor(&randn(&[3, 1, 5], 4)).unwrap();
        let product = (repeat_rows(v.as_tensor(), 7).unwrap() * &x).unwrap();
        let broadcast = v.as_tensor().broadcast_mul(&x).unwrap();
        assert!(max_diff(&product, &broadcast) < 1e-12);
        let (g, g_ref) = (grads_of(&product, &[&v]), grads_of(&broadcast, &[&v]));
        assert!(max_diff(&g[0], &g_ref[0]) < 1e-12);
        assert!(repeat_rows(&randn(&[3, 2, 5], 1), 4).is_err());
        assert!(repeat_rows(&randn(&[5], 1), 4).is_err());

        // Where the ops use it: a trained bias, modulation, gate input and QK-norm weight get
        // the gradients of the plain broadcasts.
        let w = Var::from_tensor(&randn(&[4, 5], 6)).unwrap();
        let b = Var::from_tensor(&randn(&[4], 7)).unwrap();
        let y = frozen_linear(&x, w.as_tensor(), Some(b.as_tensor())).unwrap();
        let y_ref = x
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert!(max_diff(&y, &y_ref) < 1e-12);
        for (g, g_ref) in grads_of(&y, &[&w, &b])
            .iter()
            .zip(grads_of(&y_ref, &[&w, &b]))
        {
            assert!(max_diff(g, &g_ref) < 1e-12);
        }
        let shift = Var::from_tensor(&randn(&[3, 5], 8)).unwrap();
        let scale = Var::from_tensor(&randn(&[3, 5], 9)).unwrap();
        let m = modulate(&x, shift.as_tensor(), scale.as_tensor()).unwrap();
        let m_ref = x
            .broadcast_mul(&(scale.as_tensor().unsqueeze(1).unwrap() + 1.0).unwrap())
            .unwrap()
            .broadcast_add(&shift.as_tensor().unsqueeze(1).unwrap())
            .unwrap();
        assert!(max_diff(&m, &m_ref) < 1e-12);
        for (g, g_ref) in grads_of(&m, &[&shift, &scale])
            .iter()
            .zip(grads_of(&m_ref, &[&shift, &scale]))
        {
            assert!(max_diff(g, &g_ref) < 1e-12);
        }
        let nw = Var::from_tensor(&randn(&[5], 10)).unwrap();
        let r = rms_norm_composed(&x, nw.as_tensor(), 1e-6).unwrap();
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let r_ref = x
            .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(nw.as_tensor())
            .unwrap();
        assert!(max_diff(&r, &r_ref) < 1e-12);
        assert!(max_diff(&grads_of(&r, &[&nw])[0], &grads_of(&r_ref, &[&nw])[0]) < 1e-12);
    }

    #[test]
    fn frozen_linear_accepts_a_row_slice_of_a_fused_weight() {
        let fused = randn(&[9, 4], 4);
        let w = fused.narrow(0, 3, 3).unwrap();
        let x = randn(&[2, 4], 5);
        let y = frozen_linear(&x, &w, None).unwrap();
        let reference = x.matmul(&w.t().unwrap()).unwrap();
        let diff = max_diff(&y, &reference);
        assert!(diff < 1e-12);
    }

    #[test]
    fn norms_match_hand_computation() {
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 6.0]], &Device::Cpu).unwrap();
        let ln: Vec<f64> = layer_norm(&x, 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // mean 3, var (4+1+0+9)/4 = 3.5
        let s = 3.5f64.sqrt();
        for (a, e) in ln.iter().zip([-2.0 / s, -1.0 / s, 0.0, 3.0 / s]) {
            assert!((a - e).abs() < 1e-12);
        }
        let w = Tensor::new(&[1.0f64, 2.0, 1.0, 1.0], &Device::Cpu).unwrap();
        let rms: Vec<f64> = rms_norm(&x, &w, 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let r = 12.5f64.sqrt(); // mean of squares (1+4+9+36)/4
        for (a, e) in rms.iter().zip([1.0 / r, 4.0 / r, 3.0 / r, 6.0 / r]) {
            assert!((a - e).abs() < 1e-12);
        }
    }

    #[test]
    fn rope_rotates_pairs() {
        let x = Tensor::new(&[1.0f64, 0.0, 0.0, 1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let a = 0.3f64;
        let cos = Tensor::new(&[[a.cos(), 1.0]], &Device::Cpu).unwrap();
        let sin = Tensor::new(&[[a.sin(), 0.0]], &Device::Cpu).unwrap();
        let y: Vec<f64> = apply_rope(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let e = [a.cos(), a.sin(), 0.0, 1.0];
        for (p, q) in y.iter().zip(e) {
            assert!((p - q).abs() < 1e-12, "{y:?}");
        }
    }

    /// The three fused ops and their composed references on the same inputs: values and
    /// gradients (a random cotangent), in f64 and (values) bf16.
    type Fused = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;
    fn fused_cases() -> [(&'static str, Fused, Fused); 4] {
        [
            (
                "layer norm",
                |x, _, _| layer_norm(x, 1e-6),
                |x, _, _| layer_norm_composed(x, 1e-6),
            ),
            (
                "rms norm",
                |x, w, _| rms_norm(x, w, 1e-6),
                |x, w, _| rms_norm_composed(x, w, 1e-6),
            ),
            (
                "rope",
                |x, c, s| apply_rope(x, c, s),
                |x, c, s| rope_composed(x, c, s),
            ),
            ("gelu", |x, _, _| gelu(x), |x, _, _| Ok(x.gelu()?)),
        ]
    }

    /// Inputs [2, 3, 5, 8]: x, the RMS weight [8] (also read as angles [5, 4] by RoPE).
    fn fused_inputs() -> (Tensor, Tensor, Tensor, Tensor) {
        let x = randn(&[2, 3, 5, 8], 11);
        let w = (randn(&[8], 12) + 1.5).unwrap();
        let angles = (randn(&[5, 4], 13) * 3.0).unwrap();
        (x, w, angles.cos().unwrap(), angles.sin().unwrap())
    }

    #[test]
    fn fused_ops_match_their_composed_references() {
        let (x, w, cos, sin) = fused_inputs();
        let g = randn(x.dims(), 14);
        for (name, fused, composed) in fused_cases() {
            let extra = |n: &str| if n == "rope" { (&cos, &sin) } else { (&w, &w) };
            let (a1, a2) = extra(name);
            let xv = Var::from_tensor(&x).unwrap();
            let y = fused(xv.as_tensor(), a1, a2).unwrap();
            let y_ref = composed(xv.as_tensor(), a1, a2).unwrap();
            assert!(max_diff(&y, &y_ref) < 1e-12, "{name}: values");
            let dx = |y: &Tensor| {
                let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                grads.get(xv.as_tensor()).unwrap().clone()
            };
            // candle's GELU backward uses its constants to six digits (0.0356774, 0.797885,
            // ...), so its gradient is off by about 2e-7; the fused one matches finite
            // differences (next test).
            let tol = if name == "gelu" { 1e-5 } else { 1e-12 };
            let d = max_diff(&dx(&y), &dx(&y_ref));
            eprintln!("{name}: fused vs composed gradient {d:.2e}");
            assert!(d < tol, "{name}: gradients {d}");
            let xb = x.to_dtype(DType::BF16).unwrap();
            let (b1, b2) = (
                a1.to_dtype(DType::BF16).unwrap(),
                a2.to_dtype(DType::BF16).unwrap(),
            );
            let yb = fused(&xb, &b1, &b2).unwrap();
            assert_eq!(yb.dtype(), DType::BF16);
            let yb_ref = composed(&xb, &b1, &b2).unwrap();
            let d = max_diff(
                &yb.to_dtype(DType::F64).unwrap(),
                &yb_ref.to_dtype(DType::F64).unwrap(),
            );
            assert!(d < 5e-2, "{name}: bf16 values {d}");
        }
    }

    #[test]
    fn fused_op_gradients_match_finite_differences() {
        let (x, w, cos, sin) = fused_inputs();
        let g = randn(x.dims(), 15);
        let h = 1e-6;
        for (name, fused, _) in fused_cases() {
            let (a1, a2) = if name == "rope" {
                (&cos, &sin)
            } else {
                (&w, &w)
            };
            let loss = |x: &Tensor| -> f64 {
                (fused(x, a1, a2).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            };
            let xv = Var::from_tensor(&x).unwrap();
            let grads = (fused(xv.as_tensor(), a1, a2).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx: Vec<f64> = grads
                .get(xv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
            for i in (0..flat.len()).step_by(7) {
                let bump = |d: f64| {
                    let mut v = flat.clone();
                    v[i] += d;
                    Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap()
                };
                let fd = (loss(&bump(h)) - loss(&bump(-h))) / (2.0 * h);
                assert!(
                    (fd - dx[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "{name}[{i}]: fd {fd}, autograd {}",
                    dx[i]
                );
            }
        }
    }

    /// The frozen-linear op on a GPU against the CPU at a FLUX.1-dev projection size: output
    /// and input gradient, no weight gradient. Built with the `cuda` feature; says it did not
    /// run where no CUDA device opens.
    /// The fused ops on a GPU against the CPU at FLUX.1-dev row sizes (3072 for the block
    /// norms, 128 for the QK norms and RoPE): values and input gradients, f32 and bf16. Built
    /// with the `cuda` feature; says it did not run where no CUDA device opens.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_fused_ops_match_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("not run: no CUDA device");
            return;
        };
        let wide = randn(&[1, 77, 3072], 21);
        let heads = randn(&[1, 24, 77, 128], 22);
        let w = (randn(&[128], 23) + 1.5).unwrap();
        let angles = (randn(&[77, 64], 24) * 3.0).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            for (name, fused, _) in fused_cases() {
                let (x, a1, a2) = match name {
                    "layer norm" | "gelu" => (&wide, &w, &w),
                    "rms norm" => (&heads, &w, &w),
                    _ => (&heads, &cos, &sin),
                };
                let g = randn(x.dims(), 25);
                let run = |dev: &Device| {
                    let on = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(dev).unwrap();
                    let xv = Var::from_tensor(&on(x)).unwrap();
                    let (t1, t2) = if name == "rope" {
                        (a1.to_device(dev).unwrap(), a2.to_device(dev).unwrap())
                    } else {
                        (on(a1), on(a2))
                    };
                    let y = fused(xv.as_tensor(), &t1, &t2).unwrap();
                    let l = (y.to_dtype(DType::F64).unwrap() * g.to_device(dev).unwrap()).unwrap();
                    let grads = l.sum_all().unwrap().backward().unwrap();
                    let back = |t: &Tensor| {
                        t.to_device(&Device::Cpu)
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap()
                    };
                    (back(&y), back(grads.get(xv.as_tensor()).unwrap()))
                };
                let ((y0, g0), (y1, g1)) = (run(&Device::Cpu), run(&gpu));
                for (what, a, b) in [("y", &y0, &y1), ("dx", &g0, &g1)] {
                    let d = crate::test_util::rel_diff(a, b);
                    eprintln!("fused {name} {dt:?} {what}: max |cuda - cpu| / max |cpu| = {d:.3e} (bound {tol:.0e})");
                    assert!(d < tol, "{name} {dt:?} {what}: {d}");
                }
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_frozen_linear_matches_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("not run: no CUDA device");
            return;
        };
        let x = (randn(&[2, 333, 3072], 1) * 0.5).unwrap();
        let w = (randn(&[1024, 3072], 2) * 0.02).unwrap();
        let b = randn(&[1024], 3);
        for (dt, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
            let run = |dev: &Device| {
                let on = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(dev).unwrap();
                let xv = Var::from_tensor(&on(&x)).unwrap();
                let wv = Var::from_tensor(&on(&w)).unwrap();
                let y = frozen_linear(xv.as_tensor(), wv.as_tensor(), Some(&on(&b))).unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                assert!(
                    g.get(wv.as_tensor()).is_none(),
                    "a frozen weight got a gradient"
                );
                let back = |t: &Tensor| {
                    t.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                };
                (back(&y), back(g.get(xv.as_tensor()).unwrap()))
            };
            let ((y0, g0), (y1, g1)) = (run(&Device::Cpu), run(&gpu));
            for (name, a, c) in [("y", &y0, &y1), ("dx", &g0, &g1)] {
                let d = crate::test_util::rel_diff(a, c);
                eprintln!("frozen linear {dt:?} {name}: max |cuda - cpu| / max |cpu| = {d:.3e} (bound {tol:.0e})");
                assert!(d < tol, "{dt:?} {name}: {d}");
            }
        }
    }
}
