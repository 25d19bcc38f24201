//! `trainer export`: a checkpoint to a Hugging Face model folder (design.md §7).
//!
//! Writes, as asked by `--format`:
//! - diffusers: `pytorch_lora_weights.safetensors` (`transformer.<module>.lora_A/B.weight`);
//! - peft: `adapter_model.safetensors` (`base_model.model.<module>...`);
//! - kohya: `<run name>-kohya.safetensors` (BFL names for kohya scripts and ComfyUI);
//! - always `adapter_config.json` (PEFT's LoraConfig) and a `README.md` model card.
//!
//! The scale alpha / r is folded into B and the files say alpha = r, so every loader applies
//! the trained delta exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::checkpoint::{self, Loaded};
use crate::config::Config;
use crate::error::{Result, TrainerError};
use crate::storage::Location;
use flux::lora_format::{self, LoraTensors, ModuleLora};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Diffusers,
    Peft,
    Kohya,
    All,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub format: Format,
    /// Export the EMA weights instead of the raw ones.
    pub ema: bool,
    pub dtype: DType,
    /// The Hub id of the base model for the card (empty: described from the config).
    pub base_model: String,
    /// License identifier for the card's metadata.
    pub license: String,
}

pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";
pub const PEFT_FILE: &str = "adapter_model.safetensors";
pub const PEFT_CONFIG: &str = "adapter_config.json";
pub const CARD: &str = "README.md";

/// A checkpoint folder (`.../step-NNNNNNNN`), a folder of checkpoints (its LATEST or newest
/// valid one), or a run folder; each may be a local path or an object-store URL.
pub fn resolve_checkpoint(path: &Path) -> Result<Loaded> {
    let location = path.to_string_lossy().trim_end_matches('/').to_string();
    if location
        .rsplit('/')
        .next()
        .is_some_and(|l| l.starts_with("step-"))
    {
        return checkpoint::load_folder(&location);
    }
    for root in [location.clone(), format!("{location}/checkpoints")] {
        if let Some(l) = checkpoint::latest_valid(&Location::parse(&root)?)? {
            return Ok(l);
        }
    }
    Err(TrainerError::Checkpoint {
        path: path.to_path_buf(),
        reason: "holds no checkpoint (expected a step-NNNNNNNN folder, a checkpoints folder or a run folder)".into(),
    })
}

