//! Identity: whether the subjects of the references appear where the target has them.
//!
//! The held-out target is noised to `identity_t` (its layout survives, its colours and
//! textures mostly do not) and denoised to 0 in `identity_steps` equal Euler steps, once with
//! the references and once with them zeroed. At every correspondence point the generated
//! pixel is compared with the reference's pixel: similarity 1 - mean |RGB difference| / 2,
//! RGB in [-1, 1], both images through the codec (the reference as the model receives it).
//! The clean target through the codec gives the ceiling.

use candle_core::{DType, Tensor};

use super::{inputs_of, noised, HeldOutSample, MeasureSpec};
use crate::error::Result;
use flux::embed::unpack_latents;
use flux::schedule::FlowMatchSchedule;
use flux::{Flux, LoraView};

/// Running sums of the identity similarities over correspondence points.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct IdentityTally {
    pub points: usize,
    pub with_refs: f64,
    pub refs_zeroed: f64,
    pub ceiling: f64,
}

impl IdentityTally {
    fn mean(&self, sum: f64) -> f64 {
        if self.points == 0 {
            f64::NAN
        } else {
            sum / self.points as f64
        }
    }

    pub fn with_refs(&self) -> f64 {
        self.mean(self.with_refs)
    }

    pub fn refs_zeroed(&self) -> f64 {
        self.mean(self.refs_zeroed)
    }

    pub fn ceiling(&self) -> f64 {
        self.mean(self.ceiling)
    }

    pub fn merge(&mut self, o: &IdentityTally) {
        self.points += o.points;
        self.with_refs += o.with_refs;
        self.refs_zeroed += o.refs_zeroed;
        self.ceiling += o.ceiling;
    }
}

/// An image [3, H, W] in [-1, 1], read at normalised coordinates.
pub struct Image {
    data: Vec<f32>,
    h: usize,
    w: usize,
}

impl Image {
    /// From a decoder's output [1, 3, H, W].
    pub fn of(x: &Tensor) -> Result<Self> {
        let (_, _, h, w) = x.dims4()?;
        Ok(Self {
            data: x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            h,
            w,
        })
    }

    /// The pixel covering normalised (x, y).
    pub fn at(&self, x: f32, y: f32) -> [f32; 3] {
        let px = ((x * self.w as f32) as usize).min(self.w - 1);
        let py = ((y * self.h as f32) as usize).min(self.h - 1);
        [0, 1, 2].map(|c| self.data[c * self.h * self.w + py * self.w + px])
    }
}

/// 1 - mean |a - b| / 2 over the channels of two pixels in [-1, 1].
pub fn similarity(a: [f32; 3], b: [f32; 3]) -> f64 {
    let d: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum();
    1.0 - (d / 6.0) as f64
}

/// Decodes packed latents [1, N, 64] of a `grid` to an image.
fn decode(
    decoder: &flux::encoders::VaeDecoder,
    latents: &Tensor,
    grid: datasets::TokenGrid,
) -> Result<Image> {
    let z = unpack_latents(&latents.to_dtype(DType::F32)?, grid.rows * 2, grid.cols * 2)?;
    Image::of(&decoder.decode(&z)?)
}

/// The clean target and each reference of `sample` through the codec.
pub(super) fn through_codec(
    sample: &crate::data::sample::Sample,
    decoder: &flux::encoders::VaeDecoder,
) -> Result<(Image, Vec<Image>)> {
    let clean = decode(decoder, &sample.x0.unsqueeze(0)?, sample.grid)?;
    let references = sample
        .refs
        .iter()
        .map(|r| decode(decoder, &r.latent.unsqueeze(0)?, r.grid))
        .collect::<Result<_>>()?;
    Ok((clean, references))
}

/// `identity_steps` equal steps from `identity_t` down to 0.
fn schedule(spec: &MeasureSpec) -> FlowMatchSchedule {
    let n = spec.identity_steps.max(1);
    let t0 = spec.identity_t as f32;
    FlowMatchSchedule {
        sigmas: (0..=n).map(|i| t0 * (1.0 - i as f32 / n as f32)).collect(),
    }
}

/// The identity similarities of one held-out sample.
pub fn of_sample(
    model: &Flux,
    lora: LoraView,
    s: &HeldOutSample,
    spec: &MeasureSpec,
    noise: &Tensor,
    decoder: &flux::encoders::VaeDecoder,
) -> Result<IdentityTally> {
    let sample = &s.sample;
    let dtype = model.dtype();
    let start = noised(&sample.x0, noise, spec.identity_t, dtype)?;
    let schedule = schedule(spec);
    let mut generated = Vec::with_capacity(2);
    for zero_refs in [false, true] {
        let inputs = inputs_of(
            sample,
            start.clone(),
            spec,
            spec.identity_t,
            zero_refs,
            dtype,
        )?;
        let out = flux::sample::denoise(model, lora, inputs, &schedule, spec.guidance, false)?;
        generated.push(decode(decoder, &out.latents, sample.grid)?);
    }
    let mut out = IdentityTally::default();
    for (reference, dr) in s.references.iter().zip(&s.decoded.refs) {
        for p in &dr.points {
            let want = reference.at(p[0], p[1]);
            out.points += 1;
            out.with_refs += similarity(generated[0].at(p[2], p[3]), want);
            out.refs_zeroed += similarity(generated[1].at(p[2], p[3]), want);
            out.ceiling += similarity(s.clean.at(p[2], p[3]), want);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_is_one_for_equal_pixels_and_zero_for_opposite_ones() {
        assert_eq!(similarity([0.5, -1.0, 1.0], [0.5, -1.0, 1.0]), 1.0);
        assert_eq!(similarity([1.0; 3], [-1.0; 3]), 0.0);
        assert!((similarity([0.0; 3], [0.5, 0.0, 0.0]) - (1.0 - 0.5 / 6.0)).abs() < 1e-6);
    }

    #[test]
    fn images_are_read_at_normalised_coordinates() {
        // 2 x 4 image whose red channel is its pixel index.
        let x = Tensor::from_vec(
            (0..24).map(|i| i as f32).collect::<Vec<_>>(),
            (1, 3, 2, 4),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let img = Image::of(&x).unwrap();
        assert_eq!(img.at(0.0, 0.0)[0], 0.0);
        assert_eq!(img.at(0.99, 0.99)[0], 7.0);
        assert_eq!(img.at(0.3, 0.6), [5.0, 13.0, 21.0]);
        assert_eq!(img.at(1.0, 1.0)[0], 7.0, "the far edge clamps");
    }

    #[test]
    fn the_schedule_runs_from_identity_t_to_zero_in_equal_steps() {
        let spec = MeasureSpec {
            measure_t: vec![],
            identity_t: 0.8,
            identity_steps: 4,
            guidance: 1.0,
            ref_guidance: 1.0,
            isolate_refs: true,
        };
        let s = schedule(&spec);
        assert_eq!(s.steps(), 4);
        assert_eq!(s.sigmas[0], 0.8);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert!((s.sigmas[1] - 0.6).abs() < 1e-6);
    }
}
