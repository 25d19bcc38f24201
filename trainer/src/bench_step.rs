//! `trainer bench-step`: the time, peak memory and model FLOP utilisation of real training
//! steps of one config (any model, device and dtype), as a markdown row and a JSON line. The
//! GPU kit (ci/gpu/run.sh) runs it for FLUX.1-dev; the PyTorch baseline writes the same fields.
//!
//! Model FLOPs per step (what the method needs, not what recomputation adds), per sample with
//! S tokens, hidden size D and L blocks:
//! - linear layers: F_lin = 24 D^2 S L (each block's projections hold 12 D^2 weights per
//!   token: q, k, v, out and the 4D MLP of a double block; qkv + MLP-in and the fused out of a
//!   single block);
//! - attention: F_attn = 4 S^2 D L (Q K^T and P V);
//! - a step: forward F_lin + F_attn, backward F_lin (input gradients only: the base is
//!   frozen) + 2 F_attn. Model FLOPs = 2 F_lin + 3 F_attn. The LoRA, embeddings and
//!   modulation add under 1% and are left out.
//!
//! MFU = model FLOPs / (s/step x peak FLOP/s of the device), with the peak given on the
//! command line (989 TFLOP/s: H100/H200 SXM dense bf16).

use std::time::Instant;

use serde::Serialize;

use crate::bench::{gb, median};
use crate::config::Config;
use crate::device_memory::PeakMemory;
use crate::error::Result;
use crate::run::Run;

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct StepBench {
    pub label: String,
    pub framework: &'static str,
    pub device: String,
    pub dtype: String,
    /// Tokens of one sample: text + target + references.
    pub tokens: usize,
    pub batch: usize,
    /// Median over the measured steps.
    pub s_per_step: f64,
    /// Of which: forward and backward over the micro-batches (with the gradient all-reduce),
    /// and the agreement all-reduce plus the update (clipping, AdamW, EMA); medians.
    pub accumulate_s: f64,
    pub update_s: f64,
    pub steps: usize,
    /// Peak bytes during the measured steps (device pool on a GPU, heap on the CPU).
    pub peak_bytes: Option<usize>,
    /// Bytes in use once the run is built, before any step: the frozen weights, the LoRA, its
    /// optimizer and EMA state, the data (what a step's peak starts from).
    pub resident_bytes: Option<usize>,
    /// The process's peak resident set at the end (host memory, whatever the device): the
    /// measure the PyTorch baseline gives on the CPU.
    pub max_rss_bytes: Option<usize>,
    pub model_flops: f64,
    /// Achieved model FLOP/s over the median step, in TFLOP/s.
    pub tflops: f64,
    /// Fraction of `peak_tflops`.
    pub mfu: f64,
    pub peak_tflops: f64,
    /// With profiling: seconds per step in each phase (phases may nest), by name.
    pub phases: Vec<(String, f64)>,
}

/// Tokens of one sample under `cfg`'s data settings, with `data.max_refs` references.
pub fn tokens_per_sample(cfg: &Config) -> usize {
    let grid = |px: usize| (px / 16) * (px / 16);
    cfg.data.text_tokens
        + grid(cfg.data.resolution)
        + cfg.data.max_refs * grid(cfg.data.ref_resolution)
}

/// Model FLOPs of one training step (module docs) for `batch` samples of `tokens` tokens.
pub fn model_flops(fc: &flux::FluxConfig, tokens: usize, batch: usize) -> f64 {
    let (d, s) = (fc.hidden() as f64, tokens as f64);
    let l = (fc.num_double + fc.num_single) as f64;
    let lin = 24.0 * d * d * s * l;
    let attn = 4.0 * s * s * d * l;
    batch as f64 * (2.0 * lin + 3.0 * attn)
}

/// One step as `Run::train_step` takes it, with the device synchronised after each part:
/// (accumulate s, agree + update s).
fn timed_step(run: &mut Run, step: u64) -> Result<(f64, f64)> {
    let t = Instant::now();
    let acc = run.accumulate(step)?;
    run.device.synchronize()?;
    let accumulate = t.elapsed().as_secs_f64();
    let t = Instant::now();
    run.finish_step(step, acc, t)?;
    run.device.synchronize()?;
    Ok((accumulate, t.elapsed().as_secs_f64()))
}

