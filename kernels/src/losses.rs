//! SCAL (semantic correspondence attention loss) and MDL (multi-reference disentanglement
//! loss) on sampled attention rows, design.md §5 and paper eq. 10-14.
//!
//! Shape legend: `rows_pn` is [P_total, N_tgt]: row j is the head- and block-averaged softmax of
//! sampled reference point j over the target tokens. Points are grouped by reference in order:
//! `segments[k]` rows belong to reference k. A reference with no sampled point has segment 0
//! and takes no part in either loss.
//!
//! Everything is composed from candle ops that have a backward, so gradients reach the rows.

use candle_core::{DType, Tensor, D};

use crate::error::{KernelError, Result};

/// Added inside every logarithm, as the official code does (1e-9 for SCAL, 1e-8 for JSD), so a
/// row that underflows to 0 gives a large finite loss rather than inf.
const SCAL_LOG_EPS: f64 = 1e-9;
const MDL_LOG_EPS: f64 = 1e-8;

/// Which MDL the objective uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MdlVariant {
    /// Paper eq. 12-14: negated mean symmetric KL over ordered pairs.
    PaperKl,
    /// Official code: negated mean Jensen-Shannon divergence over unordered pairs.
    OfficialJsd,
}

/// Number of sampled rows of each reference, in row order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefSegments(pub Vec<usize>);

impl RefSegments {
    pub fn total(&self) -> usize {
        self.0.iter().sum()
    }

    /// (row offset, row count) of each reference that has at least one row.
    fn non_empty(&self) -> Vec<(usize, usize)> {
        let mut offset = 0;
        let mut out = Vec::new();
        for &len in &self.0 {
            if len > 0 {
                out.push((offset, len));
            }
            offset += len;
        }
        out
    }
}

fn check_rows(
    op: &'static str,
    rows_pn: &Tensor,
    segments: &RefSegments,
) -> Result<(usize, usize)> {
    let (p, n) = rows_pn.dims2().map_err(|_| KernelError::Shape {
        op,
        arg: "rows",
        expected: "[P_total, N_tgt]".into(),
        found: rows_pn.dims().to_vec(),
    })?;
    if segments.total() != p {
        return Err(KernelError::Length {
            op,
            arg: "rows (first dim)",
            found: p,
            expected: segments.total(),
            expected_from: "the sum of the reference segments",
        });
    }
    Ok((p, n))
}

/// A scalar zero on the rows' device, for the cases where a loss has no terms.
fn zero_like(rows_pn: &Tensor) -> Result<Tensor> {
    Ok(Tensor::zeros((), rows_pn.dtype(), rows_pn.device())?)
}

/// L_SCA = -(1/K) sum_k (1/P_k) sum_j log A[u_kj, v_kj], over the K references with points.
///
/// `tgt_idx[j]` is the target token that row j must attend to.
pub fn scal_loss(rows_pn: &Tensor, tgt_idx: &[u32], segments: &RefSegments) -> Result<Tensor> {
    const OP: &str = "scal_loss";
    let (p, n) = check_rows(OP, rows_pn, segments)?;
    if tgt_idx.len() != p {
        return Err(KernelError::Length {
            op: OP,
            arg: "tgt_idx",
            found: tgt_idx.len(),
            expected: p,
            expected_from: "rows",
        });
    }
    if let Some((position, &index)) = tgt_idx.iter().enumerate().find(|(_, &v)| v as usize >= n) {
        return Err(KernelError::IndexOutOfRange {
            op: OP,
            arg: "tgt_idx",
            index: index as usize,
            position,
            bound: n,
        });
    }
    let refs = segments.non_empty();
    if refs.is_empty() {
        return zero_like(rows_pn);
    }
    let idx = Tensor::from_slice(tgt_idx, (p, 1), rows_pn.device())?;
    let picked = rows_pn.gather(&idx, 1)?.squeeze(1)?; // [P]
    let log_p = (picked + SCAL_LOG_EPS)?.log()?;
    let mut total: Option<Tensor> = None;
    for &(offset, len) in &refs {
        let mean_k = log_p.narrow(0, offset, len)?.mean_all()?;
        total = Some(match total {
            None => mean_k,
            Some(t) => (t + mean_k)?,
        });
    }
    let total = total.expect("refs is non-empty");
    Ok((total.neg()? / refs.len() as f64)?)
}

