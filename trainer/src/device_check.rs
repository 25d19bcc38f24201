//! `trainer check-device`: one training step's losses and every LoRA gradient computed on a
//! device (a GPU) and on the CPU from the same weights, batch, noise and sampled points,
//! compared against stated tolerances. It answers "does this GPU train the same model?"
//! before any long run, and is the correctness step of the GPU kit.

use candle_core::DType;
use serde::Serialize;

use crate::config::{Config, DataSource, DeviceName, InitName};
use crate::data::Sample;
use crate::error::{Result, TrainerError};
use crate::objective::{self, DrawAt, LossParts};
use crate::run::Run;

/// The comparison of one dtype.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceCheck {
    pub dtype: String,
    pub device: String,
    /// Block-wise recomputation on (train.checkpointing).
    pub recompute: bool,
    /// Largest relative difference of the loss parts (total, diffusion, SCAL, MDL).
    pub loss_rel: f64,
    /// Largest difference of a LoRA gradient relative to its largest element, over tensors.
    pub grad_rel: f64,
    /// The gradient tensor with the largest difference.
    pub worst_tensor: String,
    pub tensors: usize,
    pub tolerance: f64,
    pub pass: bool,
    pub device_losses: [f64; 4],
    pub cpu_losses: [f64; 4],
}

/// Relative tolerance by dtype: f32 accumulates in a different order on the GPU; bf16 rounds
/// the base weights and activations to 8 bits of mantissa.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 1e-3,
        _ => 8e-2,
    }
}

fn parts(p: &LossParts) -> [f64; 4] {
    [p.total, p.diff, p.scal, p.mdl]
}

fn step(run: &Run) -> Result<(LossParts, Vec<candle_core::Tensor>)> {
    let data = run
        .data
        .in_memory()
        .ok_or_else(|| TrainerError::config("data.source", "check-device needs \"synthetic\""))?;
    let take = run.cfg.train.batch_size.min(data.len());
    let samples: Vec<&Sample> = data.iter().take(take).collect();
    let draw = DrawAt {
        seed: run.cfg.run.seed,
        step: 0,
        first_slot: 0,
    };
    let prep = objective::prepare(
        &run.objective(),
        &samples,
        draw,
        true,
        run.model.dtype(),
        &run.device,
    )?;
    let ckpt = run.cfg.train.checkpointing;
    objective::loss_and_lora_grads(&run.model, &run.lora, &prep, &run.objective(), 0, ckpt)
}

/// Builds `cfg` on its device and on the CPU (same seed, so the same weights, data and
/// draws), runs one step's forward and backward on each and compares them.
pub fn check(cfg: &Config) -> Result<DeviceCheck> {
    let mut cfg = cfg.clone();
    cfg.data.source = DataSource::Synthetic;
    cfg.model.init = InitName::Portable;
    let mut cpu_cfg = cfg.clone();
    cpu_cfg.model.device = DeviceName::Cpu;
    let dev = Run::build(cfg.clone())?;
    let cpu = Run::build(cpu_cfg)?;
    let (pd, gd) = step(&dev)?;
    let (pc, gc) = step(&cpu)?;
    let loss_rel = parts(&pd)
        .iter()
        .zip(parts(&pc))
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-6))
        .fold(0f64, f64::max);
    let names = cpu.lora.named_vars();
    let mut grad_rel = 0f64;
    let mut worst_tensor = String::new();
    for ((name, _), (a, b)) in names.iter().zip(gd.iter().zip(&gc)) {
        let a = a
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F64)?;
        let b = b.to_dtype(DType::F64)?;
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
        let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()? / scale;
        if diff > grad_rel || worst_tensor.is_empty() {
            grad_rel = grad_rel.max(diff);
            worst_tensor = name.clone();
        }
    }
    let dtype = cfg.model.dtype.dtype();
    let tol = tolerance(dtype);
    Ok(DeviceCheck {
        dtype: format!("{dtype:?}").to_lowercase(),
        device: format!("{:?}", dev.device.location()),
        recompute: cfg.train.checkpointing,
        loss_rel,
        grad_rel,
        worst_tensor,
        tensors: names.len(),
        tolerance: tol,
        pass: loss_rel <= tol && grad_rel <= tol && grad_rel.is_finite(),
        device_losses: parts(&pd),
        cpu_losses: parts(&pc),
    })
}

impl DeviceCheck {
    pub const HEADER: &'static str = "| check | device | dtype | recompute | losses (rel. diff) | LoRA gradients (rel. diff, worst tensor) | tolerance | result |\n|---|---|---|---|---|---|---|---|";

    pub fn row(&self) -> String {
        format!(
            "| one step vs CPU | {} | {} | {} | {:.2e} | {:.2e} ({}, {} tensors) | {:.0e} | {} |",
            self.device,
            self.dtype,
            if self.recompute { "on" } else { "off" },
            self.loss_rel,
            self.grad_rel,
            self.worst_tensor,
            self.tensors,
            self.tolerance,
            if self.pass { "pass" } else { "FAIL" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Also bf16 with block-wise recomputation, whose objective mixes bf16 block outputs with
    /// f32 loss rows (a dtype mismatch there once failed only at FLUX.1-dev settings).
    #[test]
    fn the_cpu_agrees_with_itself_exactly() {
        for (dtype, ckpt) in [("f32", false), ("bf16", true)] {
            agrees_with_itself(dtype, ckpt);
        }
    }

    fn agrees_with_itself(dtype: &str, ckpt: bool) {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = Config::load(
            std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../configs/tiny-cpu.toml"
            )),
            &[
                format!("run.dir=\"{}\"", tmp.path().display()),
                "data.resolution=64".into(),
                "data.ref_resolution=64".into(),
                "data.samples=2".into(),
                "data.min_refs=2".into(),
                "model.weights=\"\"".into(),
                "data.text_tokens=16".into(),
                "train.progress=false".into(),
                format!("model.dtype=\"{dtype}\""),
                format!("train.checkpointing={ckpt}"),
            ],
        )
        .unwrap();
        let c = check(&cfg).unwrap();
        assert!(c.pass, "{c:?}");
        assert_eq!(c.loss_rel, 0.0);
        assert_eq!(c.grad_rel, 0.0);
        assert!(c.tensors > 0 && c.cpu_losses[0] > 0.0);
    }
}
