//! SCAL (semantic correspondence attention loss) and MDL (multi-reference disentanglement
//! loss) on attention rows, design.md §5, paper eq. 10-14 and the official `compute_align_sep_losses`.
//!
//! Shape legend: `rows_pn` is [P_total, N_tgt]: row j is the head- and block-averaged softmax of
//! one reference query over the target tokens. Rows are grouped by reference in order:
//! `segments[k]` rows belong to reference k. A reference with no row has segment 0 and takes no
//! part in either loss.
//!
//! The two sources differ in how they reduce and which divergence they take; [`ScalSettings`]
//! and [`MdlSettings`] name each choice. Everything is composed from candle ops that have a
//! backward, so gradients reach the rows.

use candle_core::{Tensor, D};

use crate::error::{KernelError, Result};

/// How SCAL averages its log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalReduce {
    /// Paper eq. 10: the mean over each reference's points, then the mean over references.
    PerReference,
    /// Official code: one mean over the points of all references together.
    Pooled,
}

/// SCAL's reduction and the epsilon added inside its logarithm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalSettings {
    pub reduce: ScalReduce,
    /// log(A + eps): a row that underflows to 0 gives a large finite loss rather than inf
    /// (official: 1e-9).
    pub eps: f64,
}

impl Default for ScalSettings {
    fn default() -> Self {
        Self {
            reduce: ScalReduce::PerReference,
            eps: 1e-9,
        }
    }
}

/// The divergence MDL maximises between the references' mean attention distributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// Paper eq. 13: (KL(p||q) + KL(q||p)) / 2, with eps added to both distributions as the
    /// official `sym_kl_divergence` does.
    SymmetricKl,
    /// Official code (`jsd_loss`): KL(p||m)/2 + KL(q||m)/2, m = (p+q)/2, eps inside the logs.
    Jsd,
}

/// MDL's divergence and its epsilon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MdlSettings {
    pub divergence: Divergence,
    /// Official: 1e-8 in both divergence functions.
    pub eps: f64,
}

impl Default for MdlSettings {
    fn default() -> Self {
        Self {
            divergence: Divergence::SymmetricKl,
            eps: 1e-8,
        }
    }
}

/// Number of rows of each reference, in row order.
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

