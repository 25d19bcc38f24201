//! `datasets synth`: multi-subject scenes with exact correspondences and masks.
//!
//! Each sample pastes 1 to `max_refs` subjects (squares, discs, diamonds and rings with a
//! per-kind colour, gradient and stripes, some mirrored) at known places and sizes into a target
//! over a gradient background; reference k shows subject k alone on a plain background at
//! another place and size, with its mask. A correspondence is a reference pixel on the subject
//! and the target pixel with the same subject-local coordinates, kept where subject k is the
//! visible one there, so points and masks are exact. Images are PNG, JPEG or lossless WebP so
//! all three decoders are exercised. The same (options, seed) always gives the same bytes.

use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::plan::mix;
use crate::schema::{RawCorrespondence, RawRef, RawSample};
use crate::transform::{png, png_mask};

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub samples: usize,
    pub min_refs: usize,
    pub max_refs: usize,
    pub seed: u64,
    /// Target side in pixels.
    pub size: u32,
    /// Reference side in pixels (references are size x size*3/4 or the transpose).
    pub ref_size: u32,
    /// Reference pixels between sampled correspondence points.
    pub point_stride: u32,
    /// Targets of varied aspect ratios (1:2 to 2:1, about `size` squared pixels) instead of
    /// squares: the scene is drawn square and stretched, so points and masks stay exact.
    pub aspects: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            samples: 64,
            min_refs: 1,
            max_refs: 3,
            seed: 0,
            size: 256,
            ref_size: 192,
            point_stride: 4,
            aspects: false,
        }
    }
}

/// Target aspect ratios (width : height) of `SynthOptions::aspects`.
const ASPECTS: [(u32, u32); 9] = [
    (1, 1),
    (4, 3),
    (3, 4),
    (3, 2),
    (2, 3),
    (16, 9),
    (9, 16),
    (2, 1),
    (1, 2),
];

/// The target stretched to one of `ASPECTS` (drawn from its own stream, so square datasets do
/// not change); normalised correspondences hold through a stretch.
fn stretched(target: RgbImage, opts: &SynthOptions, index: usize) -> RgbImage {
    if !opts.aspects {
        return target;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(mix(opts.seed, &[0xa5ec7, index as u64]));
    let (a, b) = ASPECTS[rng.random_range(0..ASPECTS.len())];
    let ratio = (a as f32 / b as f32).sqrt();
    let side = opts.size as f32;
    let (w, h) = (
        ((side * ratio).round() as u32).max(1),
        ((side / ratio).round() as u32).max(1),
    );
    image::imageops::resize(&target, w, h, image::imageops::FilterType::Triangle)
}

const KIND_NAMES: [&str; 8] = [
    "red square",
    "green disc",
    "blue diamond",
    "yellow ring",
    "purple square",
    "orange disc",
    "teal diamond",
    "pink ring",
];
const KIND_COLOURS: [[f32; 3]; 8] = [
    [210.0, 40.0, 40.0],
    [40.0, 180.0, 60.0],
    [40.0, 70.0, 210.0],
    [230.0, 210.0, 40.0],
    [140.0, 50.0, 170.0],
    [240.0, 140.0, 30.0],
    [30.0, 160.0, 160.0],
    [240.0, 120.0, 180.0],
];

#[derive(Debug, Clone, Copy)]
struct Subject {
    kind: usize,
    x: f32,
    y: f32,
    size: f32,
    mirrored: bool,
}

impl Subject {
    /// Subject-local (u, v) of pixel centre (px, py); u is mirrored for mirrored subjects so the
    /// texture follows the subject.
    fn local(&self, px: f32, py: f32) -> (f32, f32) {
        let u = (px - self.x) / self.size;
        let v = (py - self.y) / self.size;
        (if self.mirrored { 1.0 - u } else { u }, v)
    }

    fn pixel_at(&self, u: f32, v: f32) -> (f32, f32) {
        let u = if self.mirrored { 1.0 - u } else { u };
        (self.x + u * self.size, self.y + v * self.size)
    }
}

fn inside(kind: usize, u: f32, v: f32) -> bool {
    if !(0.0..1.0).contains(&u) || !(0.0..1.0).contains(&v) {
        return false;
    }
    let (du, dv) = (u - 0.5, v - 0.5);
    match kind % 4 {
        0 => true,
        1 => du * du + dv * dv <= 0.25,
        2 => du.abs() + dv.abs() <= 0.5,
        _ => (0.04..=0.25).contains(&(du * du + dv * dv)),
    }
}

fn colour(kind: usize, u: f32, v: f32) -> [u8; 3] {
    let base = KIND_COLOURS[kind];
    let stripe = if ((u * 4.0).floor() as i32) % 2 == 0 {
        1.0
    } else {
        0.8
    };
    let shade = 0.75 + 0.35 * v;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = (base[c] * stripe * shade + 25.0 * u).clamp(0.0, 255.0) as u8;
    }
    out
}

