//! Global batches over an in-memory dataset: a deterministic shuffle per (seed, epoch), and batches
//! formed from samples with the same number of references (their tensors must stack). The
//! position is a small cursor (epoch, batch) so a run can continue exactly where it stopped.

use rand::seq::SliceRandom;

use datasets::Cursor;

use crate::error::{Result, TrainerError};
use flux::rng::{stream, Purpose};

/// Global batches of sample indices over an in-memory dataset, with a resumable cursor.
pub struct GlobalBatches {
    /// Reference count of each sample.
    ref_counts: Vec<usize>,
    batch_size: usize,
    seed: u64,
    cursor: Cursor,
    batches: Vec<Vec<usize>>,
}

impl GlobalBatches {
    pub fn new(ref_counts: Vec<usize>, batch_size: usize, seed: u64) -> Result<Self> {
        let mut l = Self {
            ref_counts,
            batch_size,
            seed,
            cursor: Cursor::default(),
            batches: Vec::new(),
        };
        l.batches = l.epoch_batches(0);
        if l.batches.is_empty() {
            return Err(TrainerError::config(
                "train.batch_size",
                format!("{batch_size} is larger than every group of samples with equal reference counts; lower it or raise data.samples"),
            ));
        }
        Ok(l)
    }

    /// The batches of one epoch: shuffle, then fill per-reference-count buckets in that order;
    /// a full bucket is a batch, leftovers are dropped.
    fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.ref_counts.len()).collect();
        order.shuffle(&mut stream(self.seed, Purpose::Shuffle, &[epoch]));
        let mut buckets: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        let mut out = Vec::new();
        for i in order {
            let bucket = buckets.entry(self.ref_counts[i]).or_default();
            bucket.push(i);
            if bucket.len() == self.batch_size {
                out.push(std::mem::take(bucket));
            }
        }
        out
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Continues from `cursor` (saved by a run with the same global batch size).
    pub fn restore(&mut self, cursor: Cursor) {
        self.batches = self.epoch_batches(cursor.epoch);
        self.cursor = cursor;
    }

    /// Batches per epoch at the current global batch size.
    pub fn batches_per_epoch(&self) -> usize {
        self.batches.len()
    }

    /// The next batch of sample indices.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.cursor.batch >= self.batches.len() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                batch: 0,
            };
            self.batches = self.epoch_batches(self.cursor.epoch);
        }
        let b = self.batches[self.cursor.batch].clone();
        self.cursor.batch += 1;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_share_reference_counts_and_epochs_cover_samples() {
        let counts = vec![1, 2, 1, 2, 1, 2, 1, 2];
        let mut l = GlobalBatches::new(counts.clone(), 2, 5).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let b = l.next_batch();
            assert_eq!(counts[b[0]], counts[b[1]]);
            seen.extend(b);
        }
        seen.sort();
        assert_eq!(seen, (0..8).collect::<Vec<_>>());
        assert_eq!(l.next_batch().len(), 2);
        assert_eq!(l.cursor().epoch, 1);
    }

    #[test]
    fn a_restored_loader_continues_with_the_same_batches() {
        let counts = vec![1, 2, 1, 2, 1, 2, 1, 2, 1, 1];
        let mut a = GlobalBatches::new(counts.clone(), 2, 9).unwrap();
        for _ in 0..7 {
            a.next_batch();
        }
        let mut b = GlobalBatches::new(counts, 2, 9).unwrap();
        b.restore(a.cursor());
        for _ in 0..10 {
            assert_eq!(a.next_batch(), b.next_batch());
        }
    }

    #[test]
    fn oversized_batch_is_refused() {
        let err = GlobalBatches::new(vec![1, 2, 3], 2, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("train.batch_size"), "{err}");
    }
}
