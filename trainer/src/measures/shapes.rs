//! Which shape and colour a tiny-world picture of one subject shows: the subject is segmented
//! from the background, then each of `datasets synth`'s shapes is fitted to it and the best
//! fit named. `trainer shapes` uses it to say whether a base draws the scenes' shapes
//! (design.md §14).
//!
//! - Background: synth draws a linear gradient, so a plane per channel is fitted by least
//!   squares to a band along the picture's border, then fitted again without the band's
//!   outliers (a subject touching the border).
//! - Subject: the pixels farther than [`SUBJECT_DISTANCE`] from that plane (RGB in [0, 1],
//!   Euclidean), their largest 4-connected component, unless it is a speck or covers more
//!   than half the picture (noise). A ring's hole is background, so it stays a hole.
//! - Shape: each synth shape ([`datasets::synth::inside`], the renderer's own geometry) is
//!   placed on the component's bounding box at sizes 0.8 to 1.25 of its larger side and shifts
//!   of up to two pixels; the shape whose best placement has the largest intersection over
//!   union wins.
//! - Colour: the palette colour nearest the component's mean RGB (palette colours at their
//!   mean shading).

use datasets::synth::{inside, mean_plain_rgb, COLOURS, SHAPES};
use image::RgbImage;
use serde::Serialize;

/// A pixel belongs to a subject when its RGB (in [0, 1]) is this far from the background
/// plane: the gradients' channels span 60-200 of 255 and the palette's colours sit well away
/// from them, while codec and sampling noise stay far below.
pub const SUBJECT_DISTANCE: f64 = 0.15;

/// Components smaller than this share of the picture are not a subject (specks).
const MIN_AREA_SHARE: f64 = 0.005;
/// Nor are components larger than this share: synth's subjects span at most 0.55 of the side
/// (0.3 of the picture), and a picture of noise is off its fitted background nearly
/// everywhere, which would fit the square.
const MAX_AREA_SHARE: f64 = 0.5;

/// Sizes tried, as shares of the bounding box's larger side.
const SIZE_STEPS: usize = 10;
const SIZE_RANGE: (f64, f64) = (0.8, 1.25);
/// Shifts tried in each direction, in pixels.
const SHIFTS: [f64; 3] = [-2.0, 0.0, 2.0];

/// What [`find`] sees in a picture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Found {
    /// Index into `datasets::synth::SHAPES` of the best fit.
    pub shape: usize,
    /// The best intersection over union of each shape, in `SHAPES` order.
    pub iou: [f64; 4],
    /// Index into `datasets::synth::COLOURS` nearest the subject's mean colour.
    pub colour: usize,
    /// Pixels of the subject.
    pub area: usize,
}

/// The subject of `img` (its largest component off the background) and its best shape and
/// colour; `None` when nothing stands off the background.
pub fn find(img: &RgbImage) -> Option<Found> {
    let mask = subject_mask(img)?;
    let area = mask.iter().filter(|&&m| m).count();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let iou = fit_shapes(&mask, area, w, h);
    let shape = (0..SHAPES.len())
        .max_by(|&a, &b| iou[a].total_cmp(&iou[b]))
        .unwrap_or(0);
    Some(Found {
        shape,
        iou,
        colour: nearest_colour(img, &mask),
        area,
    })
}

/// RGB of pixel `i` in [0, 1].
fn rgb(img: &RgbImage, i: usize) -> [f64; 3] {
    let (w, _) = img.dimensions();
    let p = img.get_pixel(i as u32 % w, i as u32 / w).0;
    p.map(|c| c as f64 / 255.0)
}

