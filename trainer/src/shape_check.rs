//! `trainer shapes`: does a base draw the tiny world's shapes? It samples "<colour> <shape>"
//! for every colour and shape of `datasets synth` (plain subjects, one per picture) from
//! pure noise and names the shape and colour each picture shows ([`crate::measures::shapes`]).
//! The same naming on the data's own one-subject scenes, through the same codec, is the
//! ceiling printed beside: what a base that draws the scenes exactly would score. Chance is
//! 1/4 for shapes and 1/8 for colours. design.md §14.

use std::path::Path;

use candle_core::Device;
use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::config::Config;
use crate::error::{Result, TrainerError};
use crate::measures::shapes::{find, Found};
use crate::sample::{SampleRequest, Sampler};
use datasets::synth::{Identity, Split, SynthOptions, COLOURS, SHAPES};

/// How the pictures are made.
#[derive(Debug, Clone)]
pub struct ShapeSpec {
    /// Seeds per prompt (1..=seeds).
    pub seeds: u64,
    pub steps: usize,
    pub guidance: f32,
    /// Classifier-free guidance against the empty caption (1: none).
    pub true_cfg: f32,
    /// Picture side in pixels.
    pub size: usize,
    /// One-subject scenes of the data's generator named for the ceiling.
    pub ceiling_scenes: usize,
}

/// One named picture.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeRow {
    pub prompt: String,
    pub seed: u64,
    /// What the prompt (or the scene's caption) asks for.
    pub shape: String,
    pub colour: String,
    /// Whether the prompt's identity is one training scenes never show (held out).
    pub held_out: bool,
    /// What the picture shows; `None` when no subject stands off the background.
    pub found_shape: Option<String>,
    pub found_colour: Option<String>,
    /// Best intersection over union of the asked-for shape, and of the best shape.
    pub iou_asked: f64,
    pub iou_best: f64,
    /// Subject pixels.
    pub area: usize,
}

/// Scores over a set of rows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShapeScores {
    pub pictures: usize,
    /// Pictures in which a subject was found.
    pub found: usize,
    /// Share of pictures whose best shape is the asked-for one (no subject counts as wrong).
    pub shape_accuracy: f64,
    /// Per asked-for shape, in `datasets::synth::SHAPES` order.
    pub shape_accuracy_by_shape: Vec<f64>,
    pub colour_accuracy: f64,
    /// Mean best intersection over union of the asked-for shape (0 without a subject).
    pub mean_iou_asked: f64,
    /// Counts: row = asked-for shape, column = found shape, then "none".
    pub confusion: Vec<Vec<usize>>,
}

/// What `trainer shapes` writes.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeReport {
    pub seeds: u64,
    pub steps: usize,
    pub guidance: f32,
    pub true_cfg: f32,
    pub size: usize,
    pub shape_chance: f64,
    pub colour_chance: f64,
    /// The base's pictures.
    pub base: ShapeScores,
    /// The base's pictures of identities training scenes show, and of held-out ones.
    pub base_train_identities: ShapeScores,
    pub base_held_out_identities: ShapeScores,
    /// The data's own one-subject scenes through the codec.
    pub ceiling: ShapeScores,
    pub rows: Vec<ShapeRow>,
    pub ceiling_rows: Vec<ShapeRow>,
}

fn bad(name: &str, reason: impl Into<String>) -> TrainerError {
    TrainerError::Input {
        name: name.into(),
        reason: reason.into(),
    }
}

impl ShapeSpec {
    fn check(&self) -> Result<()> {
        if self.seeds == 0 {
            return Err(bad("--seeds", "must be at least 1"));
        }
        if self.steps == 0 {
            return Err(bad("--steps", "must be at least 1"));
        }
        if self.size < 32 || !self.size.is_multiple_of(16) {
            return Err(bad(
                "--size",
                format!("{}: must be a multiple of 16, at least 32", self.size),
            ));
        }
        Ok(())
    }
}

/// A row for a picture asked to show `id`.
fn row(prompt: String, seed: u64, id: Identity, found: Option<&Found>) -> ShapeRow {
    ShapeRow {
        prompt,
        seed,
        shape: SHAPES[id.shape].into(),
        colour: COLOURS[id.colour].0.into(),
        held_out: id.split() == Split::HeldOut,
        found_shape: found.map(|f| SHAPES[f.shape].into()),
        found_colour: found.map(|f| COLOURS[f.colour].0.into()),
        iou_asked: found.map_or(0.0, |f| f.iou[id.shape]),
        iou_best: found.map_or(0.0, |f| f.iou[f.shape]),
        area: found.map_or(0, |f| f.area),
    }
}

