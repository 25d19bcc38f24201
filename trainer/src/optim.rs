//! AdamW with f32 moments, global-norm gradient clipping, a warmup + constant/cosine learning
//! rate schedule, and an EMA of the trainable weights. candle-nn's AdamW has none of clipping,
//! schedule or EMA (design.md §8), so this is written against plain tensors.

use candle_core::{DType, Tensor, Var};

use crate::checks::{non_negative, positive};
use crate::error::{Result, TrainerError};

/// The learning-rate shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    Constant,
    /// Cosine decay from the peak to `min_lr_ratio * lr` at the last step.
    Cosine,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
/// The `[optim]` section of a run config: AdamW, clipping, the learning-rate schedule and
/// the EMA.
pub struct OptimSpec {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Maximum global gradient norm; 0 disables clipping.
    pub grad_clip: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    /// EMA decay of the LoRA weights; 0 disables the EMA.
    pub ema_decay: f64,
    /// Caps the EMA's decay at optimizer step s (from 0) at (1 + s) / (10 + s), as diffusers'
    /// `EMAModel` does: without it the average keeps ema_decay^steps of the weights the run
    /// started from, which a run from random weights must train many times 1 / (1 - decay)
    /// steps to forget.
    pub ema_warmup: bool,
}

impl Default for OptimSpec {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            grad_clip: 1.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            min_lr_ratio: 0.0,
            ema_decay: 0.99,
            ema_warmup: false,
        }
    }
}

impl OptimSpec {
    /// The clipping norm; None when `grad_clip` is 0.
    pub fn clip(&self) -> Option<f64> {
        (self.grad_clip > 0.0).then_some(self.grad_clip)
    }

    /// Range checks, naming the `optim.*` key.
    pub fn validate(&self) -> Result<()> {
        let o = self;
        let err = |k: &str, why: String| Err(TrainerError::config(k, why));
        if !non_negative(o.lr) || !o.lr.is_finite() {
            return err("optim.lr", format!("{} must be a finite number >= 0", o.lr));
        }
        for (k, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return err(k, format!("{v} must be in [0, 1)"));
            }
        }
        if !positive(o.eps) {
            return err("optim.eps", format!("{} must be positive", o.eps));
        }
        if !non_negative(o.weight_decay) {
            return err(
                "optim.weight_decay",
                format!("{} must be >= 0", o.weight_decay),
            );
        }
        if !non_negative(o.grad_clip) {
            return err(
                "optim.grad_clip",
                format!("{} must be >= 0 (0 disables clipping)", o.grad_clip),
            );
        }
        if !(0.0..=1.0).contains(&o.min_lr_ratio) {
            return err(
                "optim.min_lr_ratio",
                format!("{} must be in [0, 1]", o.min_lr_ratio),
            );
        }
        if !(0.0..1.0).contains(&o.ema_decay) {
            return err(
                "optim.ema_decay",
                format!("{} must be in [0, 1) (0 disables the EMA)", o.ema_decay),
            );
        }
        Ok(())
    }
}

