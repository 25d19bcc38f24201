//! Which rows a rank reads, in which order, as batches: a pure function of the manifest, the
//! seed, the epoch, the world size and the rank, so the position in a run is a small [`Cursor`].
//!
//! An epoch: the row groups of all shards are shuffled by (seed, epoch) and dealt to ranks, each
//! to the rank holding the fewest rows so far (ranks get disjoint parts within one row group of
//! each other in size, and each rank fetches only its own row groups). A rank's rows are shuffled
//! within windows of `shuffle_rows` rows by (seed, epoch, rank, window), then grouped into
//! batches of equal reference count (their tensors must stack): a batch is emitted when its
//! group fills; what is left in the groups at the end of the epoch is dropped and counted. Rows
//! whose reference count is invalid become batches of their own, which the reader skips and
//! reports by sample id.
//!
//! Resuming with the same world size continues exactly. With another world size the dealing
//! changes: a resumed run starts the same epoch at the same fraction of it ([`Cursor::rescale`]),
//! so within that epoch some samples may repeat or be missed; later epochs are exact again.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// Where a rank stands: the next batch to read in an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub batch: usize,
}

impl Cursor {
    /// The position in a world of another size: the same epoch, at the same fraction.
    pub fn rescale(self, old_batches: usize, new_batches: usize) -> Self {
        let batch = if old_batches == 0 {
            0
        } else {
            ((self.batch as u128 * new_batches as u128).div_ceil(old_batches as u128)) as usize
        };
        Self {
            epoch: self.epoch,
            batch,
        }
    }
}

/// A row: shard index, row group index, row within the row group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowRef {
    pub shard: u32,
    pub group: u32,
    pub row: u32,
}

impl RowRef {
    pub fn unit(&self) -> (u32, u32) {
        (self.shard, self.group)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSpec {
    pub seed: u64,
    pub world: usize,
    pub rank: usize,
    pub batch_size: usize,
    pub shuffle_rows: usize,
    /// Some(resolution): aspect buckets at that resolution, and a batch's targets share one
    /// (see `buckets`); None: every target is square.
    pub buckets: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    pub batches: Vec<Vec<RowRef>>,
    /// Rows of this rank not in any batch (partial groups at the end of the epoch).
    pub dropped: Vec<RowRef>,
}

/// A well-mixed seed from the run seed and a few tags (splitmix64 steps).
pub fn mix(seed: u64, tags: &[u64]) -> u64 {
    let mut z = seed ^ 0x6d6f_7361_6963_6473;
    for &t in tags.iter().chain([&0x5eed]) {
        z = z.wrapping_add(t).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
    }
    z
}

const UNITS: u64 = 1;
const ROWS: u64 = 2;

/// The row groups each rank reads in `epoch`, in reading order.
pub fn deal_units(
    manifest: &Manifest,
    seed: u64,
    epoch: u64,
    world: usize,
) -> Vec<Vec<(u32, u32)>> {
    let mut units: Vec<(u32, u32, usize)> = manifest
        .shards
        .iter()
        .enumerate()
        .flat_map(|(s, shard)| {
            shard
                .row_groups
                .iter()
                .enumerate()
                .map(move |(g, rg)| (s as u32, g as u32, rg.rows))
        })
        .collect();
    units.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(seed, &[UNITS, epoch])));
    let mut dealt = vec![Vec::new(); world.max(1)];
    let mut rows = vec![0usize; world.max(1)];
    for (s, g, n) in units {
        let r = (0..rows.len()).min_by_key(|&r| (rows[r], r)).unwrap_or(0);
        rows[r] += n;
        dealt[r].push((s, g));
    }
    dealt
}

/// This rank's batches in `epoch`.
pub fn plan_epoch(manifest: &Manifest, spec: &PlanSpec, epoch: u64) -> EpochPlan {
    let units = deal_units(manifest, spec.seed, epoch, spec.world);
    let mine = units.get(spec.rank).cloned().unwrap_or_default();
    let mut rows: Vec<(RowRef, usize)> = Vec::new();
    for (s, g) in mine {
        let info = &manifest.shards[s as usize].row_groups[g as usize];
        for (row, k) in info.refs.bytes().enumerate() {
            rows.push((
                RowRef {
                    shard: s,
                    group: g,
                    row: row as u32,
                },
                (k - b'0') as usize,
            ));
        }
    }
    let window = spec.shuffle_rows.max(1);
    for (w, chunk) in rows.chunks_mut(window).enumerate() {
        let key = mix(spec.seed, &[ROWS, epoch, spec.rank as u64, w as u64]);
        chunk.shuffle(&mut ChaCha8Rng::seed_from_u64(key));
    }
    let bs = spec.batch_size.max(1);
    // Partial batches by (reference count, target bucket); without buckets the bucket is one
    // and the same for all.
    let mut groups: BTreeMap<(usize, (usize, usize)), Vec<RowRef>> = BTreeMap::new();
    let mut batches = Vec::new();
    let shapes = spec.buckets.map(crate::buckets::buckets);
    for (r, k) in rows {
        let bucket = match &shapes {
            None => Some((0, 0)),
            Some(shapes) => recorded_size(manifest, &r)
                .and_then(|[w, h]| crate::buckets::pick_from(shapes, w, h)),
        };
        let Some(bucket) = bucket.filter(|_| (1..=crate::schema::MAX_REFS).contains(&k)) else {
            // An invalid row (reference count, or unknown target size with buckets) goes
            // alone, so the reader reports it by id instead of dropping it silently in a tail.
            batches.push(vec![r]);
            continue;
        };
        let g = groups.entry((k, bucket)).or_default();
        g.push(r);
        if g.len() == bs {
            batches.push(std::mem::take(g));
        }
    }
    EpochPlan {
        batches,
        dropped: groups.into_values().flatten().collect(),
    }
}