/// Scores of `rows` (empty rows score 0).
pub fn scores<'a>(rows: impl IntoIterator<Item = &'a ShapeRow>) -> ShapeScores {
    let rows: Vec<&ShapeRow> = rows.into_iter().collect();
    let n = rows.len();
    let share = |k: usize, of: usize| if of == 0 { 0.0 } else { k as f64 / of as f64 };
    let index = |name: &str| SHAPES.iter().position(|s| *s == name);
    let mut confusion = vec![vec![0usize; SHAPES.len() + 1]; SHAPES.len()];
    for r in &rows {
        if let Some(asked) = index(&r.shape) {
            let got = r
                .found_shape
                .as_deref()
                .and_then(index)
                .unwrap_or(SHAPES.len());
            confusion[asked][got] += 1;
        }
    }
    let right = |r: &&&ShapeRow| r.found_shape.as_deref() == Some(r.shape.as_str());
    ShapeScores {
        pictures: n,
        found: rows.iter().filter(|r| r.found_shape.is_some()).count(),
        shape_accuracy: share(rows.iter().filter(right).count(), n),
        shape_accuracy_by_shape: confusion
            .iter()
            .enumerate()
            .map(|(s, counts)| share(counts[s], counts.iter().sum()))
            .collect(),
        colour_accuracy: share(
            rows.iter()
                .filter(|r| r.found_colour.as_deref() == Some(r.colour.as_str()))
                .count(),
            n,
        ),
        mean_iou_asked: if n == 0 {
            0.0
        } else {
            rows.iter().map(|r| r.iou_asked).sum::<f64>() / n as f64
        },
        confusion,
    }
}

/// Every plain (colour, shape) identity, colours outer.
fn plain_identities() -> Vec<Identity> {
    (0..COLOURS.len())
        .flat_map(|colour| {
            (0..SHAPES.len()).map(move |shape| Identity {
                shape,
                colour,
                pattern: 0,
            })
        })
        .collect()
}

/// The identity a one-subject synth caption names ("teal disc"), if plain.
fn plain_identity_of(caption: &str) -> Option<Identity> {
    let words: Vec<&str> = caption.split(' ').collect();
    let [colour, shape] = words[..] else {
        return None;
    };
    Some(Identity {
        colour: COLOURS.iter().position(|c| c.0 == colour)?,
        shape: SHAPES.iter().position(|s| *s == shape)?,
        pattern: 0,
    })
}

/// One of the data generator's one-subject scenes of a plain subject.
struct PlainScene {
    index: usize,
    caption: String,
    id: Identity,
    image: RgbImage,
}

/// The one-subject scenes among synth's samples `indices` (training split, seed 0, `size`
/// pixels) whose subject is plain, decoded.
fn plain_scenes(
    size: usize,
    indices: std::ops::Range<usize>,
) -> impl Iterator<Item = Result<PlainScene>> {
    let opts = SynthOptions {
        min_refs: 1,
        max_refs: 1,
        size: size as u32,
        ..Default::default()
    };
    indices.filter_map(move |index| {
        let s = datasets::synth::sample(&opts, index);
        let id = plain_identity_of(&s.caption)?;
        Some(
            image::load_from_memory(&s.target)
                .map_err(|e| bad("synth target", format!("{}: {e}", s.sample_id)))
                .map(|img| PlainScene {
                    index,
                    caption: s.caption,
                    id,
                    image: img.to_rgb8(),
                }),
        )
    })
}

/// The ceiling: the first `count` plain one-subject scenes, through the pipeline's codec,
/// named.
fn ceiling_rows(sampler: &Sampler, count: usize, size: usize) -> Result<Vec<ShapeRow>> {
    // A quarter of the training identities are plain; stop long after any plausible need.
    plain_scenes(size, 0..count.saturating_mul(64))
        .take(count)
        .map(|scene| {
            let scene = scene?;
            let seen = sampler.through_codec(&scene.image)?;
            Ok(row(
                scene.caption,
                scene.index as u64,
                scene.id,
                find(&seen).as_ref(),
            ))
        })
        .collect()
}

