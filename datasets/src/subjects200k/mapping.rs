//! The official correspondence mapping of SemAlign-MS-Subjects200K, written after the official
//! dataset (`Subjects200K.__getitem__` and `build_ref2tgt_mapping`), so an import at the run's
//! resolution gives exactly the pairs the official trainer uses:
//!
//! 1. The DIFT and GeoAware fields ([4096, 2]: for each target patch of a 64 x 64 grid, (y, x)
//!    of the matching reference patch in 64-grid units) are resized to the target's token grid
//!    G = resolution / 16 when G != 64: bilinear, half-pixel centres, no antialiasing (torch's
//!    `F.interpolate(..., mode="bilinear", align_corners=False)`), then truncated to integers.
//!    The values stay in 64-grid units.
//! 2. A target token keeps its pair where both fields agree and the target mask is on. The mask
//!    (first channel, > 0.5 after scaling to [0, 1]; all on when the file is missing) is resized
//!    to the target's size (short side, Pillow NEAREST: source pixel floor((x + 0.5) w / w'))
//!    and then to G x G (torch `nearest`: source floor(i * w' / G)).
//! 3. The reference token is (y R // 64, x R // 64) on the R = ref_resolution / 16 grid, and a
//!    reference token keeps the first target token (in target order) that maps to it.
//!
//! At 1024 px (G = 64) step 1 changes nothing; at 512 px the agreement is checked on the
//! averaged 32 x 32 fields, which keeps a different set of pairs than checking it on the 64 grid
//! and mapping afterwards.

use std::collections::HashSet;

/// Side of the grid the released coordinate files are on.
pub const COORD_GRID: usize = 64;

/// Which pairs `import-subjects200k` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// The official pairs for targets of `resolution` px and references of `ref_resolution` px
    /// (square, multiples of 16). A run at these resolutions trains on exactly them.
    Official {
        resolution: usize,
        ref_resolution: usize,
    },
    /// The official pairs at 1024 px (the 64 x 64 grid of the files); a run at another
    /// resolution maps them to its grid by patch centres.
    Grid64,
}

impl Mapping {
    /// (target, reference) sizes in pixels the pairs are computed for.
    pub fn sizes(self) -> (usize, usize) {
        match self {
            Mapping::Official {
                resolution,
                ref_resolution,
            } => (resolution, ref_resolution),
            Mapping::Grid64 => (16 * COORD_GRID, 16 * COORD_GRID),
        }
    }

    /// Checks the sizes, naming the flag.
    pub fn check(self) -> Result<(), String> {
        let (t, r) = self.sizes();
        for (flag, v) in [("--resolution", t), ("--ref-resolution", r)] {
            if v < 16 || v % 16 != 0 {
                return Err(format!("{flag} {v}: must be a positive multiple of 16"));
            }
        }
        Ok(())
    }
}

/// A target mask as the official loader reads it: one value per pixel, on where its first
/// channel exceeds half of full scale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetMask {
    pub width: usize,
    pub height: usize,
    /// Row-major.
    pub on: Vec<bool>,
}

impl TargetMask {
    /// Decodes a mask image: grey images by their grey level, colour ones by their red channel.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let img = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        let on: Vec<bool> = if img.color().has_color() {
            img.to_rgb8().pixels().map(|p| p.0[0] > 127).collect()
        } else {
            img.to_luma8().pixels().map(|p| p.0[0] > 127).collect()
        };
        Ok(Self { width, height, on })
    }

    /// The mask on the target's G x G token grid for a target of `tgt_size` px.
    fn on_grid(&self, tgt_size: usize, g: usize) -> Vec<bool> {
        let (w, h) = (self.width, self.height);
        // torchvision Resize(int): the short side to tgt_size, the long one scaled (floored).
        let (rw, rh) = if w <= h {
            (tgt_size, tgt_size * h / w)
        } else {
            (tgt_size * w / h, tgt_size)
        };
        let pil = |i: usize, from: usize, to: usize| -> usize {
            ((((i as f64) + 0.5) * from as f64 / to as f64) as usize).min(from - 1)
        };
        let torch = |i: usize, from: usize| -> usize {
            if from == g {
                i
            } else {
                (((i as f32) * (from as f32 / g as f32)).floor() as usize).min(from - 1)
            }
        };
        let mut out = Vec::with_capacity(g * g);
        for gy in 0..g {
            let y = pil(torch(gy, rh), h, rh);
            for gx in 0..g {
                let x = pil(torch(gx, rw), w, rw);
                out.push(self.on[y * w + x]);
            }
        }
        out
    }
}

