//! LoRA files in the formats other tools read, and back (design.md §7):
//! - diffusers: `transformer.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r],
//!   optionally `transformer.<module>.alpha` (a scalar; the delta is scaled by alpha / r);
//! - PEFT: the same tensors under `base_model.model.<module>.`;
//! - kohya / ComfyUI: BFL module names, `lora_unet_<module with _>.lora_down.weight`,
//!   `.lora_up.weight` and `.alpha`. BFL fuses q, k, v (and in single blocks the MLP input) into
//!   one linear; their adapters become one adapter of rank n*r whose up matrix is block
//!   diagonal, which is exactly the sum of the parts' deltas.
//!
//! Exports fold the scale into B and write alpha = rank, so every loader (with or without alpha
//! support) applies the trained delta exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{FluxError, Result};
use crate::weights::bfl_linear_modules;
use crate::FluxConfig;

/// One module's adapter: delta W = scale * B A.
#[derive(Debug, Clone)]
pub struct ModuleLora {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scale: f64,
}

impl ModuleLora {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// scale * B A, [out, in], in f32.
    pub fn delta(&self) -> Result<Tensor> {
        let (a, b) = (self.a.to_dtype(DType::F32)?, self.b.to_dtype(DType::F32)?);
        Ok((b.matmul(&a)? * self.scale)?)
    }

    /// B with the scale folded in (so the file needs scale 1).
    fn b_scaled(&self) -> Result<Tensor> {
        Ok(if self.scale == 1.0 {
            self.b.clone()
        } else {
            (&self.b * self.scale)?
        })
    }
}

/// Adapters by diffusers module path.
pub type LoraTensors = BTreeMap<String, ModuleLora>;

fn bad(path: &Path, reason: impl Into<String>) -> FluxError {
    FluxError::Weights {
        file: path.to_path_buf(),
        problems: vec![reason.into()],
    }
}

/// The adapters of a live run (or, with `shadow`, its EMA in `named_vars()` order).
pub fn from_live(lora: &crate::Lora, shadow: Option<&[Tensor]>) -> LoraTensors {
    let vars = lora.named_vars();
    let value = |i: usize| match shadow {
        Some(s) => s[i].clone(),
        None => vars[i].1.as_tensor().clone(),
    };
    // named_vars() lists each module's A then B, in adapter order.
    lora.adapters()
        .enumerate()
        .map(|(k, (m, _))| {
            (
                m.clone(),
                ModuleLora {
                    a: value(2 * k),
                    b: value(2 * k + 1),
                    scale: lora.scale(),
                },
            )
        })
        .collect()
}

/// diffusers keys (`prefix` "transformer.") or PEFT keys ("base_model.model."), scale folded.
pub fn to_prefixed(l: &LoraTensors, prefix: &str, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(l.len() * 2);
    for (m, ad) in l {
        out.push((
            format!("{prefix}{m}.lora_A.weight"),
            ad.a.to_dtype(dtype)?.contiguous()?,
        ));
        out.push((
            format!("{prefix}{m}.lora_B.weight"),
            ad.b_scaled()?.to_dtype(dtype)?.contiguous()?,
        ));
    }
    Ok(out)
}

/// The sizes kohya naming needs (block counts, hidden width), read off the adapters.
pub fn config_from_adapters(l: &LoraTensors, path: &Path) -> Result<FluxConfig> {
    let mut hidden = None;
    let (mut double, mut single) = (0, 0);
    for (m, ad) in l {
        let block = |prefix: &str| {
            m.strip_prefix(prefix)
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
        };
        if let Some(i) = block("single_transformer_blocks.") {
            single = single.max(i + 1);
        } else if let Some(i) = block("transformer_blocks.") {
            double = double.max(i + 1);
        }
        // Every adapted module of a block except a few reads the hidden width.
        if m.ends_with("attn.to_q") || m.ends_with("proj_mlp") || m.ends_with("norm1.linear") {
            hidden = Some(ad.a.dims()[1]);
        }
        if m == "x_embedder" {
            hidden = Some(ad.b.dims()[0]);
        }
    }
    let hidden = hidden.ok_or_else(|| {
        bad(
            path,
            "cannot tell the model width from these adapters (no to_q, proj_mlp, norm1.linear or x_embedder)",
        )
    })?;
    Ok(FluxConfig {
        num_heads: 1,
        head_dim: hidden,
        num_double: double,
        num_single: single,
        ..FluxConfig::tiny()
    })
}

