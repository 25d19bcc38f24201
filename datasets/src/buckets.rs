//! Aspect-ratio buckets: target sizes of about the training resolution's area whose sides are
//! multiples of 16 px (one token), with aspect ratios from 1:2 to 2:1. A target goes to the
//! bucket whose aspect ratio is nearest its own (in log scale; ties to the narrower bucket), is
//! resized to cover it and centre-cropped, so it loses less of the picture than a square crop.
//! Batches hold targets of one bucket.
//!
//! The bucket of a row follows from its target's size, which the manifest records, so the
//! epoch plan still comes from the manifest alone.

/// Pixels per token side (8x VAE, 2x2 patches).
const STEP: usize = 16;

/// Widest aspect ratio kept (either way).
const MAX_RATIO: f64 = 2.0;

/// The buckets (width, height) of `resolution`'s area, narrowest first; (resolution,
/// resolution) is one of them.
pub fn buckets(resolution: usize) -> Vec<(usize, usize)> {
    let area = resolution * resolution;
    // Landscape and square shapes: for each height, the widest width that fits the area.
    let mut wide: Vec<(usize, usize)> = Vec::new();
    let mut h = STEP;
    while h <= resolution {
        let w = (area / h) / STEP * STEP;
        if w >= h && w as f64 / h as f64 <= MAX_RATIO {
            wide.push((w, h));
        }
        h += STEP;
    }
    // Portrait shapes are their transposes, so both orientations get the same choice.
    let mut out: Vec<(usize, usize)> = wide
        .iter()
        .filter(|(w, h)| w != h)
        .map(|&(w, h)| (h, w))
        .chain(wide.iter().copied())
        .collect();
    out.sort_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)));
    out.dedup();
    out
}

/// The bucket (width, height) of a `width` x `height` image at `resolution`; None for an image
/// without pixels.
pub fn pick(resolution: usize, width: u32, height: u32) -> Option<(usize, usize)> {
    pick_from(&buckets(resolution), width, height)
}

/// [`pick`] among `buckets` (computed once by callers that pick for many rows).
pub fn pick_from(buckets: &[(usize, usize)], width: u32, height: u32) -> Option<(usize, usize)> {
    if width == 0 || height == 0 {
        return None;
    }
    let aspect = (width as f64 / height as f64).ln();
    let mut best: Option<((usize, usize), f64)> = None;
    for &b in buckets {
        let d = ((b.0 as f64 / b.1 as f64).ln() - aspect).abs();
        if best.is_none_or(|(_, bd)| d < bd - 1e-12) {
            best = Some((b, d));
        }
    }
    best.map(|(b, _)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_about_the_area_in_whole_tokens() {
        for res in [128, 256, 512, 1024] {
            let bs = buckets(res);
            assert!(bs.contains(&(res, res)), "{res}: {bs:?}");
            for &(w, h) in &bs {
                assert!(w % 16 == 0 && h % 16 == 0, "{w}x{h}");
                assert!(w * h <= res * res, "{w}x{h}");
                // Flooring to whole tokens loses less than one token row or column.
                assert!(w * (h + 16) > res * res, "{w}x{h} at {res}");
                let r = w as f64 / h as f64;
                assert!((0.5..=2.0).contains(&r), "{w}x{h}");
            }
            let ratios: Vec<f64> = bs.iter().map(|&(w, h)| w as f64 / h as f64).collect();
            assert!(
                ratios.windows(2).all(|r| r[0] < r[1]),
                "narrowest first, once each"
            );
        }
        for res in [128, 512, 1024] {
            let bs = buckets(res);
            for &(w, h) in &bs {
                assert!(bs.contains(&(h, w)), "{res}: {w}x{h} without its transpose");
            }
        }
    }

    #[test]
    fn images_go_to_the_nearest_aspect() {
        assert_eq!(pick(512, 1000, 1000), Some((512, 512)));
        assert_eq!(pick(512, 1, 1), Some((512, 512)));
        let (w, h) = pick(512, 1600, 900).unwrap();
        assert!(
            w > h && (w as f64 / h as f64 - 16.0 / 9.0).abs() < 0.1,
            "{w}x{h}"
        );
        let (w, h) = pick(512, 900, 1600).unwrap();
        assert!(
            w < h && (h as f64 / w as f64 - 16.0 / 9.0).abs() < 0.1,
            "{w}x{h}"
        );
        // Beyond 2:1 the widest bucket.
        let widest = *buckets(512).last().unwrap();
        assert_eq!(pick(512, 5000, 100), Some(widest));
        assert_eq!(pick(512, 0, 100), None);
    }
}
