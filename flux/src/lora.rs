//! LoRA adapters on the reference branch (design.md §4.4): the same frozen weight serves
//! text and target tokens as is and reference tokens with y = W x + b + (alpha/r) B A x.
//!
//! Adapters are f32 `Var`s whatever the base dtype; the cast to the activation dtype is inside
//! the graph, so their gradients come back in f32 (design.md §8).
//!
//! Shape legend: `a_ri` [rank, in], `b_or` [out, rank], `x_bsi` batch, tokens, in features.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::config::FluxConfig;
use crate::error::{FluxError, Result, Setting};
use crate::rng::{name_hash, stream, Purpose};

/// The official MOSAIC target list (design.md §4.4), as module-path globs where `*` matches
/// one dotted segment.
pub const DEFAULT_TARGETS: [&str; 13] = [
    "x_embedder",
    "transformer_blocks.*.norm1.linear",
    "transformer_blocks.*.attn.to_q",
    "transformer_blocks.*.attn.to_k",
    "transformer_blocks.*.attn.to_v",
    "transformer_blocks.*.attn.to_out.0",
    "transformer_blocks.*.ff.net.2",
    "single_transformer_blocks.*.norm.linear",
    "single_transformer_blocks.*.proj_mlp",
    "single_transformer_blocks.*.proj_out",
    "single_transformer_blocks.*.attn.to_q",
    "single_transformer_blocks.*.attn.to_k",
    "single_transformer_blocks.*.attn.to_v",
];

/// How A is initialised (B is always zero, so training starts from the base model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraInit {
    /// PEFT "gaussian", used by MOSAIC: A ~ N(0, (1/r)^2).
    Gaussian,
    /// PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)).
    Kaiming,
}

/// The adapters to create (a run config's `[lora]` section).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSpec {
    pub rank: usize,
    /// The delta is scaled by alpha / rank.
    pub alpha: f64,
    pub init: LoraInit,
    /// Module-path globs of the reference branch (`*` matches one path segment or part).
    pub targets: Vec<String>,
    /// Start from this LoRA file (diffusers, PEFT or kohya keys, e.g. the released MOSAIC
    /// weights or an export of ours) instead of `init`; empty: `init`.
    pub init_from: String,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 16.0,
            init: LoraInit::Gaussian,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            init_from: String::new(),
        }
    }
}

impl LoraSpec {
    /// Range checks that need no model.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(FluxError::setting(Setting::LoraRank, "must be at least 1"));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(FluxError::setting(
                Setting::LoraAlpha,
                format!("{} must be positive", self.alpha),
            ));
        }
        if self.targets.is_empty() {
            return Err(FluxError::setting(
                Setting::LoraTargets,
                "must name at least one module",
            ));
        }
        Ok(())
    }
}

/// Every module that sees reference tokens, with (in, out) features: the only modules a LoRA of
/// the reference branch can adapt.
pub fn adaptable_modules(cfg: &FluxConfig) -> Vec<(String, usize, usize)> {
    let (d, mlp) = (cfg.hidden(), cfg.mlp_hidden());
    let mut v = vec![("x_embedder".to_string(), cfg.in_channels, d)];
    for i in 0..cfg.num_double {
        let p = format!("transformer_blocks.{i}");
        v.push((format!("{p}.norm1.linear"), d, 6 * d));
        for m in ["to_q", "to_k", "to_v", "to_out.0"] {
            v.push((format!("{p}.attn.{m}"), d, d));
        }
        v.push((format!("{p}.ff.net.0.proj"), d, mlp));
        v.push((format!("{p}.ff.net.2"), mlp, d));
    }
    for i in 0..cfg.num_single {
        let p = format!("single_transformer_blocks.{i}");
        v.push((format!("{p}.norm.linear"), d, 3 * d));
        for m in ["to_q", "to_k", "to_v"] {
            v.push((format!("{p}.attn.{m}"), d, d));
        }
        v.push((format!("{p}.proj_mlp"), d, mlp));
        v.push((format!("{p}.proj_out"), d + mlp, d));
    }
    v
}

/// `*` matches exactly one dotted segment; everything else must be equal.
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let s: Vec<&str> = path.split('.').collect();
    p.len() == s.len() && p.iter().zip(&s).all(|(a, b)| *a == "*" || a == b)
}

/// One adapted module.
pub struct Adapter {
    pub a: Var,
    pub b: Var,
}

/// All adapters of a run, keyed by module path (diffusers naming), in sorted order.
pub struct Lora {
    adapters: BTreeMap<String, Adapter>,
    pub rank: usize,
    pub alpha: f64,
}