/// kohya / ComfyUI keys (BFL modules, fused where BFL fuses), scale folded, alpha = rank.
pub fn to_kohya(l: &LoraTensors, cfg: &FluxConfig, dtype: DType) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut used = 0;
    for (stem, parts) in bfl_linear_modules(cfg) {
        let present: Vec<(usize, &ModuleLora)> = parts
            .iter()
            .enumerate()
            .filter_map(|(i, (m, _))| l.get(m).map(|ad| (i, ad)))
            .collect();
        if present.is_empty() {
            continue;
        }
        used += present.len();
        let key = format!("lora_unet_{}", stem.replace('.', "_"));
        let (down, up) = if parts.len() == 1 {
            (present[0].1.a.clone(), present[0].1.b_scaled()?)
        } else {
            // Every part gets a rank slot of the same width r, in BFL's part order: down stacks
            // the parts' A (zero rows for a part without an adapter), up is block diagonal with
            // part i's B at its output rows and its slot's columns. The reader relies on this
            // layout to split the module back exactly.
            let r = present[0].1.rank();
            if present.iter().any(|(_, ad)| ad.rank() != r) {
                return Err(FluxError::Input {
                    name: "kohya export".into(),
                    reason: format!("the parts of {stem} have different ranks"),
                });
            }
            let like = &present[0].1.a;
            let (dt, dev, fan_in) = (like.dtype(), like.device(), like.dims()[1]);
            let total = r * parts.len();
            let (mut downs, mut ups) = (Vec::new(), Vec::new());
            for (i, (_, rows)) in parts.iter().enumerate() {
                let left = Tensor::zeros((*rows, i * r), dt, dev)?;
                let right = Tensor::zeros((*rows, total - (i + 1) * r), dt, dev)?;
                let (a, b) = match present.iter().find(|(j, _)| *j == i) {
                    Some((_, ad)) => (ad.a.to_dtype(dt)?, ad.b_scaled()?.to_dtype(dt)?),
                    None => (
                        Tensor::zeros((r, fan_in), dt, dev)?,
                        Tensor::zeros((*rows, r), dt, dev)?,
                    ),
                };
                downs.push(a);
                ups.push(Tensor::cat(&[left, b, right], 1)?);
            }
            (Tensor::cat(&downs, 0)?, Tensor::cat(&ups, 0)?)
        };
        let rank = down.dims()[0];
        out.push((
            format!("{key}.lora_down.weight"),
            down.to_dtype(dtype)?.contiguous()?,
        ));
        out.push((
            format!("{key}.lora_up.weight"),
            up.to_dtype(dtype)?.contiguous()?,
        ));
        out.push((
            format!("{key}.alpha"),
            Tensor::new(rank as f32, &Device::Cpu)?,
        ));
    }
    if used != l.len() {
        let known: std::collections::BTreeSet<String> = bfl_linear_modules(cfg)
            .into_iter()
            .flat_map(|(_, p)| p.into_iter().map(|(m, _)| m))
            .collect();
        let missing: Vec<&String> = l.keys().filter(|m| !known.contains(*m)).collect();
        return Err(FluxError::Input {
            name: "kohya export".into(),
            reason: format!("modules with no BFL counterpart: {missing:?}"),
        });
    }
    Ok(out)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
}

/// Reads adapters from any of the three key layouts (detected from the keys).
pub fn read(map: &HashMap<String, Tensor>, path: &Path) -> Result<LoraTensors> {
    if map.keys().any(|k| k.starts_with("lora_unet_")) {
        return read_kohya(map, path);
    }
    let mut out = LoraTensors::new();
    let mut problems = Vec::new();
    for (k, a) in map {
        let Some(stem) = k.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let module = stem
            .strip_prefix("transformer.")
            .or_else(|| stem.strip_prefix("base_model.model."))
            .unwrap_or(stem);
        let Some(b) = map.get(&format!("{stem}.lora_B.weight")) else {
            problems.push(format!(
                "{stem}.lora_B.weight is missing (its lora_A is there)"
            ));
            continue;
        };
        let r = a.dims()[0];
        if b.dims().get(1) != Some(&r) {
            problems.push(format!(
                "{stem}: lora_A {:?} and lora_B {:?} disagree on the rank",
                a.dims(),
                b.dims()
            ));
            continue;
        }
        let scale = match map.get(&format!("{stem}.alpha")) {
            Some(alpha) => scalar(alpha)? / r as f64,
            None => 1.0,
        };
        out.insert(
            module.to_string(),
            ModuleLora {
                a: a.clone(),
                b: b.clone(),
                scale,
            },
        );
    }
    if !problems.is_empty() {
        return Err(FluxError::Weights {
            file: path.to_path_buf(),
            problems,
        });
    }
    if out.is_empty() {
        return Err(bad(
            path,
            "no LoRA tensors found (expected transformer.<module>.lora_A.weight, base_model.model.<module>.lora_A.weight or lora_unet_<module>.lora_down.weight)",
        ));
    }
    Ok(out)
}