/// Per (shape, seed) a row of the colours' pictures, each framed green when its shape was
/// named right, red when wrong, grey without a subject.
fn sheet(pictures: &[(ShapeRow, RgbImage)], seeds: u64) -> RgbImage {
    let framed: Vec<RgbImage> = pictures
        .iter()
        .map(|(r, img)| {
            let colour = match &r.found_shape {
                None => Rgb([128, 128, 128]),
                Some(s) if *s == r.shape => Rgb([0, 200, 0]),
                Some(_) => Rgb([220, 0, 0]),
            };
            let mut img = img.clone();
            let (w, h) = img.dimensions();
            let edge = (w.min(h) / 32).max(1);
            for (x, y, p) in img.enumerate_pixels_mut() {
                if x < edge || y < edge || x + edge >= w || y + edge >= h {
                    *p = colour;
                }
            }
            img
        })
        .collect();
    let tile = framed.first().map_or(64, |i| i.height());
    let mut grid_rows = Vec::new();
    for shape in SHAPES {
        for seed in 1..=seeds {
            let samples: Vec<&RgbImage> = pictures
                .iter()
                .zip(&framed)
                .filter(|((r, _), _)| r.shape == shape && r.seed == seed)
                .map(|(_, img)| img)
                .collect();
            grid_rows.push(crate::validation::grid::GridRow { refs: &[], samples });
        }
    }
    crate::validation::grid::grid(&grid_rows, tile)
}

/// Samples every plain colour and shape with the base of `cfg` and names what each picture
/// shows; the report and the sheet (rows: shape then seed; columns: colours).
pub fn run(cfg: &Config, spec: &ShapeSpec, device: &Device) -> Result<(ShapeReport, RgbImage)> {
    spec.check()?;
    let mut sampler = Sampler::load(cfg, None, device)?;
    let mut pictures = Vec::new();
    for id in plain_identities() {
        let prompt = format!("{} {}", COLOURS[id.colour].0, SHAPES[id.shape]);
        for seed in 1..=spec.seeds {
            let req = SampleRequest {
                prompt: prompt.clone(),
                refs: Vec::new(),
                width: spec.size,
                height: spec.size,
                ref_size: spec.size,
                steps: spec.steps,
                guidance: spec.guidance,
                true_cfg: spec.true_cfg,
                negative_prompt: String::new(),
                seed,
                ref_cache: true,
                start: None,
                init: None,
            };
            let image = sampler.sample(&req)?.image;
            let r = row(prompt.clone(), seed, id, find(&image).as_ref());
            pictures.push((r, image));
        }
    }
    let rows: Vec<ShapeRow> = pictures.iter().map(|(r, _)| r.clone()).collect();
    let ceiling_rows = ceiling_rows(&sampler, spec.ceiling_scenes, spec.size)?;
    let report = ShapeReport {
        seeds: spec.seeds,
        steps: spec.steps,
        guidance: spec.guidance,
        true_cfg: spec.true_cfg,
        size: spec.size,
        shape_chance: 1.0 / SHAPES.len() as f64,
        colour_chance: 1.0 / COLOURS.len() as f64,
        base: scores(&rows),
        base_train_identities: scores(rows.iter().filter(|r| !r.held_out)),
        base_held_out_identities: scores(rows.iter().filter(|r| r.held_out)),
        ceiling: scores(&ceiling_rows),
        rows,
        ceiling_rows,
    };
    Ok((report, sheet(&pictures, spec.seeds)))
}

/// The report as markdown: the scores, then the base's confusion matrix.
pub fn table(r: &ShapeReport) -> String {
    let line = |name: &str, s: &ShapeScores| {
        let by: Vec<String> = s
            .shape_accuracy_by_shape
            .iter()
            .map(|a| format!("{a:.2}"))
            .collect();
        format!(
            "| {name} | {} | {} | {:.3} | {} | {:.3} | {:.3} |\n",
            s.pictures,
            s.found,
            s.shape_accuracy,
            by.join(" / "),
            s.colour_accuracy,
            s.mean_iou_asked
        )
    };
    let mut out = format!(
        "{} steps, guidance {}, true CFG {}, {} px; chance: shape {:.2}, colour {:.3}\n\n\
         | pictures | n | subject found | shape accuracy | by shape ({}) | colour accuracy | IoU of the asked shape |\n\
         |---|---|---|---|---|---|---|\n",
        r.steps,
        r.guidance,
        r.true_cfg,
        r.size,
        r.shape_chance,
        r.colour_chance,
        SHAPES.join(" / ")
    );
    out += &line("base", &r.base);
    out += &line("base, training identities", &r.base_train_identities);
    out += &line("base, held-out identities", &r.base_held_out_identities);
    out += &line("ceiling: the data's scenes", &r.ceiling);
    out += &format!(
        "\nbase: asked (rows) against found (columns: {} / none)\n\n",
        SHAPES.join(" / ")
    );
    for (shape, counts) in SHAPES.iter().zip(&r.base.confusion) {
        let c: Vec<String> = counts.iter().map(|n| n.to_string()).collect();
        out += &format!("{shape:>8}: {}\n", c.join(" "));
    }
    out
}

