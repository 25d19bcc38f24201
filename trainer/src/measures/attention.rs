//! What the attention rows of correspondence points say, as plain arithmetic on rows (one row
//! per pair: its softmax over the target tokens, averaged over the loss's blocks and heads):
//!
//! - correspondence accuracy: the share of pairs whose row peaks within one token (in both
//!   directions of the grid) of the pair's target token; its chance level is the share of
//!   target tokens within one token of it, averaged over the pairs (about 9/N inside the grid);
//! - separation: for a sample of two or more references, the share of each row's mass on its
//!   own subject's region (the target tokens of its reference's pairs) out of its mass on all
//!   subjects' regions; its chance level is the share uniform attention would give.

use datasets::TokenGrid;

/// Running sums of the attention measures over pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AttentionTally {
    pub pairs: usize,
    pub hits: usize,
    /// Sum over pairs of their chance of a hit.
    pub chance: f64,
    /// Rows of samples with two or more references.
    pub separation_rows: usize,
    pub separation: f64,
    /// Sum over those rows of the share uniform attention would put on the own region.
    pub separation_chance: f64,
}

impl AttentionTally {
    pub fn accuracy(&self) -> f64 {
        ratio(self.hits as f64, self.pairs)
    }

    pub fn accuracy_chance(&self) -> f64 {
        ratio(self.chance, self.pairs)
    }

    pub fn separation(&self) -> f64 {
        ratio(self.separation, self.separation_rows)
    }

    pub fn separation_chance(&self) -> f64 {
        ratio(self.separation_chance, self.separation_rows)
    }

    pub fn merge(&mut self, o: &AttentionTally) {
        self.pairs += o.pairs;
        self.hits += o.hits;
        self.chance += o.chance;
        self.separation_rows += o.separation_rows;
        self.separation += o.separation;
        self.separation_chance += o.separation_chance;
    }
}

