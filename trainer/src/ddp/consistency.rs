//! Keeping the ranks' LoRA identical: rank 0's weights broadcast to every rank, and hashes
//! compared at start, after a resume and every `distributed.check_weights_every` steps, so a
//! divergence is caught naming the ranks instead of silently training different models.

use candle_core::{DType, Tensor};
use flux::Lora;
use sha2::{Digest, Sha256};

use super::{Dist, DistError, ReduceOp};
use crate::error::Result;

/// sha256 of the LoRA weights' bytes, in variable order.
pub fn lora_digest(lora: &Lora) -> Result<Vec<u8>> {
    let mut h = Sha256::new();
    for (name, v) in lora.named_vars() {
        h.update(name.as_bytes());
        let flat = v.as_tensor().flatten_all()?;
        match flat.dtype() {
            DType::F64 => flat
                .to_vec1::<f64>()?
                .iter()
                .for_each(|x| h.update(x.to_le_bytes())),
            _ => flat
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .for_each(|x| h.update(x.to_le_bytes())),
        }
    }
    Ok(h.finalize().to_vec())
}

/// Fails naming every rank whose `value` differs from rank 0's.
/// `value` is only computed when there are other ranks to compare with (a LoRA digest of a
/// FLUX-sized adapter is seconds of hashing).
pub fn check_same(
    dist: &Dist,
    what: &str,
    value: impl FnOnce() -> Result<Vec<u8>>,
    show: fn(&[u8]) -> String,
) -> Result<()> {
    if dist.world_size() == 1 {
        return Ok(());
    }
    let value = value()?;
    let all = dist.call("all-gather", move |c| c.all_gather_bytes(&value))?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, v)| *v != &all[0])
        .map(|(r, v)| format!("rank {r} has {}", show(v)))
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(DistError::Mismatch(format!(
        "{what}: rank 0 has {}, {}",
        show(&all[0]),
        differ.join(", ")
    ))
    .into())
}

/// Fails unless every rank was started with the same config and `--set` overrides.
pub fn check_same_config(dist: &Dist, cfg: &crate::config::Config) -> Result<()> {
    check_same(
        dist,
        "config fingerprint (start every rank with the same config and --set overrides)",
        || Ok(cfg.fingerprint()?.into_bytes()),
        text,
    )
}

pub fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(6).map(|x| format!("{x:02x}")).collect()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).chars().take(12).collect()
}

/// Rank 0's values of `tensors` (all of one dtype) on every rank, in one broadcast (`what`
/// names it in errors).
pub fn broadcast_from_rank0(
    dist: &Dist,
    what: &'static str,
    tensors: &[Tensor],
) -> Result<Vec<Tensor>> {
    if dist.world_size() == 1 || tensors.is_empty() {
        return Ok(tensors.to_vec());
    }
    let flat = flatten(tensors)?;
    let got = dist.call(what, move |c| c.broadcast(&flat, 0))?;
    split_like(&got, tensors)
}

/// The mean over the ranks of each of `tensors` (all of one dtype), in one all-reduce.
pub fn mean_over_ranks(dist: &Dist, what: &'static str, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    if dist.world_size() == 1 || tensors.is_empty() {
        return Ok(tensors.to_vec());
    }
    let flat = flatten(tensors)?;
    let got = dist.call(what, move |c| c.all_reduce(&flat, ReduceOp::Mean))?;
    split_like(&got, tensors)
}

/// `tensors` flattened into one vector, in order.
fn flatten(tensors: &[Tensor]) -> Result<Tensor> {
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// [`flatten`] undone: `flat` cut into tensors of the shapes of `like`.
fn split_like(flat: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut offset = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let out = flat.narrow(0, offset, n)?.reshape(t.shape())?;
            offset += n;
            Ok(out)
        })
        .collect()
}

/// Sets every LoRA variable to rank 0's value, then verifies by hash.
pub fn sync_lora(dist: &Dist, lora: &Lora, what: &str) -> Result<()> {
    if dist.world_size() == 1 {
        return Ok(());
    }
    let vars: Vec<&candle_core::Var> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let now: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    for (v, t) in vars
        .iter()
        .zip(broadcast_from_rank0(dist, "LoRA broadcast", &now)?)
    {
        v.set(&t)?;
    }
    check_same(dist, what, || lora_digest(lora), hex_prefix)
}

/// Fails naming the ranks whose LoRA differs from rank 0's (`when` says at what point).
pub fn check_lora(dist: &Dist, lora: &Lora, when: &str) -> Result<()> {
    check_same(
        dist,
        &format!("LoRA weights {when}"),
        || lora_digest(lora),
        hex_prefix,
    )
}
