//! Correspondence sampling (design.md §5, paper eq. 9): from each reference's token pairs
//! (reference token u, target token G(u)), draw up to P pairs without replacement, skipping
//! reference tokens the mask excludes, and turn reference tokens into indices of the
//! concatenated reference sequence (reference k's tokens start after those of references
//! 0..k).

use rand::Rng;

use crate::error::{KernelError, Result};
use crate::losses::RefSegments;

const OP: &str = "sample_points";

/// One reference's candidates.
#[derive(Debug, Clone, Copy)]
pub struct RefPoints<'a> {
    /// (reference token, target token) pairs.
    pub pairs: &'a [(u32, u32)],
    /// Tokens of this reference (its span in the concatenated sequence).
    pub ref_tokens: usize,
    /// Usable reference tokens (`mask[u]`); None: all.
    pub mask: Option<&'a [bool]>,
}

/// The sampled points of one sample, ready for `attention_rows` and the losses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampled {
    /// Indices into the concatenated reference tokens.
    pub ref_idx: Vec<u32>,
    /// The target token each sampled point must attend to.
    pub tgt_idx: Vec<u32>,
    /// Points per reference, in order.
    pub segments: Vec<usize>,
}

impl Sampled {
    pub fn ref_segments(&self) -> RefSegments {
        RefSegments(self.segments.clone())
    }
}

/// Draws up to `p` points per reference from `rng`: all usable pairs when fewer exist. `p = 0`
/// takes every usable pair in their given order, drawing nothing (the official recipe).
pub fn sample_points(refs: &[RefPoints], p: usize, rng: &mut impl Rng) -> Result<Sampled> {
    let mut out = Sampled {
        ref_idx: Vec::new(),
        tgt_idx: Vec::new(),
        segments: Vec::with_capacity(refs.len()),
    };
    let mut offset = 0u32;
    for (k, r) in refs.iter().enumerate() {
        if let Some(m) = r.mask {
            if m.len() != r.ref_tokens {
                return Err(KernelError::Length {
                    op: OP,
                    arg: "mask",
                    found: m.len(),
                    expected: r.ref_tokens,
                    expected_from: "the reference's token count",
                });
            }
        }
        if let Some((position, &(u, _))) = r
            .pairs
            .iter()
            .enumerate()
            .find(|(_, (u, _))| *u as usize >= r.ref_tokens)
        {
            return Err(KernelError::PointOutOfRange {
                op: OP,
                reference: k,
                position,
                token: u as usize,
                tokens: r.ref_tokens,
            });
        }
        let usable: Vec<(u32, u32)> = match r.mask {
            None => r.pairs.to_vec(),
            Some(m) => r
                .pairs
                .iter()
                .copied()
                .filter(|(u, _)| m[*u as usize])
                .collect(),
        };
        let picked: Vec<usize> = if p == 0 {
            (0..usable.len()).collect()
        } else {
            rand::seq::index::sample(rng, usable.len(), usable.len().min(p)).into_vec()
        };
        out.segments.push(picked.len());
        for i in picked {
            let (u, t) = usable[i];
            out.ref_idx.push(offset + u);
            out.tgt_idx.push(t);
        }
        offset += r.ref_tokens as u32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn draws_without_replacement_caps_and_offsets_by_reference() {
        let a: Vec<(u32, u32)> = (0..10).map(|i| (i, 100 + i)).collect();
        let b: Vec<(u32, u32)> = (0..3).map(|i| (i, 200 + i)).collect();
        let refs = [
            RefPoints {
                pairs: &a,
                ref_tokens: 16,
                mask: None,
            },
            RefPoints {
                pairs: &b,
                ref_tokens: 16,
                mask: None,
            },
            RefPoints {
                pairs: &[],
                ref_tokens: 16,
                mask: None,
            },
        ];
        let s = sample_points(&refs, 4, &mut rng(1)).unwrap();
        assert_eq!(
            s.segments,
            vec![4, 3, 0],
            "capped at P, all when fewer, none when empty"
        );
        let mut first: Vec<u32> = s.ref_idx[..4].to_vec();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 4, "no point twice");
        assert!(
            s.ref_idx[4..].iter().all(|&i| (16..19).contains(&i)),
            "reference 1 starts at 16"
        );
        for (&r, &t) in s.ref_idx.iter().zip(&s.tgt_idx) {
            let local = r % 16;
            assert_eq!(
                t,
                if r < 16 { 100 + local } else { 200 + local },
                "pairs stay paired"
            );
        }
        assert_eq!(s, sample_points(&refs, 4, &mut rng(1)).unwrap(), "seeded");
    }

    #[test]
    fn zero_points_takes_every_pair_in_order_without_drawing() {
        let a: Vec<(u32, u32)> = (0..5).map(|i| (4 - i, 10 + i)).collect();
        let b: Vec<(u32, u32)> = vec![(1, 7), (1, 8)];
        let refs = [
            RefPoints {
                pairs: &a,
                ref_tokens: 6,
                mask: None,
            },
            RefPoints {
                pairs: &b,
                ref_tokens: 2,
                mask: None,
            },
        ];
        let mut r = rng(3);
        let s = sample_points(&refs, 0, &mut r).unwrap();
        assert_eq!(s.segments, vec![5, 2]);
        assert_eq!(s.ref_idx, vec![4, 3, 2, 1, 0, 7, 7]);
        assert_eq!(s.tgt_idx, vec![10, 11, 12, 13, 14, 7, 8]);
        assert_eq!(r.random::<u64>(), rng(3).random::<u64>(), "nothing drawn");
    }

    #[test]
    fn masked_tokens_are_never_drawn() {
        let pairs: Vec<(u32, u32)> = (0..8).map(|i| (i, i)).collect();
        let mask: Vec<bool> = (0..8).map(|i| i % 2 == 0).collect();
        let refs = [RefPoints {
            pairs: &pairs,
            ref_tokens: 8,
            mask: Some(&mask),
        }];
        let s = sample_points(&refs, 100, &mut rng(2)).unwrap();
        let mut got = s.ref_idx.clone();
        got.sort();
        assert_eq!(got, vec![0, 2, 4, 6]);
    }

    #[test]
    fn bad_masks_and_tokens_are_named() {
        let pairs = [(9u32, 0u32)];
        let e = sample_points(
            &[RefPoints {
                pairs: &pairs,
                ref_tokens: 8,
                mask: None,
            }],
            4,
            &mut rng(0),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("reference 0") && e.contains("token 9") && e.contains("has 8 tokens"),
            "{e}"
        );
        let mask = [true; 3];
        let e = sample_points(
            &[RefPoints {
                pairs: &[],
                ref_tokens: 8,
                mask: Some(&mask),
            }],
            4,
            &mut rng(0),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`mask`") && e.contains("length 3"), "{e}");
    }
}
