//! `trainer bench-rows`: the attention rows the losses need, at FLUX.1-dev sizes (24 heads,
//! head dim 128), computed (a) as the official code does (whole reference-to-target maps,
//! softmax over target tokens, head mean, then gather the sampled rows) and (b) with the fused
//! `kernels::attention_rows`, forward and forward + backward, with peak memory (the heap on the
//! CPU, the memory pool on a GPU). One selected block; the loss is linear in the number of
//! selected blocks for both.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};

use crate::device_memory::PeakMemory;
use crate::error::Result;

const HEADS: usize = 24;
const HEAD_DIM: usize = 128;
/// Above this estimate the official approach is not run (its peak is computed instead): the
/// CPU machines this runs on have 24 GB, the GPUs 80 GB.
fn max_measured_bytes(device: &Device) -> usize {
    if device.is_cpu() {
        23_000_000_000
    } else {
        70_000_000_000
    }
}

struct Case {
    n_tgt: usize,
    refs: usize,
    points: usize,
}

/// The official approach: full maps per reference, softmax over target tokens, head mean,
/// then the sampled rows.
fn official(q: &Tensor, k: &Tensor, idx: &Tensor, scale: f64) -> Result<Tensor> {
    let z = (q.matmul(&k.t()?)? * scale)?; // [H, N_ref, N_tgt]
    let max = z.max_keepdim(D::Minus1)?.detach();
    let e = z.broadcast_sub(&max)?.exp()?;
    let maps = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.mean(0)?; // [N_ref, N_tgt]
    Ok(maps.index_select(idx, 0)?)
}

fn fused(q: &Tensor, k: &Tensor, idx: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(kernels::attention_rows(q, k, idx, scale)?)
}

type RowsFn = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>;

/// (forward s, forward+backward s, peak heap bytes of forward+backward).
fn measure(f: RowsFn, case: &Case, reps: usize, dev: &Device) -> Result<(f64, f64, usize)> {
    let n_ref = case.n_tgt * case.refs;
    let q = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (HEADS, n_ref, HEAD_DIM), dev)?))?;
    let k = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (HEADS, case.n_tgt, HEAD_DIM), dev)?))?;
    let p = case.points * case.refs;
    let idx: Vec<u32> = (0..p).map(|i| ((i * 7919) % n_ref) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), dev)?;
    let w = Tensor::randn(0f32, 1.0, (p, case.n_tgt), dev)?;
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let (mut fwd, mut both, mut peak) = (f64::MAX, f64::MAX, 0usize);
    for _ in 0..reps {
        let t = Instant::now();
        let rows = f(q.as_tensor(), k.as_tensor(), &idx, scale)?;
        let _ = rows.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        fwd = fwd.min(t.elapsed().as_secs_f64());
        drop(rows);
        dev.synchronize()?;
        let memory = PeakMemory::start(dev);
        let t = Instant::now();
        let rows = f(q.as_tensor(), k.as_tensor(), &idx, scale)?;
        let grads = (rows * &w)?.sum_all()?.backward()?;
        let _ = grads.get(q.as_tensor()).map(|g| g.sum_all());
        dev.synchronize()?;
        both = both.min(t.elapsed().as_secs_f64());
        peak = peak.max(memory.peak().unwrap_or(0));
    }
    Ok((fwd, both, peak))
}

/// Seconds for SCAL + both MDL variants, forward and backward, on a rows tensor of `refs`
/// references x `points` rows over `n_tgt` target tokens (the composed candle ops).
fn losses_time(refs: usize, points: usize, n_tgt: usize, dev: &Device) -> Result<f64> {
    let p = refs * points;
    let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (p, n_tgt), dev)?)?;
    let segments = kernels::RefSegments(vec![points; refs]);
    let tgt: Vec<u32> = (0..p).map(|i| ((i * 31) % n_tgt) as u32).collect();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let rows = candle_nn::ops::softmax(logits.as_tensor(), D::Minus1)?;
        let jsd = kernels::MdlSettings {
            divergence: kernels::Divergence::Jsd,
            ..Default::default()
        };
        let l = ((kernels::scal_loss(&rows, &tgt, &segments, Default::default())?
            + kernels::mdl_loss(&rows, &segments, Default::default())?)?
            + kernels::mdl_loss(&rows, &segments, jsd)?)?;
        let g = l.backward()?;
        let _ = g.get(logits.as_tensor()).map(|g| g.sum_all());
        dev.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn mb(b: usize) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// The official approach's peak: 14.1 times one H x N_ref x N_tgt f32 map, the ratio measured
/// at 1024 and at 4096 target tokens with one reference (scores, exp, probabilities and their
/// gradients are alive together).
fn official_bytes(c: &Case) -> usize {
    HEADS * c.n_tgt * c.refs * c.n_tgt * 4 * 141 / 10
}

/// The markdown table of every case.
pub fn report(reps: usize, device: &Device) -> Result<String> {
    let mut cases = Vec::new();
    for n_tgt in [1024, 4096] {
        for refs in [1, 2, 3, 6] {
            for points in [150, 200] {
                cases.push(Case {
                    n_tgt,
                    refs,
                    points,
                });
            }
        }
    }
    let mut out = String::from(
        "| N_tgt | refs | P per ref | (a) official fwd | (a) fwd+bwd | (a) peak | (b) fused fwd | (b) fwd+bwd | (b) peak | fwd+bwd speedup | memory ratio |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in &cases {
        let (bf, bb, bp) = measure(fused, c, reps, device)?;
        let a = if official_bytes(c) <= max_measured_bytes(device) {
            Some(measure(official, c, reps, device)?)
        } else {
            None
        };
        let row = match a {
            Some((af, ab, ap)) => format!(
                "| {} | {} | {} | {:.3} s | {:.3} s | {} | {:.3} s | {:.3} s | {} | {:.1}x | {:.0}x |\n",
                c.n_tgt, c.refs, c.points, af, ab, mb(ap), bf, bb, mb(bp), ab / bb,
                ap as f64 / bp.max(1) as f64
            ),
            None => format!(
                "| {} | {} | {} | not run | not run | ~{} (computed) | {:.3} s | {:.3} s | {} | - | ~{:.0}x |\n",
                c.n_tgt, c.refs, c.points, mb(official_bytes(c)), bf, bb, mb(bp),
                official_bytes(c) as f64 / bp.max(1) as f64
            ),
        };
        out += &row;
    }
    out += "\nSCAL + MDL (both variants) on the rows, composed candle ops, forward + backward:\n\n| N_tgt | refs | P per ref | time |\n|---|---|---|---|\n";
    for (n, refs, points) in [(1024, 2, 150), (1024, 6, 200), (4096, 6, 200)] {
        out += &format!(
            "| {n} | {refs} | {points} | {:.2} ms |\n",
            losses_time(refs, points, n, device)? * 1e3
        );
    }
    Ok(out)
}
