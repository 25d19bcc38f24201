//! `datasets synth`: multi-subject scenes with exact correspondences and masks.
//!
//! A subject is a shape (square, disc, diamond, ring), a colour (8) and a pattern (plain,
//! striped, checked, two-tone): 128 identities, each named in words ("teal striped disc").
//! A quarter of them (one pattern per colour and shape) form the held-out split: training
//! scenes never show them, so validation on them tests subjects never seen, named by words
//! that were. Each sample pastes 1 to `max_refs` subjects of distinct colours at known places
//! and sizes into a target over a gradient background; reference k shows subject k alone on a
//! plain background at another place and size, with its mask. A correspondence is a reference
//! pixel on the subject and the target pixel with the same subject-local coordinates, kept
//! where subject k is the visible one there, so points and masks are exact. The caption names
//! the subjects. Images are PNG, JPEG or lossless WebP so all three decoders are exercised.
//! The same (options, seed) always gives the same bytes.

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
    /// Which subjects the scenes show: the training ones or the held-out ones.
    pub split: Split,
}

/// The subjects a dataset's scenes show (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Split {
    #[default]
    Train,
    HeldOut,
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
            split: Split::Train,
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

/// The shapes' names, indexed by `Identity::shape` (geometry: [`inside`]).
pub const SHAPES: [&str; 4] = ["square", "disc", "diamond", "ring"];
/// The colours' names and RGB (0-255) before shading, indexed by `Identity::colour`.
pub const COLOURS: [(&str, [f32; 3]); 8] = [
    ("red", [210.0, 40.0, 40.0]),
    ("green", [40.0, 180.0, 60.0]),
    ("blue", [40.0, 70.0, 210.0]),
    ("yellow", [230.0, 210.0, 40.0]),
    ("purple", [140.0, 50.0, 170.0]),
    ("orange", [240.0, 140.0, 30.0]),
    ("teal", [30.0, 160.0, 160.0]),
    ("pink", [240.0, 120.0, 180.0]),
];
/// Patterns: the subject's colour alternates with a light version of it ("" is plain).
pub const PATTERNS: [&str; 4] = ["", "striped", "checked", "two-tone"];

/// A subject's identity: shape, colour and pattern (indices into the tables above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub shape: usize,
    pub colour: usize,
    pub pattern: usize,
}

impl Identity {
    /// Every identity, in a fixed order.
    pub fn all() -> impl Iterator<Item = Identity> {
        (0..PATTERNS.len()).flat_map(|pattern| {
            (0..COLOURS.len()).flat_map(move |colour| {
                (0..SHAPES.len()).map(move |shape| Identity {
                    shape,
                    colour,
                    pattern,
                })
            })
        })
    }

    /// The split this identity belongs to: for each (colour, shape) exactly one of the four
    /// patterns is held out, so every word and every pair of words occurs in training.
    pub fn split(&self) -> Split {
        if (self.colour + 2 * self.shape + 3 * self.pattern) % 4 == 3 {
            Split::HeldOut
        } else {
            Split::Train
        }
    }

