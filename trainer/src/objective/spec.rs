//! The `[loss]` and `[conditioning]` sections of a run config: loss weights and schedule, which
//! attention rows the losses read and how they reduce them, and the timestep distribution.
//!
//! The settings can express both MOSAIC recipes (docs/design.md §5, "Two recipes"):
//! - the paper's (seed 003, eq. 9-15): P sampled points per reference, SCAL averaged per
//!   reference, MDL the symmetric KL of the mean rows of the sampled points;
//! - the official code's (train.py `compute_align_sep_losses`): every valid pair, SCAL pooled
//!   over all pairs, MDL the Jensen-Shannon divergence of the mean rows of ALL reference tokens.
//!
//! The code defaults are the paper's.

use std::fmt;

use kernels::{Divergence, MdlSettings, ScalReduce, ScalSettings};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::checks::{non_negative, positive};
use crate::error::{Result, TrainerError};
use flux::config::FluxConfig;
use flux::RowBlocks;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// A run config's `[conditioning]` section: how references and guidance enter the model.
pub struct ConditioningSpec {
    /// References do not attend to each other (the official group mask).
    pub isolate_refs: bool,
    /// Guidance value fed to text and target (MOSAIC trains with 1.0).
    pub guidance: f64,
    /// Guidance value fed to the references.
    pub ref_guidance: f64,
}

impl Default for ConditioningSpec {
    fn default() -> Self {
        Self {
            isolate_refs: true,
            guidance: 1.0,
            ref_guidance: 1.0,
        }
    }
}

impl ConditioningSpec {
    /// Range checks, naming the key.
    pub fn validate(&self) -> Result<()> {
        if !self.guidance.is_finite() || !self.ref_guidance.is_finite() {
            return Err(TrainerError::config(
                "conditioning.guidance",
                "must be finite",
            ));
        }
        Ok(())
    }
}

/// `loss.scal_reduce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScalReduceName {
    /// Paper eq. 10: mean per reference, then over references.
    PerReference,
    /// Official: one mean over all pairs of all references.
    Pooled,
}

/// `loss.mdl_rows`: whose attention rows MDL averages into each reference's distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MdlRows {
    /// Paper eq. 11-12: the sampled correspondence points.
    Points,
    /// Official: every token of the reference, background included.
    AllTokens,
}

/// `loss.mdl_divergence`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DivergenceName {
    /// Paper eq. 13: (KL(p||q) + KL(q||p)) / 2.
    SymmetricKl,
    /// Official: Jensen-Shannon divergence.
    Jsd,
}

impl ScalReduceName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerReference => "per-reference",
            Self::Pooled => "pooled",
        }
    }
}

impl MdlRows {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Points => "points",
            Self::AllTokens => "all-tokens",
        }
    }
}

impl DivergenceName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SymmetricKl => "symmetric-kl",
            Self::Jsd => "jsd",
        }
    }
}

/// How the attention rows are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowsImpl {
    /// The kernels crate's op: no attention map.
    Fused,
    /// Candle ops materializing [heads, P, N_tgt] (the reference).
    Plain,
}

/// `loss.double_blocks` / `loss.single_blocks`: explicit block indices, or a name resolved
/// against the model's depth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockSelection {
    /// Every block of the kind (the official code: all 19 double blocks).
    All,
    /// The first half, rounded up (the paper's "early blocks", Table 10; the exact set is not
    /// published: 0..=9 of FLUX.1's 19 double blocks).
    Early,
    List(Vec<usize>),
}

impl BlockSelection {
    /// The block indices for a model with `count` blocks of this kind.
    pub fn resolve(&self, count: usize) -> Vec<usize> {
        match self {
            Self::All => (0..count).collect(),
            Self::Early => (0..count.div_ceil(2)).collect(),
            Self::List(v) => v.clone(),
        }
    }

    /// Whether no block can be selected whatever the model.
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::List(v) if v.is_empty())
    }
}

