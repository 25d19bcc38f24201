//! Reading and checking `trainer forward`'s inputs file: every tensor is named as the argument
//! of diffusers' `FluxTransformer2DModel.forward` or, for the references, as
//! `ref_hidden_states.{k}` and friends; anything missing or misshaped is refused by name.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::error::{Result, TrainerError};
use flux::embed::{ids_from_tensor, reference_ids};
use flux::RefInputs;

fn bad(name: &str, reason: impl Into<String>) -> TrainerError {
    TrainerError::Input {
        name: name.into(),
        reason: reason.into(),
    }
}

/// The tensor `name`, required.
pub fn take<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    map.get(name)
        .ok_or_else(|| bad(name, "missing from the inputs file"))
}

/// One value per batch element.
pub fn values(t: &Tensor, name: &str, batch: usize) -> Result<Vec<f32>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if v.len() != batch {
        return Err(bad(
            name,
            format!(
                "has {} values, expected one per batch element ({batch})",
                v.len()
            ),
        ));
    }
    Ok(v)
}

/// Position ids [S, 3] (a leading batch dim of 1, diffusers' deprecated layout, is accepted);
/// with `tokens`, S must equal it.
pub fn ids(t: &Tensor, name: &str, tokens: Option<usize>) -> Result<Vec<[f32; 3]>> {
    let t = if t.rank() == 3 && t.dim(0)? == 1 {
        t.get(0)?
    } else {
        t.clone()
    };
    if t.rank() != 2 || t.dim(1)? != 3 || tokens.is_some_and(|n| t.dim(0).ok() != Some(n)) {
        let want = tokens.map_or("[S, 3]".to_string(), |n| format!("[{n}, 3]"));
        return Err(bad(
            name,
            format!("expected shape {want}, found {:?}", t.dims()),
        ));
    }
    Ok(ids_from_tensor(&t)?)
}

/// `ref_hidden_states.{k}` for k = 0, 1, ... (each [B, N_k, C]) with their ids (given, or the
/// official rule for square references), `ref_timestep` (default 0) and `ref_guidance` (default
/// 1); None without references.
pub fn references(
    map: &HashMap<String, Tensor>,
    batch: usize,
    channels: usize,
    dtype: DType,
) -> Result<Option<RefInputs>> {
    let mut parts = Vec::new();
    let mut all_ids = Vec::new();
    let mut lens = Vec::new();
    while let Some(t) = map.get(&format!("ref_hidden_states.{}", parts.len())) {
        let k = parts.len();
        let name = format!("ref_hidden_states.{k}");
        let dims = t.dims();
        if dims.len() != 3 || dims[0] != batch || dims[2] != channels || dims[1] == 0 {
            return Err(bad(
                &name,
                format!(
                    "expected shape [{batch}, N_{k} > 0, {channels}] (batch and channels of hidden_states), found {dims:?}"
                ),
            ));
        }
        let n = dims[1];
        let id_name = format!("ref_img_ids.{k}");
        let ref_ids = match map.get(&id_name) {
            Some(i) => ids(i, &id_name, Some(n))?,
            None => {
                let side = (n as f64).sqrt().round() as usize;
                if side * side != n {
                    return Err(bad(
                        &id_name,
                        format!("missing, and reference {k}'s {n} tokens are not a square grid the default ids could describe"),
                    ));
                }
                reference_ids(side, side, k)
            }
        };
        all_ids.extend(ref_ids);
        lens.push(n);
        parts.push(t.to_dtype(dtype)?);
    }
    let stray: Vec<&String> = map
        .keys()
        .filter(|k| {
            ["ref_hidden_states.", "ref_img_ids."].iter().any(|p| {
                k.strip_prefix(p)
                    .is_some_and(|i| i.parse::<usize>().map_or(true, |i| i >= parts.len()))
            })
        })
        .collect();
    if let Some(k) = stray.first() {
        return Err(bad(
            k,
            format!(
                "does not belong to references 0..{} (they are numbered from 0 without gaps)",
                parts.len()
            ),
        ));
    }
    if parts.is_empty() {
        for name in ["ref_timestep", "ref_guidance", "ref_points", "ref_targets"] {
            if map.contains_key(name) {
                return Err(bad(name, "given without references (ref_hidden_states.0)"));
            }
        }
        return Ok(None);
    }
    let per_batch = |name: &str, default: f32| -> Result<Vec<f32>> {
        match map.get(name) {
            Some(t) => values(t, name, batch),
            None => Ok(vec![default; batch]),
        }
    };
    Ok(Some(RefInputs {
        latents: Tensor::cat(&parts, 1)?,
        ids: all_ids,
        lens,
        timestep: per_batch("ref_timestep", 0.0)?,
        guidance: per_batch("ref_guidance", 1.0)?,
    }))
}

/// Indices of an int64 [P] tensor, each below `bound` (`what` says what they index).
pub fn indices(
    map: &HashMap<String, Tensor>,
    name: &str,
    bound: usize,
    what: &str,
) -> Result<Option<Vec<u32>>> {
    let Some(t) = map.get(name) else {
        return Ok(None);
    };
    if t.rank() != 1 || !matches!(t.dtype(), DType::I64 | DType::U32 | DType::U8) {
        return Err(bad(
            name,
            format!(
                "expected an int64 vector [P], found {:?} {:?}",
                t.dtype(),
                t.dims()
            ),
        ));
    }
    let v: Vec<i64> = t.to_dtype(DType::I64)?.to_vec1()?;
    if let Some((i, x)) = v
        .iter()
        .enumerate()
        .find(|(_, &x)| x < 0 || x as usize >= bound)
    {
        return Err(bad(
            name,
            format!("element {i} is {x}, outside 0..{bound} ({what})"),
        ));
    }
    Ok(Some(v.into_iter().map(|x| x as u32).collect()))
}
