//! Image preprocessing as transformers' image processors do it (the PIL ones): resize (the
//! shortest edge to a size, keeping the aspect, or to an exact size), centre crop, rescale to
//! [0, 1], normalise per channel. Read from the model folder's `preprocessor_config.json`.
//!
//! Resampling is the image crate's separable filters (bicubic a = -0.5 for PIL's BICUBIC,
//! triangle for BILINEAR, Lanczos3 for LANCZOS), which widen with the scale factor when
//! shrinking, as PIL's do; PIL rounds its intermediate pass to 8 bits and the image crate does
//! not, so pixel values may differ by about 1/255 before normalisation.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;

use crate::encoders::{EncodeError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resize {
    /// The shortest edge to this many pixels, the other as int(size x long / short).
    ShortestEdge(u32),
    /// Exactly (height, width).
    Exact(u32, u32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub resize: Option<Resize>,
    pub filter: FilterType,
    /// Centre crop (height, width).
    pub crop: Option<(u32, u32)>,
    pub rescale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImageProcessor {
    /// CLIP's processor (openai/clip-vit-*): shortest edge 224, centre crop 224, bicubic.
    pub fn clip_default() -> Self {
        Self {
            resize: Some(Resize::ShortestEdge(224)),
            filter: FilterType::CatmullRom,
            crop: Some((224, 224)),
            rescale: 1.0 / 255.0,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }

    /// ViT's processor (facebook/dino-vits16): 224 x 224, bilinear, ImageNet statistics.
    pub fn vit_default() -> Self {
        Self {
            resize: Some(Resize::Exact(224, 224)),
            filter: FilterType::Triangle,
            crop: None,
            rescale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    /// DINOv2's processor (facebook/dinov2-*, a BitImageProcessor): shortest edge 256,
    /// centre crop 224, bicubic, ImageNet statistics.
    pub fn dinov2_default() -> Self {
        Self {
            resize: Some(Resize::ShortestEdge(256)),
            filter: FilterType::CatmullRom,
            crop: Some((224, 224)),
            ..Self::vit_default()
        }
    }

    /// The processor `preprocessor_config.json` (at `path`, for messages) describes, with
    /// `base`'s values for what it leaves out.
    pub fn from_json(text: &str, path: &Path, base: Self) -> Result<Self> {
        let bad = |reason: String| EncodeError::file(path.display().to_string(), reason);
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(true);
        let num =
            |x: &serde_json::Value, k: &str| x.get(k).and_then(|n| n.as_u64()).map(|n| n as u32);
        let triple = |k: &str, d: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k) {
                None => Ok(d),
                Some(x) => {
                    let vals: Vec<f32> = x
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|n| n.as_f64())
                                .map(|n| n as f32)
                                .collect()
                        })
                        .unwrap_or_default();
                    <[f32; 3]>::try_from(vals.as_slice())
                        .map_err(|_| bad(format!("`{k}` must be three numbers")))
                }
            }
        };
        let resize = if !flag("do_resize") {
            None
        } else {
            match v.get("size") {
                None => base.resize,
                Some(s) if s.is_u64() => s.as_u64().map(|n| Resize::ShortestEdge(n as u32)),
                Some(s) => match (num(s, "shortest_edge"), num(s, "height"), num(s, "width")) {
                    (Some(e), _, _) => Some(Resize::ShortestEdge(e)),
                    (None, Some(h), Some(w)) => Some(Resize::Exact(h, w)),
                    _ => {
                        return Err(bad(format!(
                            "`size` {s}: expected shortest_edge or height and width"
                        )))
                    }
                },
            }
        };
        let do_crop = v
            .get("do_center_crop")
            .and_then(|x| x.as_bool())
            .unwrap_or(base.crop.is_some());
        let crop = if !do_crop {
            None
        } else {
            match v.get("crop_size") {
                None if base.crop.is_some() => base.crop,
                None => return Err(bad("do_center_crop without `crop_size`".into())),
                Some(c) if c.is_u64() => c.as_u64().map(|n| (n as u32, n as u32)),
                Some(c) => match (num(c, "height"), num(c, "width")) {
                    (Some(h), Some(w)) => Some((h, w)),
                    _ => return Err(bad(format!("`crop_size` {c}: expected height and width"))),
                },
            }
        };
        let filter = match v.get("resample").and_then(|r| r.as_u64()) {
            None => base.filter,
            Some(0) => FilterType::Nearest,
            Some(1) => FilterType::Lanczos3,
            Some(2) => FilterType::Triangle,
            Some(3) => FilterType::CatmullRom,
            Some(r) => {
                return Err(bad(format!(
                    "`resample` {r}: only 0-3 (nearest, lanczos, bilinear, bicubic)"
                )))
            }
        };
        let rescale = if flag("do_rescale") {
            v.get("rescale_factor")
                .and_then(|r| r.as_f64())
                .map_or(base.rescale, |r| r as f32)
        } else {
            1.0
        };
        let (mean, std) = if flag("do_normalize") {
            (
                triple("image_mean", base.mean)?,
                triple("image_std", base.std)?,
            )
        } else {
            ([0.0; 3], [1.0; 3])
        };
        Ok(Self {
            resize,
            filter,
            crop,
            rescale,
            mean,
            std,
        })
    }

    /// `img` as the model takes it: [3, H, W] f32 on `device`.
    pub fn pixels(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let (w, h) = img.dimensions();
        let resized = match self.resize {
            None => img.clone(),
            Some(Resize::Exact(rh, rw)) => image::imageops::resize(img, rw, rh, self.filter),
            Some(Resize::ShortestEdge(s)) => {
                let (short, long) = (w.min(h), w.max(h));
                let long_out = (s as u64 * long as u64 / short.max(1) as u64) as u32;
                let (ow, oh) = if w <= h { (s, long_out) } else { (long_out, s) };
                image::imageops::resize(img, ow, oh, self.filter)
            }
        };
        let (w, h) = resized.dimensions();
        let cropped = match self.crop {
            Some((ch, cw)) if ch <= h && cw <= w => {
                let (top, left) = ((h - ch) / 2, (w - cw) / 2);
                image::imageops::crop_imm(&resized, left, top, cw, ch).to_image()
            }
            Some((ch, cw)) => {
                return Err(EncodeError::file(
                    "image",
                    format!("{w}x{h} after resizing is smaller than the {cw}x{ch} crop"),
                ))
            }
            None => resized,
        };
        let (w, h) = cropped.dimensions();
        let plane = (w * h) as usize;
        let mut data = vec![0f32; 3 * plane];
        for (x, y, p) in cropped.enumerate_pixels() {
            let i = (y * w + x) as usize;
            for c in 0..3 {
                data[c * plane + i] = (p.0[c] as f32 * self.rescale - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (3, h as usize, w as usize), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_read_as_transformers_writes_them() {
        let clip = r#"{"crop_size": {"height": 32, "width": 32}, "do_center_crop": true,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 32}}"#;
        let p =
            ImageProcessor::from_json(clip, Path::new("c.json"), ImageProcessor::clip_default())
                .unwrap();
        assert_eq!(p.resize, Some(Resize::ShortestEdge(32)));
        assert_eq!(p.crop, Some((32, 32)));
        assert_eq!(p.mean, [0.5; 3]);
        let vit = r#"{"do_resize": true, "size": {"height": 32, "width": 40}, "resample": 2}"#;
        let p = ImageProcessor::from_json(vit, Path::new("v.json"), ImageProcessor::vit_default())
            .unwrap();
        assert_eq!(p.resize, Some(Resize::Exact(32, 40)));
        assert_eq!(p.crop, None);
        assert_eq!(p.filter, FilterType::Triangle);
        let e = ImageProcessor::from_json(
            r#"{"image_mean": [1, 2]}"#,
            Path::new("x.json"),
            ImageProcessor::vit_default(),
        )
        .unwrap_err();
        let e = crate::chain(&e);
        assert!(e.contains("image_mean"), "{e}");
    }

    #[test]
    fn shortest_edge_keeps_the_aspect_and_the_crop_is_centred() {
        // 40 x 20: the short edge to 10 makes 20 x 10; the centre crop of 10 x 10 starts at 5.
        let mut img = RgbImage::from_pixel(40, 20, image::Rgb([0, 0, 0]));
        for y in 0..20 {
            for x in 10..30 {
                img.put_pixel(x, y, image::Rgb([255, 255, 255]));
            }
        }
        let p = ImageProcessor {
            resize: Some(Resize::ShortestEdge(10)),
            filter: FilterType::Nearest,
            crop: Some((10, 10)),
            rescale: 1.0 / 255.0,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let t = p.pixels(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), [3, 10, 10]);
        // The middle half of the image is white: all of the crop.
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|&x| x == 1.0));
    }
}