/// kohya keys back to per-module adapters. A fused module whose up matrix is block diagonal
/// (as we write it) splits back into exact per-part adapters; otherwise each part gets the
/// whole down matrix and its rows of the up matrix (same delta, larger rank).
fn read_kohya(map: &HashMap<String, Tensor>, path: &Path) -> Result<LoraTensors> {
    let mut adapters = LoraTensors::new();
    let downs: Vec<(&String, &Tensor)> = map
        .iter()
        .filter(|(k, _)| k.ends_with(".lora_down.weight"))
        .collect();
    // Widths come from the adapters themselves: fused parts need the hidden size.
    let hidden = downs
        .iter()
        .find(|(k, _)| k.contains("_img_attn_qkv") || k.contains("_linear1"))
        .map(|(_, d)| d.dims()[1])
        .or_else(|| {
            map.iter()
                .find(|(k, _)| k.starts_with("lora_unet_img_in") && k.ends_with("lora_up.weight"))
                .map(|(_, u)| u.dims()[0])
        })
        .ok_or_else(|| bad(path, "cannot tell the model width from these kohya keys"))?;
    let count = |prefix: &str| {
        map.keys()
            .filter_map(|k| {
                k.strip_prefix(prefix)?
                    .split('_')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    };
    let cfg = FluxConfig {
        num_heads: 1,
        head_dim: hidden,
        num_double: count("lora_unet_double_blocks_"),
        num_single: count("lora_unet_single_blocks_"),
        ..FluxConfig::tiny()
    };
    let modules: HashMap<String, Vec<(String, usize)>> = bfl_linear_modules(&cfg)
        .into_iter()
        .map(|(stem, parts)| (format!("lora_unet_{}", stem.replace('.', "_")), parts))
        .collect();
    for (k, down) in downs {
        let key = k.trim_end_matches(".lora_down.weight");
        let parts = modules
            .get(key)
            .ok_or_else(|| bad(path, format!("`{key}` is not a FLUX module")))?;
        let up = map
            .get(&format!("{key}.lora_up.weight"))
            .ok_or_else(|| bad(path, format!("{key}.lora_up.weight is missing")))?;
        let rank = down.dims()[0];
        let scale = match map.get(&format!("{key}.alpha")) {
            Some(a) => scalar(a)? / rank as f64,
            None => 1.0,
        };
        if parts.len() == 1 {
            adapters.insert(
                parts[0].0.clone(),
                ModuleLora {
                    a: down.clone(),
                    b: up.clone(),
                    scale,
                },
            );
            continue;
        }
        let k = parts.len();
        let is_zero = |t: &Tensor| -> Result<bool> {
            Ok(t.abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                == 0.0)
        };
        // Our layout: k equal rank slots and a block-diagonal up matrix. Anything else (another
        // tool's fused LoRA) gives every part the whole down matrix and its rows of up.
        let mut ours = rank % k == 0;
        let slot = rank / k.max(1);
        let mut row = 0;
        let mut blocks = Vec::with_capacity(k);
        for (i, (_, rows)) in parts.iter().enumerate() {
            let block = up.narrow(0, row, *rows)?;
            row += rows;
            if ours {
                for j in (0..k).filter(|&j| j != i) {
                    if !is_zero(&block.narrow(1, j * slot, slot)?)? {
                        ours = false;
                    }
                }
            }
            blocks.push(block);
        }
        for (i, ((module, _), block)) in parts.iter().zip(blocks).enumerate() {
            let (a, b) = if ours {
                (
                    down.narrow(0, i * slot, slot)?,
                    block.narrow(1, i * slot, slot)?,
                )
            } else {
                (down.clone(), block)
            };
            // A part written without an adapter has an all-zero down slot.
            if ours && is_zero(&a)? {
                continue;
            }
            adapters.insert(module.clone(), ModuleLora { a, b, scale });
        }
    }
    if adapters.is_empty() {
        return Err(bad(path, "no LoRA tensors found"));
    }
    Ok(adapters)
}

/// Sets `lora`'s adapters from `file` (continuing from a released or exported LoRA): the same
/// modules and rank, A as stored and B rescaled so that scale * B A is the file's delta.
pub fn apply_to(lora: &crate::Lora, file: &LoraTensors, path: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for (module, ad) in lora.adapters() {
        let Some(src) = file.get(module) else {
            problems.push(format!(
                "{module}: no adapter in the file (the LoRA targets name it)"
            ));
            continue;
        };
        if src.a.dims() != ad.a.as_tensor().dims() || src.b.dims() != ad.b.as_tensor().dims() {
            problems.push(format!(
                "{module}: lora_A {:?} / lora_B {:?} in the file, this run needs {:?} / {:?} (LoRA rank {})",
                src.a.dims(),
                src.b.dims(),
                ad.a.as_tensor().dims(),
                ad.b.as_tensor().dims(),
                lora.rank
            ));
        }
    }
    for module in file.keys() {
        if lora.get(module).is_none() {
            problems.push(format!(
                "{module}: in the file but not among the LoRA targets"
            ));
        }
    }
    if !problems.is_empty() {
        return Err(FluxError::Weights {
            file: path.to_path_buf(),
            problems,
        });
    }
    for (module, ad) in lora.adapters() {
        let src = &file[module];
        let dtype = ad.a.dtype();
        ad.a.set(&src.a.to_dtype(dtype)?.to_device(ad.a.device())?)?;
        let b = (src.b.to_dtype(DType::F64)? * (src.scale / lora.scale()))?;
        ad.b.set(&b.to_dtype(dtype)?.to_device(ad.b.device())?)?;
    }
    Ok(())
}

/// Serializes `tensors` with `metadata` and writes them to `path`: the same inputs give the
/// same bytes (the header's keys sorted), and a failed write (a full disk) leaves an earlier
/// file at `path` whole (a temporary file, fsynced, then renamed).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(metadata))
            .map_err(|e| FluxError::write(path, e))?;
    let bytes = canonical_header(&bytes).ok_or_else(|| {
        FluxError::write(path, "the serialized header is not valid JSON (internal)")
    })?;
    write_atomically(path, &bytes)
}

/// `bytes` (a serialized safetensors file) with its JSON header's keys in sorted order, padded
/// with spaces to a multiple of 8 as the format asks; the tensor data stay as they are.
fn canonical_header(bytes: &[u8]) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8 + n)?;
    // serde_json's map is a BTreeMap: keys come out sorted.
    let value: serde_json::Value = serde_json::from_slice(header).ok()?;
    let mut json = serde_json::to_vec(&value).ok()?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Some(out)
}