/// Renders subjects over `bg`; returns the image and, per pixel, the visible subject.
fn render(
    w: u32,
    h: u32,
    subjects: &[Subject],
    bg: impl Fn(u32, u32) -> [u8; 3],
) -> (RgbImage, Vec<Option<usize>>) {
    let mut img = RgbImage::new(w, h);
    let mut label = vec![None; (w * h) as usize];
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
        let mut top = None;
        for (i, s) in subjects.iter().enumerate() {
            let (u, v) = s.local(cx, cy);
            if inside(s.kind, u, v) {
                top = Some((i, u, v));
            }
        }
        p.0 = match top {
            Some((i, u, v)) => {
                label[(y * w + x) as usize] = Some(i);
                colour(subjects[i].kind, u, v)
            }
            None => bg(x, y),
        };
    }
    (img, label)
}

fn encode(img: &RgbImage, format: usize) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let written = match format % 3 {
        1 => img.write_to(&mut out, image::ImageFormat::Jpeg),
        2 => image::DynamicImage::ImageRgb8(img.clone())
            .write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut out)),
        _ => return png(img),
    };
    match written {
        Ok(()) => out.into_inner(),
        Err(_) => png(img),
    }
}

/// Sample `index` of the synthetic dataset.
pub fn sample(opts: &SynthOptions, index: usize) -> RawSample {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(opts.seed, &[0x5e17, index as u64]));
    let (w, h) = (opts.size, opts.size);
    let lo = opts.min_refs.clamp(1, 6);
    let k = rng.random_range(lo..=opts.max_refs.clamp(lo, 6));
    let mut kinds: Vec<usize> = (0..KIND_NAMES.len()).collect();
    for i in 0..kinds.len() {
        let j = rng.random_range(i..kinds.len());
        kinds.swap(i, j);
    }
    let subjects: Vec<Subject> = kinds[..k]
        .iter()
        .map(|&kind| {
            let size = rng.random_range(0.3..0.55) * w as f32;
            Subject {
                kind,
                x: rng.random_range(0.0..(w as f32 - size)),
                y: rng.random_range(0.0..(h as f32 - size)),
                size,
                mirrored: rng.random_bool(0.3),
            }
        })
        .collect();
    let (g0, g1): ([f32; 3], [f32; 3]) = (
        [0, 1, 2].map(|_| rng.random_range(60.0..200.0)),
        [0, 1, 2].map(|_| rng.random_range(60.0..200.0)),
    );
    let (target, label) = render(w, h, &subjects, |x, y| {
        let t = (x + y) as f32 / (w + h) as f32;
        [0, 1, 2].map(|c| (g0[c] * (1.0 - t) + g1[c] * t) as u8)
    });

    let mut refs = Vec::with_capacity(k);
    let mut correspondences = Vec::with_capacity(k);
    for (i, s) in subjects.iter().enumerate() {
        let (rw, rh) = if rng.random_bool(0.5) {
            (opts.ref_size, opts.ref_size * 3 / 4)
        } else {
            (opts.ref_size * 3 / 4, opts.ref_size)
        };
        let size = rng.random_range(0.5..0.85) * rw.min(rh) as f32;
        let placed = Subject {
            kind: s.kind,
            x: rng.random_range(0.0..(rw as f32 - size)),
            y: rng.random_range(0.0..(rh as f32 - size)),
            size,
            mirrored: s.mirrored,
        };
        let bg = [0, 1, 2].map(|_| rng.random_range(0..255u8));
        let (img, ref_label) = render(rw, rh, &[placed], |_, _| bg);
        let mut mask = GrayImage::new(rw, rh);
        for (x, y, p) in mask.enumerate_pixels_mut() {
            p.0[0] = if ref_label[(y * rw + x) as usize].is_some() {
                255
            } else {
                0
            };
        }
        let mut points = Vec::new();
        let stride = opts.point_stride.max(1);
        for ry in (0..rh).step_by(stride as usize) {
            for rx in (0..rw).step_by(stride as usize) {
                if ref_label[(ry * rw + rx) as usize].is_none() {
                    continue;
                }
                let (u, v) = placed.local(rx as f32 + 0.5, ry as f32 + 0.5);
                let (tx, ty) = s.pixel_at(u, v);
                let (txi, tyi) = (tx.floor() as i64, ty.floor() as i64);
                if txi < 0 || tyi < 0 || txi >= w as i64 || tyi >= h as i64 {
                    continue;
                }
                if label[(tyi as u32 * w + txi as u32) as usize] == Some(i) {
                    points.push([
                        (rx as f32 + 0.5) / rw as f32,
                        (ry as f32 + 0.5) / rh as f32,
                        tx / w as f32,
                        ty / h as f32,
                    ]);
                }
            }
        }
        refs.push(RawRef {
            image: encode(&img, index + i + 1),
            mask: Some(png_mask(&mask)),
            label: Some(KIND_NAMES[s.kind].to_string()),
        });
        correspondences.push(RawCorrespondence {
            reference: i as u8,
            points,
        });
    }
    let names: Vec<&str> = subjects.iter().map(|s| KIND_NAMES[s.kind]).collect();
    RawSample {
        sample_id: format!("synth-{:08x}-{index:07}", opts.seed as u32),
        caption: format!("a photo of a {}", names.join(" and a ")),
        target: encode(&stretched(target, opts, index), index),
        refs,
        correspondences,
        category: Some("synthetic".into()),
        quality: None,
        source: Some(format!("datasets synth --seed {}", opts.seed)),
    }
}

