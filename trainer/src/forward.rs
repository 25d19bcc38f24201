//! `trainer forward`: a plain FLUX forward (no references) on inputs named as the arguments of
//! diffusers' `FluxTransformer2DModel.forward`, for parity checks against diffusers.
//!
//! Inputs (safetensors): hidden_states [B, N, C], encoder_hidden_states [B, L, ctx],
//! pooled_projections [B, pooled], timestep [B] and guidance [B] in diffusers' units (the values
//! passed to forward, which multiplies them by 1000), img_ids [N, 3], txt_ids [L, 3] (a leading
//! batch dim of 1, the deprecated layout, is accepted).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, TrainerError};
use flux::embed::ids_from_tensor;
use flux::lora::{LoraInit, LoraSpec};
use flux::{weights, Flux, Lora, ModelInputs, RowBlocks};

fn take<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    map.get(name).ok_or_else(|| TrainerError::Input {
        name: name.into(),
        reason: "missing from the inputs file".into(),
    })
}

fn values(t: &Tensor, name: &str, batch: usize) -> Result<Vec<f32>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if v.len() != batch {
        return Err(TrainerError::Input {
            name: name.into(),
            reason: format!(
                "has {} values, expected one per batch element ({batch})",
                v.len()
            ),
        });
    }
    Ok(v)
}

fn ids(t: &Tensor, name: &str) -> Result<Vec<[f32; 3]>> {
    let t = if t.rank() == 3 { t.get(0)? } else { t.clone() };
    if t.rank() != 2 || t.dim(1)? != 3 {
        return Err(TrainerError::Input {
            name: name.into(),
            reason: format!("expected shape [S, 3], found {:?}", t.dims()),
        });
    }
    Ok(ids_from_tensor(&t)?)
}

/// Runs the forward and returns `output` [B, N, C] in f32.
pub fn forward_file(
    weights_path: &Path,
    inputs: &Path,
    dtype: DType,
    axes: Option<[usize; 3]>,
) -> Result<Tensor> {
    let device = Device::Cpu;
    let (cfg, w) = weights::load(weights_path, dtype, &device, axes)?;
    let model = Flux::new(cfg.clone(), &w, RowBlocks::default())?;
    let map = candle_core::safetensors::load(inputs, &device)
        .map_err(|e| TrainerError::read(inputs, e))?;
    let img = take(&map, "hidden_states")?.to_dtype(dtype)?;
    let b = img.dim(0)?;
    let guidance = match map.get("guidance") {
        Some(g) => values(g, "guidance", b)?,
        None if cfg.guidance_embeds => {
            return Err(TrainerError::Input {
                name: "guidance".into(),
                reason: "required: the model has a guidance embedder".into(),
            })
        }
        None => vec![0.0; b],
    };
    let inp = ModelInputs {
        img,
        img_ids: ids(take(&map, "img_ids")?, "img_ids")?,
        txt: take(&map, "encoder_hidden_states")?.to_dtype(dtype)?,
        txt_ids: ids(take(&map, "txt_ids")?, "txt_ids")?,
        pooled: take(&map, "pooled_projections")?.to_dtype(dtype)?,
        timestep: values(take(&map, "timestep")?, "timestep", b)?,
        guidance,
        refs: None,
        isolate_refs: true,
        row_queries: None,
    };
    // No references: the LoRA is never applied, so an empty adapter set is exact.
    let lora = Lora::new(
        &cfg,
        &LoraSpec {
            rank: 1,
            alpha: 1.0,
            init: LoraInit::Gaussian,
            targets: vec!["x_embedder".into()],
            init_from: String::new(),
        },
        0,
        DType::F32,
        &device,
    )?;
    let out = model.forward(&inp, lora.view(false))?;
    Ok(out.pred.to_dtype(DType::F32)?)
}

/// `trainer forward`: writes tensor `output` to `out`.
pub fn forward_cmd(
    weights_path: &Path,
    inputs: &Path,
    out: &Path,
    dtype: DType,
    axes: Option<[usize; 3]>,
) -> Result<()> {
    let output = forward_file(weights_path, inputs, dtype, axes)?;
    let mut map = HashMap::new();
    map.insert("output".to_string(), output);
    candle_core::safetensors::save(&map, out)?;
    Ok(())
}
