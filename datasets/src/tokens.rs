//! Correspondence points to token indices.
//!
//! A point is (ref_x, ref_y, tgt_x, tgt_y) in normalised [0, 1] image coordinates, so it holds
//! at any training resolution. A token grid of H x W tokens (16 px per token: 8x VAE, 2x2
//! patch) maps y to row = min(floor(y*H), H-1), x to col = min(floor(x*W), W-1), and the index
//! is row*W + col, row-major like the 2x2 latent packing. Several points on one reference token
//! keep the first one, as the official `build_ref2tgt_mapping` does.

/// One correspondence: (ref_x, ref_y, tgt_x, tgt_y), normalised.
pub type Point4 = [f32; 4];

/// A reference token and the target token it corresponds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPair {
    pub ref_token: u32,
    pub tgt_token: u32,
}

/// A token grid: rows x cols tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenGrid {
    pub rows: usize,
    pub cols: usize,
}

impl TokenGrid {
    /// The grid of an image of `height` x `width` pixels (16 px per token).
    pub fn for_pixels(height: usize, width: usize) -> Self {
        Self {
            rows: height / 16,
            cols: width / 16,
        }
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Index of the token under the normalised point (x, y).
    pub fn index_of(&self, x: f32, y: f32) -> u32 {
        let row = ((y * self.rows as f32).floor() as usize).min(self.rows - 1);
        let col = ((x * self.cols as f32).floor() as usize).min(self.cols - 1);
        (row * self.cols + col) as u32
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokensError {
    #[error("correspondence point {index} has coordinate {value} outside [0, 1] (field {field})")]
    OutOfRange {
        index: usize,
        field: &'static str,
        value: f32,
    },
    #[error("token grid {rows}x{cols} is empty")]
    EmptyGrid { rows: usize, cols: usize },
}

const FIELDS: [&str; 4] = ["ref_x", "ref_y", "tgt_x", "tgt_y"];

/// Maps points to (reference token, target token) pairs, one per reference token, keeping the
/// first point that lands on it. Points outside [0, 1] (or NaN) are an error naming the point.
pub fn map_points_to_tokens(
    points: &[Point4],
    ref_grid: TokenGrid,
    tgt_grid: TokenGrid,
) -> Result<Vec<TokenPair>, TokensError> {
    for grid in [ref_grid, tgt_grid] {
        if grid.is_empty() {
            return Err(TokensError::EmptyGrid {
                rows: grid.rows,
                cols: grid.cols,
            });
        }
    }
    let mut seen = vec![false; ref_grid.len()];
    let mut out = Vec::new();
    for (index, p) in points.iter().enumerate() {
        for (field, &value) in FIELDS.iter().zip(p) {
            if !(0.0..=1.0).contains(&value) {
                return Err(TokensError::OutOfRange {
                    index,
                    field,
                    value,
                });
            }
        }
        let ref_token = ref_grid.index_of(p[0], p[1]);
        if !std::mem::replace(&mut seen[ref_token as usize], true) {
            out.push(TokenPair {
                ref_token,
                tgt_token: tgt_grid.index_of(p[2], p[3]),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_follows_the_design_rule() {
        let g = TokenGrid { rows: 4, cols: 8 };
        assert_eq!(g.index_of(0.0, 0.0), 0);
        assert_eq!(
            g.index_of(1.0, 1.0),
            31,
            "x = y = 1 clamps to the last token"
        );
        assert_eq!(g.index_of(0.5, 0.25), 8 + 4);
        assert_eq!(g.index_of(0.124, 0.0), 0);
        assert_eq!(g.index_of(0.125, 0.0), 1);
        assert_eq!(
            TokenGrid::for_pixels(512, 256),
            TokenGrid { rows: 32, cols: 16 }
        );
    }

    #[test]
    fn first_point_per_reference_token_wins() {
        let g = TokenGrid { rows: 2, cols: 2 };
        let pts = [
            [0.1, 0.1, 0.9, 0.9],
            [0.2, 0.2, 0.1, 0.1],
            [0.9, 0.1, 0.1, 0.9],
        ];
        let pairs = map_points_to_tokens(&pts, g, g).unwrap();
        assert_eq!(
            pairs,
            vec![
                TokenPair {
                    ref_token: 0,
                    tgt_token: 3
                },
                TokenPair {
                    ref_token: 1,
                    tgt_token: 2
                }
            ]
        );
    }

    #[test]
    fn out_of_range_point_is_named() {
        let g = TokenGrid { rows: 2, cols: 2 };
        let err = map_points_to_tokens(&[[0.1, 0.1, 0.5, 0.5], [0.1, 1.5, 0.5, 0.5]], g, g);
        assert_eq!(
            err,
            Err(TokensError::OutOfRange {
                index: 1,
                field: "ref_y",
                value: 1.5
            })
        );
        let err = map_points_to_tokens(&[[f32::NAN, 0.1, 0.5, 0.5]], g, g).unwrap_err();
        assert!(err.to_string().contains("ref_x"));
    }
}