    /// "teal striped disc", "red square".
    pub fn name(&self) -> String {
        let colour = COLOURS[self.colour].0;
        let shape = SHAPES[self.shape];
        match PATTERNS[self.pattern] {
            "" => format!("{colour} {shape}"),
            pattern => format!("{colour} {pattern} {shape}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Subject {
    id: Identity,
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

/// Whether subject-local (u, v) (the subject's square is [0, 1) x [0, 1)) is on shape
/// `shape`: the whole square, the inscribed disc, the inscribed diamond, or the disc less a
/// hole of 0.4 of its diameter (ring).
pub fn inside(shape: usize, u: f32, v: f32) -> bool {
    if !(0.0..1.0).contains(&u) || !(0.0..1.0).contains(&v) {
        return false;
    }
    let (du, dv) = (u - 0.5, v - 0.5);
    match shape {
        0 => true,
        1 => du * du + dv * dv <= 0.25,
        2 => du.abs() + dv.abs() <= 0.5,
        _ => (0.04..=0.25).contains(&(du * du + dv * dv)),
    }
}

/// Brightness at subject-local height v: shading from top to bottom shows orientation.
fn shade(v: f32) -> f32 {
    0.8 + 0.3 * v
}

/// The mean RGB (0-255) of a plain subject of colour `colour` (its shading is symmetric about
/// the middle row).
pub fn mean_plain_rgb(colour: usize) -> [f32; 3] {
    COLOURS[colour % COLOURS.len()].1.map(|c| c * shade(0.5))
}

/// The colour of subject `id` at subject-local (u, v): its pattern in its colour and a light
/// version of it, shaded from top to bottom so that orientation shows.
fn colour(id: Identity, u: f32, v: f32) -> [u8; 3] {
    let base = COLOURS[id.colour].1;
    let cell = |x: f32| (x * 4.0).floor() as i32;
    let light = match PATTERNS[id.pattern] {
        "striped" => cell(u) % 2 == 1,
        "checked" => (cell(u) + cell(v)) % 2 == 1,
        "two-tone" => v >= 0.5,
        _ => false,
    };
    let shade = shade(v);
    [0, 1, 2].map(|c| {
        let b = if light {
            0.45 * base[c] + 0.55 * 255.0
        } else {
            base[c]
        };
        (b * shade).clamp(0.0, 255.0) as u8
    })
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
            if inside(s.id.shape, u, v) {
                top = Some((i, u, v));
            }
        }
        p.0 = match top {
            Some((i, u, v)) => {
                label[(y * w + x) as usize] = Some(i);
                colour(subjects[i].id, u, v)
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

/// `k` identities of `split` with distinct colours, drawn from `rng`.
fn identities(split: Split, k: usize, rng: &mut impl Rng) -> Vec<Identity> {
    let mut pool: Vec<Identity> = Identity::all().filter(|i| i.split() == split).collect();
    let mut out: Vec<Identity> = Vec::with_capacity(k);
    while out.len() < k && !pool.is_empty() {
        let id = pool.swap_remove(rng.random_range(0..pool.len()));
        pool.retain(|p| p.colour != id.colour);
        out.push(id);
    }
    out
}

/// Sample `index` of the synthetic dataset.
pub fn sample(opts: &SynthOptions, index: usize) -> RawSample {
    let stream = match opts.split {
        Split::Train => 0x5e17,
        Split::HeldOut => 0x4e1d,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(mix(opts.seed, &[stream, index as u64]));
    let (w, h) = (opts.size, opts.size);
    let lo = opts.min_refs.clamp(1, 6);
    let k = rng.random_range(lo..=opts.max_refs.clamp(lo, 6));
    let subjects: Vec<Subject> = identities(opts.split, k, &mut rng)
        .into_iter()
        .map(|id| {
            let size = rng.random_range(0.3..0.55) * w as f32;
            Subject {
                id,
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
            id: s.id,
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
            label: Some(s.id.name()),
        });
        correspondences.push(RawCorrespondence {
            reference: i as u8,
            points,
        });
    }
    let names: Vec<String> = subjects.iter().map(|s| s.id.name()).collect();
    let split = match opts.split {
        Split::Train => "",
        Split::HeldOut => "heldout-",
    };
    RawSample {
        sample_id: format!("synth-{split}{:08x}-{index:07}", opts.seed as u32),
        caption: names.join(", "),
        target: encode(&stretched(target, opts, index), index),
        refs,
        correspondences,
        category: Some("synthetic".into()),
        quality: None,
        source: Some(format!("datasets synth --seed {}", opts.seed)),
    }
}

/// Samples drawn at once on rayon's threads before the writer takes them in order: enough to
/// keep every core busy, few enough (a few MB) not to matter in memory.
const DRAW_CHUNK: usize = 512;

/// Writes samples 0..opts.samples as a dataset at `loc`. Each sample depends only on (options,
/// seed, index), so they are drawn in parallel (rayon's pool) and written in index order: the
/// bytes are those of a sequential loop whatever the number of threads (test).
pub fn write_dataset(
    loc: crate::store::Location,
    opts: &SynthOptions,
    wopts: crate::writer::WriterOptions,
) -> crate::error::Result<crate::manifest::Manifest> {
    use rayon::prelude::*;
    let mut w = crate::writer::ShardWriter::new(loc, wopts)?;
    for start in (0..opts.samples).step_by(DRAW_CHUNK) {
        let end = (start + DRAW_CHUNK).min(opts.samples);
        let drawn: Vec<RawSample> = (start..end)
            .into_par_iter()
            .map(|i| sample(opts, i))
            .collect();
        for s in drawn {
            w.add(s)?;
        }
    }
    w.finish()
}

/// Folder of a synthetic dataset that holds its validation cases.
pub const VALIDATION_DIR: &str = "validation";
/// Folder of a synthetic dataset that holds its held-out scenes, as a dataset of their own.
pub const HELDOUT_DIR: &str = "heldout";

/// Writes `n` validation cases next to the dataset at `loc`: held-out scenes `0..n` (subjects
/// training never shows; the first scenes of the held-out dataset), as
/// `validation/cases.json` in the official case-list format
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
    let heldout = SynthOptions {
        split: Split::HeldOut,
        ..opts.clone()
    };
    let mut cases = Vec::with_capacity(n);
    for index in 0..n {
        let s = sample(&heldout, index);
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
    fn the_dataset_written_is_the_samples_in_order_whatever_the_threads() {
        // More samples than one draw chunk, so the chunks' seams are crossed too.
        let opts = SynthOptions {
            samples: DRAW_CHUNK + 37,
            size: 32,
            ref_size: 32,
            ..Default::default()
        };
        let wopts = crate::writer::WriterOptions {
            rows_per_shard: 200,
            row_group_rows: 50,
            ..Default::default()
        };
        // The manifest holds every shard's and row group's sha256: equal manifests are equal
        // bytes.
        let written = |write: &dyn Fn(crate::store::Location) -> crate::manifest::Manifest| {
            let tmp = tempfile::tempdir().unwrap();
            write(crate::store::Location::local(tmp.path()))
        };
        // The reference: one sample after the other, as the writer takes them.
        let sequential = written(&|loc| {
            let mut w = crate::writer::ShardWriter::new(loc, wopts.clone()).unwrap();
            for i in 0..opts.samples {
                w.add(sample(&opts, i)).unwrap();
            }
            w.finish().unwrap()
        });
        assert_eq!(sequential.shards.len(), 3);
        for threads in [1, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let parallel = written(&|loc| {
                pool.install(|| write_dataset(loc, &opts, wopts.clone()))
                    .unwrap()
            });
            assert_eq!(sequential, parallel, "differs with {threads} threads");
        }
    }

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
        let heldout = SynthOptions {
            split: Split::HeldOut,
            ..opts.clone()
        };
        for (i, c) in cases.iter().enumerate() {
            // The held-out split's scenes: subjects training never shows.
            assert_eq!(c["index"], i);
            assert_eq!(c["prompt"], sample(&heldout, i).caption);
            let refs = c["image_paths"].as_array().unwrap();
            assert_eq!(refs.len(), sample(&heldout, i).refs.len());
            for r in refs {
                let img = image::open(tmp.path().join("validation").join(r.as_str().unwrap()));
                assert!(img.is_ok(), "{r} is an image");
            }
        }
    }

    #[test]
    fn held_out_subjects_never_appear_in_training_but_their_words_do() {
        let all: Vec<Identity> = Identity::all().collect();
        assert_eq!(all.len(), 128);
        let held: Vec<&Identity> = all.iter().filter(|i| i.split() == Split::HeldOut).collect();
        assert_eq!(held.len(), 32);
        // Every (colour, shape) pair keeps three of its four patterns for training.
        for c in 0..COLOURS.len() {
            for sh in 0..SHAPES.len() {
                let n = held
                    .iter()
                    .filter(|i| i.colour == c && i.shape == sh)
                    .count();
                assert_eq!(n, 1, "colour {c} shape {sh}");
            }
        }
        let names = |split: Split| {
            let opts = SynthOptions {
                samples: 40,
                size: 64,
                ref_size: 48,
                split,
                ..Default::default()
            };
            (0..40)
                .flat_map(|i| sample(&opts, i).refs)
                .filter_map(|r| r.label)
                .collect::<std::collections::BTreeSet<String>>()
        };
        let (train, heldout) = (names(Split::Train), names(Split::HeldOut));
        assert!(train.is_disjoint(&heldout), "{train:?} vs {heldout:?}");
        let held_names: std::collections::BTreeSet<String> =
            held.iter().map(|i| i.name()).collect();
        assert!(heldout.is_subset(&held_names));
        let words = |set: &std::collections::BTreeSet<String>| {
            set.iter()
                .flat_map(|n| n.split(' ').map(str::to_string).collect::<Vec<_>>())
                .collect::<std::collections::BTreeSet<String>>()
        };
        assert!(words(&heldout).is_subset(&words(&train)));
    }

    #[test]
    fn captions_name_the_subjects_and_colours_are_distinct() {
        let opts = SynthOptions {
            samples: 20,
            max_refs: 4,
            size: 64,
            ref_size: 48,
            ..Default::default()
        };
        for i in 0..20 {
            let s = sample(&opts, i);
            let names: Vec<String> = s.refs.iter().filter_map(|r| r.label.clone()).collect();
            assert_eq!(s.caption, names.join(", "));
            let colours: std::collections::BTreeSet<&str> =
                names.iter().filter_map(|n| n.split(' ').next()).collect();
            assert_eq!(colours.len(), names.len(), "{names:?}");
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