fn ratio(sum: f64, n: usize) -> f64 {
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// Whether target tokens `a` and `b` of `grid` are at most one token apart in each direction.
fn near(grid: TokenGrid, a: usize, b: usize) -> bool {
    let (ra, ca) = (a / grid.cols, a % grid.cols);
    let (rb, cb) = (b / grid.cols, b % grid.cols);
    ra.abs_diff(rb) <= 1 && ca.abs_diff(cb) <= 1
}

/// Target tokens within one token of `t`.
fn neighbourhood(grid: TokenGrid, t: usize) -> usize {
    let (r, c) = (t / grid.cols, t % grid.cols);
    let span = |x: usize, n: usize| (x + 1).min(n - 1) + 1 - x.saturating_sub(1);
    span(r, grid.rows) * span(c, grid.cols)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// The measures of one sample: `rows[k][j]` is the row of pair `j` of reference `k`, over
/// the `grid`'s target tokens, and `targets[k][j]` that pair's target token.
pub fn tally(rows: &[Vec<Vec<f32>>], targets: &[Vec<u32>], grid: TokenGrid) -> AttentionTally {
    let n = grid.len();
    let mut out = AttentionTally::default();
    for (k_rows, k_tgts) in rows.iter().zip(targets) {
        for (row, &t) in k_rows.iter().zip(k_tgts) {
            let t = t as usize;
            out.pairs += 1;
            out.hits += usize::from(near(grid, argmax(row), t));
            out.chance += neighbourhood(grid, t) as f64 / n as f64;
        }
    }
    if rows.len() < 2 {
        return out;
    }
    let regions: Vec<Vec<bool>> = targets
        .iter()
        .map(|ts| {
            let mut r = vec![false; n];
            for &t in ts {
                r[t as usize] = true;
            }
            r
        })
        .collect();
    for (k, k_rows) in rows.iter().enumerate() {
        // Others' regions, without the tokens the own region shares with them.
        let others: Vec<bool> = (0..n)
            .map(|i| !regions[k][i] && regions.iter().enumerate().any(|(j, r)| j != k && r[i]))
            .collect();
        let own_n = regions[k].iter().filter(|&&b| b).count();
        let other_n = others.iter().filter(|&&b| b).count();
        if own_n == 0 || other_n == 0 {
            continue;
        }
        for row in k_rows {
            let mass = |set: &[bool]| -> f64 {
                row.iter()
                    .zip(set)
                    .filter(|(_, &b)| b)
                    .map(|(&v, _)| v as f64)
                    .sum()
            };
            let (own, other) = (mass(&regions[k]), mass(&others));
            if own + other > 0.0 {
                out.separation_rows += 1;
                out.separation += own / (own + other);
                out.separation_chance += own_n as f64 / (own_n + other_n) as f64;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRID: TokenGrid = TokenGrid { rows: 4, cols: 4 };

    fn one_hot(at: usize) -> Vec<f32> {
        let mut r = vec![0.0; GRID.len()];
        r[at] = 1.0;
        r
    }

    #[test]
    fn neighbourhoods_count_the_tokens_inside_the_grid() {
        // Corner, edge, inside, by brute force.
        for t in 0..16 {
            let brute = (0..16).filter(|&u| near(GRID, t, u)).count();
            assert_eq!(neighbourhood(GRID, t), brute, "token {t}");
        }
        assert_eq!(neighbourhood(GRID, 0), 4);
        assert_eq!(neighbourhood(GRID, 5), 9);
    }

    #[test]
    fn a_peak_within_one_token_is_a_hit_and_chance_is_the_neighbourhood_share() {
        // Target token 5 (row 1, col 1): peaks at 10 (1 away diagonally) hit, 7 (2 away) miss.
        let rows = vec![vec![one_hot(10), one_hot(7)]];
        let t = tally(&rows, &[vec![5, 5]], GRID);
        assert_eq!((t.pairs, t.hits), (2, 1));
        assert!((t.accuracy() - 0.5).abs() < 1e-12);
        assert!((t.accuracy_chance() - 9.0 / 16.0).abs() < 1e-12);
        // Uniform rows: the first maximum (token 0) decides, and one sample has no separation.
        assert!(t.separation().is_nan());
    }

    #[test]
    fn separation_is_the_own_share_of_the_mass_on_subjects() {
        // Reference 0's pairs land on tokens {0, 1}, reference 1's on {1}: token 1 is own for
        // both, so reference 0 has no others' region (its rows say nothing) and reference 1's
        // others' region is {0}.
        let mut r0 = vec![0.0; 16];
        r0[0] = 0.5;
        r0[14] = 0.25;
        r0[3] = 0.25; // background: not counted
        let mut r1 = vec![0.0; 16];
        r1[1] = 0.3;
        r1[0] = 0.1;
        let rows = vec![vec![r0.clone(), r0], vec![r1]];
        let t = tally(&rows, &[vec![0, 1], vec![1]], GRID);
        // Only reference 1's row counts: own 0.3 / (0.3 + 0.1); uniform would give 1 / 2.
        assert_eq!(t.separation_rows, 1);
        assert!((t.separation() - 0.75).abs() < 1e-6);
        assert!((t.separation_chance() - 0.5).abs() < 1e-12);
        let t = tally(
            &[vec![vec![0.0; 16]], vec![one_hot(14)]],
            &[vec![0], vec![14]],
            GRID,
        );
        // A row with no mass on any subject says nothing; the other row is all own.
        assert_eq!(t.separation_rows, 1);
        assert_eq!(t.separation(), 1.0);
    }

    #[test]
    fn tallies_merge_as_sums() {
        let a = tally(&[vec![one_hot(5)]], &[vec![5]], GRID);
        let b = tally(&[vec![one_hot(0)]], &[vec![15]], GRID);
        let mut m = a;
        m.merge(&b);
        assert_eq!((m.pairs, m.hits), (2, 1));
        assert!((m.accuracy_chance() - (9.0 + 4.0) / 32.0).abs() < 1e-12);
    }
}