impl Serialize for BlockSelection {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::All => s.serialize_str("all"),
            Self::Early => s.serialize_str("early"),
            Self::List(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for BlockSelection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BlockSelection;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a list of block indices such as [0, 1, 2], "all" or "early""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                match v {
                    "all" => Ok(BlockSelection::All),
                    "early" => Ok(BlockSelection::Early),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(i) = seq.next_element::<usize>()? {
                    v.push(i);
                }
                Ok(BlockSelection::List(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// A run config's `[loss]` section. Defaults: the paper's recipe.
pub struct LossSpec {
    /// alpha (paper 0.4; official 0.1).
    pub scal_weight: f64,
    /// beta (paper 0.6; official 1.0 after its ramp).
    pub mdl_weight: f64,
    /// The MDL weight is 0 before this optimizer step...
    pub mdl_ramp_start: u64,
    /// ...then rises linearly to `mdl_weight` over this many steps (0: at once).
    pub mdl_ramp_steps: u64,
    /// P: correspondence points sampled per reference (paper 150); 0: every valid pair, in
    /// data order (official).
    pub points_per_ref: usize,
    pub scal_reduce: ScalReduceName,
    /// SCAL's log(A + eps) (official 1e-9; the paper states none).
    pub scal_eps: f64,
    pub mdl_rows: MdlRows,
    pub mdl_divergence: DivergenceName,
    /// MDL's epsilon (official 1e-8 in both divergences; the paper states none).
    pub mdl_eps: f64,
    /// Apply SCAL and MDL to samples whose references condition dropout zeroed (the official
    /// code does; by default they are left out, their rows telling nothing).
    pub supervise_dropped_refs: bool,
    /// Double blocks whose attention rows feed SCAL/MDL.
    pub double_blocks: BlockSelection,
    pub single_blocks: BlockSelection,
    pub rows: RowsImpl,
    /// t = sigmoid(n), n ~ N(logit_mean, logit_std^2).
    pub logit_mean: f64,
    pub logit_std: f64,
    /// Apply the resolution-dependent shift mu(seq_len) to t.
    pub resolution_shift: bool,
}

impl Default for LossSpec {
    fn default() -> Self {
        Self {
            scal_weight: 0.4,
            mdl_weight: 0.6,
            mdl_ramp_start: 0,
            mdl_ramp_steps: 0,
            points_per_ref: 150,
            scal_reduce: ScalReduceName::PerReference,
            scal_eps: 1e-9,
            mdl_rows: MdlRows::Points,
            mdl_divergence: DivergenceName::SymmetricKl,
            mdl_eps: 1e-8,
            supervise_dropped_refs: false,
            double_blocks: BlockSelection::Early,
            single_blocks: BlockSelection::List(Vec::new()),
            rows: RowsImpl::Fused,
            logit_mean: 0.0,
            logit_std: 1.0,
            resolution_shift: true,
        }
    }
}

/// Which source a set of loss settings reproduces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipe {
    Paper,
    Official,
    /// Settings of both; the list says which setting follows which source.
    Mixed(Vec<String>),
}

impl fmt::Display for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recipe::Paper => f.write_str("the paper's"),
            Recipe::Official => f.write_str("the official code's"),
            Recipe::Mixed(v) => write!(f, "mixed ({})", v.join(", ")),
        }
    }
}

