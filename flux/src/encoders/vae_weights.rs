//! The FLUX VAE encoder's weights from either layout, in BFL names (those of `ae.safetensors`,
//! which candle-transformers' `flux::autoencoder::Encoder` reads), and its configuration read
//! off the tensor shapes.
//!
//! diffusers (`vae/diffusion_pytorch_model.safetensors`) -> BFL:
//! - `encoder.down_blocks.{i}.resnets.{j}.*` -> `encoder.down.{i}.block.{j}.*`
//!   (`conv_shortcut` -> `nin_shortcut`)
//! - `encoder.down_blocks.{i}.downsamplers.0.conv.*` -> `encoder.down.{i}.downsample.conv.*`
//! - `encoder.mid_block.resnets.{0,1}.*` -> `encoder.mid.block_{1,2}.*`
//! - `encoder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.*` ->
//!   `encoder.mid.attn_1.{norm,q,k,v,proj_out}.*`, linear weights [c, c] -> 1x1 convs [c, c, 1, 1]
//! - `encoder.conv_norm_out.*` -> `encoder.norm_out.*`; `conv_in`, `conv_out` keep their names.
//!
//! The decoder the same way, `decoder.*`, except that diffusers numbers its up blocks from the
//! lowest resolution and BFL from the highest: `decoder.up_blocks.{i}` ->
//! `decoder.up.{levels - 1 - i}`, with `upsamplers.0.conv` -> `upsample.conv`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use candle_transformers::models::flux::autoencoder::Config as VaeConfig;

use super::{EncodeError, Result, LATENT_CHANNELS};

/// FLUX.1's latent normalisation (design.md §3.6), for a BFL file that carries no config.
pub const FLUX_SCALE: f64 = 0.3611;
pub const FLUX_SHIFT: f64 = 0.1159;

/// The half of the VAE to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Encoder,
    Decoder,
}

impl Part {
    fn prefix(self) -> &'static str {
        match self {
            Part::Encoder => "encoder",
            Part::Decoder => "decoder",
        }
    }
}

/// The BFL name of a diffusers VAE tensor of `part`, with whether it is an attention linear
/// weight that must become a 1x1 convolution; None for names FLUX's VAE does not have.
/// `levels` (the decoder's up blocks) renumbers the decoder's blocks.
fn bfl_part_name(name: &str, part: Part, levels: usize) -> Option<(String, bool)> {
    let p = part.prefix();
    let rest = name.strip_prefix(p)?.strip_prefix('.')?;
    let parts: Vec<&str> = rest.split('.').collect();
    let tail = |from: usize| parts[from.min(parts.len())..].join(".");
    let renamed = match parts.as_slice() {
        ["conv_in" | "conv_out", _] => (format!("{p}.{rest}"), false),
        ["conv_norm_out", leaf] => (format!("{p}.norm_out.{leaf}"), false),
        ["down_blocks", i, "resnets", j, ..] if part == Part::Encoder => (
            format!(
                "encoder.down.{i}.block.{j}.{}",
                tail(4).replace("conv_shortcut", "nin_shortcut")
            ),
            false,
        ),
        ["down_blocks", i, "downsamplers", "0", "conv", leaf] if part == Part::Encoder => {
            (format!("encoder.down.{i}.downsample.conv.{leaf}"), false)
        }
        ["up_blocks", i, "resnets", j, ..] if part == Part::Decoder => {
            let level = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            (
                format!(
                    "decoder.up.{level}.block.{j}.{}",
                    tail(4).replace("conv_shortcut", "nin_shortcut")
                ),
                false,
            )
        }
        ["up_blocks", i, "upsamplers", "0", "conv", leaf] if part == Part::Decoder => {
            let level = levels.checked_sub(1 + i.parse::<usize>().ok()?)?;
            (format!("decoder.up.{level}.upsample.conv.{leaf}"), false)
        }
        ["mid_block", "resnets", j, ..] => {
            let k: usize = j.parse().ok()?;
            if k > 1 {
                return None;
            }
            (format!("{p}.mid.block_{}.{}", k + 1, tail(3)), false)
        }
        ["mid_block", "attentions", "0", module, .., leaf] => {
            let bfl = match *module {
                "group_norm" => "norm",
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                "to_out" => "proj_out",
                _ => return None,
            };
            let is_weight = *leaf == "weight" && bfl != "norm";
            (format!("{p}.mid.attn_1.{bfl}.{leaf}"), is_weight)
        }
        _ => return None,
    };
    Some(renamed)
}