impl Lora {
    /// Creates the adapters named by `spec.targets` (then set from `spec.init_from` when given). A pattern that matches no adaptable
    /// module is an error naming it (a typo would otherwise silently train nothing there).
    /// Adapters are f32 for training; f64 exists for gradient checks against finite differences.
    pub fn new(
        cfg: &FluxConfig,
        spec: &LoraSpec,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if spec.rank == 0 {
            return Err(FluxError::setting(Setting::LoraRank, "must be at least 1"));
        }
        let modules = adaptable_modules(cfg);
        for pat in &spec.targets {
            if !modules.iter().any(|(m, _, _)| glob_matches(pat, m)) {
                return Err(FluxError::setting(
                    Setting::LoraTargets,
                    format!("`{pat}` matches no module of the reference branch (text-only modules such as add_q_proj cannot be adapted)"),
                ));
            }
        }
        let r = spec.rank;
        let mut adapters = BTreeMap::new();
        for (name, fan_in, fan_out) in modules {
            if !spec.targets.iter().any(|p| glob_matches(p, &name)) {
                continue;
            }
            let mut rng = stream(seed, Purpose::LoraInit, &[name_hash(&name)]);
            let a: Vec<f32> = match spec.init {
                LoraInit::Gaussian => {
                    let normal = Normal::new(0.0f32, 1.0 / r as f32)
                        .map_err(|e| FluxError::setting(Setting::LoraRank, e.to_string()))?;
                    (0..r * fan_in).map(|_| normal.sample(&mut rng)).collect()
                }
                LoraInit::Kaiming => {
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    (0..r * fan_in)
                        .map(|_| rng.random_range(-bound..bound))
                        .collect()
                }
            };
            let a = Var::from_tensor(&Tensor::from_vec(a, (r, fan_in), device)?.to_dtype(dtype)?)?;
            let b = Var::zeros((fan_out, r), dtype, device)?;
            adapters.insert(name, Adapter { a, b });
        }
        let lora = Self {
            adapters,
            rank: spec.rank,
            alpha: spec.alpha,
        };
        if !spec.init_from.is_empty() {
            let path = std::path::Path::new(&spec.init_from);
            crate::lora_format::apply_to(&lora, &crate::lora_format::load(path)?, path)?;
        }
        Ok(lora)
    }

    /// alpha / r, the factor on B A x.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn adapters(&self) -> impl Iterator<Item = (&String, &Adapter)> {
        self.adapters.iter()
    }

    pub fn get(&self, module: &str) -> Option<&Adapter> {
        self.adapters.get(module)
    }

    /// All trainable variables in a fixed order: for each module (sorted), A then B, with the
    /// names `<module>.lora_A` / `<module>.lora_B`.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut v = Vec::with_capacity(self.adapters.len() * 2);
        for (name, ad) in &self.adapters {
            v.push((format!("{name}.lora_A"), &ad.a));
            v.push((format!("{name}.lora_B"), &ad.b));
        }
        v
    }

    pub fn num_params(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// A tracked view (adapters take part in the graph) or a detached one (no graph is built,
    /// for the first pass of gradient checkpointing).
    pub fn view(&self, tracked: bool) -> LoraView<'_> {
        LoraView {
            lora: self,
            tracked,
        }
    }
}

/// A [`crate::Lora`] holding exactly the adapters of `file` (read from `path`), each at the
/// scale the file gives it (alpha/r where it carries alpha, else 1): for applying a finished
/// LoRA rather than training one. Every module must exist in a model of `cfg`'s shape, and all
/// adapters must share one rank.
pub fn from_adapters(
    cfg: &FluxConfig,
    file: &crate::lora_format::LoraTensors,
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Lora> {
    let ranks: std::collections::BTreeSet<usize> = file
        .values()
        .map(crate::lora_format::ModuleLora::rank)
        .collect();
    let rank = match (ranks.len(), ranks.first()) {
        (1, Some(&r)) => r,
        (0, _) => {
            return Err(FluxError::Weights {
                file: path.to_path_buf(),
                problems: vec!["holds no LoRA adapter".into()],
            })
        }
        _ => {
            return Err(FluxError::Weights {
                file: path.to_path_buf(),
                problems: vec![format!(
                    "adapters of several ranks {ranks:?}: one rank is supported"
                )],
            })
        }
    };
    let known = adaptable_modules(cfg);
    let unknown: Vec<String> = file
        .keys()
        .filter(|m| !known.iter().any(|(k, _, _)| k == *m))
        .map(|m| format!("{m}: no such module in the reference branch of this base"))
        .collect();
    if !unknown.is_empty() {
        return Err(FluxError::Weights {
            file: path.to_path_buf(),
            problems: unknown,
        });
    }
    let spec = LoraSpec {
        rank,
        alpha: rank as f64,
        init: LoraInit::Gaussian,
        targets: file.keys().cloned().collect(),
        init_from: String::new(),
    };
    let lora = Lora::new(cfg, &spec, 0, dtype, device)?;
    crate::lora_format::apply_to(&lora, file, path)?;
    Ok(lora)
}

/// Applies the adapters to reference-branch activations.
#[derive(Clone, Copy)]
pub struct LoraView<'a> {
    lora: &'a Lora,
    tracked: bool,
}