/// A coordinate field of the 64 grid resized to G x G as torch's bilinear interpolation with
/// `align_corners=False` (f32, clamped source index, weights in its order), then truncated.
fn resize_field(field: &[(i64, i64)], g: usize) -> Vec<(i64, i64)> {
    let n = COORD_GRID;
    let scale = n as f32 / g as f32;
    let index = |o: usize| -> (usize, usize, f32, f32) {
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = src as usize;
        let i1 = if i0 < n - 1 { i0 + 1 } else { i0 };
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        (i0, i1, 1.0 - l1, l1)
    };
    let mut out = Vec::with_capacity(g * g);
    for oy in 0..g {
        let (y0, y1, wy0, wy1) = index(oy);
        for ox in 0..g {
            let (x0, x1, wx0, wx1) = index(ox);
            let at = |y: usize, x: usize| field[y * n + x];
            let channel = |c: fn((i64, i64)) -> i64| -> i64 {
                let v = |y, x| c(at(y, x)) as f32;
                let top = v(y0, x0) * wx0 + v(y0, x1) * wx1;
                let bottom = v(y1, x0) * wx0 + v(y1, x1) * wx1;
                (top * wy0 + bottom * wy1) as i64
            };
            out.push((channel(|p| p.0), channel(|p| p.1)));
        }
    }
    out
}

/// The official (reference token, target token) pairs of one sample, in target order, for a
/// target of `tgt_size` px and a reference of `ref_size` px. `dift` and `geo` are the [4096]
/// (y, x) fields of the 64 grid.
pub fn official_pairs(
    dift: &[(i64, i64)],
    geo: &[(i64, i64)],
    mask: Option<&TargetMask>,
    tgt_size: usize,
    ref_size: usize,
) -> Vec<(u32, u32)> {
    let (g, r) = (tgt_size / 16, ref_size / 16);
    let (d, e) = if g == COORD_GRID {
        (dift.to_vec(), geo.to_vec())
    } else {
        (resize_field(dift, g), resize_field(geo, g))
    };
    let on = mask.map(|m| m.on_grid(tgt_size, g));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (t, (a, b)) in d.iter().zip(&e).enumerate() {
        if a != b || on.as_ref().is_some_and(|m| !m[t]) {
            continue;
        }
        let grid = COORD_GRID as i64;
        let (ry, rx) = (a.0 * r as i64 / grid, a.1 * r as i64 / grid);
        let ref_token = (ry * r as i64 + rx) as u32;
        if seen.insert(ref_token) {
            out.push((ref_token, t as u32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(f: impl Fn(usize, usize) -> (i64, i64)) -> Vec<(i64, i64)> {
        (0..COORD_GRID * COORD_GRID)
            .map(|n| f(n / COORD_GRID, n % COORD_GRID))
            .collect()
    }

    #[test]
    fn at_1024_px_pairs_are_the_agreeing_masked_patches() {
        let dift = field(|y, x| (y as i64, x as i64));
        let mut geo = dift.clone();
        geo[65] = (0, 0);
        let pairs = official_pairs(&dift, &geo, None, 1024, 1024);
        assert_eq!(pairs.len(), 4095);
        assert!(pairs.iter().all(|&(r, t)| r == t && t != 65));
    }

    #[test]
    fn at_512_px_the_fields_are_averaged_before_agreement() {
        // dift and geo disagree on two patches of one 2x2 block but have the same average
        // there: the 64 grid drops both, the official 32 grid keeps the block.
        let dift = field(|y, x| (y as i64, x as i64));
        let mut geo = dift.clone();
        geo.swap(0, 1);
        let pairs = official_pairs(&dift, &geo, None, 512, 512);
        assert_eq!(pairs.len(), 1024);
        // Block (0, 0) averages (0, 0), (0, 1), (1, 0), (1, 1) = (0.5, 0.5), truncated to (0, 0).
        assert_eq!(pairs[0], (0, 0));
        // Block (1, 1): coordinates (2.5, 2.5) -> (2, 2) in 64 units -> reference token (1, 1).
        assert_eq!(pairs[33], (33, 33));
        let grid64 = official_pairs(&dift, &geo, None, 1024, 1024);
        assert_eq!(grid64.len(), 4094);
    }

    #[test]
    fn the_first_target_per_reference_token_is_kept() {
        let dift = field(|_, _| (10, 20));
        let pairs = official_pairs(&dift, &dift, None, 512, 512);
        assert_eq!(pairs, vec![(5 * 32 + 10, 0)]);
    }

    #[test]
    fn masks_go_through_both_nearest_resizes() {
        // A 512 px mask on from column 100: at 1024 px the 64 grid samples columns 8i (Pillow
        // doubles, torch takes every 16th), so token 13 (column 104) is on and 12 (96) off.
        let (w, h) = (512, 512);
        let on = (0..w * h).map(|i| i % w >= 100).collect();
        let m = TargetMask {
            width: w,
            height: h,
            on,
        };
        let g = m.on_grid(1024, 64);
        assert!(!g[12] && g[13]);
        // At 512 px the 32 grid samples columns 16i: token 6 (96) off, 7 (112) on.
        let g = m.on_grid(512, 32);
        assert!(!g[6] && g[7]);
    }

    #[test]
    fn resized_fields_truncate_like_long() {
        // Averages of 2x2 blocks with a non-integer result are truncated.
        let f = field(|y, x| ((y % 2) as i64 * 3, (x % 2) as i64));
        let r = resize_field(&f, 32);
        assert!(r.iter().all(|&p| p == (1, 0)), "{:?}", &r[..4]);
    }
}
