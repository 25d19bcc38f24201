//! The `[validation]` table: which images to render during training, and when.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSpec {
    /// Render every this many optimizer steps, and after the last one (0: never).
    pub every: u64,
    /// A case list in the official format (`[{"index", "prompt", "image_paths"}]`; relative
    /// image paths start at its folder). `datasets synth` writes one for its scenes.
    pub cases: String,
    /// One image per case and seed; each seed's noise is its own stream.
    pub seeds: Vec<u64>,
    /// Denoising steps.
    pub steps: usize,
    /// Distilled guidance.
    pub guidance: f32,
    /// Classifier-free guidance on the prompt against the empty caption (`trainer sample
    /// --true-cfg`; 1: none). For bases trained with caption dropout, as the tiny base.
    pub true_cfg: f32,
    /// Square side in pixels (0: `data.resolution`).
    pub size: usize,
    /// Render with the EMA of the LoRA (needs `optim.ema_decay` > 0) instead of the live one.
    pub ema: bool,
    /// Also render before the first step of a fresh run (the base with the initial LoRA).
    pub at_start: bool,
    /// References attend only to themselves and their keys and values are computed once per
    /// image (`trainer sample --ref-cache`).
    pub ref_cache: bool,
    /// A held-out dataset (`datasets synth` writes `<out>/heldout`): at each validation the
    /// correspondence accuracy, separation and identity are measured on it (`trainer eval
    /// --heldout` measures the same). Empty: no measures.
    pub heldout: String,
    /// Noise levels the attention measures average over.
    pub measure_t: Vec<f64>,
    /// Identity: the held-out target noised to this level, then denoised to 0...
    pub identity_t: f64,
    /// ...in this many steps.
    pub identity_steps: usize,
}

impl Default for ValidationSpec {
    fn default() -> Self {
        Self {
            every: 0,
            cases: String::new(),
            seeds: vec![42],
            steps: 28,
            guidance: 3.5,
            true_cfg: 1.0,
            size: 0,
            ema: false,
            at_start: false,
            ref_cache: true,
            heldout: String::new(),
            measure_t: vec![0.25, 0.5, 0.75],
            identity_t: 0.8,
            identity_steps: 8,
        }
    }
}

impl ValidationSpec {
    pub fn enabled(&self) -> bool {
        self.every > 0
    }

    /// Whether to render after `done` completed steps of a run of `max_steps`.
    pub fn due(&self, done: u64, max_steps: u64) -> bool {
        self.enabled() && done > 0 && (done.is_multiple_of(self.every) || done == max_steps)
    }

    /// Range checks, naming the key; `ema_decay` is `optim.ema_decay`.
    pub fn validate(&self, ema_decay: f64) -> Result<()> {
        let err = |k: &str, why: &str| Err(TrainerError::config(k, why.to_string()));
        if !self.enabled() {
            return Ok(());
        }
        if self.cases.is_empty() {
            return err(
                "validation.cases",
                "validation is on (validation.every > 0) but names no case list; `datasets synth` writes one as <out>/validation/cases.json",
            );
        }
        if !self.heldout.is_empty() {
            if self.measure_t.is_empty() || self.measure_t.iter().any(|t| !(*t > 0.0 && *t < 1.0)) {
                return err(
                    "validation.measure_t",
                    "must hold at least one noise level, each in (0, 1)",
                );
            }
            if !(self.identity_t > 0.0 && self.identity_t <= 1.0) {
                return err("validation.identity_t", "must be in (0, 1]");
            }
            if self.identity_steps == 0 {
                return err("validation.identity_steps", "must be at least 1");
            }
        }
        if self.seeds.is_empty() {
            return err("validation.seeds", "must hold at least one seed");
        }
        if self.steps == 0 {
            return err("validation.steps", "must be at least 1");
        }
        if self.size != 0 && (self.size < 16 || !self.size.is_multiple_of(16)) {
            return err(
                "validation.size",
                "must be a positive multiple of 16 (or 0: data.resolution)",
            );
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return err("validation.guidance", "must be a finite number >= 0");
        }
        if !(self.true_cfg.is_finite() && self.true_cfg >= 1.0) {
            return err(
                "validation.true_cfg",
                "must be a finite number >= 1 (1: none)",
            );
        }
        if self.ema && ema_decay <= 0.0 {
            return err(
                "validation.ema",
                "renders with the EMA of the LoRA, but optim.ema_decay = 0 keeps none",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_every_n_steps_and_after_the_last() {
        let v = ValidationSpec {
            every: 4,
            cases: "c.json".into(),
            ..Default::default()
        };
        let due: Vec<u64> = (0..=10).filter(|&s| v.due(s, 10)).collect();
        assert_eq!(due, vec![4, 8, 10]);
        assert!(!ValidationSpec::default().due(10, 10), "off by default");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let on = ValidationSpec {
            every: 1,
            cases: "c.json".into(),
            ..Default::default()
        };
        type Change = fn(&mut ValidationSpec);
        let held = |v: &mut ValidationSpec| v.heldout = "h".into();
        let changes: [(Change, &str); 10] = [
            (|v| v.cases = String::new(), "validation.cases"),
            (|v| v.seeds = vec![], "validation.seeds"),
            (|v| v.steps = 0, "validation.steps"),
            (|v| v.size = 100, "validation.size"),
            (|v| v.guidance = f32::NAN, "validation.guidance"),
            (|v| v.true_cfg = 0.5, "validation.true_cfg"),
            (|v| v.ema = true, "validation.ema"),
            (|v| v.measure_t = vec![0.5, 1.0], "validation.measure_t"),
            (|v| v.identity_t = 0.0, "validation.identity_t"),
            (|v| v.identity_steps = 0, "validation.identity_steps"),
        ];
        for (change, key) in changes {
            let mut spec = on.clone();
            held(&mut spec);
            change(&mut spec);
            let e = spec.validate(0.0).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        on.validate(0.0).unwrap();
        ValidationSpec { ema: true, ..on }.validate(0.99).unwrap();
    }
}