/// Writes samples 0..opts.samples as a dataset at `loc`.
pub fn write_dataset(
    loc: crate::store::Location,
    opts: &SynthOptions,
    wopts: crate::writer::WriterOptions,
) -> crate::error::Result<crate::manifest::Manifest> {
    let mut w = crate::writer::ShardWriter::new(loc, wopts)?;
    for i in 0..opts.samples {
        w.add(sample(opts, i))?;
    }
    w.finish()
}

/// Folder of a synthetic dataset that holds its validation cases.
pub const VALIDATION_DIR: &str = "validation";

/// Writes `n` validation cases next to the dataset at `loc`: scenes `opts.samples..+n`, which
/// training never reads, as `validation/cases.json` in the official case-list format
/// (`[{"index", "prompt", "image_paths"}]`, paths relative to that file) with each reference
/// as `<index>-ref<k>.png` and the scene itself as `<index>-target.png` (`target_path`).
/// Returns the path of `cases.json` as `loc` names it.
pub fn write_validation_cases(
    loc: &crate::store::Location,
    opts: &SynthOptions,
    n: usize,
) -> crate::error::Result<String> {
    let decode = |bytes: &[u8], what: &str| {
        image::load_from_memory(bytes)
            .map(|i| i.to_rgb8())
            .map_err(|e| crate::error::DataError::input(format!("synthetic {what}"), e))
    };
    let mut cases = Vec::with_capacity(n);
    for i in 0..n {
        let index = opts.samples + i;
        let s = sample(opts, index);
        let mut paths = Vec::with_capacity(s.refs.len());
        for (k, r) in s.refs.iter().enumerate() {
            let name = format!("{index}-ref{k}.png");
            let img = decode(&r.image, "reference")?;
            loc.put(&format!("{VALIDATION_DIR}/{name}"), png(&img))?;
            paths.push(name);
        }
        let target = format!("{index}-target.png");
        loc.put(
            &format!("{VALIDATION_DIR}/{target}"),
            png(&decode(&s.target, "target")?),
        )?;
        cases.push(serde_json::json!({
            "index": index,
            "prompt": s.caption,
            "image_paths": paths,
            "target_path": target,
        }));
    }
    let rel = format!("{VALIDATION_DIR}/cases.json");
    let text = serde_json::to_vec_pretty(&cases)
        .map_err(|e| crate::error::DataError::input(loc.name(&rel), e))?;
    loc.put(&rel, text)?;
    Ok(loc.name(&rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::{decode_sample, TransformSpec};

    #[test]
    fn validation_cases_are_unseen_scenes_in_the_official_format() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = crate::store::Location::local(tmp.path());
        let opts = SynthOptions {
            samples: 5,
            ..Default::default()
        };
        let path = write_validation_cases(&loc, &opts, 3).unwrap();
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(cases.len(), 3);
        for (i, c) in cases.iter().enumerate() {
            // Indices after the training samples: scenes training never reads.
            assert_eq!(c["index"], 5 + i);
            assert_eq!(c["prompt"], sample(&opts, 5 + i).caption);
            let refs = c["image_paths"].as_array().unwrap();
            assert_eq!(refs.len(), sample(&opts, 5 + i).refs.len());
            for r in refs {
                let img = image::open(tmp.path().join("validation").join(r.as_str().unwrap()));
                assert!(img.is_ok(), "{r} is an image");
            }
        }
    }

    #[test]
    fn samples_are_valid_deterministic_and_vary() {
        let opts = SynthOptions {
            samples: 8,
            max_refs: 6,
            size: 96,
            ref_size: 64,
            ..Default::default()
        };
        let a: Vec<_> = (0..8).map(|i| sample(&opts, i)).collect();
        for (i, s) in a.iter().enumerate() {
            assert_eq!(s.check(), Ok(()));
            assert_eq!(s, &sample(&opts, i));
            assert!(s.correspondences.iter().any(|c| !c.points.is_empty()));
        }
        let counts: std::collections::BTreeSet<usize> = a.iter().map(|s| s.refs.len()).collect();
        assert!(counts.len() > 1, "reference counts should vary: {counts:?}");
    }

    #[test]
    fn corresponding_points_show_the_same_colour_after_the_transforms() {
        for aspects in [false, true] {
            let opts = SynthOptions {
                samples: 6,
                max_refs: 3,
                size: 256,
                ref_size: 192,
                point_stride: 4,
                aspects,
                ..Default::default()
            };
            let spec = TransformSpec {
                resolution: 128,
                ref_resolution: 96,
                aspect_buckets: aspects,
            };
            let (mut agree, mut total) = (0, 0);
            let mut shapes = std::collections::BTreeSet::new();
            for i in 0..6 {
                let d = decode_sample(&sample(&opts, i), &spec).unwrap();
                shapes.insert((d.target.width, d.target.height));
                assert_eq!(
                    (d.grid.cols * 16, d.grid.rows * 16),
                    (d.target.width, d.target.height)
                );
                let at = |p: &crate::transform::Pixels, x: f32, y: f32| {
                    let x = ((x * p.width as f32) as usize).min(p.width - 1);
                    let y = ((y * p.height as f32) as usize).min(p.height - 1);
                    let hw = p.height * p.width;
                    [0, 1, 2].map(|c| p.data[c * hw + y * p.width + x])
                };
                for r in &d.refs {
                    assert!(!r.pairs.is_empty());
                    for p in &r.points {
                        let a = at(&r.pixels, p[0], p[1]);
                        let b = at(&d.target, p[2], p[3]);
                        let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum();
                        total += 1;
                        // Points on a stripe border or the subject's edge blur when resized
                        // (and JPEG blurs more); the rest must match.
                        if diff < 0.3 {
                            agree += 1;
                        }
                    }
                }
            }
            assert!(total > 200, "only {total} points");
            assert!(
                agree * 10 >= total * 8,
                "aspects {aspects}: {agree} of {total} corresponding points agree in colour"
            );
            assert_eq!(shapes.len() > 1, aspects, "target shapes {shapes:?}");
        }
    }
}