/// The background plane of each channel, a + b x + c y (x, y in [0, 1]).
fn background(img: &RgbImage) -> [[f64; 3]; 3] {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let band = (w.min(h) / 16).max(1);
    let border: Vec<usize> = (0..w * h)
        .filter(|&i| {
            let (x, y) = (i % w, i / w);
            x < band || y < band || x >= w - band || y >= h - band
        })
        .collect();
    let coords = |i: usize| [1.0, (i % w) as f64 / w as f64, (i / w) as f64 / h as f64];
    [0, 1, 2].map(|c| {
        let first = plane_fit(border.iter().map(|&i| (coords(i), rgb(img, i)[c])));
        let residual = |i: usize| (dot(&first, &coords(i)) - rgb(img, i)[c]).abs();
        let mut r: Vec<f64> = border.iter().map(|&i| residual(i)).collect();
        r.sort_by(f64::total_cmp);
        let cut = (2.5 * r[r.len() / 2]).max(0.05);
        plane_fit(
            border
                .iter()
                .filter(|&&i| residual(i) < cut)
                .map(|&i| (coords(i), rgb(img, i)[c])),
        )
    })
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Least squares of v ~ p . x over the points: the 3 x 3 normal equations, solved by
/// Gaussian elimination (a constant when they are singular).
fn plane_fit(points: impl Iterator<Item = ([f64; 3], f64)>) -> [f64; 3] {
    let mut a = [[0.0f64; 4]; 3];
    let mut mean = (0.0, 0usize);
    for (x, v) in points {
        for r in 0..3 {
            for c in 0..3 {
                a[r][c] += x[r] * x[c];
            }
            a[r][3] += x[r] * v;
        }
        mean = (mean.0 + v, mean.1 + 1);
    }
    let constant = [mean.0 / mean.1.max(1) as f64, 0.0, 0.0];
    for col in 0..3 {
        let pivot = (col..3)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        if a[pivot][col].abs() < 1e-9 {
            return constant;
        }
        a.swap(col, pivot);
        let lead = a[col];
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / lead[col];
                for (v, l) in row.iter_mut().zip(lead).skip(col) {
                    *v -= f * l;
                }
            }
        }
    }
    [0, 1, 2].map(|r| a[r][3] / a[r][r])
}

/// The largest 4-connected component of the pixels off the background, or `None` when it is
/// a speck.
fn subject_mask(img: &RgbImage) -> Option<Vec<bool>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return None;
    }
    let planes = background(img);
    let off: Vec<bool> = (0..w * h)
        .map(|i| {
            let x = [1.0, (i % w) as f64 / w as f64, (i / w) as f64 / h as f64];
            let p = rgb(img, i);
            let d2: f64 = (0..3).map(|c| (p[c] - dot(&planes[c], &x)).powi(2)).sum();
            d2.sqrt() > SUBJECT_DISTANCE
        })
        .collect();
    let mut label = vec![0u32; w * h];
    let (mut best, mut best_size, mut next) = (0u32, 0usize, 0u32);
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !off[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = (i % w, i / w);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            for j in neighbours.into_iter().flatten() {
                if off[j] && label[j] == 0 {
                    label[j] = next;
                    stack.push(j);
                }
            }
        }
        if size > best_size {
            (best, best_size) = (next, size);
        }
    }
    let share = best_size as f64 / (w * h) as f64;
    if !(MIN_AREA_SHARE..=MAX_AREA_SHARE).contains(&share) {
        return None;
    }
    Some(label.iter().map(|&l| l == best).collect())
}

/// The best intersection over union of each shape placed on the bounding box of the mask (of
/// `area` pixels).
fn fit_shapes(mask: &[bool], area: usize, w: usize, h: usize) -> [f64; 4] {
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let (x, y) = (i % w, i / w);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
    }
    let (cx, cy) = ((x0 + x1) as f64 / 2.0, (y0 + y1) as f64 / 2.0);
    let extent = (x1 - x0).max(y1 - y0) as f64;
    [0, 1, 2, 3].map(|shape| {
        let mut best = 0.0f64;
        for k in 0..SIZE_STEPS {
            let f =
                SIZE_RANGE.0 + (SIZE_RANGE.1 - SIZE_RANGE.0) * k as f64 / (SIZE_STEPS - 1) as f64;
            let size = extent * f;
            for dy in SHIFTS {
                for dx in SHIFTS {
                    let (left, top) = (cx + dx - size / 2.0, cy + dy - size / 2.0);
                    best = best.max(iou_with(mask, w, h, area, shape, left, top, size));
                }
            }
        }
        best
    })
}

