//! Shards round-trip through the reader; ranks read disjoint parts; a resumed reader yields
//! exactly the samples that remained, for 1, 2 and 4 ranks.

use std::collections::HashSet;

use datasets::synth;
use datasets::transform::decode_sample;
use datasets::{Cursor, Location};

use crate::common::*;

#[test]
fn every_sample_comes_back_decoded_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    let m = write_synth(&loc, 30, 3);
    assert_eq!(m.total_rows, 30);
    assert_eq!(m.shards.len(), 3);
    let opts = loader_opts(1, 0, 1);
    let spec = opts.transform;
    let mut l = open(&loc, opts, Cursor::default());
    let src = synth_opts(30, 3);
    let mut seen = HashSet::new();
    for _ in 0..30 {
        let b = l.next_batch().unwrap();
        for d in b.samples {
            let index: usize = d.sample_id.rsplit('-').next().unwrap().parse().unwrap();
            let want = decode_sample(&synth::sample(&src, index), &spec).unwrap();
            assert_eq!(d, want, "sample {index} differs after the round trip");
            assert!(seen.insert(index), "sample {index} read twice");
        }
    }
    assert_eq!(seen.len(), 30);
    assert_eq!(l.cursor(), Cursor { epoch: 1, batch: 0 });
    assert_eq!(l.report().skipped_total, 0);
}

#[test]
fn ranks_read_disjoint_parts_and_batches_share_reference_counts() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    write_synth(&loc, 40, 3);
    for world in [2, 4] {
        let mut all = Vec::new();
        for rank in 0..world {
            let mut l = open(&loc, loader_opts(world, rank, 2), Cursor::default());
            let n = l.batches_in_epoch(0);
            for _ in 0..n {
                let b = l.next_batch().unwrap();
                assert_eq!(b.samples.len(), 2);
                assert_eq!(b.samples[0].refs.len(), b.samples[1].refs.len());
                all.extend(b.samples.into_iter().map(|s| s.sample_id));
            }
            assert_eq!(l.cursor(), Cursor { epoch: 1, batch: 0 });
            let r = l.report();
            assert!(r.tail_rows_dropped[&0] <= 2 * 3, "{r:?}");
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "world {world}: a sample read by two ranks");
        assert!(n >= 40 - world * 3, "world {world}: only {n} of 40 read");
    }
}

#[test]
fn a_resumed_reader_yields_exactly_the_remaining_samples() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    write_synth(&loc, 48, 3);
    for world in [1, 2, 4] {
        for rank in 0..world {
            let mut full = open(&loc, loader_opts(world, rank, 2), Cursor::default());
            let per_epoch = full.batches_in_epoch(0);
            let total = per_epoch + full.batches_in_epoch(1) + 1;
            let want = read_ids(&mut full, total);
            for stop in [1, per_epoch / 2, per_epoch, per_epoch + 1] {
                let mut a = open(&loc, loader_opts(world, rank, 2), Cursor::default());
                let mut got = read_ids(&mut a, stop);
                let cursor = a.cursor();
                drop(a);
                let mut b = open(&loc, loader_opts(world, rank, 2), cursor);
                got.extend(read_ids(&mut b, total - stop));
                assert_eq!(
                    got, want,
                    "world {world} rank {rank}: resumed after {stop} batches at {cursor:?}"
                );
            }
        }
    }
}

#[test]
fn epochs_reshuffle_and_a_seed_fixes_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    write_synth(&loc, 24, 2);
    let mut l = open(&loc, loader_opts(1, 0, 1), Cursor::default());
    let e0 = read_ids(&mut l, 24);
    let e1 = read_ids(&mut l, 24);
    assert_ne!(e0, e1);
    let mut sorted0: Vec<_> = e0.iter().flatten().collect();
    let mut sorted1: Vec<_> = e1.iter().flatten().collect();
    sorted0.sort();
    sorted1.sort();
    assert_eq!(sorted0, sorted1);
    let mut again = open(&loc, loader_opts(1, 0, 1), Cursor::default());
    assert_eq!(read_ids(&mut again, 24), e0);
}