/// a_k: the normalised mean of reference k's rows, one distribution over target tokens each.
fn reference_distributions(rows_pn: &Tensor, segments: &RefSegments) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for (offset, len) in segments.non_empty() {
        let mean = rows_pn.narrow(0, offset, len)?.mean(0)?; // [N]
        let norm = mean.sum_keepdim(D::Minus1)?;
        out.push(mean.broadcast_div(&norm)?);
    }
    Ok(out)
}

/// sum_v p_v (log(p_v + eps) - log(q_v + eps))
fn kl(p: &Tensor, q: &Tensor) -> Result<Tensor> {
    let lp = (p + MDL_LOG_EPS)?.log()?;
    let lq = (q + MDL_LOG_EPS)?.log()?;
    Ok((p * (lp - lq)?)?.sum_all()?)
}

/// Paper MDL: L_MD = -(1/(K(K-1))) sum_{i != j} (KL(a_i||a_j) + KL(a_j||a_i)) / 2; 0 for K < 2.
pub fn mdl_kl_loss(rows_pn: &Tensor, segments: &RefSegments) -> Result<Tensor> {
    check_rows("mdl_kl_loss", rows_pn, segments)?;
    let a = reference_distributions(rows_pn, segments)?;
    let k = a.len();
    if k < 2 {
        return zero_like(rows_pn);
    }
    let mut total = Tensor::zeros((), rows_pn.dtype(), rows_pn.device())?;
    for i in 0..k {
        for j in 0..k {
            if i != j {
                let sym = ((kl(&a[i], &a[j])? + kl(&a[j], &a[i])?)? * 0.5)?;
                total = (total + sym)?;
            }
        }
    }
    Ok((total.neg()? / (k * (k - 1)) as f64)?)
}

/// Official MDL: the negated mean Jensen-Shannon divergence over the K(K-1)/2 unordered pairs,
/// JSD(p,q) = 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2; 0 for K < 2.
pub fn mdl_jsd_loss(rows_pn: &Tensor, segments: &RefSegments) -> Result<Tensor> {
    check_rows("mdl_jsd_loss", rows_pn, segments)?;
    let a = reference_distributions(rows_pn, segments)?;
    let k = a.len();
    if k < 2 {
        return zero_like(rows_pn);
    }
    let mut total = Tensor::zeros((), rows_pn.dtype(), rows_pn.device())?;
    for i in 0..k {
        for j in (i + 1)..k {
            let m = ((&a[i] + &a[j])? * 0.5)?;
            let jsd = ((kl(&a[i], &m)? + kl(&a[j], &m)?)? * 0.5)?;
            total = (total + jsd)?;
        }
    }
    let pairs = k * (k - 1) / 2;
    Ok((total.neg()? / pairs as f64)?)
}

/// MDL of the chosen variant.
pub fn mdl_loss(variant: MdlVariant, rows_pn: &Tensor, segments: &RefSegments) -> Result<Tensor> {
    match variant {
        MdlVariant::PaperKl => mdl_kl_loss(rows_pn, segments),
        MdlVariant::OfficialJsd => mdl_jsd_loss(rows_pn, segments),
    }
}

