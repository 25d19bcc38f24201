//! FLUX's sampling schedule: the sigmas diffusers' FluxPipeline hands
//! FlowMatchEulerDiscreteScheduler (linspace(1, 1/steps, steps), shifted by
//! exp(mu) / (exp(mu) + (1/sigma - 1)) with mu linear in the target token count, 0.5 at 256
//! tokens and 1.15 at 4096), and its Euler step x += (sigma_next - sigma) v.
//!
//! The arithmetic follows diffusers' precisely: the sigmas are rounded to f32 before the shift,
//! which runs in f32; the transformer receives (sigma * 1000) / 1000 in f32, as the pipeline
//! passes `timestep / 1000` of timesteps stored as sigma * 1000. Checked against diffusers'
//! values for 1, 4 and 28 steps at 256, 512 and 1024 px (`ci/scheduler_fixture.py`).

use candle_core::{DType, Tensor};

use crate::error::{FluxError, Result};

/// mu(n): the resolution shift for `n` target tokens (linear through (256, 0.5) and
/// (4096, 1.15), in f64 as diffusers' `calculate_shift`).
pub fn shift_mu(image_seq_len: usize) -> f64 {
    let m = (1.15 - 0.5) / (4096.0 - 256.0);
    let b = 0.5 - m * 256.0;
    image_seq_len as f64 * m + b
}

/// The flow-matching interpolation at noise level `sigma`: (1 - sigma) x0 + sigma noise, in
/// f32 (training's x_t; at a schedule's first sigma, the start latents of img2img, which
/// diffusers' scheduler calls `scale_noise`).
pub fn noised(x0: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    let x0 = x0.to_dtype(DType::F32)?;
    let noise = noise.to_dtype(DType::F32)?;
    Ok(((x0 * (1.0 - sigma))? + (noise * sigma)?)?)
}

/// The sigmas of one sampling run: `steps + 1` values from 1 down to 0.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchSchedule {
    pub sigmas: Vec<f32>,
}

