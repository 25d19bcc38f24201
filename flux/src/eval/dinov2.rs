//! DINOv2, the network the paper's DINO score cites: transformers' `Dinov2Model` checkpoint
//! (facebook/dinov2-small / -base / -large / -giant: `config.json` and safetensors weights in
//! the hub's layout, which transformers also writes), written here with candle ops because
//! candle-transformers' DINOv2 reads timm's weight names and resizes the position embeddings
//! by nearest neighbour where transformers resizes them bicubically.
//!
//! The network: 14 x 14 patches (a strided convolution) after a CLS token; position
//! embeddings learnt for a 37 x 37 grid (518 pixels) and resized to the image's grid (16 x 16
//! for the processor's 224-pixel crops) as `torch.nn.functional.interpolate(mode="bicubic",
//! align_corners=False)` does; pre-norm blocks whose attention and MLP outputs are scaled per
//! channel (layer scale) before the residual; a GELU MLP, or for the giant model a SwiGLU one;
//! a final layer norm. The feature is the CLS token after it (transformers'
//! `last_hidden_state[:, 0]`, its `pooler_output`). Inference only: no op here needs a backward.

use candle_core::{DType, IndexOp, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::encoders::{EncodeError, Result};

/// The fields of transformers' `Dinov2Config` the network needs, checked.
#[derive(Debug, Clone)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub mlp_ratio: f64,
    pub layer_norm_eps: f64,
    /// The image side the position embeddings were learnt for.
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
    pub use_swiglu_ffn: bool,
}

/// `config.json` as written: sizes may be an int or an [h, w] pair.
#[derive(Deserialize)]
struct Raw {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    image_size: serde_json::Value,
    patch_size: serde_json::Value,
    #[serde(default = "default_channels")]
    num_channels: usize,
    #[serde(default = "default_true")]
    qkv_bias: bool,
    #[serde(default)]
    use_swiglu_ffn: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}

impl Dinov2Config {
    /// The config in `v` (read from `at`, named in errors), checked for what this network
    /// implements.
    pub fn from_json(v: serde_json::Value, at: &str) -> Result<Self> {
        let bad = |reason: String| EncodeError::file(at.to_string(), reason);
        let raw: Raw = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        if raw.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act `{}`: DINOv2's `gelu` is expected",
                raw.hidden_act
            )));
        }
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                raw.hidden_size, raw.num_attention_heads
            )));
        }
        // A square side from an int or an [h, w] pair with h = w.
        let side = |key: &str, v: &serde_json::Value| {
            let n = match v {
                serde_json::Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].as_u64(),
                other => other.as_u64(),
            };
            n.map(|n| n as usize).ok_or_else(|| {
                bad(format!(
                    "`{key}` {v}: a side in pixels (or a square [h, w]) is expected"
                ))
            })
        };
        let image_size = side("image_size", &raw.image_size)?;
        let patch_size = side("patch_size", &raw.patch_size)?;
        if patch_size == 0 || image_size < patch_size {
            return Err(bad(format!(
                "image_size {image_size} and patch_size {patch_size}: no patch fits"
            )));
        }
        Ok(Self {
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            mlp_ratio: raw.mlp_ratio,
            layer_norm_eps: raw.layer_norm_eps,
            image_size,
            patch_size,
            num_channels: raw.num_channels,
            qkv_bias: raw.qkv_bias,
            use_swiglu_ffn: raw.use_swiglu_ffn,
        })
    }

    /// The side of the grid of patches the position embeddings were learnt for.
    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The MLP's hidden width: hidden x mlp_ratio, and for SwiGLU two thirds of it rounded up
    /// to a multiple of 8 (as DINOv2's giant model was built).
    fn mlp_hidden(&self) -> usize {
        let h = (self.hidden_size as f64 * self.mlp_ratio) as usize;
        if self.use_swiglu_ffn {
            (h * 2 / 3).div_ceil(8) * 8
        } else {
            h
        }
    }
}

enum Mlp {
    Gelu {
        fc1: Linear,
        fc2: Linear,
    },
    /// `weights_in` holds the gate's rows, then the up projection's.
    SwiGlu {
        weights_in: Linear,
        weights_out: Linear,
    },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Mlp::Gelu { fc1, fc2 } => fc2.forward(&fc1.forward(x)?.gelu_erf()?)?,
            Mlp::SwiGlu {
                weights_in,
                weights_out,
            } => {
                let both = weights_in.forward(x)?;
                let half = both.dim(D::Minus1)? / 2;
                let gate = both.narrow(D::Minus1, 0, half)?;
                let up = both.narrow(D::Minus1, half, half)?;
                weights_out.forward(&(candle_nn::ops::silu(&gate)? * up)?)?
            }
        })
    }
}