/// Which layout a set of VAE tensor names is in.
fn is_diffusers(names: &[String]) -> bool {
    names
        .iter()
        .any(|n| n.starts_with("encoder.down_blocks.") || n.starts_with("decoder.up_blocks."))
}

/// The encoder's tensors (on the CPU, in their stored dtype) in BFL names, from safetensors
/// files in either layout.
pub fn load(files: &[PathBuf]) -> Result<HashMap<String, Tensor>> {
    load_part(files, Part::Encoder)
}

/// The tensors of one half of the VAE (on the CPU, in their stored dtype) in BFL names.
pub fn load_part(files: &[PathBuf], part: Part) -> Result<HashMap<String, Tensor>> {
    let at = files
        .first()
        .map(|f| f.display().to_string())
        .unwrap_or_default();
    // SAFETY: read-only mapping of files nobody truncates while we read them.
    let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| EncodeError::candle(&at, e))?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    if names.iter().any(|n| n == "quant_conv.weight") {
        return Err(EncodeError::file(
            &at,
            "this VAE has a quant_conv (a Stable Diffusion VAE?); FLUX's has none",
        ));
    }
    let diffusers = is_diffusers(&names);
    let prefix = format!("{}.", part.prefix());
    let levels = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix("decoder.up_blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    let mut out = HashMap::new();
    for name in names.iter().filter(|n| n.starts_with(&prefix)) {
        let t = st
            .load(name, &Device::Cpu)
            .map_err(|e| EncodeError::candle(&at, e))?;
        let (bfl, to_conv) = if diffusers {
            bfl_part_name(name, part, levels).ok_or_else(|| {
                EncodeError::file(
                    &at,
                    format!("unexpected VAE {} tensor `{name}`", part.prefix()),
                )
            })?
        } else {
            (name.clone(), false)
        };
        let t = if to_conv {
            let (o, i) = t
                .dims2()
                .map_err(|e| EncodeError::file(&at, format!("tensor `{name}`: {e}")))?;
            t.reshape((o, i, 1, 1))?
        } else {
            t
        };
        out.insert(bfl, t);
    }
    if out.is_empty() {
        return Err(EncodeError::file(
            &at,
            format!(
                "no `{prefix}*` tensor: not a VAE (ae.safetensors or vae/diffusion_pytorch_model.safetensors)"
            ),
        ));
    }
    Ok(out)
}

