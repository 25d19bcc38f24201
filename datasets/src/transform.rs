//! From a stored row to training inputs: decode the images (PNG, JPEG, WebP), bring the target
//! to the training resolution (resize the short side, centre crop), prepare each reference the
//! way the official inference does (white background through the mask, crop to the mask's box,
//! scale to 0.9 of the canvas, centred; without a mask, like the target), move every
//! correspondence through the same crops and resizes, and map it to token indices
//! (design.md §2), one per reference token.

use image::imageops::FilterType;
use image::{GrayImage, RgbImage};

use crate::error::SampleProblem;
use crate::schema::RawSample;
use crate::tokens::{map_points_to_tokens, Point4, TokenGrid, TokenPair};

/// Share of the reference canvas the subject's box is scaled to (official inference: 0.9).
pub const REF_SCALE: f32 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformSpec {
    /// Target side in pixels (a multiple of 16).
    pub resolution: usize,
    /// Reference side in pixels (a multiple of 16).
    pub ref_resolution: usize,
    /// Targets go to the aspect bucket of `resolution`'s area nearest their own aspect
    /// (`buckets`) instead of a resolution x resolution square.
    pub aspect_buckets: bool,
}

impl TransformSpec {
    /// The (width, height) a `width` x `height` target is brought to.
    pub fn target_size(&self, width: u32, height: u32) -> (usize, usize) {
        let square = (self.resolution, self.resolution);
        if self.aspect_buckets {
            crate::buckets::pick(self.resolution, width, height).unwrap_or(square)
        } else {
            square
        }
    }
}

/// An image as f32 CHW in [-1, 1] (the encoders' input).
pub use flux::encoders::Pixels;

#[derive(Debug, Clone, PartialEq)]
pub struct DecodedRef {
    pub pixels: Pixels,
    pub grid: TokenGrid,
    pub pairs: Vec<TokenPair>,
    /// The correspondences after the transforms (normalised), before the token mapping.
    pub points: Vec<Point4>,
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub sample_id: String,
    pub caption: String,
    pub target: Pixels,
    pub grid: TokenGrid,
    pub refs: Vec<DecodedRef>,
}

/// A map of normalised source coordinates to normalised output coordinates.
#[derive(Debug, Clone, Copy)]
struct Affine {
    /// output_px = (src_px - origin) * scale + offset, per axis.
    src_w: f32,
    src_h: f32,
    origin: (f32, f32),
    scale: (f32, f32),
    offset: (f32, f32),
    /// Output width and height in pixels.
    out: (f32, f32),
}

impl Affine {
    /// Normalised (x, y) in the source to normalised output coordinates; None when cropped out.
    fn apply(&self, x: f32, y: f32) -> Option<(f32, f32)> {
        let ox = ((x * self.src_w - self.origin.0) * self.scale.0 + self.offset.0) / self.out.0;
        let oy = ((y * self.src_h - self.origin.1) * self.scale.1 + self.offset.1) / self.out.1;
        ((0.0..=1.0).contains(&ox) && (0.0..=1.0).contains(&oy)).then_some((ox, oy))
    }
}

/// [width, height] of an encoded image, from its header only.
pub fn image_size(bytes: &[u8]) -> Option<[u32; 2]> {
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()?;
    Some([w, h])
}

/// Decodes PNG, JPEG or WebP (told apart by their bytes), naming `what` on failure.
fn decode_image(bytes: &[u8], what: &str) -> Result<image::DynamicImage, SampleProblem> {
    image::load_from_memory(bytes).map_err(|e| SampleProblem::Image {
        image: what.to_string(),
        reason: e.to_string(),
    })
}

fn decode_rgb(bytes: &[u8], what: &str) -> Result<RgbImage, SampleProblem> {
    decode_image(bytes, what).map(|i| i.to_rgb8())
}

fn decode_mask(bytes: &[u8], what: &str) -> Result<GrayImage, SampleProblem> {
    decode_image(bytes, what).map(|i| i.to_luma8())
}

fn nonempty(img: &RgbImage, what: &str) -> Result<(), SampleProblem> {
    if img.width() == 0 || img.height() == 0 {
        return Err(SampleProblem::Image {
            image: what.to_string(),
            reason: "has no pixels".into(),
        });
    }
    Ok(())
}

