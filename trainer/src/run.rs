//! A training run's state between steps (model, LoRA, optimizer, data, ranks) and how it is
//! built from a config: the frozen base, the LoRA (seeded, or continued from a file, then made
//! identical on every rank), the data feed, AdamW, EMA and the gradient buckets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device, Var};
use flux::grad::readiness_order;
use flux::{Flux, Lora, Weights};

use crate::config::{Config, DeviceName, InitName};
use crate::data::DataFeed;
use crate::ddp::consistency::{check_same_config, sync_lora};
use crate::ddp::{BucketPlan, Dist};
use crate::error::{Result, TrainerError};
use crate::objective::ObjectiveSpec;
use crate::optim::{AdamW, Ema};

/// Everything a run holds between steps.
pub struct Run {
    pub cfg: Config,
    pub device: Device,
    pub model: Flux,
    pub lora: Lora,
    pub data: DataFeed,
    pub opt: AdamW,
    pub ema: Option<Ema>,
    /// The other ranks (a single rank needs none).
    pub dist: Dist,
    /// Gradient buckets for the all-reduce.
    pub plan: BucketPlan,
    /// Set by signal handlers on this rank.
    pub stop_requested: Arc<AtomicBool>,
    /// Set once the ranks agreed, at the end of a step, that some rank was asked to stop.
    pub stop_agreed: bool,
    /// Step, skipped updates, shard cursors and lineage: fresh here, the checkpoint's after a
    /// resume.
    pub ledger: crate::checkpoint::Ledger,
}

/// The device of this rank: CUDA device `ordinal` (LOCAL_RANK) or the CPU.
pub fn device_of(cfg: &Config, ordinal: usize) -> Result<Device> {
    open_device(cfg.model.device, ordinal).map_err(|e| {
        TrainerError::config(
            "model.device",
            format!("cannot open CUDA device {ordinal}: {e} (build with --features cuda)"),
        )
    })
}

/// The CPU, or CUDA device `ordinal`.
pub fn open_device(name: DeviceName, ordinal: usize) -> candle_core::Result<Device> {
    match name {
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda => {
            let device = Device::new_cuda(ordinal)?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(d) = &device {
                // Safety: every kernel, copy and NCCL collective of this process runs on the
                // device's one stream, so the events cudarc records to order several streams
                // (two created per allocation, a wait per kernel argument) are pure host
                // overhead. Called before anything is allocated on the device.
                unsafe { d.disable_event_tracking() };
            }
            Ok(device)
        }
    }
}

/// The frozen base: loaded from `model.weights`, or seeded random weights of `model.preset`.
pub fn base_weights(cfg: &Config, device: &Device) -> Result<(flux::FluxConfig, Weights)> {
    let dtype = cfg.model.dtype.dtype();
    if cfg.model.weights.is_empty() {
        let fc = cfg.model.preset.config();
        let weights = match cfg.model.init {
            InitName::Portable => Weights::random(&fc, cfg.run.seed, dtype, device)?,
            InitName::Device => Weights::random_on_device(&fc, cfg.run.seed, dtype, device)?,
        };
        Ok((fc, weights))
    } else {
        Ok(flux::weights::load(
            Path::new(&cfg.model.weights),
            dtype,
            device,
            cfg.model.axes_dims,
        )?)
    }
}

impl Run {
    /// A single-rank run on the configured device.
    pub fn build(cfg: Config) -> Result<Self> {
        let device = device_of(&cfg, 0)?;
        Self::build_with(cfg, Dist::single(), device)
    }

    /// A run as one rank of `dist`: the configs must match (fingerprint), the LoRA starts from
    /// rank 0's, and each micro-batch of `train.batch_size` samples per rank is this rank's
    /// slice of a global micro-batch of `batch_size * world` samples.
    pub fn build_with(cfg: Config, dist: Dist, device: Device) -> Result<Self> {
        check_same_config(&dist, &cfg)?;
        flux::fused::set_enabled(cfg.model.kernels == crate::config::KernelsName::Fused);
        let (fc, weights) = base_weights(&cfg, &device)?;
        let mut model = Flux::new(fc.clone(), &weights, cfg.loss.row_blocks(&fc))?;
        model.attention = cfg.model.attention();
        let lora_dtype = if cfg.model.dtype.dtype() == candle_core::DType::F64 {
            candle_core::DType::F64
        } else {
            candle_core::DType::F32
        };
        let lora = Lora::new(&fc, &cfg.lora, cfg.run.seed, lora_dtype, &device)?;
        // The initialization is seeded and so already identical; the broadcast makes that a
        // guarantee rather than an assumption.
        sync_lora(&dist, &lora, "initial LoRA weights after broadcast")?;
        let data = DataFeed::build(&cfg, &fc, dist.rank(), dist.world_size(), &device)?;
        let vars = lora_vars(&lora);
        let opt = AdamW::new(&vars)?;
        let ema = Ema::for_spec(&cfg.optim, &vars)?;
        let bytes: Vec<usize> = vars
            .iter()
            .map(|v| v.as_tensor().elem_count() * v.as_tensor().dtype().size_in_bytes())
            .collect();
        let plan = BucketPlan::new(
            &bytes,
            &readiness_order(&model, &lora),
            (cfg.distributed.bucket_mb * (1 << 20) as f64) as usize,
        );
        Ok(Self {
            dist,
            plan,
            stop_requested: Arc::new(AtomicBool::new(false)),
            stop_agreed: false,
            ledger: crate::checkpoint::Ledger::fresh(),
            cfg,
            device,
            model,
            lora,
            data,
            opt,
            ema,
        })
    }

    /// Writes the LoRA (or its EMA) with diffusers Flux keys: `transformer.<module>.lora_A.weight`
    /// [r, in] and `lora_B.weight` [out, r]. alpha/r is folded into B so loaders that assume
    /// alpha = r (diffusers, PEFT without a config) apply the trained delta exactly.
    pub fn save_lora(&self, path: &Path, use_ema: bool) -> Result<()> {
        let shadow = match (&self.ema, use_ema) {
            (Some(e), true) => Some(e.shadow.as_slice()),
            _ => None,
        };
        let adapters = flux::lora_format::from_live(&self.lora, shadow);
        let tensors = flux::lora_format::to_prefixed(&adapters, "transformer.", DType::F32)?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        Ok(flux::lora_format::write_safetensors(path, &tensors, meta)?)
    }

    /// What the objective reads from the config.
    pub fn objective(&self) -> ObjectiveSpec<'_> {
        ObjectiveSpec {
            loss: &self.cfg.loss,
            conditioning: &self.cfg.conditioning,
            dropout: self.cfg.data.dropout(),
            empty_caption: self.data.empty_caption(),
        }
    }

    /// Writes `lora.safetensors` (and `lora_ema.safetensors` with EMA on) into `run_dir`.
    pub fn save_loras(&self, run_dir: &Path) -> Result<()> {
        self.save_lora(&lora_path(run_dir), false)?;
        if self.ema.is_some() {
            self.save_lora(&run_dir.join("lora_ema.safetensors"), true)?;
        }
        Ok(())
    }
}

/// Where a run writes its final LoRA.
pub fn lora_path(run_dir: &Path) -> PathBuf {
    run_dir.join("lora.safetensors")
}

pub fn lora_vars(lora: &Lora) -> Vec<&Var> {
    lora.named_vars().into_iter().map(|(_, v)| v).collect()
}