/// The target bucket (width, height) of row `r` under `spec`'s buckets, from the size the
/// manifest records; None without buckets or without a usable size.
pub fn row_bucket(manifest: &Manifest, spec: &PlanSpec, r: &RowRef) -> Option<(usize, usize)> {
    let [w, h] = recorded_size(manifest, r)?;
    crate::buckets::pick(spec.buckets?, w, h)
}

/// The [width, height] the manifest records for row `r`'s target.
fn recorded_size(manifest: &Manifest, r: &RowRef) -> Option<[u32; 2]> {
    let info = manifest
        .shards
        .get(r.shard as usize)?
        .row_groups
        .get(r.group as usize)?;
    info.targets.get(r.row as usize).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{RowGroupInfo, ShardInfo, Span};

    pub(crate) fn manifest(groups: &[&str]) -> Manifest {
        let span = Span {
            offset: 0,
            length: 0,
            sha256: String::new(),
        };
        let shards: Vec<ShardInfo> = groups
            .chunks(3)
            .enumerate()
            .map(|(i, gs)| ShardInfo {
                file: format!("shard-{i:05}.parquet"),
                rows: gs.iter().map(|g| g.len()).sum(),
                bytes: 8,
                sha256: String::new(),
                footer: Span {
                    offset: 0,
                    length: 8,
                    sha256: String::new(),
                },
                row_groups: gs
                    .iter()
                    .map(|g| RowGroupInfo {
                        rows: g.len(),
                        span: span.clone(),
                        refs: g.to_string(),
                        targets: Vec::new(),
                    })
                    .collect(),
            })
            .collect();
        Manifest {
            format: crate::manifest::FORMAT.into(),
            version: crate::manifest::VERSION,
            total_rows: shards.iter().map(|s| s.rows).sum(),
            shards,
            created_by: String::new(),
        }
    }

    fn spec(world: usize, rank: usize) -> PlanSpec {
        PlanSpec {
            seed: 3,
            world,
            rank,
            batch_size: 2,
            shuffle_rows: 8,
            buckets: None,
        }
    }

    #[test]
    fn ranks_read_disjoint_balanced_parts_covering_everything() {
        let m = manifest(&["1212", "2211", "1111", "22", "1122", "121", "2"]);
        for world in [1, 2, 3, 4] {
            let mut all = Vec::new();
            let mut sizes = Vec::new();
            for rank in 0..world {
                let p = plan_epoch(&m, &spec(world, rank), 5);
                let mut rows: Vec<RowRef> = p.batches.iter().flatten().copied().collect();
                rows.extend(&p.dropped);
                sizes.push(rows.len());
                for b in &p.batches {
                    let k = |r: &RowRef| {
                        m.shards[r.shard as usize].row_groups[r.group as usize]
                            .refs
                            .as_bytes()[r.row as usize]
                    };
                    assert!(b.iter().all(|r| k(r) == k(&b[0])), "mixed reference counts");
                }
                all.extend(rows);
            }
            all.sort();
            let n = all.len();
            all.dedup();
            assert_eq!(all.len(), n, "a row dealt twice");
            assert_eq!(n, m.total_rows);
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 4, "unbalanced {sizes:?}");
        }
    }

    #[test]
    fn plans_are_deterministic_and_epochs_differ() {
        let m = manifest(&["1212", "2211", "1111", "22", "1122", "121", "2"]);
        let a = plan_epoch(&m, &spec(2, 1), 0);
        assert_eq!(a, plan_epoch(&m, &spec(2, 1), 0));
        assert_ne!(a, plan_epoch(&m, &spec(2, 1), 1));
    }

    #[test]
    fn rescaled_cursor_keeps_the_fraction() {
        let c = Cursor { epoch: 2, batch: 5 };
        assert_eq!(
            c.rescale(10, 20),
            Cursor {
                epoch: 2,
                batch: 10
            }
        );
        assert_eq!(c.rescale(10, 5), Cursor { epoch: 2, batch: 3 });
        assert_eq!(c.rescale(0, 5), Cursor { epoch: 2, batch: 0 });
    }
}