impl LoraView<'_> {
    /// y + (alpha/r) B A x for `module` if it is adapted, else y unchanged.
    pub fn add_delta(&self, module: &str, x_bsi: &Tensor, y: Tensor) -> Result<Tensor> {
        let Some(ad) = self.lora.adapters.get(module) else {
            return Ok(y);
        };
        let _phase = crate::profile::phase("op: LoRA forward", x_bsi.device());
        let (a, b) = if self.tracked {
            (ad.a.as_tensor().clone(), ad.b.as_tensor().clone())
        } else {
            (ad.a.as_tensor().detach(), ad.b.as_tensor().detach())
        };
        let dtype = x_bsi.dtype();
        let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
        let in_features = x_bsi.dim(candle_core::D::Minus1)?;
        let lead: Vec<usize> = x_bsi.dims()[..x_bsi.rank() - 1].to_vec();
        let rows: usize = lead.iter().product();
        let h = x_bsi.reshape((rows, in_features))?.matmul(&a.t()?)?;
        let delta = (h.matmul(&b.t()?)? * self.lora.scale())?;
        let mut out_dims = lead;
        out_dims.push(delta.dim(1)?);
        Ok((y + delta.reshape(out_dims)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figure docs/distributed.md's scaling model starts from.
    #[test]
    fn flux_dev_default_targets_have_3_621_952_parameters_per_unit_of_rank() {
        let per_rank: usize = adaptable_modules(&FluxConfig::flux_dev())
            .iter()
            .filter(|(name, _, _)| DEFAULT_TARGETS.iter().any(|g| glob_matches(g, name)))
            .map(|(_, i, o)| i + o)
            .sum();
        assert_eq!(per_rank, 3_621_952);
    }

    fn spec(targets: &[&str]) -> LoraSpec {
        LoraSpec {
            rank: 4,
            alpha: 4.0,
            init: LoraInit::Gaussian,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            init_from: String::new(),
        }
    }

    #[test]
    fn default_targets_give_the_official_parameter_count() {
        // design.md §4.4: 1,854,439,424 trainable parameters at rank 512 on FLUX.1-dev.
        let cfg = FluxConfig::flux_dev();
        let per_rank: usize = adaptable_modules(&cfg)
            .iter()
            .filter(|(m, _, _)| DEFAULT_TARGETS.iter().any(|p| glob_matches(p, m)))
            .map(|(_, i, o)| i + o)
            .sum();
        assert_eq!(per_rank * 512, 1_854_439_424);
    }

    #[test]
    fn unknown_or_text_only_target_is_refused() {
        let cfg = FluxConfig::tiny();
        let err = Lora::new(
            &cfg,
            &spec(&["transformer_blocks.*.attn.add_q_proj"]),
            0,
            DType::F32,
            &Device::Cpu,
        )
        .err()
        .unwrap();
        assert!(
            matches!(
                err,
                FluxError::Setting {
                    setting: Setting::LoraTargets,
                    ..
                }
            ),
            "{err}"
        );
        let mut s = spec(&["x_embedder"]);
        s.rank = 0;
        assert!(matches!(
            Lora::new(&cfg, &s, 0, DType::F32, &Device::Cpu).err(),
            Some(FluxError::Setting {
                setting: Setting::LoraRank,
                ..
            })
        ));
    }

    #[test]
    fn b_starts_at_zero_and_a_is_gaussian_with_std_one_over_r() {
        let cfg = FluxConfig::tiny();
        let s = LoraSpec {
            rank: 8,
            ..spec(&["transformer_blocks.*.ff.net.2"])
        };
        let lora = Lora::new(&cfg, &s, 3, DType::F32, &Device::Cpu).unwrap();
        let ad = lora.get("transformer_blocks.0.ff.net.2").unwrap();
        assert_eq!(ad.a.dims(), &[8, cfg.mlp_hidden()]);
        assert_eq!(
            ad.b.as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let a: Vec<f32> = ad.a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let var = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
        assert!((var.sqrt() - 0.125).abs() < 0.01, "std {}", var.sqrt());
        assert!(lora.get("transformer_blocks.0.attn.to_q").is_none());
    }
}
