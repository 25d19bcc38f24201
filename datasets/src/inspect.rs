//! `datasets inspect`: what a dataset holds (shards, rows, bytes, reference counts from the
//! manifest), correspondence statistics over a sample of decoded rows, the data report of that
//! sample, and a PNG grid showing a few samples with their correspondences drawn as lines.

use image::{Rgb, RgbImage};

use crate::error::Result;
use crate::loader::{Loader, LoaderOptions};
use crate::plan::{Cursor, PlanSpec};
use crate::transform::{Decoded, Pixels, TransformSpec};

#[derive(Debug, Clone)]
pub struct InspectOptions {
    pub samples: usize,
    pub resolution: usize,
    pub grid: usize,
    pub lines_per_ref: usize,
    pub seed: u64,
    /// Decode targets into aspect buckets (as `data.aspect_buckets`).
    pub aspect_buckets: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub shards: usize,
    pub rows: usize,
    pub bytes: u64,
    /// Samples with 1..=6 references.
    pub ref_histogram: [usize; 6],
    pub decoded: usize,
    pub refs: usize,
    pub refs_without_points: usize,
    /// Per reference: correspondence points inside the crops, and token pairs after the mapping.
    pub points_min: usize,
    pub points_mean: f64,
    pub points_max: usize,
    pub pairs_min: usize,
    pub pairs_mean: f64,
    pub pairs_max: usize,
    /// Rows per aspect bucket ("WxH") at the resolution, from the target sizes the manifest
    /// records (whether or not the samples are decoded into buckets).
    pub target_buckets: std::collections::BTreeMap<String, usize>,
    /// Rows whose target size the manifest does not record (or records as zero).
    pub targets_unknown: usize,
    pub report: String,
}

/// Reads the manifest and `opts.samples` decoded samples; returns the statistics and the
/// samples for the grid.
pub fn inspect(url: &str, opts: &InspectOptions) -> Result<(Stats, Vec<Decoded>)> {
    let loader_opts = LoaderOptions {
        plan: PlanSpec {
            seed: opts.seed,
            world: 1,
            rank: 0,
            batch_size: 1,
            shuffle_rows: 1,
            buckets: opts.aspect_buckets.then_some(opts.resolution),
        },
        transform: TransformSpec {
            resolution: opts.resolution,
            ref_resolution: opts.resolution,
            aspect_buckets: opts.aspect_buckets,
        },
        io_threads: 4,
        decode_threads: 2,
        prefetch_batches: 4,
        strict: false,
        cached: false,
    };
    let mut loader = Loader::open(url, loader_opts, Cursor::default())?;
    let m = loader.manifest().clone();
    let mut st = Stats {
        shards: m.shards.len(),
        rows: m.total_rows,
        bytes: m.shards.iter().map(|s| s.bytes).sum(),
        ref_histogram: m.ref_histogram(),
        points_min: usize::MAX,
        pairs_min: usize::MAX,
        ..Default::default()
    };
    let shapes = crate::buckets::buckets(opts.resolution);
    for g in m.shards.iter().flat_map(|s| &s.row_groups) {
        st.targets_unknown += g.rows - g.targets.len().min(g.rows);
        for &[w, h] in &g.targets {
            match crate::buckets::pick_from(&shapes, w, h) {
                Some((bw, bh)) => *st.target_buckets.entry(format!("{bw}x{bh}")).or_default() += 1,
                None => st.targets_unknown += 1,
            }
        }
    }
    let mut kept = Vec::new();
    let (mut points, mut pairs) = (0usize, 0usize);
    while st.decoded < opts.samples.min(m.total_rows) {
        let b = loader.next_batch()?;
        if b.cursor.epoch > 0 && b.index == 0 {
            break;
        }
        for d in b.samples {
            st.decoded += 1;
            for r in &d.refs {
                st.refs += 1;
                st.refs_without_points += usize::from(r.pairs.is_empty());
                points += r.points.len();
                pairs += r.pairs.len();
                st.points_min = st.points_min.min(r.points.len());
                st.points_max = st.points_max.max(r.points.len());
                st.pairs_min = st.pairs_min.min(r.pairs.len());
                st.pairs_max = st.pairs_max.max(r.pairs.len());
            }
            if kept.len() < opts.grid {
                kept.push(d);
            }
        }
    }
    if st.refs > 0 {
        st.points_mean = points as f64 / st.refs as f64;
        st.pairs_mean = pairs as f64 / st.refs as f64;
    } else {
        st.points_min = 0;
        st.pairs_min = 0;
    }
    st.report = loader.report().summary();
    Ok((st, kept))
}

fn to_rgb(p: &Pixels) -> RgbImage {
    let hw = p.height * p.width;
    RgbImage::from_fn(p.width as u32, p.height as u32, |x, y| {
        let i = y as usize * p.width + x as usize;
        Rgb([0, 1, 2].map(|c| ((p.data[c * hw + i] + 1.0) * 127.5).clamp(0.0, 255.0) as u8))
    })
}

const LINE_COLOURS: [[u8; 3]; 6] = [
    [255, 0, 0],
    [0, 200, 0],
    [0, 80, 255],
    [255, 160, 0],
    [200, 0, 200],
    [0, 200, 200],
];

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

/// Bresenham's line.
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        put(img, x, y, c);
        if x == x1 && y == y1 {
            return;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn dot(img: &mut RgbImage, (x, y): (i64, i64), c: [u8; 3]) {
    for dy in -2..=2 {
        for dx in -2..=2 {
            put(img, x + dx, y + dy, c);
        }
    }
}

/// One row per sample: the target, then its references; `lines_per_ref` correspondences of
/// each reference drawn from the reference to the target.
pub fn grid(samples: &[Decoded], lines_per_ref: usize) -> RgbImage {
    let side = samples
        .iter()
        .map(|d| d.target.width.max(d.target.height))
        .max()
        .unwrap_or(16) as u32;
    let cols = 1 + samples.iter().map(|d| d.refs.len()).max().unwrap_or(0) as u32;
    let mut img = RgbImage::from_pixel(
        cols * side,
        side * samples.len().max(1) as u32,
        Rgb([40; 3]),
    );
    for (row, d) in samples.iter().enumerate() {
        let y0 = row as u32 * side;
        image::imageops::replace(&mut img, &to_rgb(&d.target), 0, y0 as i64);
        for (k, r) in d.refs.iter().enumerate() {
            let x0 = (k as u32 + 1) * side;
            image::imageops::replace(&mut img, &to_rgb(&r.pixels), x0 as i64, y0 as i64);
            let c = LINE_COLOURS[k % LINE_COLOURS.len()];
            let n = r.points.len();
            let step = (n / lines_per_ref.max(1)).max(1);
            for p in r.points.iter().step_by(step).take(lines_per_ref) {
                let a = (
                    x0 as i64 + (p[0] * r.pixels.width as f32) as i64,
                    y0 as i64 + (p[1] * r.pixels.height as f32) as i64,
                );
                let b = (
                    (p[2] * d.target.width as f32) as i64,
                    y0 as i64 + (p[3] * d.target.height as f32) as i64,
                );
                line(&mut img, a, b, c);
                dot(&mut img, a, c);
                dot(&mut img, b, c);
            }
        }
    }
    img
}