struct Layer {
    norm1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    scale1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    scale2: Tensor,
    heads: usize,
}

impl Layer {
    fn load(cfg: &Dinov2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let qkv = |name: &str| {
            let vb = vb.pp("attention.attention").pp(name);
            if cfg.qkv_bias {
                candle_nn::linear(d, d, vb)
            } else {
                candle_nn::linear_no_bias(d, d, vb)
            }
        };
        let h = cfg.mlp_hidden();
        let mlp = if cfg.use_swiglu_ffn {
            Mlp::SwiGlu {
                weights_in: candle_nn::linear(d, 2 * h, vb.pp("mlp.weights_in"))?,
                weights_out: candle_nn::linear(h, d, vb.pp("mlp.weights_out"))?,
            }
        } else {
            Mlp::Gelu {
                fc1: candle_nn::linear(d, h, vb.pp("mlp.fc1"))?,
                fc2: candle_nn::linear(h, d, vb.pp("mlp.fc2"))?,
            }
        };
        Ok(Self {
            norm1: candle_nn::layer_norm(d, eps, vb.pp("norm1"))?,
            query: qkv("query")?,
            key: qkv("key")?,
            value: qkv("value")?,
            out: candle_nn::linear(d, d, vb.pp("attention.output.dense"))?,
            scale1: vb.get(d, "layer_scale1.lambda1")?,
            norm2: candle_nn::layer_norm(d, eps, vb.pp("norm2"))?,
            mlp,
            scale2: vb.get(d, "layer_scale2.lambda1")?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let a = self.out.forward(&self.attention(&h)?)?;
        let x = (x + a.broadcast_mul(&self.scale1)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((&x + m.broadcast_mul(&self.scale2)?)?)
    }

    /// Multi-head self-attention over every token, [B, N, D] -> [B, N, D] before the output
    /// projection.
    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let o = crate::attention::full(&q, &k, &v, None)?;
        Ok(o.transpose(1, 2)?.reshape((b, n, d))?)
    }
}

/// transformers' `Dinov2Model` for inference.
pub struct Dinov2 {
    patch_embed: Conv2d,
    cls_token: Tensor,
    /// [1 + grid^2, D], as learnt.
    position: Tensor,
    grid: usize,
    patch: usize,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
}

impl Dinov2 {
    /// The network of `cfg` from `vb` (rooted where `embeddings.` is).
    pub fn load(cfg: &Dinov2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let (patch, grid) = (cfg.patch_size, cfg.grid());
        let conv = Conv2dConfig {
            stride: patch,
            ..Default::default()
        };
        let emb = vb.pp("embeddings");
        Ok(Self {
            patch_embed: candle_nn::conv2d(
                cfg.num_channels,
                d,
                patch,
                conv,
                emb.pp("patch_embeddings.projection"),
            )?,
            cls_token: emb.get((1, 1, d), "cls_token")?,
            position: emb
                .get((1, 1 + grid * grid, d), "position_embeddings")?
                .squeeze(0)?,
            grid,
            patch,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::load(cfg, vb.pp(format!("encoder.layer.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            layernorm: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layernorm"))?,
        })
    }

    /// The CLS feature after the final layer norm of pixels [B, C, H, W], [B, D].
    pub fn cls(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let (gh, gw) = (h / self.patch, w / self.patch);
        if gh == 0 || gw == 0 {
            return Err(EncodeError::file(
                "DINOv2 input",
                format!(
                    "{h} x {w} pixels: smaller than one {p} x {p} patch",
                    p = self.patch
                ),
            ));
        }
        let patches = self
            .patch_embed
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = patches.dim(2)?;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let position = self.position_for(gh, gw)?.unsqueeze(0)?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&position)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(self.layernorm.forward(&x)?.i((.., 0))?)
    }

    /// The position embeddings for a gh x gw grid, [1 + gh gw, D]: as learnt when the grid is
    /// the learnt square one, else its patch part resized bicubically (transformers resizes
    /// whenever the grid is not square, even at the learnt count).
    fn position_for(&self, gh: usize, gw: usize) -> Result<Tensor> {
        if gh == self.grid && gw == self.grid {
            return Ok(self.position.clone());
        }
        let d = self.position.dim(1)?;
        let device = self.position.device();
        let learnt = self.position.i(1..)?.to_dtype(DType::F32)?;
        // [g, g, D] -> rows resized: [gh, g * D], then columns: [gh, gw, D].
        let g = self.grid;
        let rows = Tensor::from_slice(&bicubic_weights(g, gh), (gh, g), device)?
            .matmul(&learnt.reshape((g, g * d))?)?
            .reshape((gh, g, d))?;
        let cols = Tensor::from_slice(&bicubic_weights(g, gw), (gw, g), device)?;
        let resized = cols
            .unsqueeze(0)?
            .broadcast_as((gh, gw, g))?
            .contiguous()?
            .matmul(&rows)?
            .reshape((gh * gw, d))?
            .to_dtype(self.position.dtype())?;
        Ok(Tensor::cat(&[&self.position.i(..1)?, &resized], 0)?)
    }
}

/// The [out, in] matrix (row-major) of 1-D bicubic resizing from `n_in` samples to `n_out`
/// as PyTorch's `interpolate(mode="bicubic", align_corners=False)` does it: output i reads
/// source position (i + 0.5) n_in / n_out - 0.5 (not clamped below 0 for cubic), four taps
/// around its floor with Keys' cubic convolution weights at a = -0.75, taps beyond the edges
/// reading the edge sample.
pub fn bicubic_weights(n_in: usize, n_out: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| <= 1
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    let scale = n_in as f64 / n_out as f64;
    let mut w = vec![0f32; n_out * n_in];
    for i in 0..n_out {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let base = src.floor();
        let t = src - base;
        let taps = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, tap) in taps.iter().enumerate() {
            let j = (base as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            w[i * n_in + j] += *tap as f32;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn resize(values: &[f32], n_out: usize) -> Vec<f32> {
        let w = bicubic_weights(values.len(), n_out);
        (0..n_out)
            .map(|i| {
                (0..values.len())
                    .map(|j| w[i * values.len() + j] * values[j])
                    .sum()
            })
            .collect()
    }

    #[test]
    fn bicubic_resizing_matches_pytorch() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1, 4, 9, 16]]]]), size=(1, n),
        // mode="bicubic", align_corners=False), printed by PyTorch 2.x.
        let values = [0.0, 1.0, 4.0, 9.0, 16.0];
        let torch3 = [0.148_149, 4.0, 14.074_071];
        let torch8 = [
            -0.092_834_47,
            0.187_561,
            1.176_514,
            2.619_385,
            5.441_651,
            8.471_436,
            13.395_081,
            16.649_841,
        ];
        for (want, n) in [(&torch3[..], 3), (&torch8[..], 8)] {
            let got = resize(&values, n);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-4, "to {n}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn bicubic_rows_sum_to_one_and_the_same_size_is_the_identity() {
        for (n_in, n_out) in [(37, 16), (5, 4), (4, 9), (1, 3)] {
            let w = bicubic_weights(n_in, n_out);
            for i in 0..n_out {
                let s: f32 = w[i * n_in..(i + 1) * n_in].iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{n_in} -> {n_out}, row {i}: {s}");
            }
        }
        let w = bicubic_weights(6, 6);
        for i in 0..6 {
            for j in 0..6 {
                assert_eq!(w[i * 6 + j], if i == j { 1.0 } else { 0.0 });
            }
        }
    }

    fn tiny(swiglu: bool) -> Dinov2Config {
        Dinov2Config::from_json(
            serde_json::json!({
                "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "mlp_ratio": 2, "image_size": 40, "patch_size": 8, "use_swiglu_ffn": swiglu
            }),
            "tiny",
        )
        .unwrap()
    }

    /// `cfg`'s network with seeded uniform weights for every tensor it reads, on `device`.
    fn random(cfg: &Dinov2Config, device: &Device) -> Dinov2 {
        let mut names: Vec<(String, Vec<usize>)> = Vec::new();
        let (d, h, p, g) = (
            cfg.hidden_size,
            cfg.mlp_hidden(),
            cfg.patch_size,
            cfg.grid(),
        );
        let mut add = |name: String, shape: &[usize]| names.push((name, shape.to_vec()));
        add("embeddings.cls_token".into(), &[1, 1, d]);
        add("embeddings.position_embeddings".into(), &[1, 1 + g * g, d]);
        add(
            "embeddings.patch_embeddings.projection.weight".into(),
            &[d, 3, p, p],
        );
        add("embeddings.patch_embeddings.projection.bias".into(), &[d]);
        add("layernorm.weight".into(), &[d]);
        add("layernorm.bias".into(), &[d]);
        let (fc1, fc2) = if cfg.use_swiglu_ffn {
            (("mlp.weights_in", 2 * h), "mlp.weights_out")
        } else {
            (("mlp.fc1", h), "mlp.fc2")
        };
        for l in 0..cfg.num_hidden_layers {
            let at = |n: &str| format!("encoder.layer.{l}.{n}");
            for n in ["query", "key", "value"] {
                add(at(&format!("attention.attention.{n}.weight")), &[d, d]);
                add(at(&format!("attention.attention.{n}.bias")), &[d]);
            }
            add(at("attention.output.dense.weight"), &[d, d]);
            add(at("attention.output.dense.bias"), &[d]);
            add(at(&format!("{}.weight", fc1.0)), &[fc1.1, d]);
            add(at(&format!("{}.bias", fc1.0)), &[fc1.1]);
            add(at(&format!("{fc2}.weight")), &[d, h]);
            add(at(&format!("{fc2}.bias")), &[d]);
            for n in ["norm1", "norm2"] {
                add(at(&format!("{n}.weight")), &[d]);
                add(at(&format!("{n}.bias")), &[d]);
            }
            add(at("layer_scale1.lambda1"), &[d]);
            add(at("layer_scale2.lambda1"), &[d]);
        }
        let tensors = names
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let t = crate::test_util::uniform(&shape, i as u64, 0.5)
                    .to_dtype(DType::F32)
                    .and_then(|t| t.to_device(device))
                    .unwrap();
                (name, t)
            })
            .collect();
        Dinov2::load(cfg, VarBuilder::from_tensors(tensors, DType::F32, device)).unwrap()
    }

    fn pixels(batch: usize, side: usize, seed: u64) -> Tensor {
        crate::test_util::uniform(&[batch, 3, side, side], seed, 1.0)
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn images_of_a_batch_do_not_mix_and_the_learnt_grid_is_not_resized() {
        for swiglu in [false, true] {
            let net = random(&tiny(swiglu), &Device::Cpu);
            let x = pixels(2, 32, 7);
            let both = net.cls(&x).unwrap();
            assert_eq!(both.dims(), &[2, 16]);
            for i in 0..2 {
                let one = net.cls(&x.narrow(0, i, 1).unwrap()).unwrap();
                let err = crate::test_util::max_diff(&one, &both.narrow(0, i, 1).unwrap());
                assert!(err < 1e-5, "swiglu {swiglu}, image {i}: {err}");
            }
        }
        let net = random(&tiny(false), &Device::Cpu);
        let learnt = crate::test_util::max_diff(&net.position_for(5, 5).unwrap(), &net.position);
        assert_eq!(learnt, 0.0);
        assert_eq!(net.position_for(4, 4).unwrap().dims(), &[17, 16]);
        // The learnt count on a grid that is not square is resized too, as transformers does.
        let flat = net.position_for(25, 1).unwrap();
        assert_eq!(flat.dims(), &[26, 16]);
        assert!(crate::test_util::max_diff(&flat, &net.position) > 1e-3);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_dinov2_matches_the_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("not run: no CUDA device");
            return;
        };
        for swiglu in [false, true] {
            let cfg = tiny(swiglu);
            let (cpu, cuda) = (random(&cfg, &Device::Cpu), random(&cfg, &gpu));
            // 48 pixels: a 6 x 6 grid, so the position embeddings are resized on both.
            let x = pixels(2, 48, 11);
            let want = cpu.cls(&x).unwrap();
            let got = cuda
                .cls(&x.to_device(&gpu).unwrap())
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let err = crate::test_util::max_diff(&got, &want);
            assert!(err < 1e-4, "swiglu {swiglu}: {err}");
        }
    }

    #[test]
    fn configs_it_cannot_run_are_named() {
        let at = "dinov2/config.json";
        let base = serde_json::json!({
            "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 40, "patch_size": 8
        });
        let cfg = Dinov2Config::from_json(base.clone(), at).unwrap();
        assert_eq!((cfg.grid(), cfg.patch_size, cfg.mlp_hidden()), (5, 8, 64));
        let mut swiglu = base.clone();
        swiglu["use_swiglu_ffn"] = true.into();
        swiglu["image_size"] = serde_json::json!([518, 518]);
        swiglu["patch_size"] = 14.into();
        // dinov2-giant: 1536 x 4 = 6144, two thirds 4096.
        swiglu["hidden_size"] = 1536.into();
        swiglu["num_attention_heads"] = 24.into();
        let cfg = Dinov2Config::from_json(swiglu, at).unwrap();
        assert_eq!((cfg.grid(), cfg.mlp_hidden()), (37, 4096));
        for (key, value, says) in [
            ("hidden_act", serde_json::json!("relu"), "hidden_act `relu`"),
            ("num_attention_heads", 3.into(), "not a multiple"),
            (
                "image_size",
                serde_json::json!([40, 32]),
                "`image_size` [40,32]",
            ),
            ("patch_size", 64.into(), "no patch fits"),
        ] {
            let mut v = base.clone();
            v[key] = value;
            let e = Dinov2Config::from_json(v, at).err().unwrap();
            let e = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(e.contains(at) && e.contains(says), "{key}: {e}");
        }
    }
}