/// Learning rate of optimizer step `step` (0-based) of `max_steps`: linear warmup from lr/warmup
/// to lr over `warmup_steps`, then constant or cosine.
pub fn lr_at(spec: &OptimSpec, step: u64, max_steps: u64) -> f64 {
    if step < spec.warmup_steps {
        return spec.lr * (step + 1) as f64 / spec.warmup_steps as f64;
    }
    match spec.schedule {
        Schedule::Constant => spec.lr,
        Schedule::Cosine => {
            let span = max_steps.saturating_sub(spec.warmup_steps).max(1) as f64;
            let progress = ((step - spec.warmup_steps) as f64 / span).min(1.0);
            let min = spec.lr * spec.min_lr_ratio;
            min + (spec.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// sqrt(sum of squares) over all gradients. Each tensor's sum stays on its device and one
/// value is read back: a read per tensor would synchronise a GPU a thousand times a step.
/// Squares are summed along the last dim first (in the gradient's dtype, f32 for LoRA; one
/// GPU block per row) and those row sums in f64: candle reduces a whole tensor to one value
/// with a single GPU block, slow for tensors of hundreds of thousands of values.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let sums = grads
        .iter()
        .map(|g| {
            let rows = if g.rank() >= 2 {
                g.sqr()?.sum(candle_core::D::Minus1)?
            } else {
                g.sqr()?
            };
            rows.to_dtype(DType::F64)?.sum_all()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// The factor global-norm clipping multiplies the gradients by: max_norm / norm when the norm
/// exceeds `max_norm`, else 1 (and 1 without clipping).
pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    }
}

/// AdamW state: first and second moments per variable, in f32.
pub struct AdamW {
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Number of updates applied so far (for bias correction).
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: &[&Var]) -> Result<Self> {
        let zeros = |v: &&Var| {
            v.as_tensor()
                .zeros_like()
                .and_then(|z| z.to_dtype(DType::F32))
        };
        Ok(Self {
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            t: 0,
        })
    }

    /// One decoupled-weight-decay Adam update with learning rate `lr`, the gradients first
    /// multiplied by `grad_scale` (the clipping factor). On a GPU, f32 tensors are updated in
    /// place by one kernel each (`kernels::optim`); elsewhere by composed ops, the reference.
    pub fn step(
        &mut self,
        spec: &OptimSpec,
        vars: &[&Var],
        grads: &[Tensor],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - spec.beta1.powi(self.t as i32);
        let bc2 = 1.0 - spec.beta2.powi(self.t as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            #[cfg(feature = "cuda")]
            {
                use kernels::optim::applies;
                let w = var.as_tensor();
                if flux::fused::enabled() && [w, &self.m[i], &self.v[i], g].into_iter().all(applies)
                {
                    let step = kernels::optim::AdamWStep {
                        lr,
                        beta1: spec.beta1,
                        beta2: spec.beta2,
                        bias_correction1: bc1,
                        bias_correction2: bc2,
                        eps: spec.eps,
                        weight_decay: spec.weight_decay,
                        grad_scale,
                    };
                    kernels::optim::adamw_in_place(w, &self.m[i], &self.v[i], g, &step)?;
                    continue;
                }
            }
            let mut g = g.to_dtype(DType::F32)?;
            if grad_scale != 1.0 {
                g = (g * grad_scale)?;
            }
            // Detached: a gradient that still records its ops (one not from `backward`) would
            // otherwise make each step's moments hold the previous ones, and memory grow.
            self.m[i] = ((&self.m[i] * spec.beta1)? + (&g * (1.0 - spec.beta1))?)?.detach();
            self.v[i] = ((&self.v[i] * spec.beta2)? + (g.sqr()? * (1.0 - spec.beta2))?)?.detach();
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + spec.eps)?)?;
            let w = var.as_tensor().to_dtype(DType::F32)?;
            let w = ((w * (1.0 - lr * spec.weight_decay))? - (update * lr)?)?;
            var.set(&w.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// Exponential moving average of the trainable weights, updated after each optimizer step.
///
/// The shadow tensors are detached: an op on a `Var`'s tensor records it, so an average built
/// from the variables would record the previous average, which records the one before, and
/// every step's copies would stay alive (a run ran out of memory that way: 24 GB after 800
/// steps of a 2.3 M parameter base).
pub struct Ema {
    pub decay: f64,
    /// `optim.ema_warmup`: the decay at step s is at most (1 + s) / (10 + s).
    pub warmup: bool,
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// The EMA `spec` asks for (`optim.ema_decay`, `optim.ema_warmup`) of `vars`, or None when
    /// its decay is 0.
    pub fn for_spec(spec: &OptimSpec, vars: &[&Var]) -> Result<Option<Self>> {
        if spec.ema_decay <= 0.0 {
            return Ok(None);
        }
        Self::new(spec.ema_decay, spec.ema_warmup, vars).map(Some)
    }

    /// The average of `vars` as they are now, with decay `decay` (capped early on when
    /// `warmup`: [`Ema::decay_at`]).
    pub fn new(decay: f64, warmup: bool, vars: &[&Var]) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|v| {
                v.as_tensor()
                    .to_dtype(DType::F32)
                    .and_then(|t| t.copy())
                    .map(|t| t.detach())
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            decay,
            warmup,
            shadow,
        })
    }

    /// The decay of the update after optimizer step `step` (from 0).
    pub fn decay_at(&self, step: u64) -> f64 {
        if self.warmup {
            let s = step as f64;
            self.decay.min((1.0 + s) / (10.0 + s))
        } else {
            self.decay
        }
    }

    /// shadow = shadow * d + w * (1 - d) with d = [`Ema::decay_at`] `step`, the optimizer step
    /// (from 0) just taken; in place on a GPU (as [`AdamW::step`]).
    pub fn update(&mut self, vars: &[&Var], step: u64) -> Result<()> {
        let decay = self.decay_at(step);
        for (s, v) in self.shadow.iter_mut().zip(vars) {
            #[cfg(feature = "cuda")]
            if flux::fused::enabled()
                && kernels::optim::applies(s)
                && kernels::optim::applies(v.as_tensor())
            {
                kernels::optim::ema_in_place(s, v.as_tensor(), decay)?;
                continue;
            }
            let w = v.as_tensor().to_dtype(DType::F32)?;
            *s = ((&*s * decay)? + (w * (1.0 - decay))?)?.detach();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn spec() -> OptimSpec {
        OptimSpec {
            lr: 0.1,
            ..OptimSpec::default()
        }
    }

    #[test]
    fn first_adamw_step_matches_hand_computation() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(&[&var]).unwrap();
        let g = Tensor::new(&[0.5f32, -0.25], &Device::Cpu).unwrap();
        opt.step(&spec(), &[&var], &[g], 0.1, 1.0).unwrap();
        // Step 1: m_hat = g, v_hat = g^2, update = g/(|g| + eps) = sign(g).
        let w: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        let e = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) + 0.1];
        for (a, b) in w.iter().zip(e) {
            assert!((a - b).abs() < 1e-6, "{w:?}");
        }
    }

    #[test]
    fn clipping_rescales_to_the_max_norm() {
        let g = vec![
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let norm = global_norm(&g).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let factor = clip_factor(norm, Some(1.0));
        let clipped: Vec<Tensor> = g.iter().map(|t| (t * factor).unwrap()).collect();
        assert!((global_norm(&clipped).unwrap() - 1.0).abs() < 1e-5);
        assert_eq!(clip_factor(0.3, Some(1.0)), 1.0);
        assert_eq!(clip_factor(5.0, None), 1.0);
        assert_eq!(global_norm(&[]).unwrap(), 0.0);
    }

    /// The gradient scale is the clipping factor applied before the moments: a step with
    /// scale 0.5 equals a step on half the gradient.
    #[test]
    fn grad_scale_equals_a_scaled_gradient() {
        let run = |g: [f32; 2], scale: f64| {
            let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
            let mut opt = AdamW::new(&[&var]).unwrap();
            for _ in 0..3 {
                let g = Tensor::new(&g, &Device::Cpu).unwrap();
                opt.step(&spec(), &[&var], &[g], 0.1, scale).unwrap();
            }
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run([0.5, -0.25], 0.5), run([0.25, -0.125], 1.0));
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let s = OptimSpec {
            warmup_steps: 4,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            ..spec()
        };
        assert!((lr_at(&s, 0, 104) - 0.025).abs() < 1e-12);
        assert!((lr_at(&s, 3, 104) - 0.1).abs() < 1e-12);
        assert!((lr_at(&s, 4, 104) - 0.1).abs() < 1e-12);
        assert!((lr_at(&s, 54, 104) - 0.055).abs() < 1e-9);
        assert!((lr_at(&s, 104, 104) - 0.01).abs() < 1e-12);
        let c = OptimSpec {
            warmup_steps: 0,
            ..spec()
        };
        assert_eq!(lr_at(&c, 1000, 10), 0.1);
    }

    #[test]
    fn ema_moves_toward_the_weights() {
        let var = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let mut ema = Ema::new(0.9, false, &[&var]).unwrap();
        var.set(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&[&var], 0).unwrap();
        assert!((ema.shadow[0].to_vec1::<f32>().unwrap()[0] - 0.1).abs() < 1e-7);
    }

    /// With `optim.ema_warmup` the decay follows diffusers' EMAModel, min(decay, (1 + s) /
    /// (10 + s)): 0.1 after the first step, so the average starts near the trained weights,
    /// and the configured decay once (1 + s) / (10 + s) passes it (s = 890 for 0.99).
    #[test]
    fn ema_warmup_caps_the_decay_as_diffusers_does() {
        let spec = OptimSpec {
            ema_decay: 0.99,
            ema_warmup: true,
            ..OptimSpec::default()
        };
        let var = Var::new(&[0.0f32], &Device::Cpu).unwrap();
        let mut ema = Ema::for_spec(&spec, &[&var]).unwrap().unwrap();
        assert_eq!(ema.decay_at(0), 0.1);
        assert_eq!(ema.decay_at(1), 2.0 / 11.0);
        assert_eq!(ema.decay_at(889), 890.0 / 899.0);
        assert!(ema.decay_at(889) < 0.99);
        assert_eq!(ema.decay_at(891), 0.99);
        assert_eq!(ema.decay_at(100_000), 0.99);
        // A slow reference: the running average of a weight that is 1 from the first step on.
        var.set(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap())
            .unwrap();
        let mut expect = 0.0f64;
        for step in 0..5u64 {
            ema.update(&[&var], step).unwrap();
            let d = (1.0 + step as f64) / (10.0 + step as f64);
            expect = expect * d + (1.0 - d);
            let got = ema.shadow[0].to_vec1::<f32>().unwrap()[0] as f64;
            assert!(
                (got - expect).abs() < 1e-6,
                "step {step}: {got} vs {expect}"
            );
        }
        // Without warmup the same spec keeps its decay from the start; decay 0 keeps no EMA.
        let plain = Ema::for_spec(
            &OptimSpec {
                ema_warmup: false,
                ..spec.clone()
            },
            &[&var],
        );
        assert_eq!(plain.unwrap().unwrap().decay_at(0), 0.99);
        let none = Ema::for_spec(
            &OptimSpec {
                ema_decay: 0.0,
                ..spec
            },
            &[&var],
        )
        .unwrap();
        assert!(none.is_none());
    }

    /// The optimizer's state records no ops: a state that did would keep every earlier step's
    /// tensors alive through its graph (the EMA once grew by three copies of the weights a
    /// step). The gradient here records one, as a gradient not from `backward` may.
    #[test]
    fn optimizer_state_keeps_no_graph_of_earlier_steps() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut ema = Ema::new(0.9, false, &[&var]).unwrap();
        let mut opt = AdamW::new(&[&var]).unwrap();
        assert!(!ema.shadow[0].track_op());
        for _ in 0..3 {
            let g = (var.as_tensor() * 0.5).unwrap();
            assert!(g.track_op());
            opt.step(&spec(), &[&var], &[g], 0.1, 1.0).unwrap();
            ema.update(&[&var], 0).unwrap();
            assert!(!ema.shadow[0].track_op(), "the EMA records its history");
            assert!(
                !opt.m[0].track_op() && !opt.v[0].track_op(),
                "the moments record theirs"
            );
        }
    }
}