/// Writes `shapes.json` and `shapes.png` into `dir`.
pub fn write(report: &ShapeReport, sheet: &RgbImage, dir: &Path) -> Result<()> {
    let io = |p: &Path, e: String| bad(&p.display().to_string(), e);
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e.to_string()))?;
    let json = dir.join("shapes.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| io(&json, e.to_string()))?;
    std::fs::write(&json, text + "\n").map_err(|e| io(&json, e.to_string()))?;
    let png = dir.join("shapes.png");
    sheet.save(&png).map_err(|e| io(&png, e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(shape: &str, found: Option<&str>, colour_right: bool) -> ShapeRow {
        ShapeRow {
            prompt: String::new(),
            seed: 1,
            shape: shape.into(),
            colour: "red".into(),
            held_out: false,
            found_shape: found.map(str::to_string),
            found_colour: found.map(|_| if colour_right { "red" } else { "blue" }.into()),
            iou_asked: match found {
                None => 0.0,
                Some(f) if f == shape => 0.9,
                Some(_) => 0.5,
            },
            iou_best: 0.9,
            area: 100,
        }
    }

    #[test]
    fn scores_count_rights_wrongs_and_missing_subjects() {
        let rows = [
            named("disc", Some("disc"), true),
            named("disc", Some("square"), true),
            named("ring", None, false),
            named("square", Some("square"), false),
        ];
        let s = scores(&rows);
        assert_eq!(s.pictures, 4);
        assert_eq!(s.found, 3);
        assert_eq!(s.shape_accuracy, 0.5);
        assert_eq!(s.shape_accuracy_by_shape, vec![1.0, 0.5, 0.0, 0.0]);
        assert_eq!(s.colour_accuracy, 0.5);
        assert!((s.mean_iou_asked - (0.9 + 0.5 + 0.0 + 0.9) / 4.0).abs() < 1e-12);
        assert_eq!(s.confusion[1], vec![1, 1, 0, 0, 0]);
        assert_eq!(s.confusion[3], vec![0, 0, 0, 0, 1]);
        assert_eq!(scores(&[]).shape_accuracy, 0.0);
    }

    #[test]
    fn one_subject_captions_name_plain_identities_only() {
        let id = plain_identity_of("teal disc").unwrap();
        assert_eq!((COLOURS[id.colour].0, SHAPES[id.shape]), ("teal", "disc"));
        assert_eq!(plain_identity_of("teal striped disc"), None);
        assert_eq!(plain_identity_of("red square, blue ring"), None);
        assert_eq!(plain_identity_of("mauve disc"), None);
        assert_eq!(plain_identities().len(), 32);
    }

    /// The naming itself, on the generator's own scenes through the pixel codec (4 x 4
    /// pixel means): nearly every one must be named right, or the measure says nothing.
    #[test]
    fn the_data_s_own_scenes_are_named_right() {
        let (mut right_shape, mut right_colour, mut n) = (0, 0, 0);
        for scene in plain_scenes(128, 0..400) {
            let PlainScene { id, image: img, .. } = scene.unwrap();
            let pooled = RgbImage::from_fn(128, 128, |x, y| {
                let (bx, by) = (x / 4 * 4, y / 4 * 4);
                let mut sum = [0u32; 3];
                for dy in 0..4 {
                    for dx in 0..4 {
                        let p = img.get_pixel(bx + dx, by + dy).0;
                        (0..3).for_each(|c| sum[c] += p[c] as u32);
                    }
                }
                Rgb(sum.map(|v| (v / 16) as u8))
            });
            n += 1;
            if let Some(f) = find(&pooled) {
                right_shape += (f.shape == id.shape) as usize;
                right_colour += (f.colour == id.colour) as usize;
            }
        }
        assert!(n >= 40, "{n} plain scenes");
        let (shape, colour) = (
            right_shape as f64 / n as f64,
            right_colour as f64 / n as f64,
        );
        assert!(shape >= 0.9, "shape named right in {shape} of {n}");
        assert!(colour >= 0.9, "colour named right in {colour} of {n}");
    }
}