/// The adapters of a checkpoint (raw or EMA) with the run's scale.
pub fn adapters(loaded: &Loaded, cfg: &Config, ema: bool) -> Result<LoraTensors> {
    if loaded.tensors.contains_key(checkpoint::BASE_FILE) {
        return Err(TrainerError::Checkpoint {
            path: loaded.dir.clone(),
            reason: "is a checkpoint of a base pretraining (`trainer pretrain-base`), which has no LoRA to export: its base is the run folder's base/ (a diffusers transformer folder)".into(),
        });
    }
    let file = if ema {
        checkpoint::EMA_FILE
    } else {
        checkpoint::LORA_FILE
    };
    let tensors = loaded
        .tensors
        .get(file)
        .ok_or_else(|| TrainerError::Checkpoint {
            path: loaded.dir.join(file),
            reason: if ema {
                "has no EMA weights (the run had optim.ema_decay = 0)".into()
            } else {
                "is missing".into()
            },
        })?;
    let scale = cfg.lora.alpha / cfg.lora.rank as f64;
    let mut out = LoraTensors::new();
    for (name, a) in tensors {
        let Some(module) = name.strip_suffix(".lora_A") else {
            continue;
        };
        let b =
            tensors
                .get(&format!("{module}.lora_B"))
                .ok_or_else(|| TrainerError::Checkpoint {
                    path: loaded.dir.join(file),
                    reason: format!("`{module}.lora_B` is missing"),
                })?;
        out.insert(
            module.to_string(),
            ModuleLora {
                a: a.clone(),
                b: b.clone(),
                scale,
            },
        );
    }
    Ok(out)
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

/// What the card and the metadata say about the base model.
fn base_model(cfg: &Config, opts: &ExportOptions) -> String {
    if !opts.base_model.is_empty() {
        opts.base_model.clone()
    } else if !cfg.model.weights.is_empty() {
        cfg.model.weights.clone()
    } else {
        format!(
            "randomly initialised FLUX ({:?} preset, seed {})",
            cfg.model.preset, cfg.run.seed
        )
    }
}

/// Writes the export of the checkpoint at `ckpt` into `out`; returns the files written.
pub fn export(ckpt: &Path, out: &Path, opts: &ExportOptions) -> Result<Vec<PathBuf>> {
    let loaded = resolve_checkpoint(ckpt)?;
    let cfg = Config::from_toml(&loaded.config_toml, &loaded.dir.join("config.toml"), &[])?;
    let adapters = adapters(&loaded, &cfg, opts.ema)?;
    std::fs::create_dir_all(out).map_err(|e| TrainerError::io(out, e))?;
    refuse_foreign_card(out)?;
    let r = cfg.lora.rank;
    let base = base_model(&cfg, opts);
    let metadata = file_metadata(&cfg, &loaded, opts, &base);
    let mut written = Vec::new();
    let want = |f: Format| opts.format == f || opts.format == Format::All;
    if want(Format::Diffusers) {
        let p = out.join(DIFFUSERS_FILE);
        let t = lora_format::to_prefixed(&adapters, "transformer.", opts.dtype)?;
        lora_format::write_safetensors(&p, &t, metadata.clone())?;
        written.push(p);
    }
    if want(Format::Peft) {
        let p = out.join(PEFT_FILE);
        let t = lora_format::to_prefixed(&adapters, "base_model.model.", opts.dtype)?;
        lora_format::write_safetensors(&p, &t, metadata.clone())?;
        written.push(p);
    }
    if want(Format::Kohya) {
        let p = out.join(format!("{}-kohya.safetensors", cfg.run.name));
        let fc = lora_format::config_from_adapters(&adapters, &loaded.dir)?;
        let t = lora_format::to_kohya(&adapters, &fc, opts.dtype)?;
        lora_format::write_safetensors(&p, &t, metadata)?;
        written.push(p);
    }
    written.push(write_peft_config(out, &adapters, r, &base)?);
    let p = out.join(CARD);
    lora_format::write_atomically(
        &p,
        model_card(&cfg, &loaded, opts, &base, &written).as_bytes(),
    )?;
    written.push(p);
    Ok(written)
}

/// What every model card this tool writes says, so it knows its own.
const CARD_MARK: &str = "trained with mosaic-rs";

/// A README.md in `out` that this tool did not write is somebody's: refused rather than
/// replaced.
fn refuse_foreign_card(out: &Path) -> Result<()> {
    let p = out.join(CARD);
    match std::fs::read_to_string(&p) {
        Ok(text) if !text.contains(CARD_MARK) => Err(TrainerError::Input {
            name: p.display().to_string(),
            reason: "exists and was not written by `trainer export`; the export would replace it (move it, or export to another --out)".into(),
        }),
        _ => Ok(()),
    }
}

/// The metadata every exported safetensors file carries.
fn file_metadata(
    cfg: &Config,
    loaded: &checkpoint::Loaded,
    opts: &ExportOptions,
    base: &str,
) -> HashMap<String, String> {
    let r = cfg.lora.rank;
    [
        ("format", "pt".to_string()),
        ("mosaic.base_model", base.to_string()),
        ("mosaic.step", loaded.state.step.to_string()),
        ("mosaic.rank", r.to_string()),
        ("mosaic.trained_alpha", cfg.lora.alpha.to_string()),
        (
            "mosaic.note",
            "alpha/r is folded into lora_B; load with alpha = r (scale 1)".to_string(),
        ),
        ("mosaic.ema", opts.ema.to_string()),
        (
            "mosaic.config_fingerprint",
            loaded.state.fingerprint.clone(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// PEFT's `adapter_config.json` for `adapters` (alpha = r: alpha/r is folded into B).
fn write_peft_config(
    out: &Path,
    adapters: &lora_format::LoraTensors,
    r: usize,
    base: &str,
) -> Result<PathBuf> {
    let modules: Vec<&String> = adapters.keys().collect();
    let peft = serde_json::json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": "gaussian",
        "use_rslora": false,
        "use_dora": false,
        "base_model_name_or_path": base,
        "task_type": null,
    });
    let p = out.join(PEFT_CONFIG);
    let text = serde_json::to_string_pretty(&peft).map_err(|e| TrainerError::Serialize {
        what: "the PEFT adapter config",
        source: Box::new(e),
    })?;
    std::fs::write(&p, text).map_err(|e| TrainerError::io(&p, e))?;
    Ok(p)
}

/// What the run trained on, with the references per sample the data held: the shards'
/// manifest counts them (rows outside data.min_refs..=max_refs were skipped); the synthetic
/// source draws them evenly from that range.
fn data_description(cfg: &Config) -> String {
    let d = &cfg.data;
    match d.source {
        crate::config::DataSource::Synthetic => format!(
            "synthetic scenes, {} to {} references per sample",
            d.min_refs, d.max_refs
        ),
        crate::config::DataSource::Shards => {
            let manifest =
                datasets::Location::parse(&d.url).and_then(|loc| datasets::Manifest::load(&loc));
            match manifest {
                Ok(m) => {
                    let mut counts = std::collections::BTreeMap::<usize, usize>::new();
                    for g in m.shards.iter().flat_map(|s| &s.row_groups) {
                        for row in g.row_meta() {
                            if (d.min_refs..=d.max_refs).contains(&row.refs) {
                                *counts.entry(row.refs).or_default() += 1;
                            }
                        }
                    }
                    let by: Vec<String> = counts
                        .iter()
                        .map(|(k, n)| format!("{n} with {k}"))
                        .collect();
                    format!(
                        "SemAlign-MS shards ({}), rows by references: {}",
                        d.url,
                        if by.is_empty() {
                            "none in range".to_string()
                        } else {
                            by.join(", ")
                        }
                    )
                }
                Err(e) => format!(
                    "SemAlign-MS shards ({}; unreadable at export, so references per sample unknown: {e})",
                    d.url
                ),
            }
        }
    }
}

fn model_card(
    cfg: &Config,
    loaded: &Loaded,
    opts: &ExportOptions,
    base: &str,
    files: &[PathBuf],
) -> String {
    let l = &cfg.loss;
    let t = &cfg.train;
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| {
            p.file_name()
                .map(|n| format!("- `{}`", n.to_string_lossy()))
        })
        .collect();
    let base_line = if opts.base_model.is_empty() {
        String::new()
    } else {
        format!("base_model: {}\n", opts.base_model)
    };
    format!(
        r#"---
{base_line}library_name: diffusers
license: {license}
tags:
- flux
- lora
- mosaic
- multi-subject
- text-to-image
---

# {name}

A MOSAIC multi-subject personalization LoRA for FLUX.1, trained with mosaic-rs
(https://arxiv.org/abs/2509.01977). MOSAIC applies this LoRA to the reference-image tokens only;
generic loaders apply it to every token, so use a MOSAIC pipeline for its intended behaviour.

## Training

| | |
|---|---|
| base model | {base} |
| steps | {steps} |
| weights | {which} |
| LoRA rank / alpha | {rank} / {alpha} (alpha/r folded into lora_B; files say alpha = r) |
| target modules | {targets} |
| loss | L_diff + {scal} L_SCA + {mdl} L_MD: {recipe} recipe (SCAL {scal_reduce}; MDL {divergence} of {mdl_rows} rows; {points}) |
| optimizer | AdamW, lr {lr}, {schedule:?}, warmup {warmup}, weight decay {wd}, clip {clip} |
| batch | {batch} per rank x {world} ranks x {accum} accumulation |
| data | {data}, {res} px targets |
| seed | {seed} |
| config fingerprint | `{fp}` |
| export dtype | {dtype} |

## Files

{files}

{usage}"#,
        license = opts.license,
        name = cfg.run.name,
        steps = loaded.state.step,
        which = if opts.ema { "EMA" } else { "raw (not EMA)" },
        rank = cfg.lora.rank,
        alpha = cfg.lora.alpha,
        targets = cfg.lora.targets.join(", "),
        scal = l.scal_weight,
        mdl = l.mdl_weight,
        recipe = l.recipe(),
        scal_reduce = l.scal_reduce.as_str(),
        divergence = l.mdl_divergence.as_str(),
        mdl_rows = l.mdl_rows.as_str(),
        points = match l.points_per_ref {
            0 => "every correspondence pair".to_string(),
            p => format!("{p} points per reference"),
        },
        data = data_description(cfg),
        lr = cfg.optim.lr,
        schedule = cfg.optim.schedule,
        warmup = cfg.optim.warmup_steps,
        wd = cfg.optim.weight_decay,
        clip = cfg.optim.grad_clip,
        batch = t.batch_size,
        world = loaded.state.world_size,
        accum = t.grad_accum,
        res = cfg.data.resolution,
        seed = cfg.run.seed,
        fp = loaded.state.fingerprint,
        dtype = dtype_name(opts.dtype),
        files = names.join("\n"),
        usage = CARD_USAGE,
    )
}

/// The model card's closing section: how to load the files.
const CARD_USAGE: &str = r#"## Usage (diffusers)

```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
pipe.load_lora_weights("path/or/repo-id", weight_name="pytorch_lora_weights.safetensors")
```

The `*-kohya.safetensors` file, when present, loads in ComfyUI's LoRA loader and kohya scripts.
"#;
