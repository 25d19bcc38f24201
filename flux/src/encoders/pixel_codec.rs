//! The tiny pipeline's image codec, in place of a VAE: an exact, weightless map between images
//! and FLUX-shaped latents, so that what a tiny base learns to denoise decodes to a picture.
//!
//! Encode: 4 x 4 average pooling of the [-1, 1] image, then each 2 x 2 block of the pooled
//! image's three channels into 12 channels (space to depth), times [`SCALE`], and 4 zero
//! channels: latents [B, 16, H/8, W/8] like FLUX's VAE's. Decode: the first 12 channels over
//! [`SCALE`] back to the pooled image (depth to space), enlarged 4x by repeating pixels.
//! `decode(encode(x))` is `x` at a quarter of its resolution, and `encode(decode(z)) = z` for
//! latents whose last 4 channels are zero.
//! A seeded random VAE (what the tiny pipeline used before) has a decoder that does not
//! invert its encoder, so even a perfect tiny denoiser could only show noise.

use candle_core::Tensor;

use super::{EncodeError, Result, LATENT_CHANNELS};

/// Pooling before space to depth: 4 x 2 = the VAE's 8.
const POOL: usize = 4;
const BLOCK: usize = 2;
/// Channels that carry the image: 3 colours x 2 x 2.
const USED: usize = 3 * BLOCK * BLOCK;
/// Pooled pixels times this are the latents, as FLUX's VAE scales its latents (by 0.3611)
/// to about unit standard deviation: flow matching mixes latents with unit Gaussian noise,
/// and the noise level at which a sample's shapes emerge depends on the latents' scale. The
/// synthetic scenes' pooled pixels have a standard deviation of 0.318 (mean 0.023; 4096
/// scenes of `datasets synth --seed 1`), so unscaled they drown in noise already at small t
/// and a denoiser spends most of the schedule where nothing of them is visible; times 3 they
/// have about 0.95.
pub const SCALE: f64 = 3.0;

/// Latents [B, 16, H/8, W/8] of images [B, 3, H, W] (H and W multiples of 8).
pub fn encode(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if c != 3 || h % (POOL * BLOCK) != 0 || w % (POOL * BLOCK) != 0 {
        return Err(EncodeError::Spec(format!(
            "the pixel codec takes [B, 3, H, W] with H and W multiples of 8, not {:?}",
            x.dims()
        )));
    }
    let pooled = (x.avg_pool2d(POOL)? * SCALE)?; // [B, 3, H/4, W/4]
    let (hh, ww) = (h / (POOL * BLOCK), w / (POOL * BLOCK));
    let z = pooled
        .reshape((b, 3, hh, BLOCK, ww, BLOCK))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, USED, hh, ww))?;
    let zeros = Tensor::zeros((b, LATENT_CHANNELS - USED, hh, ww), z.dtype(), z.device())?;
    Ok(Tensor::cat(&[&z, &zeros], 1)?)
}

/// Images [B, 3, 8h, 8w] of latents [B, 16, h, w] (the last 4 channels are ignored).
pub fn decode(z: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = z.dims4()?;
    if c != LATENT_CHANNELS {
        return Err(EncodeError::Spec(format!(
            "latents with {c} channels: the pixel codec's have {LATENT_CHANNELS}"
        )));
    }
    let pooled = (z.narrow(1, 0, USED)? / SCALE)?
        .reshape((b, 3, BLOCK, BLOCK, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, 3, h * BLOCK, w * BLOCK))?;
    Ok(pooled.upsample_nearest2d(h * BLOCK * POOL, w * BLOCK * POOL)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, IndexOp};

    #[test]
    fn decoding_inverts_encoding_at_a_quarter_of_the_resolution() {
        let dev = Device::Cpu;
        let x = Tensor::rand(-1f32, 1.0, (2, 3, 16, 24), &dev).unwrap();
        let z = encode(&x).unwrap();
        assert_eq!(z.dims(), &[2, 16, 2, 3]);
        // The last 4 channels are zero.
        let tail = z
            .narrow(1, 12, 4)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(tail.to_scalar::<f32>().unwrap(), 0.0);
        let y = decode(&z).unwrap();
        assert_eq!(y.dims(), x.dims());
        // Each 4 x 4 block of the decoded image is the mean of the same block of the input.
        for (b, ch, by, bx) in [(0, 0, 0, 0), (1, 2, 3, 5), (0, 1, 2, 4)] {
            let block = x
                .i((b, ch, by * 4..by * 4 + 4, bx * 4..bx * 4 + 4))
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let got = y
                .i((b, ch, by * 4 + 1, bx * 4 + 2))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!((block - got).abs() < 1e-6, "{block} vs {got}");
            // Its latent (channel colour x 4 + row parity x 2 + column parity) is the mean
            // times SCALE.
            let latent = z
                .i((b, ch * 4 + (by % 2) * 2 + bx % 2, by / 2, bx / 2))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let want = block * SCALE as f32;
            assert!((latent - want).abs() < 1e-5, "{latent} vs {want}");
        }
        // And encoding the decoded image gives the latents back.
        let again = encode(&y).unwrap();
        let d = (again - &z).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn sizes_that_are_not_multiples_of_8_are_refused() {
        let x = Tensor::zeros((1, 3, 12, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(encode(&x).is_err());
    }
}
