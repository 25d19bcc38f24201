//! The validation grid: one row per case, its references then one sample per seed.

use image::imageops::{overlay, resize, FilterType};
use image::{Rgb, RgbImage};

/// Pixels between tiles.
const GAP: u32 = 4;

/// One row of the grid.
pub struct GridRow<'a> {
    pub refs: &'a [RgbImage],
    pub samples: Vec<&'a RgbImage>,
}

/// Tiles of `tile` pixels (references resized to a square, samples scaled to the tile's
/// height), references left-aligned in `max(refs)` columns so samples line up by seed.
pub fn grid(rows: &[GridRow], tile: u32) -> RgbImage {
    let ref_cols = rows.iter().map(|r| r.refs.len()).max().unwrap_or(0) as u32;
    let sample_w =
        |img: &RgbImage| (img.width() as u64 * tile as u64 / img.height().max(1) as u64) as u32;
    let samples_w = rows
        .iter()
        .map(|r| r.samples.iter().map(|s| sample_w(s) + GAP).sum::<u32>())
        .max()
        .unwrap_or(0);
    let width = GAP + ref_cols * (tile + GAP) + samples_w;
    let height = GAP + rows.len() as u32 * (tile + GAP);
    let mut out = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([255, 255, 255]));
    for (i, row) in rows.iter().enumerate() {
        let y = (GAP + i as u32 * (tile + GAP)) as i64;
        for (k, r) in row.refs.iter().enumerate() {
            let x = (GAP + k as u32 * (tile + GAP)) as i64;
            overlay(&mut out, &resize(r, tile, tile, FilterType::Triangle), x, y);
        }
        let mut x = GAP + ref_cols * (tile + GAP);
        for s in &row.samples {
            let w = sample_w(s);
            let scaled = if s.height() == tile {
                (*s).clone()
            } else {
                resize(*s, w, tile, FilterType::Triangle)
            };
            overlay(&mut out, &scaled, x as i64, y);
            x += w + GAP;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_line_up_samples_by_seed_whatever_their_reference_count() {
        let red = RgbImage::from_pixel(10, 10, Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(8, 8, Rgb([0, 0, 255]));
        let green = RgbImage::from_pixel(8, 8, Rgb([0, 255, 0]));
        let two = [red.clone(), red.clone()];
        let one = [red];
        let rows = [
            GridRow {
                refs: &two,
                samples: vec![&blue, &green],
            },
            GridRow {
                refs: &one,
                samples: vec![&blue, &green],
            },
        ];
        let g = grid(&rows, 8);
        // 2 reference columns and 2 samples of 8 px with 4 px gaps; 2 rows.
        assert_eq!(g.dimensions(), (4 + 2 * 12 + 2 * 12, 4 + 2 * 12));
        let first_sample_x = 4 + 2 * 12;
        for row_y in [4, 16] {
            assert_eq!(g.get_pixel(first_sample_x + 1, row_y + 1).0, [0, 0, 255]);
            assert_eq!(g.get_pixel(first_sample_x + 13, row_y + 1).0, [0, 255, 0]);
        }
        // The second row's second reference column is blank.
        assert_eq!(g.get_pixel(4 + 12 + 1, 16 + 1).0, [255, 255, 255]);
        assert_eq!(g.get_pixel(4 + 12 + 1, 4 + 1).0, [255, 0, 0]);
    }
}
