//! `trainer bench-attention`: one block's joint attention at FLUX.1-dev's shape (24 heads of
//! 128), forward and backward, chunked against full, on the CPU (f32), with time and peak heap;
//! then the per-token cost of chunked attention that the memory budget uses.
//!
//! The rest of a block is the same for both forms, so the attention alone is what differs.
//! Full attention keeps [H, S, S] scores and probabilities for the backward; it is measured
//! only where that fits this machine, and computed above.

use std::fmt::Write as _;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use flux::attention::{attention, Attention, GroupMask};

use crate::bench::gb;
use crate::device_memory::PeakMemory;
use crate::error::Result;

const HEADS: usize = 24;
const HEAD_DIM: usize = 128;
/// Full attention is measured at the smallest case only: its graph holds about ten
/// [H, S, S] f32 tensors at once (scores, masked scores, exponentials, probabilities and their
/// gradients), 22 GB already at S = 4608. Larger cases are computed from the measured bytes
/// per score.
const FULL_MEASURED_UP_TO: usize = 2560;

/// Scores of one call: H x S^2.
fn scores(s: usize) -> f64 {
    HEADS as f64 * (s as f64).powi(2)
}

/// (seconds, peak heap bytes) of forward + backward of sum(o * w).
fn measure(s: usize, refs: &[usize], kind: Attention) -> Result<(f64, Option<usize>)> {
    let dev = Device::Cpu;
    let shape = (1, HEADS, s, HEAD_DIM);
    let shared = s - refs.iter().sum::<usize>();
    let mask = GroupMask::references(shared, refs, &dev)?;
    let var = || -> Result<Var> { Ok(Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?)?) };
    let (q, k, v) = (var()?, var()?, var()?);
    let w = Tensor::randn(0f32, 1.0, shape, &dev)?;
    let memory = PeakMemory::start(&dev);
    let t = Instant::now();
    let o = attention(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        Some(&mask),
        kind,
    )?;
    let grads = (o * &w)?.sum_all()?.backward()?;
    let g = grads.get(q.as_tensor()).map(|g| {
        g.sum_all()
            .and_then(|x| x.to_dtype(DType::F64)?.to_scalar::<f64>())
    });
    if let Some(r) = g {
        r?;
    }
    Ok((t.elapsed().as_secs_f64(), memory.peak()))
}

/// The cases: 512 text tokens, then (target, references) tokens of FLUX.1-dev at 512 and
/// 1024 px with 1, 3 or 6 references of the target's size.
fn cases() -> Vec<(usize, Vec<usize>)> {
    [(1024usize, 1usize), (1024, 3), (1024, 6), (4096, 3)]
        .iter()
        .map(|&(tok, refs)| (512 + tok * (1 + refs), vec![tok; refs]))
        .collect()
}

/// The markdown tables; `chunk` query rows per chunk.
pub fn report(chunk: usize) -> Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| tokens S | full: fwd+bwd | full: peak heap | chunked ({chunk}): fwd+bwd | chunked: peak heap | memory ratio |\n|---|---|---|---|---|---|"
    );
    let mut per_token = 0f64;
    let mut per_score = 0f64;
    for (s, refs) in cases() {
        let (ct, cm) = measure(
            s,
            &refs,
            Attention::Chunked {
                chunk,
                cpu_tiles: false, // the per-token cost a GPU budget takes: `chunk` rows
            },
        )?;
        let full = if s <= FULL_MEASURED_UP_TO {
            let (t, m) = measure(s, &refs, Attention::Full)?;
            if let Some(m) = m {
                per_score = per_score.max(m as f64 / scores(s));
            }
            Some((t, m))
        } else {
            None
        };
        if let Some(m) = cm {
            per_token = per_token.max(m as f64 / s as f64);
        }
        let (ft, fm, ratio) = match full {
            Some((t, m)) => (
                format!("{t:.2} s"),
                gb(m),
                match (m, cm) {
                    (Some(a), Some(b)) => format!("{:.0}x", a as f64 / b.max(1) as f64),
                    _ => "n/a".into(),
                },
            ),
            None => (
                "not run".into(),
                format!("~{:.1} GB (computed)", per_score * scores(s) / 1e9),
                cm.map_or("n/a".into(), |b| {
                    format!("~{:.0}x", per_score * scores(s) / b.max(1) as f64)
                }),
            ),
        };
        let _ = writeln!(
            out,
            "| {s} | {ft} | {fm} | {ct:.2} s | {} | {ratio} |",
            gb(cm)
        );
    }
    let _ = writeln!(
        out,
        "\nChunked attention holds at most {:.0} kB per token of the joint sequence during one block's \
         forward and backward (f32 here; the scores stay f32 under bf16 too), so one block's attention \
         at S tokens needs about S x that: {:.2} GB at S = 29184 (1024 px, 6 references).",
        per_token / 1e3,
        per_token * 29184.0 / 1e9
    );
    let _ = writeln!(
        out,
        "\nThe FLUX.1-dev memory budget (trainer/src/bench.rs) with that measured figure:\n\n{}",
        crate::bench::budget(128, per_token)
    );
    Ok(out)
}