/// Resize to cover `out_w` x `out_h` (keeping the aspect ratio), then centre crop to it.
fn cover(img: &RgbImage, out_w: usize, out_h: usize) -> (RgbImage, Affine) {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let s = (out_w as f32 / w).max(out_h as f32 / h);
    let (nw, nh) = (
        ((w * s).round() as u32).max(out_w as u32),
        ((h * s).round() as u32).max(out_h as u32),
    );
    let resized = image::imageops::resize(img, nw, nh, FilterType::Triangle);
    let (cx, cy) = ((nw - out_w as u32) / 2, (nh - out_h as u32) / 2);
    let out = image::imageops::crop_imm(&resized, cx, cy, out_w as u32, out_h as u32).to_image();
    let aff = Affine {
        src_w: w,
        src_h: h,
        origin: (0.0, 0.0),
        scale: (nw as f32 / w, nh as f32 / h),
        offset: (-(cx as f32), -(cy as f32)),
        out: (out_w as f32, out_h as f32),
    };
    (out, aff)
}

/// Resize so the short side is `side`, then centre crop to side x side.
fn cover_square(img: &RgbImage, side: usize) -> (RgbImage, Affine) {
    cover(img, side, side)
}

/// The official reference preparation with a mask: background to white, crop to the mask's
/// box, fit into REF_SCALE of a white side x side canvas, centred.
fn masked_reference(
    img: &RgbImage,
    mask: &GrayImage,
    side: usize,
    what: &str,
) -> Result<(RgbImage, Affine), SampleProblem> {
    let (w, h) = img.dimensions();
    let mask = if mask.dimensions() == (w, h) {
        mask.clone()
    } else {
        image::imageops::resize(mask, w, h, FilterType::Nearest)
    };
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
    let mut white = img.clone();
    for (x, y, p) in white.enumerate_pixels_mut() {
        if mask.get_pixel(x, y).0[0] > 127 {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        } else {
            p.0 = [255, 255, 255];
        }
    }
    if x1 == 0 {
        return Err(SampleProblem::Invalid {
            what: format!("{what} mask"),
            reason: "is empty (no pixel above 127)".into(),
        });
    }
    let (bw, bh) = (x1 - x0, y1 - y0);
    let crop = image::imageops::crop_imm(&white, x0, y0, bw, bh).to_image();
    let fit = REF_SCALE * side as f32 / bw.max(bh) as f32;
    let (nw, nh) = (
        ((bw as f32 * fit).round() as u32).clamp(1, side as u32),
        ((bh as f32 * fit).round() as u32).clamp(1, side as u32),
    );
    let resized = image::imageops::resize(&crop, nw, nh, FilterType::Triangle);
    let mut canvas = RgbImage::from_pixel(side as u32, side as u32, image::Rgb([255, 255, 255]));
    let (ox, oy) = ((side as u32 - nw) / 2, (side as u32 - nh) / 2);
    image::imageops::replace(&mut canvas, &resized, ox as i64, oy as i64);
    let aff = Affine {
        src_w: w as f32,
        src_h: h as f32,
        origin: (x0 as f32, y0 as f32),
        scale: (nw as f32 / bw as f32, nh as f32 / bh as f32),
        offset: (ox as f32, oy as f32),
        out: (side as f32, side as f32),
    };
    Ok((canvas, aff))
}

/// RGB8 to CHW f32 in [-1, 1].
pub fn to_pixels(img: &RgbImage) -> Pixels {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            data[c * w * h + y as usize * w + x as usize] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Pixels {
        height: h,
        width: w,
        data,
    }
}

/// Decodes and transforms one (checked) sample.
pub fn decode_sample(raw: &RawSample, spec: &TransformSpec) -> Result<Decoded, SampleProblem> {
    let target = decode_rgb(&raw.target, "target")?;
    nonempty(&target, "target")?;
    let (tw, th) = spec.target_size(target.width(), target.height());
    let (target, tgt_aff) = cover(&target, tw, th);
    let grid = TokenGrid::for_pixels(th, tw);
    let ref_grid = TokenGrid::for_pixels(spec.ref_resolution, spec.ref_resolution);
    let mut refs = Vec::with_capacity(raw.refs.len());
    for (k, r) in raw.refs.iter().enumerate() {
        let what = format!("refs[{k}].image");
        let img = decode_rgb(&r.image, &what)?;
        nonempty(&img, &what)?;
        let (img, aff) = match &r.mask {
            Some(m) => {
                let mask = decode_mask(m, &format!("refs[{k}].mask"))?;
                masked_reference(&img, &mask, spec.ref_resolution, &format!("refs[{k}]"))?
            }
            None => cover_square(&img, spec.ref_resolution),
        };
        let points: Vec<Point4> = raw
            .points_of(k)
            .filter_map(|p| {
                let (rx, ry) = aff.apply(p[0], p[1])?;
                let (tx, ty) = tgt_aff.apply(p[2], p[3])?;
                Some([rx, ry, tx, ty])
            })
            .collect();
        let pairs =
            map_points_to_tokens(&points, ref_grid, grid).map_err(|e| SampleProblem::Invalid {
                what: format!("correspondences of reference {k}"),
                reason: e.to_string(),
            })?;
        refs.push(DecodedRef {
            pixels: to_pixels(&img),
            grid: ref_grid,
            pairs,
            points,
            label: r.label.clone(),
        });
    }
    Ok(Decoded {
        sample_id: raw.sample_id.clone(),
        caption: raw.caption.clone(),
        target: to_pixels(&target),
        grid,
        refs,
    })
}