/// The encoder's configuration from its tensor shapes (BFL names).
pub fn config(w: &HashMap<String, Tensor>, scale: f64, shift: f64, at: &str) -> Result<VaeConfig> {
    let dims = |name: &str| -> Result<Vec<usize>> {
        w.get(name)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| EncodeError::file(at, format!("not a FLUX VAE: no tensor `{name}`")))
    };
    let conv_in = dims("encoder.conv_in.weight")?;
    let conv_out = dims("encoder.conv_out.weight")?;
    if conv_in.len() != 4 || conv_out.len() != 4 {
        return Err(EncodeError::file(
            at,
            "conv_in/conv_out are not 2-d convolutions",
        ));
    }
    let (ch, in_channels) = (conv_in[0], conv_in[1]);
    let levels = (0..)
        .take_while(|i| w.contains_key(&format!("encoder.down.{i}.block.0.conv1.weight")))
        .count();
    let num_res_blocks = (0..)
        .take_while(|j| w.contains_key(&format!("encoder.down.0.block.{j}.conv1.weight")))
        .count();
    if levels == 0 || num_res_blocks == 0 {
        return Err(EncodeError::file(at, "no down-sampling blocks found"));
    }
    // Every level but the last halves the size: FLUX's 16 px per token need 8x (4 levels).
    if levels != 4 {
        return Err(EncodeError::file(
            at,
            format!(
                "the VAE encoder has {levels} levels ({}x down-sampling); FLUX's has 4 (8x)",
                2f64.powi(levels as i32 - 1)
            ),
        ));
    }
    let mut ch_mult = Vec::with_capacity(levels);
    for i in 0..levels {
        let out = dims(&format!("encoder.down.{i}.block.0.conv2.weight"))?[0];
        if out % ch != 0 {
            return Err(EncodeError::file(
                at,
                format!("block {i} has {out} channels, not a multiple of conv_in's {ch}"),
            ));
        }
        ch_mult.push(out / ch);
    }
    // candle's GroupNorm layers use 32 groups, as FLUX's VAE does.
    if let Some(c) = ch_mult.iter().map(|m| m * ch).find(|c| c % 32 != 0) {
        return Err(EncodeError::file(
            at,
            format!("{c} channels is not a multiple of the 32 normalisation groups"),
        ));
    }
    let z_channels = conv_out[0] / 2;
    if z_channels != LATENT_CHANNELS {
        return Err(EncodeError::file(
            at,
            format!("the VAE has {z_channels} latent channels; FLUX's has {LATENT_CHANNELS}"),
        ));
    }
    Ok(VaeConfig {
        resolution: 256,
        in_channels,
        ch,
        out_ch: in_channels,
        ch_mult,
        num_res_blocks,
        z_channels,
        scale_factor: scale,
        shift_factor: shift,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bfl_name(name: &str) -> Option<(String, bool)> {
        bfl_part_name(name, Part::Encoder, 0)
    }

    #[test]
    fn diffusers_names_map_to_bfl_names() {
        let cases = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight", false),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
                "encoder.down.1.block.0.nin_shortcut.bias",
                false,
            ),
            (
                "encoder.down_blocks.2.resnets.1.norm2.weight",
                "encoder.down.2.block.1.norm2.weight",
                false,
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.weight",
                "encoder.down.0.downsample.conv.weight",
                false,
            ),
            (
                "encoder.mid_block.resnets.1.conv1.weight",
                "encoder.mid.block_2.conv1.weight",
                false,
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
                true,
            ),
            (
                "encoder.mid_block.attentions.0.to_q.bias",
                "encoder.mid.attn_1.q.bias",
                false,
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.weight",
                "encoder.mid.attn_1.norm.weight",
                false,
            ),
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias", false),
        ];
        for (d, b, conv) in cases {
            assert_eq!(bfl_name(d), Some((b.to_string(), conv)), "{d}");
        }
        assert_eq!(bfl_name("encoder.mid_block.resnets.2.conv1.weight"), None);
        assert_eq!(bfl_name("decoder.conv_in.weight"), None);
    }

    #[test]
    fn diffusers_decoder_names_map_to_bfl_names_with_up_blocks_reversed() {
        let d = |n: &str| bfl_part_name(n, Part::Decoder, 4);
        assert_eq!(
            d("decoder.up_blocks.0.resnets.2.conv1.weight"),
            Some(("decoder.up.3.block.2.conv1.weight".into(), false))
        );
        assert_eq!(
            d("decoder.up_blocks.3.resnets.0.conv_shortcut.bias"),
            Some(("decoder.up.0.block.0.nin_shortcut.bias".into(), false))
        );
        assert_eq!(
            d("decoder.up_blocks.1.upsamplers.0.conv.weight"),
            Some(("decoder.up.2.upsample.conv.weight".into(), false))
        );
        assert_eq!(
            d("decoder.mid_block.attentions.0.to_k.weight"),
            Some(("decoder.mid.attn_1.k.weight".into(), true))
        );
        assert_eq!(
            d("decoder.conv_norm_out.weight"),
            Some(("decoder.norm_out.weight".into(), false))
        );
        assert_eq!(d("encoder.conv_in.weight"), None);
    }
}
