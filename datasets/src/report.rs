//! The per-run data report: every skipped sample with its id, where it is and why, counted by
//! kind, plus the rows dropped at epoch ends. Nothing is skipped silently.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Samples listed by id beyond this many are only counted (the counts stay exact).
const MAX_LISTED: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub sample_id: String,
    /// Shard file, row group and row.
    pub at: String,
    pub kind: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// Samples skipped, by kind of problem.
    pub skipped_by_kind: BTreeMap<String, usize>,
    pub skipped_total: usize,
    /// Batches not trained on because one of their samples was skipped.
    pub batches_dropped: usize,
    /// Rows left over in partial groups at epoch ends (by epoch).
    pub tail_rows_dropped: BTreeMap<u64, usize>,
    pub samples_read: usize,
    pub skipped: Vec<Skipped>,
}

impl DataReport {
    /// Adds `other`'s counts and skipped samples to this report (a run's reports across
    /// loaders that a restore replaced).
    pub fn merge(&mut self, other: DataReport) {
        for (k, n) in other.skipped_by_kind {
            *self.skipped_by_kind.entry(k).or_default() += n;
        }
        self.skipped_total += other.skipped_total;
        self.batches_dropped += other.batches_dropped;
        self.samples_read += other.samples_read;
        self.tail_rows_dropped.extend(other.tail_rows_dropped);
        self.skipped.extend(other.skipped);
    }

    pub fn skip(&mut self, sample_id: &str, at: &str, kind: &str, reason: &str) {
        *self.skipped_by_kind.entry(kind.to_string()).or_default() += 1;
        self.skipped_total += 1;
        if self.skipped.len() < MAX_LISTED {
            self.skipped.push(Skipped {
                sample_id: sample_id.to_string(),
                at: at.to_string(),
                kind: kind.to_string(),
                reason: reason.to_string(),
            });
        }
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        let kinds: Vec<String> = self
            .skipped_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "{} samples read, {} skipped ({}), {} batches dropped, {} rows dropped at epoch ends",
            self.samples_read,
            self.skipped_total,
            if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join(", ")
            },
            self.batches_dropped,
            self.tail_rows_dropped.values().sum::<usize>()
        )
    }
}