/// L_SCA: the negated mean of log(A[u_j, v_j] + eps), reduced as `settings.reduce` says, over
/// the references with rows. `tgt_idx[j]` is the target token that row j must attend to.
pub fn scal_loss(
    rows_pn: &Tensor,
    tgt_idx: &[u32],
    segments: &RefSegments,
    settings: ScalSettings,
) -> Result<Tensor> {
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
    let log_p = (picked + settings.eps)?.log()?;
    if settings.reduce == ScalReduce::Pooled {
        return Ok(log_p.mean_all()?.neg()?);
    }
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

/// a_k: the normalised mean of reference k's rows, one distribution over target tokens each
/// (paper eq. 12; the official code skips the normalisation, a no-op on softmax rows up to
/// rounding).
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
fn kl_eps_in_logs(p: &Tensor, q: &Tensor, eps: f64) -> Result<Tensor> {
    let lp = (p + eps)?.log()?;
    let lq = (q + eps)?.log()?;
    Ok((p * (lp - lq)?)?.sum_all()?)
}

/// The divergence between two reference distributions.
fn divergence(p: &Tensor, q: &Tensor, settings: MdlSettings) -> Result<Tensor> {
    let eps = settings.eps;
    Ok(match settings.divergence {
        Divergence::SymmetricKl => {
            let (p, q) = ((p + eps)?, (q + eps)?);
            let (lp, lq) = (p.log()?, q.log()?);
            let d = (&lp - &lq)?;
            // KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)
            (((p - q)? * d)?.sum_all()? * 0.5)?
        }
        Divergence::Jsd => {
            let m = ((p + q)? * 0.5)?;
            ((kl_eps_in_logs(p, &m, eps)? + kl_eps_in_logs(q, &m, eps)?)? * 0.5)?
        }
    })
}

/// L_MD: the negated mean divergence over the K(K-1)/2 unordered pairs of references with rows
/// (paper eq. 14 sums ordered pairs over K(K-1): the same value, the divergences being
/// symmetric); 0 for K < 2.
pub fn mdl_loss(rows_pn: &Tensor, segments: &RefSegments, settings: MdlSettings) -> Result<Tensor> {
    check_rows("mdl_loss", rows_pn, segments)?;
    let a = reference_distributions(rows_pn, segments)?;
    let k = a.len();
    if k < 2 {
        return zero_like(rows_pn);
    }
    let mut total = Tensor::zeros((), rows_pn.dtype(), rows_pn.device())?;
    for i in 0..k {
        for j in (i + 1)..k {
            total = (total + divergence(&a[i], &a[j], settings)?)?;
        }
    }
    let pairs = k * (k - 1) / 2;
    Ok((total.neg()? / pairs as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    const PAPER_SCAL: ScalSettings = ScalSettings {
        reduce: ScalReduce::PerReference,
        eps: 1e-9,
    };
    const POOLED_SCAL: ScalSettings = ScalSettings {
        reduce: ScalReduce::Pooled,
        eps: 1e-9,
    };
    const SYM_KL: MdlSettings = MdlSettings {
        divergence: Divergence::SymmetricKl,
        eps: 1e-8,
    };
    const JSD: MdlSettings = MdlSettings {
        divergence: Divergence::Jsd,
        eps: 1e-8,
    };

    fn rows(data: &[f64], p: usize, n: usize) -> Tensor {
        Tensor::from_slice(data, (p, n), &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    /// The official code's divergences, written out on plain slices.
    fn official_jsd(p: &[f64], q: &[f64], eps: f64) -> f64 {
        let m: Vec<f64> = p.iter().zip(q).map(|(a, b)| 0.5 * (a + b)).collect();
        let kl = |x: &[f64]| -> f64 {
            x.iter()
                .zip(&m)
                .map(|(a, b)| a * ((a + eps).ln() - (b + eps).ln()))
                .sum()
        };
        0.5 * (kl(p) + kl(q))
    }

    fn official_sym_kl(p: &[f64], q: &[f64], eps: f64) -> f64 {
        let kl = |x: &[f64], y: &[f64]| -> f64 {
            x.iter()
                .zip(y)
                .map(|(a, b)| (a + eps) * ((a + eps).ln() - (b + eps).ln()))
                .sum()
        };
        0.5 * (kl(p, q) + kl(q, p))
    }

    #[test]
    fn scal_matches_hand_computation_both_reductions() {
        // Two references: ref 0 has rows 0,1; ref 1 has row 2.
        let r = rows(&[0.5, 0.25, 0.25, 0.1, 0.8, 0.1, 0.2, 0.2, 0.6], 3, 3);
        let segs = RefSegments(vec![2, 1]);
        let eps = 1e-9;
        let logs = [
            (0.5f64 + eps).ln(),
            (0.8f64 + eps).ln(),
            (0.6f64 + eps).ln(),
        ];
        let per_ref = -((logs[0] + logs[1]) / 2.0 + logs[2]) / 2.0;
        let pooled = -(logs[0] + logs[1] + logs[2]) / 3.0;
        let got = scalar(&scal_loss(&r, &[0, 1, 2], &segs, PAPER_SCAL).unwrap());
        assert!((got - per_ref).abs() < 1e-12, "{got} vs {per_ref}");
        let got = scalar(&scal_loss(&r, &[0, 1, 2], &segs, POOLED_SCAL).unwrap());
        assert!((got - pooled).abs() < 1e-12, "{got} vs {pooled}");
        assert!(
            (per_ref - pooled).abs() > 1e-3,
            "the two reductions differ here"
        );
    }

    #[test]
    fn scal_epsilon_is_the_given_one() {
        let r = rows(&[0.0, 1.0], 1, 2);
        let s = ScalSettings {
            eps: 1e-4,
            ..PAPER_SCAL
        };
        let got = scalar(&scal_loss(&r, &[0], &RefSegments(vec![1]), s).unwrap());
        assert!((got + 1e-4f64.ln()).abs() < 1e-9, "{got}");
    }

    #[test]
    fn scal_skips_references_without_points() {
        let r = rows(&[0.5, 0.5], 1, 2);
        for s in [PAPER_SCAL, POOLED_SCAL] {
            let loss = scal_loss(&r, &[1], &RefSegments(vec![0, 1, 0]), s).unwrap();
            assert!((scalar(&loss) + (0.5f64 + 1e-9).ln()).abs() < 1e-12);
            let empty = Tensor::zeros((0, 4), DType::F64, &Device::Cpu).unwrap();
            let loss = scal_loss(&empty, &[], &RefSegments(vec![0, 0]), s).unwrap();
            assert_eq!(scalar(&loss), 0.0);
        }
    }

    #[test]
    fn scal_rejects_bad_indices_and_lengths() {
        let r = rows(&[0.5, 0.5], 1, 2);
        let err = scal_loss(&r, &[2], &RefSegments(vec![1]), PAPER_SCAL).unwrap_err();
        assert!(err.to_string().contains("tgt_idx"), "{err}");
        let err = scal_loss(&r, &[0], &RefSegments(vec![2]), PAPER_SCAL).unwrap_err();
        assert!(err.to_string().contains("segments"), "{err}");
    }

    #[test]
    fn mdl_matches_the_official_functions() {
        // ref 0: rows [0.7,0.3] and [0.5,0.5] -> a0 = [0.6,0.4]; ref 1: [0.2,0.8]; ref 2: [0.5,0.5].
        let r = rows(&[0.7, 0.3, 0.5, 0.5, 0.2, 0.8, 0.5, 0.5], 4, 2);
        let segs = RefSegments(vec![2, 1, 1]);
        let a = [[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]];
        let pairs = [(0, 1), (0, 2), (1, 2)];
        for (settings, f) in [
            (SYM_KL, official_sym_kl as fn(&[f64], &[f64], f64) -> f64),
            (JSD, official_jsd),
        ] {
            let expected = -pairs
                .iter()
                .map(|&(i, j)| f(&a[i], &a[j], 1e-8))
                .sum::<f64>()
                / 3.0;
            let got = scalar(&mdl_loss(&r, &segs, settings).unwrap());
            assert!(
                (got - expected).abs() < 1e-12,
                "{settings:?}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn mdl_is_zero_for_one_reference() {
        let r = rows(&[0.6, 0.4, 0.2, 0.8], 2, 2);
        for s in [SYM_KL, JSD] {
            let loss = mdl_loss(&r, &RefSegments(vec![2, 0]), s).unwrap();
            assert_eq!(scalar(&loss), 0.0);
        }
    }

    #[test]
    fn losses_have_gradients_matching_finite_differences() {
        let data = [0.3, 0.2, 0.5, 0.1, 0.6, 0.3, 0.25, 0.25, 0.5];
        let segs = RefSegments(vec![2, 1]);
        let f = |v: &Tensor| -> Tensor {
            let mut total = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
            for s in [PAPER_SCAL, POOLED_SCAL] {
                total = (total + scal_loss(v, &[2, 1, 0], &segs, s).unwrap()).unwrap();
            }
            for s in [SYM_KL, JSD] {
                total = (total + mdl_loss(v, &segs, s).unwrap()).unwrap();
            }
            total
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
