//! `trainer bench`: step time and peak memory of real training steps on CPU (tiny and medium
//! models, block-wise recomputation off and on, measured side by side in one run), and a computed
//! memory budget for FLUX.1-dev at 512 and 1024 px with 1, 3 and 6 references.
//!
//! Peak memory comes from the counting allocator the `trainer` binary installs (heap bytes
//! above the level before the step); elsewhere it reads "n/a".

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use crate::alloc;
use crate::config::Config;
use crate::error::Result;
use crate::run::Run;
use flux::lora::{adaptable_modules, glob_matches, DEFAULT_TARGETS};
use flux::FluxConfig;

const GB: f64 = 1e9;

/// A measured case: a name and config overrides on top of configs/tiny-cpu.toml.
struct Case {
    name: &'static str,
    sets: Vec<String>,
}

fn cases() -> Vec<Case> {
    let common = [
        "train.progress=false",
        "data.min_refs=2",
        "data.max_refs=2",
        "data.samples=4",
        "train.batch_size=1",
    ];
    let mk = |name, extra: &[&str]| Case {
        name,
        sets: common.iter().chain(extra).map(|s| s.to_string()).collect(),
    };
    vec![
        mk("tiny 128px, 2 refs", &["model.preset=\"tiny\""]),
        mk(
            "medium 256px, 2 refs",
            &[
                "model.preset=\"medium\"",
                "data.resolution=256",
                "data.ref_resolution=256",
                "data.text_tokens=64",
                "loss.double_blocks=[0, 1, 2]",
                "loss.points_per_ref=150",
            ],
        ),
    ]
}

/// The median of `v` (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bytes in GB with two decimals, or "n/a" where nothing measured them.
pub(crate) fn gb(b: Option<usize>) -> String {
    b.map_or("n/a".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
}

fn fmt_bytes(b: usize) -> String {
    if b == 0 {
        "n/a".into()
    } else {
        format!("{:.1} MB", b as f64 / 1e6)
    }
}

/// Measures `steps` steps (after one warm-up step) of each case with checkpointing off and on.
fn measured(base: &Path, steps: usize) -> Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| case | checkpointing | s/step (median of {steps}) | peak heap during a step |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for case in cases() {
        for ckpt in [false, true] {
            let mut sets = case.sets.clone();
            sets.push(format!("train.checkpointing={ckpt}"));
            sets.push(format!("train.max_steps={}", steps + 1));
            let cfg = Config::load(base, &sets)?;
            let mut run = Run::build(cfg)?;
            run.train_step(0)?;
            let mut times = Vec::with_capacity(steps);
            let mut peak = 0usize;
            for step in 1..=steps as u64 {
                let before = alloc::current();
                alloc::reset_peak();
                let t = Instant::now();
                run.train_step(step)?;
                times.push(t.elapsed().as_secs_f64());
                peak = peak.max(alloc::peak().saturating_sub(before));
            }
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {} |",
                case.name,
                if ckpt { "on" } else { "off" },
                median(times),
                fmt_bytes(peak)
            );
        }
    }
    Ok(out)
}

/// Trainable LoRA parameters of the default (official) targets at rank `r`.
fn lora_params(cfg: &FluxConfig, r: usize) -> usize {
    adaptable_modules(cfg)
        .iter()
        .filter(|(m, _, _)| DEFAULT_TARGETS.iter().any(|p| glob_matches(p, m)))
        .map(|(_, i, o)| r * (i + o))
        .sum()
}

/// The memory model, per sample (batch 1), bf16 activations:
/// - frozen weights: parameters x 2 bytes;
/// - LoRA state: parameters x 20 bytes (f32 weight, gradient, two Adam moments, EMA);
/// - kept block inputs with recomputation: blocks x S x D x 2 bytes;
/// - one block's graph: about 30 D values per token (norm outputs, q/k/v, attention output,
///   MLP input and 4D hidden before and after GELU), plus the attention: chunked,
///   `attn_per_token` bytes per token (about five f32 [heads, chunk] rows per token live in the
///   backward; `trainer bench-attention` measures it); materialised, scores and probabilities
///   in f32: 2 x heads x S^2 x 4 bytes;
/// - without recomputation every block keeps its graph.
pub fn budget(r: usize, attn_per_token: f64) -> String {
    let cfg = FluxConfig::flux_dev();
    let d = cfg.hidden() as f64;
    let weights = flux::weights::expected_tensors(&cfg)
        .iter()
        .map(|e| e.shape.iter().product::<usize>())
        .sum::<usize>() as f64
        * 2.0;
    let lora = lora_params(&cfg, r) as f64 * 20.0;
    let blocks = (cfg.num_double + cfg.num_single) as f64;
    let mut out = String::new();
    let _ = writeln!(out, "| px | refs | tokens S | weights | LoRA r={r} + Adam + EMA | kept inputs (recompute) | one block, chunked attn | one block, materialised attn | total recompute + chunked | total recompute + materialised | total no recompute + chunked |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for px in [512usize, 1024] {
        for refs in [1usize, 3, 6] {
            let tok = (px / 16) * (px / 16);
            let s = (512 + tok * (1 + refs)) as f64;
            let kept = blocks * s * d * 2.0;
            let block = 30.0 * s * d * 2.0;
            let chunked = s * attn_per_token;
            let attn = 2.0 * cfg.num_heads as f64 * s * s * 4.0;
            let fused = weights + lora + kept + block + chunked;
            let _ = writeln!(
                out,
                "| {px} | {refs} | {} | {:.1} GB | {:.1} GB | {:.1} GB | {:.1} GB | {:.1} GB | {:.1} GB{} | {:.1} GB | {:.1} GB |",
                s as usize,
                weights / GB,
                lora / GB,
                kept / GB,
                (block + chunked) / GB,
                (block + attn) / GB,
                fused / GB,
                if fused <= 80.0 * GB { " (fits 80 GB)" } else { "" },
                (weights + lora + kept + block + attn) / GB,
                (weights + lora + blocks * block + chunked) / GB,
            );
        }
    }
    out
}

/// The whole report; `base` is configs/tiny-cpu.toml.
pub fn report(base: &Path, steps: usize) -> Result<String> {
    let mut out = String::from("Measured on CPU (this machine), one run, side by side:\n\n");
    out.push_str(&measured(base, steps)?);
    out.push_str("\nComputed memory budget for FLUX.1-dev, batch 1, bf16 base, 512 text tokens (formulas in trainer/src/bench.rs):\n\n");
    let cfg = FluxConfig::flux_dev();
    let estimate = 5.0 * (cfg.num_heads * flux::attention::DEFAULT_CHUNK * 4) as f64;
    out.push_str(&budget(128, estimate));
    Ok(out)
}