/// Writes `bytes` to `path` through `path.tmp`, fsynced, then renamed over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(FluxError::io(path, e));
    }
    Ok(())
}

/// Reads a LoRA file of any supported layout.
pub fn load(path: &Path) -> Result<LoraTensors> {
    let map =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| FluxError::read(path, e))?;
    read(&map, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_are_the_same_bytes_whatever_the_metadata_order() {
        let tmp = tempfile::tempdir().unwrap();
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let tensors = vec![
            ("b.weight".to_string(), t.clone()),
            ("a.weight".to_string(), t),
        ];
        let files: Vec<Vec<u8>> = (0..2)
            .map(|i| {
                let mut meta = HashMap::new();
                for k in 0..20 {
                    let k = if i == 0 { k } else { 19 - k };
                    meta.insert(format!("key{k}"), format!("value{k}"));
                }
                let p = tmp.path().join(format!("f{i}.safetensors"));
                write_safetensors(&p, &tensors, meta).unwrap();
                std::fs::read(&p).unwrap()
            })
            .collect();
        assert_eq!(files[0], files[1]);
        let back = candle_core::safetensors::load(tmp.path().join("f0.safetensors"), &Device::Cpu)
            .unwrap();
        assert_eq!(back["a.weight"].dims(), &[2, 3]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&files[0]).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["key7"], "value7");
    }

    #[test]
    fn a_failed_write_leaves_the_earlier_file_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("lora.safetensors");
        std::fs::write(&p, b"earlier").unwrap();
        // The temporary file cannot be created: it is a folder (stands in for a full disk).
        std::fs::create_dir(tmp.path().join("lora.safetensors.tmp")).unwrap();
        let t = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let e = write_safetensors(&p, &[("x".into(), t)], HashMap::new());
        assert!(e.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"earlier");
    }

    fn adapters(cfg: &FluxConfig, rank: usize) -> LoraTensors {
        let dev = Device::Cpu;
        let h = cfg.hidden();
        let mut l = LoraTensors::new();
        let mut add = |m: &str, fan_in: usize, fan_out: usize| {
            let a = Tensor::randn(0f32, 1.0, (rank, fan_in), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (fan_out, rank), &dev).unwrap();
            l.insert(m.to_string(), ModuleLora { a, b, scale: 0.5 });
        };
        add("x_embedder", cfg.in_channels, h);
        add("transformer_blocks.0.attn.to_q", h, h);
        add("transformer_blocks.0.attn.to_v", h, h);
        add("transformer_blocks.0.norm1.linear", h, 6 * h);
        add("single_transformer_blocks.1.attn.to_k", h, h);
        add("single_transformer_blocks.1.proj_mlp", h, 4 * h);
        add("single_transformer_blocks.1.proj_out", 5 * h, h);
        l
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn kohya_round_trip_restores_every_adapter_exactly() {
        let cfg = FluxConfig::tiny();
        let mut l = adapters(&cfg, 4);
        // An adapter that has not moved yet (B = 0) must survive too.
        let mlp = l.get_mut("single_transformer_blocks.1.proj_mlp").unwrap();
        mlp.b = mlp.b.zeros_like().unwrap();
        let k = to_kohya(&l, &cfg, DType::F32).unwrap();
        let names: Vec<&str> = k.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "lora_unet_img_in.lora_down.weight",
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
            "lora_unet_double_blocks_0_img_mod_lin.alpha",
            "lora_unet_single_blocks_1_linear1.lora_down.weight",
            "lora_unet_single_blocks_1_linear2.lora_up.weight",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        let map: HashMap<String, Tensor> = k.into_iter().collect();
        // q and v of the fused qkv: three rank-4 slots (k's empty), up block diagonal.
        let up = &map["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"];
        assert_eq!(up.dims(), &[3 * cfg.hidden(), 12]);
        let back = read(&map, Path::new("k.safetensors")).unwrap();
        assert_eq!(back.len(), l.len());
        for (m, ad) in &l {
            let got = &back[m];
            assert_eq!(got.rank(), 4, "{m}");
            assert!(
                max_diff(&got.delta().unwrap(), &ad.delta().unwrap()) < 1e-5,
                "{m}"
            );
            assert!(max_diff(&got.a, &ad.a) == 0.0, "{m}: A is copied exactly");
        }
    }

    #[test]
    fn diffusers_and_peft_keys_read_back_with_alpha() {
        let cfg = FluxConfig::tiny();
        let l = adapters(&cfg, 2);
        for prefix in ["transformer.", "base_model.model."] {
            let map: HashMap<String, Tensor> = to_prefixed(&l, prefix, DType::F32)
                .unwrap()
                .into_iter()
                .collect();
            let back = read(&map, Path::new("x")).unwrap();
            for (m, ad) in &l {
                assert_eq!(back[m].scale, 1.0);
                assert!(max_diff(&back[m].delta().unwrap(), &ad.delta().unwrap()) < 1e-5);
            }
        }
        // An alpha key scales by alpha / r (the released MOSAIC files may carry one).
        let mut map: HashMap<String, Tensor> = to_prefixed(&l, "transformer.", DType::F32)
            .unwrap()
            .into_iter()
            .collect();
        map.insert(
            "transformer.x_embedder.alpha".into(),
            Tensor::new(1.0f32, &Device::Cpu).unwrap(),
        );
        assert_eq!(read(&map, Path::new("x")).unwrap()["x_embedder"].scale, 0.5);
        map.remove("transformer.x_embedder.lora_B.weight");
        let e = read(&map, Path::new("x")).err().unwrap().to_string();
        assert!(
            e.contains("transformer.x_embedder.lora_B.weight is missing"),
            "{e}"
        );
    }
}