impl LossSpec {
    /// Range checks, naming the `loss.*` key.
    pub fn validate(&self) -> Result<()> {
        let s = self;
        let err = |k: &str, why: String| Err(TrainerError::config(k, why));
        for (k, v) in [
            ("loss.scal_weight", s.scal_weight),
            ("loss.mdl_weight", s.mdl_weight),
        ] {
            if !non_negative(v) || !v.is_finite() {
                return err(k, format!("{v} must be a finite number >= 0"));
            }
        }
        for (k, v) in [("loss.scal_eps", s.scal_eps), ("loss.mdl_eps", s.mdl_eps)] {
            if !positive(v) || !v.is_finite() {
                return err(
                    k,
                    format!("{v} must be a finite number > 0 (it keeps log() finite)"),
                );
            }
        }
        if !positive(s.logit_std) {
            return err(
                "loss.logit_std",
                format!("{} must be positive", s.logit_std),
            );
        }
        if (s.scal_weight > 0.0 || s.mdl_weight > 0.0)
            && s.double_blocks.is_empty()
            && s.single_blocks.is_empty()
        {
            return err("loss.double_blocks", "SCAL/MDL are on but no block is selected (set loss.double_blocks or loss.single_blocks, or the weights to 0)".into());
        }
        Ok(())
    }

    /// The MDL weight at optimizer step `step`: 0 before the ramp, linear over it, then full.
    pub fn mdl_weight_at(&self, step: u64) -> f64 {
        if step < self.mdl_ramp_start {
            0.0
        } else if self.mdl_ramp_steps == 0 {
            self.mdl_weight
        } else {
            let p = (step - self.mdl_ramp_start) as f64 / self.mdl_ramp_steps as f64;
            self.mdl_weight * p.min(1.0)
        }
    }

    /// Which blocks of a model of `cfg`'s depth emit attention rows, and how.
    pub fn row_blocks(&self, cfg: &FluxConfig) -> RowBlocks {
        RowBlocks {
            double: self.double_blocks.resolve(cfg.num_double),
            single: self.single_blocks.resolve(cfg.num_single),
            plain: self.rows == RowsImpl::Plain,
        }
    }

    /// The kernels crate's SCAL settings.
    pub fn scal(&self) -> ScalSettings {
        ScalSettings {
            reduce: match self.scal_reduce {
                ScalReduceName::PerReference => ScalReduce::PerReference,
                ScalReduceName::Pooled => ScalReduce::Pooled,
            },
            eps: self.scal_eps,
        }
    }

    /// The kernels crate's MDL settings.
    pub fn mdl(&self) -> MdlSettings {
        MdlSettings {
            divergence: match self.mdl_divergence {
                DivergenceName::SymmetricKl => Divergence::SymmetricKl,
                DivergenceName::Jsd => Divergence::Jsd,
            },
            eps: self.mdl_eps,
        }
    }

    /// Which source the settings that tell the two recipes apart follow (the weights, ramp,
    /// epsilons and blocks are free: each config says its own).
    pub fn recipe(&self) -> Recipe {
        let choices = [
            (
                "points_per_ref",
                self.points_per_ref > 0,
                format!("points_per_ref = {}", self.points_per_ref),
            ),
            (
                "scal_reduce",
                self.scal_reduce == ScalReduceName::PerReference,
                format!("scal_reduce = \"{}\"", self.scal_reduce.as_str()),
            ),
            (
                "mdl_rows",
                self.mdl_rows == MdlRows::Points,
                format!("mdl_rows = \"{}\"", self.mdl_rows.as_str()),
            ),
            (
                "mdl_divergence",
                self.mdl_divergence == DivergenceName::SymmetricKl,
                format!("mdl_divergence = \"{}\"", self.mdl_divergence.as_str()),
            ),
            (
                "supervise_dropped_refs",
                !self.supervise_dropped_refs,
                format!("supervise_dropped_refs = {}", self.supervise_dropped_refs),
            ),
        ];
        let paper = choices.iter().filter(|c| c.1).count();
        if paper == choices.len() {
            Recipe::Paper
        } else if paper == 0 {
            Recipe::Official
        } else {
            Recipe::Mixed(
                choices
                    .iter()
                    .map(|(_, is_paper, text)| {
                        format!("{text}: {}", if *is_paper { "paper" } else { "official" })
                    })
                    .collect(),
            )
        }
    }