/// Rows must be probabilities; a caller that holds f16/bf16 rows gets f32 math.
pub fn rows_to_f32(rows_pn: &Tensor) -> Result<Tensor> {
    Ok(rows_pn.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rows(data: &[f64], p: usize, n: usize) -> Tensor {
        Tensor::from_slice(data, (p, n), &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    #[test]
    fn scal_matches_hand_computation() {
        // Two references: ref 0 has rows 0,1; ref 1 has row 2.
        let r = rows(&[0.5, 0.25, 0.25, 0.1, 0.8, 0.1, 0.2, 0.2, 0.6], 3, 3);
        let loss = scal_loss(&r, &[0, 1, 2], &RefSegments(vec![2, 1])).unwrap();
        let eps = SCAL_LOG_EPS;
        let ref0 = ((0.5f64 + eps).ln() + (0.8f64 + eps).ln()) / 2.0;
        let ref1 = (0.6f64 + eps).ln();
        let expected = -(ref0 + ref1) / 2.0;
        assert!(
            (scalar(&loss) - expected).abs() < 1e-12,
            "{} vs {expected}",
            scalar(&loss)
        );
    }

    #[test]
    fn scal_skips_references_without_points() {
        let r = rows(&[0.5, 0.5], 1, 2);
        let loss = scal_loss(&r, &[1], &RefSegments(vec![0, 1, 0])).unwrap();
        assert!((scalar(&loss) + (0.5f64 + SCAL_LOG_EPS).ln()).abs() < 1e-12);
        let empty = Tensor::zeros((0, 4), DType::F64, &Device::Cpu).unwrap();
        let loss = scal_loss(&empty, &[], &RefSegments(vec![0, 0])).unwrap();
        assert_eq!(scalar(&loss), 0.0);
    }

    #[test]
    fn scal_rejects_bad_indices_and_lengths() {
        let r = rows(&[0.5, 0.5], 1, 2);
        let err = scal_loss(&r, &[2], &RefSegments(vec![1])).unwrap_err();
        assert!(err.to_string().contains("tgt_idx"), "{err}");
        let err = scal_loss(&r, &[0], &RefSegments(vec![2])).unwrap_err();
        assert!(err.to_string().contains("segments"), "{err}");
    }

    #[test]
    fn mdl_kl_matches_hand_computation() {
        // ref 0: rows [0.7,0.3] and [0.5,0.5] -> a0 = [0.6,0.4]; ref 1: [0.2,0.8].
        let r = rows(&[0.7, 0.3, 0.5, 0.5, 0.2, 0.8], 3, 2);
        let loss = mdl_kl_loss(&r, &RefSegments(vec![2, 1])).unwrap();
        let e = MDL_LOG_EPS;
        let kl = |p: [f64; 2], q: [f64; 2]| -> f64 {
            p.iter()
                .zip(q)
                .map(|(pi, qi)| pi * ((pi + e).ln() - (qi + e).ln()))
                .sum()
        };
        let (a0, a1) = ([0.6, 0.4], [0.2, 0.8]);
        // Two ordered pairs, each contributing the symmetric KL.
        let sym = (kl(a0, a1) + kl(a1, a0)) / 2.0;
        let expected = -(2.0 * sym) / 2.0;
        assert!((scalar(&loss) - expected).abs() < 1e-12);
    }

    #[test]
    fn mdl_jsd_matches_hand_computation() {
        let r = rows(&[0.6, 0.4, 0.2, 0.8, 0.5, 0.5], 3, 2);
        let loss = mdl_jsd_loss(&r, &RefSegments(vec![1, 1, 1])).unwrap();
        let e = MDL_LOG_EPS;
        let kl = |p: [f64; 2], q: [f64; 2]| -> f64 {
            p.iter()
                .zip(q)
                .map(|(pi, qi)| pi * ((pi + e).ln() - (qi + e).ln()))
                .sum()
        };
        let jsd = |p: [f64; 2], q: [f64; 2]| {
            let m = [(p[0] + q[0]) / 2.0, (p[1] + q[1]) / 2.0];
            0.5 * kl(p, m) + 0.5 * kl(q, m)
        };
        let a = [[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]];
        let expected = -(jsd(a[0], a[1]) + jsd(a[0], a[2]) + jsd(a[1], a[2])) / 3.0;
        assert!((scalar(&loss) - expected).abs() < 1e-12);
    }

    #[test]
    fn mdl_is_zero_for_one_reference() {
        let r = rows(&[0.6, 0.4, 0.2, 0.8], 2, 2);
        for v in [MdlVariant::PaperKl, MdlVariant::OfficialJsd] {
            let loss = mdl_loss(v, &r, &RefSegments(vec![2, 0])).unwrap();
            assert_eq!(scalar(&loss), 0.0);
        }
    }

    #[test]
    fn losses_have_gradients_matching_finite_differences() {
        let data = [0.3, 0.2, 0.5, 0.1, 0.6, 0.3, 0.25, 0.25, 0.5];
        let segs = RefSegments(vec![2, 1]);
        let f = |v: &Tensor| -> Tensor {
            let s = scal_loss(v, &[2, 1, 0], &segs).unwrap();
            let k = mdl_kl_loss(v, &segs).unwrap();
            let j = mdl_jsd_loss(v, &segs).unwrap();
            ((s + k).unwrap() + j).unwrap()
        };
        let var = Var::from_tensor(&rows(&data, 3, 3)).unwrap();
        let grads = f(var.as_tensor()).backward().unwrap();
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let h = 1e-6;
        for i in 0..data.len() {
            let mut plus = data;
            plus[i] += h;
            let mut minus = data;
            minus[i] -= h;
            let fd = (scalar(&f(&rows(&plus, 3, 3))) - scalar(&f(&rows(&minus, 3, 3)))) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6,
                "element {i}: fd {fd} vs autograd {}",
                g[i]
            );
        }
    }
}