impl FlowMatchSchedule {
    /// The schedule FluxPipeline uses for `steps` steps on `image_seq_len` target tokens.
    pub fn flux(steps: usize, image_seq_len: usize) -> Self {
        let steps = steps.max(1);
        let e = shift_mu(image_seq_len).exp() as f32;
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                // np.linspace(1.0, 1 / steps, steps) in f64, then astype(float32).
                let end = 1.0 / steps as f64;
                let s = if steps == 1 {
                    1.0
                } else {
                    1.0 + (end - 1.0) * i as f64 / (steps - 1) as f64
                };
                let s = s as f32;
                e / (e + (1.0 / s - 1.0))
            })
            .collect();
        sigmas.push(0.0);
        Self { sigmas }
    }

    /// The part of this schedule image-to-image sampling at `strength` runs, as diffusers'
    /// FluxImg2ImgPipeline does: the schedule of `steps` from index
    /// t_start = int(max(steps - min(steps * strength, steps), 0)). Its first sigma is the
    /// noise level of the start latents, sigma n + (1 - sigma) x0 (the scheduler's
    /// `scale_noise`). A strength outside (0, 1] or one that leaves no step is refused.
    pub fn img2img(&self, strength: f64) -> Result<Self> {
        let steps = self.steps();
        let bad = |reason: String| FluxError::Input {
            name: "strength".into(),
            reason,
        };
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(bad(format!("{strength}: must be in (0, 1]")));
        }
        let init = (steps as f64 * strength).min(steps as f64);
        let t_start = (steps as f64 - init).max(0.0) as usize;
        if t_start >= steps {
            return Err(bad(format!(
                "{strength} of {steps} steps leaves no step to run (diffusers refuses it too)"
            )));
        }
        Ok(Self {
            sigmas: self.sigmas[t_start..].to_vec(),
        })
    }

    /// The latents this schedule starts from for clean latents `x0` and `noise`: `x0` noised
    /// to its first sigma (the noise itself for a full schedule), in f32.
    pub fn start_latents(&self, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        noised(x0, noise, self.sigmas[0] as f64)
    }

    /// Denoising steps.
    pub fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// What the transformer receives as its timestep at step `i` (its "sigma").
    pub fn model_timestep(&self, i: usize) -> f32 {
        (self.sigmas[i] * 1000.0) / 1000.0
    }

    /// One Euler step from sigma_i to sigma_{i+1}: x + (sigma_{i+1} - sigma_i) v, in f32,
    /// returned in `x`'s dtype.
    pub fn step(&self, i: usize, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        let dt = (self.sigmas[i + 1] - self.sigmas[i]) as f64;
        let x32 = x.to_dtype(DType::F32)?;
        let v32 = v.to_dtype(DType::F32)?;
        Ok((x32 + (v32 * dt)?)?.to_dtype(x.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[derive(serde::Deserialize)]
    struct Case {
        image_seq_len: usize,
        steps: usize,
        mu: f64,
        sigmas: Vec<f32>,
        model_timesteps: Vec<f32>,
    }

    #[derive(serde::Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }

    #[test]
    fn sigmas_are_diffusers_for_1_4_and_28_steps_at_three_resolutions() {
        let f: Fixture =
            serde_json::from_str(include_str!("../tests/fixtures/flow_match_sigmas.json")).unwrap();
        assert_eq!(f.cases.len(), 9);
        for c in &f.cases {
            assert!((shift_mu(c.image_seq_len) - c.mu).abs() < 1e-12);
            let s = FlowMatchSchedule::flux(c.steps, c.image_seq_len);
            assert_eq!(s.steps(), c.steps);
            for (i, (a, b)) in s.sigmas.iter().zip(&c.sigmas).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-7,
                    "{} steps, {} tokens, sigma {i}: {a} vs diffusers {b}",
                    c.steps,
                    c.image_seq_len
                );
            }
            for (i, want) in c.model_timesteps.iter().enumerate() {
                let got = s.model_timestep(i);
                assert!((got - want).abs() <= 1e-7, "timestep {i}: {got} vs {want}");
            }
        }
    }

    /// x_t = (1 - s) x0 + s n, v = n - x0: stepping with the exact velocity from the start
    /// latents at `s`'s first sigma lands on x0.
    fn assert_lands_on_x0(s: &FlowMatchSchedule) {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
        let n = Tensor::new(&[1.0f32, 0.25, -0.5], &dev).unwrap();
        let v = (&n - &x0).unwrap();
        let mut x = s.start_latents(&x0, &n).unwrap();
        for i in 0..s.steps() {
            x = s.step(i, &x, &v).unwrap();
        }
        let d: Vec<f32> = (x - x0).unwrap().abs().unwrap().to_vec1().unwrap();
        assert!(d.iter().all(|&e| e < 1e-6), "{d:?}");
    }

    #[test]
    fn euler_steps_reach_x0_for_an_exact_velocity() {
        let s = FlowMatchSchedule::flux(4, 1024);
        assert_eq!(s.sigmas[0], 1.0);
        assert_lands_on_x0(&s);
    }

    #[test]
    fn img2img_starts_where_diffusers_does() {
        let full = FlowMatchSchedule::flux(28, 64);
        // diffusers: t_start = int(max(28 - min(28 * s, 28), 0)).
        for (strength, t_start) in [(1.0, 0), (0.6, 11), (0.5, 14), (0.3, 19), (0.01, 27)] {
            let s = full.img2img(strength).unwrap();
            assert_eq!(s.steps(), 28 - t_start, "strength {strength}");
            assert_eq!(s.sigmas[..], full.sigmas[t_start..], "strength {strength}");
        }
        for strength in [0.0, -0.1, 1.5, f64::NAN, 1e-300] {
            let e = full.img2img(strength).unwrap_err().to_string();
            assert!(e.contains("strength"), "{strength}: {e}");
        }
    }

    #[test]
    fn img2img_reaches_x0_from_its_start_latents() {
        let s = FlowMatchSchedule::flux(10, 256).img2img(0.45).unwrap();
        assert!(s.sigmas[0] < 1.0 && s.sigmas[0] > 0.0);
        assert_lands_on_x0(&s);
    }

    #[test]
    fn start_latents_mix_noise_and_x0_at_the_first_sigma() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
        let n = Tensor::new(&[1.0f32, 0.25], &dev).unwrap();
        let full = FlowMatchSchedule::flux(8, 64);
        let start: Vec<f32> = full.start_latents(&x0, &n).unwrap().to_vec1().unwrap();
        assert_eq!(
            start,
            vec![1.0, 0.25],
            "a full schedule starts from the noise"
        );
        let tail = full.img2img(0.5).unwrap();
        let s = tail.sigmas[0];
        let start: Vec<f32> = tail.start_latents(&x0, &n).unwrap().to_vec1().unwrap();
        for (got, (x, e)) in start.iter().zip([(0.5f32, 1.0f32), (-1.0, 0.25)]) {
            let want = (1.0 - s) * x + s * e;
            assert!((got - want).abs() < 1e-6, "{got} against {want}");
        }
    }
}