    /// Logs, once at start, a combination of settings that neither source used.
    pub fn log_recipe(&self) {
        match self.recipe() {
            Recipe::Mixed(_) => tracing::warn!(
                "loss settings follow neither MOSAIC source exactly: {} (allowed; docs/design.md §5 compares them)",
                self.recipe()
            ),
            r => tracing::info!("loss settings: {r} recipe"),
        }
    }
}

/// What the objective reads from a run config: its `[loss]` and `[conditioning]` sections and
/// condition dropout, with the empty caption's embeddings that text dropout feeds.
#[derive(Debug, Clone, Copy)]
pub struct ObjectiveSpec<'a> {
    pub loss: &'a LossSpec,
    pub conditioning: &'a ConditioningSpec,
    pub dropout: super::dropout::DropoutSpec,
    pub empty_caption: Option<&'a super::dropout::EmptyCaption>,
}

impl ObjectiveSpec<'_> {
    /// Whether step `step` needs attention rows (SCAL or MDL is on).
    pub fn needs_rows(&self, step: u64) -> bool {
        self.loss.scal_weight > 0.0 || self.loss.mdl_weight_at(step) > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdl_ramp() {
        let spec = LossSpec {
            scal_weight: 0.1,
            mdl_weight: 1.0,
            mdl_ramp_start: 10_000,
            mdl_ramp_steps: 1000,
            ..LossSpec::default()
        };
        assert_eq!(spec.mdl_weight_at(9_999), 0.0);
        assert_eq!(spec.mdl_weight_at(10_500), 0.5);
        assert_eq!(spec.mdl_weight_at(20_000), 1.0);
    }

    #[test]
    fn block_selections_resolve_against_the_depth() {
        assert_eq!(
            BlockSelection::Early.resolve(19),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(BlockSelection::Early.resolve(2), vec![0]);
        assert_eq!(BlockSelection::All.resolve(3), vec![0, 1, 2]);
        assert_eq!(BlockSelection::List(vec![4]).resolve(2), vec![4]);
        assert!(BlockSelection::List(vec![]).is_empty());
        assert!(!BlockSelection::Early.is_empty());
    }

    #[test]
    fn block_selections_read_and_write_toml() {
        #[derive(Serialize, Deserialize)]
        struct T {
            b: BlockSelection,
        }
        for (text, want) in [
            ("b = \"all\"", BlockSelection::All),
            ("b = \"early\"", BlockSelection::Early),
            ("b = [0, 3]", BlockSelection::List(vec![0, 3])),
        ] {
            let t: T = toml::from_str(text).unwrap();
            assert_eq!(t.b, want);
            let back: T = toml::from_str(&toml::to_string(&t).unwrap()).unwrap();
            assert_eq!(back.b, want);
        }
        let e = toml::from_str::<T>("b = \"late\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"all\" or \"early\""), "{e}");
    }

    #[test]
    fn recipes_are_recognised() {
        assert_eq!(LossSpec::default().recipe(), Recipe::Paper);
        let official = LossSpec {
            points_per_ref: 0,
            scal_reduce: ScalReduceName::Pooled,
            mdl_rows: MdlRows::AllTokens,
            mdl_divergence: DivergenceName::Jsd,
            supervise_dropped_refs: true,
            ..LossSpec::default()
        };
        assert_eq!(official.recipe(), Recipe::Official);
        let mixed = LossSpec {
            mdl_divergence: DivergenceName::Jsd,
            ..LossSpec::default()
        };
        let Recipe::Mixed(parts) = mixed.recipe() else {
            panic!("not mixed")
        };
        assert!(parts.contains(&"mdl_divergence = \"jsd\": official".to_string()));
    }

    #[test]
    fn epsilons_must_be_positive() {
        for (spec, key) in [
            (
                LossSpec {
                    scal_eps: 0.0,
                    ..LossSpec::default()
                },
                "loss.scal_eps",
            ),
            (
                LossSpec {
                    mdl_eps: f64::NAN,
                    ..LossSpec::default()
                },
                "loss.mdl_eps",
            ),
        ] {
            let e = spec.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