/// Encodes an RGB image as PNG.
pub fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    // Writing PNG into memory cannot fail for an RGB8 buffer.
    let _ = img.write_to(&mut out, image::ImageFormat::Png);
    out.into_inner()
}

/// Encodes a mask as an 8-bit PNG.
pub fn png_mask(mask: &GrayImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let _ = mask.write_to(&mut out, image::ImageFormat::Png);
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{RawCorrespondence, RawRef};

    fn spec() -> TransformSpec {
        TransformSpec {
            resolution: 64,
            ref_resolution: 32,
            aspect_buckets: false,
        }
    }

    #[test]
    fn target_is_cropped_to_a_square_and_points_follow() {
        // 128 x 64 image: short side 64 stays, the centre 64 x 64 is kept (x from 32 to 96).
        let mut img = RgbImage::from_pixel(128, 64, image::Rgb([0, 0, 0]));
        img.put_pixel(40, 10, image::Rgb([255, 0, 0]));
        let (out, aff) = cover_square(&img, 64);
        assert_eq!(out.dimensions(), (64, 64));
        assert_eq!(out.get_pixel(8, 10).0[0], 255);
        let (x, y) = aff.apply(40.5 / 128.0, 10.5 / 64.0).unwrap();
        assert!((x * 64.0 - 8.5).abs() < 1e-4 && (y * 64.0 - 10.5).abs() < 1e-4);
        assert_eq!(aff.apply(0.1, 0.5), None, "left edge is cropped away");
    }

    #[test]
    fn masked_reference_is_white_boxed_scaled_and_centred() {
        let img = RgbImage::from_pixel(100, 50, image::Rgb([10, 20, 30]));
        let mut mask = GrayImage::new(100, 50);
        for y in 10..30 {
            for x in 20..60 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let (out, aff) = masked_reference(&img, &mask, 100, "r").unwrap();
        // Box 40 x 20 scaled to 90 x 45, centred: x 5..95, y 27..72 (rounded).
        assert_eq!(out.get_pixel(50, 50).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(2, 50).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(50, 10).0, [255, 255, 255]);
        let (x, y) = aff.apply(20.0 / 100.0, 10.0 / 50.0).unwrap();
        assert!((x * 100.0 - 5.0).abs() < 1e-3, "{x}");
        assert!((y * 100.0 - 27.0).abs() < 1e-3, "{y}");
        let (x, _) = aff.apply(60.0 / 100.0, 20.0 / 50.0).unwrap();
        assert!((x * 100.0 - 95.0).abs() < 1e-3, "{x}");
        let err = masked_reference(&img, &GrayImage::new(4, 4), 100, "refs[0]").unwrap_err();
        assert!(err.to_string().contains("refs[0] mask"), "{err}");
    }

    #[test]
    fn sample_decodes_with_token_pairs_and_bad_images_are_named() {
        let img = RgbImage::from_pixel(64, 64, image::Rgb([200, 100, 50]));
        let mut raw = RawSample {
            sample_id: "x".into(),
            caption: "c".into(),
            target: png(&img),
            refs: vec![RawRef {
                image: png(&img),
                mask: None,
                label: None,
            }],
            correspondences: vec![RawCorrespondence {
                reference: 0,
                points: vec![
                    [0.1, 0.1, 0.9, 0.9],
                    [0.11, 0.11, 0.5, 0.5],
                    [0.9, 0.9, 0.1, 0.1],
                ],
            }],
            ..Default::default()
        };
        let d = decode_sample(&raw, &spec()).unwrap();
        assert_eq!(d.target.data.len(), 3 * 64 * 64);
        assert!((d.target.data[0] - (200.0 / 127.5 - 1.0)).abs() < 1e-6);
        assert_eq!(d.refs[0].pixels.width, 32);
        // Two points land on the same reference token: one pair is kept.
        assert_eq!(d.refs[0].pairs.len(), 2);
        assert_eq!(d.refs[0].pairs[0].tgt_token as usize, 3 * 4 + 3);

        raw.refs[0].image.truncate(20);
        let err = decode_sample(&raw, &spec()).unwrap_err();
        assert_eq!(err.kind(), "bad-image");
        assert!(err.to_string().contains("refs[0].image"), "{err}");
        raw.target = b"GIF89a not an image format we read".to_vec();
        assert!(decode_sample(&raw, &spec())
            .unwrap_err()
            .to_string()
            .contains("target"));
    }
}