/// Intersection over union of the mask (of `area` pixels) and shape `shape` drawn in the
/// square of side `size` at (`left`, `top`), pixel centres sampled as synth renders.
#[allow(clippy::too_many_arguments)]
fn iou_with(
    mask: &[bool],
    w: usize,
    h: usize,
    area: usize,
    shape: usize,
    left: f64,
    top: f64,
    size: f64,
) -> f64 {
    // Only the square can hold the shape; the mask's pixels outside it count in the union.
    let xs = (left.floor().max(0.0) as usize)..((left + size).ceil().max(0.0) as usize).min(w);
    let ys = (top.floor().max(0.0) as usize)..((top + size).ceil().max(0.0) as usize).min(h);
    let (mut both, mut drawn) = (0usize, 0usize);
    for y in ys {
        for x in xs.clone() {
            let u = ((x as f64 + 0.5 - left) / size) as f32;
            let v = ((y as f64 + 0.5 - top) / size) as f32;
            if inside(shape, u, v) {
                drawn += 1;
                both += mask[y * w + x] as usize;
            }
        }
    }
    let union = area + drawn - both;
    if union == 0 {
        0.0
    } else {
        both as f64 / union as f64
    }
}

/// The palette colour nearest the masked pixels' mean.
fn nearest_colour(img: &RgbImage, mask: &[bool]) -> usize {
    let mut sum = [0.0f64; 3];
    let mut n = 0usize;
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let p = rgb(img, i);
        (0..3).for_each(|c| sum[c] += p[c] * 255.0);
        n += 1;
    }
    let mean = sum.map(|s| s / n.max(1) as f64);
    (0..COLOURS.len())
        .min_by(|&a, &b| {
            let d = |k: usize| {
                let c = mean_plain_rgb(k);
                (0..3).map(|j| (mean[j] - c[j] as f64).powi(2)).sum::<f64>()
            };
            d(a).total_cmp(&d(b))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A picture of shape `shape` in colour `colour` over a gradient, drawn with synth's
    /// geometry at (`left`, `top`) with side `size`.
    fn drawn(shape: usize, colour: usize, left: f64, top: f64, size: f64) -> RgbImage {
        let rgb = mean_plain_rgb(colour).map(|c| c as u8);
        RgbImage::from_fn(128, 128, |x, y| {
            let u = ((x as f64 + 0.5 - left) / size) as f32;
            let v = ((y as f64 + 0.5 - top) / size) as f32;
            if inside(shape, u, v) {
                Rgb(rgb)
            } else {
                let t = (x + y) as f32 / 256.0;
                Rgb([(90.0 + 60.0 * t) as u8, (170.0 - 80.0 * t) as u8, 120])
            }
        })
    }

    #[test]
    fn each_shape_and_colour_drawn_alone_is_named() {
        for (shape, shape_name) in SHAPES.iter().enumerate() {
            for (colour, (colour_name, _)) in COLOURS.iter().enumerate() {
                let size = 40.0 + 4.0 * colour as f64;
                let img = drawn(shape, colour, 20.0 + 3.0 * shape as f64, 30.0, size);
                let f = find(&img).expect("a subject");
                assert_eq!(f.shape, shape, "{shape_name} {:?}", f.iou);
                assert_eq!(f.colour, colour, "{colour_name}");
                assert!(f.iou[shape] > 0.9, "{:?}", f.iou);
            }
        }
    }

    #[test]
    fn a_shape_touching_the_border_is_still_named() {
        let img = drawn(2, 2, -6.0, 70.0, 60.0);
        let f = find(&img).expect("a subject");
        assert_eq!(SHAPES[f.shape], "diamond", "{:?}", f.iou);
    }

    #[test]
    fn a_plain_gradient_has_no_subject() {
        let img = drawn(0, 0, 500.0, 500.0, 10.0);
        assert_eq!(find(&img), None);
        assert_eq!(find(&RgbImage::new(0, 0)), None);
        // Noise is off any plane nearly everywhere: no subject, not a picture-sized square.
        let mut state = 7u64;
        let noise = RgbImage::from_fn(128, 128, |_, _| {
            Rgb([0, 1, 2].map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            }))
        });
        assert_eq!(find(&noise), None);
    }

    #[test]
    fn the_plane_fit_recovers_a_plane() {
        let p = plane_fit((0..50).map(|i| {
            let (x, y) = ((i % 7) as f64 / 7.0, (i / 7) as f64 / 7.0);
            ([1.0, x, y], 0.2 + 0.3 * x - 0.1 * y)
        }));
        for (a, b) in p.iter().zip([0.2, 0.3, -0.1]) {
            assert!((a - b).abs() < 1e-9, "{p:?}");
        }
        // Degenerate points give their mean.
        assert_eq!(
            plane_fit([([1.0, 0.5, 0.5], 0.4)].into_iter()),
            [0.4, 0.0, 0.0]
        );
    }
}