/// Runs `warmup` steps, then `steps` measured ones, of the run `cfg` describes. Every rank's
/// work is synchronised with the device before a step's clock stops.
pub fn measure(
    label: &str,
    cfg: Config,
    warmup: usize,
    steps: usize,
    peak_tflops: f64,
    profile: bool,
) -> Result<StepBench> {
    let tokens = tokens_per_sample(&cfg);
    let batch = cfg.train.batch_size * cfg.train.grad_accum;
    let dtype = format!("{:?}", cfg.model.dtype).to_lowercase();
    let mut run = Run::build(cfg)?;
    run.device.synchronize()?;
    let resident_bytes = crate::device_memory::resident(&run.device);
    for step in 0..warmup as u64 {
        run.train_step(step)?;
    }
    run.device.synchronize()?;
    let memory = PeakMemory::start(&run.device);
    flux::profile::enable(profile);
    let (mut times, mut acc_times, mut upd_times) = (Vec::new(), Vec::new(), Vec::new());
    for step in warmup as u64..(warmup + steps) as u64 {
        let (acc, upd) = timed_step(&mut run, step)?;
        acc_times.push(acc);
        upd_times.push(upd);
        times.push(acc + upd);
    }
    let phases = flux::profile::totals()
        .into_iter()
        .map(|(name, (secs, _))| (name.to_string(), secs / steps as f64))
        .collect();
    flux::profile::enable(false);
    let s_per_step = median(times);
    let flops = model_flops(&run.model.cfg, tokens, batch);
    let tflops = flops / s_per_step / 1e12;
    Ok(StepBench {
        label: label.to_string(),
        framework: "candle (this trainer)",
        device: format!("{:?}", run.device.location()),
        dtype,
        tokens,
        batch,
        s_per_step,
        accumulate_s: median(acc_times),
        update_s: median(upd_times),
        steps,
        peak_bytes: memory.peak(),
        resident_bytes,
        max_rss_bytes: crate::device_memory::process_peak_rss(),
        model_flops: flops,
        tflops,
        mfu: tflops / peak_tflops,
        peak_tflops,
        phases,
    })
}

impl StepBench {
    pub const HEADER: &'static str = "| case | framework | device | dtype | tokens | s/step | of which fwd+bwd / update | peak memory (after build) | model TFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|---|---|";

    /// The result as a row under [`Self::HEADER`].
    pub fn row(&self) -> String {
        let mem = format!(
            "{} (built: {})",
            gb(self.peak_bytes),
            gb(self.resident_bytes)
        );
        format!(
            "| {} | {} | {} | {} | {} | {:.4} | {:.4} / {:.4} | {} | {:.2} | {:.1}% |",
            self.label,
            self.framework,
            self.device,
            self.dtype,
            self.tokens,
            self.s_per_step,
            self.accumulate_s,
            self.update_s,
            mem,
            self.tflops,
            100.0 * self.mfu
        )
    }

    /// The profile as a markdown table (empty without `--profile`). Phases nest: the `op:`
    /// phases (single operations, wherever they run) lie inside the others, so shares need not
    /// add up to 100%. The device is synchronised at every phase boundary, which slows the
    /// profiled steps; shares are of the profiled step's time.
    pub fn profile_table(&self) -> String {
        if self.phases.is_empty() {
            return String::new();
        }
        let total = self.s_per_step.max(1e-12);
        let mut out = String::from("| phase | s per step | share of the step |\n|---|---|---|\n");
        for (name, s) in &self.phases {
            out += &format!("| {name} | {s:.4} | {:.1}% |\n", 100.0 * s / total);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_follow_the_formula() {
        let fc = flux::FluxConfig::flux_dev();
        // 512 px target and one 512 px reference with 512 text tokens.
        let s = 512 + 1024 + 1024;
        let d = 3072f64;
        let lin = 24.0 * d * d * s as f64 * 57.0;
        let attn = 4.0 * (s as f64).powi(2) * d * 57.0;
        let f = model_flops(&fc, s, 1);
        assert!((f - (2.0 * lin + 3.0 * attn)).abs() < 1.0);
        assert!((model_flops(&fc, s, 2) - 2.0 * f).abs() < 1.0);
        // About 80 TFLOP: at 45% of 989 TFLOP/s a step takes 0.18 s.
        assert!((7.9e13..8.1e13).contains(&f), "{f:e}");
    }
}
