//! Aspect buckets: targets of many aspect ratios are batched by bucket (every batch one shape,
//! the shape the target's aspect asks for), a resumed reader still yields exactly the remaining
//! samples, the latent cache keeps the buckets, and a manifest without (or with wrong) target
//! sizes is refused or reported.

use std::collections::{BTreeSet, HashMap};

use datasets::cache::{self, PrecomputeOptions};
use datasets::encode::{EncoderSpec, EncoderWeights};
use datasets::synth::{self, SynthOptions};
use datasets::{Cursor, LoaderOptions, Location, Manifest};

use crate::common::*;

fn write_aspects(loc: &Location, n: usize) -> Manifest {
    synth::write_dataset(loc.clone(), &aspect_opts(n), small_writer()).unwrap()
}

fn bucket_opts(world: usize, rank: usize) -> LoaderOptions {
    let mut o = loader_opts(world, rank, 2);
    // 64 px (4 x 4 tokens) has three buckets: 48 x 80, 64 x 64 and 80 x 48.
    o.plan.buckets = Some(64);
    o.transform.resolution = 64;
    o.transform.aspect_buckets = true;
    o
}

fn aspect_opts(n: usize) -> SynthOptions {
    SynthOptions {
        aspects: true,
        ..synth_opts(n, 2)
    }
}

/// The [width, height] the manifest records for every sample, by id; checked against the
/// images (the writer writes samples in order).
fn sizes(loc: &Location, n: usize) -> HashMap<String, [u32; 2]> {
    let m = Manifest::load(loc).unwrap();
    let targets: Vec<[u32; 2]> = m
        .shards
        .iter()
        .flat_map(|s| s.row_groups.iter().flat_map(|g| g.targets.clone()))
        .collect();
    assert_eq!(targets.len(), n);
    (0..n)
        .zip(targets)
        .map(|(i, t)| {
            let raw = synth::sample(&aspect_opts(n), i);
            assert_eq!(datasets::transform::image_size(&raw.target), Some(t));
            (raw.sample_id, t)
        })
        .collect()
}

#[test]
fn batches_share_the_bucket_their_targets_ask_for() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    write_aspects(&loc, 40);
    let recorded = sizes(&loc, 40);
    for world in [1, 2] {
        let mut shapes = BTreeSet::new();
        let mut seen = 0;
        for rank in 0..world {
            let mut l = open(&loc, bucket_opts(world, rank), Cursor::default());
            for _ in 0..l.batches_in_epoch(0) {
                let b = l.next_batch().unwrap();
                let first = &b.samples[0];
                let shape = (first.target.width, first.target.height);
                for s in &b.samples {
                    assert_eq!(
                        (s.target.width, s.target.height),
                        shape,
                        "one shape per batch"
                    );
                    assert_eq!((s.grid.cols * 16, s.grid.rows * 16), shape);
                    let [w, h] = recorded[&s.sample_id];
                    assert_eq!(Some(shape), datasets::buckets::pick(64, w, h));
                    assert_eq!(s.refs.len(), first.refs.len());
                }
                shapes.insert(shape);
                seen += b.samples.len();
            }
            assert_eq!(l.report().skipped_total, 0);
        }
        assert_eq!(shapes.len(), 3, "shapes {shapes:?}");
        assert!(
            seen >= 40 - 2 * 2 * 5 * world,
            "world {world}: only {seen} read"
        );
    }
}

#[test]
fn a_resumed_reader_with_buckets_yields_exactly_the_remaining_samples() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    write_aspects(&loc, 40);
    for world in [1, 2] {
        for rank in 0..world {
            let mut full = open(&loc, bucket_opts(world, rank), Cursor::default());
            let per_epoch = full.batches_in_epoch(0);
            let total = per_epoch + 2;
            let want = read_ids(&mut full, total);
            for stop in [1, per_epoch / 2, per_epoch] {
                let mut a = open(&loc, bucket_opts(world, rank), Cursor::default());
                let mut got = read_ids(&mut a, stop);
                let cursor = a.cursor();
                drop(a);
                let mut b = open(&loc, bucket_opts(world, rank), cursor);
                got.extend(read_ids(&mut b, total - stop));
                assert_eq!(got, want, "world {world} rank {rank} stopped after {stop}");
            }
        }
    }
}

#[test]
fn manifests_without_or_with_wrong_target_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    let mut m = write_aspects(&loc, 12);
    // The plan and the transform must agree.
    let mut o = bucket_opts(1, 0);
    o.plan.buckets = None;
    let e = datasets::Loader::start(loc.clone(), m.clone().into(), o, Cursor::default())
        .err()
        .unwrap()
        .message();
    assert!(e.contains("aspect buckets"), "{e}");

    // A manifest from before aspect buckets records no sizes.
    let mut old = m.clone();
    for s in &mut old.shards {
        for g in &mut s.row_groups {
            g.targets.clear();
        }
    }
    let e = datasets::Loader::start(
        loc.clone(),
        old.into(),
        bucket_opts(1, 0),
        Cursor::default(),
    )
    .err()
    .unwrap()
    .message();
    assert!(
        e.contains("manifest.json") && e.contains("records no target sizes"),
        "{e}"
    );

    // A size that does not describe the image: the sample is skipped and reported.
    let victim = {
        let g = &mut m.shards[0].row_groups[0];
        let [w, h] = g.targets[1];
        // Recorded as the other extreme of its actual aspect: another bucket.
        g.targets[1] = if w > h { [1000, 2000] } else { [2000, 1000] };
        g.targets[2] = [0, 0];
        (1, 2)
    };
    m.write(&loc).unwrap();
    let (ids, report) = {
        let mut l = open(&loc, bucket_opts(1, 0), Cursor::default());
        let mut ids = Vec::new();
        for _ in 0..l.batches_in_epoch(0) {
            ids.extend(
                l.next_batch()
                    .unwrap()
                    .samples
                    .into_iter()
                    .map(|s| s.sample_id),
            );
        }
        (ids, l.report())
    };
    let bad: Vec<&str> = report
        .skipped
        .iter()
        .map(|s| s.sample_id.as_str())
        .collect();
    let first = synth::sample(&aspect_opts(12), victim.0).sample_id;
    let second = synth::sample(&aspect_opts(12), victim.1).sample_id;
    assert!(bad.contains(&first.as_str()), "{bad:?}");
    assert!(bad.contains(&second.as_str()), "{bad:?}");
    assert!(!ids.contains(&first) && !ids.contains(&second));
    let reasons: Vec<&str> = report.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("does not describe")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("missing or zero")),
        "{reasons:?}"
    );
}

#[test]
fn the_latent_cache_keeps_the_buckets() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Location::local(&tmp.path().join("data"));
    let out = Location::local(&tmp.path().join("cache"));
    write_aspects(&data, 16);
    let opts = PrecomputeOptions {
        encoders: EncoderSpec {
            weights: EncoderWeights::TinyRandom { seed: 9 },
            text_tokens: 8,
            context_dim: 32,
            pooled_dim: 16,
        },
        transform: bucket_opts(1, 0).transform,
        device: candle_core::Device::Cpu,
        part: (0, 1),
        created_by: "test".into(),
    };
    cache::precompute(&data, &out, &opts).unwrap();
    let fp = cache::fingerprint(&opts.encoders, &opts.transform).unwrap();
    assert!(fp.contains("aspect-buckets"), "{fp}");
    let square = cache::fingerprint(&opts.encoders, &loader_opts(1, 0, 2).transform).unwrap();
    assert!(
        cache::open(&out, &data, &square).is_err(),
        "a square run refuses it"
    );
    let m = cache::open(&out, &data, &fp).unwrap();
    let mut raw = open(&data, bucket_opts(1, 0), Cursor::default());
    let mut lo = bucket_opts(1, 0);
    lo.cached = true;
    let mut cached = datasets::Loader::start(out, m.into(), lo, Cursor::default()).unwrap();
    for _ in 0..raw.batches_in_epoch(0) {
        let (a, b) = (raw.next_batch().unwrap(), cached.next_batch().unwrap());
        assert_eq!(a.samples.len(), b.cached.len());
        for (d, c) in a.samples.iter().zip(&b.cached) {
            assert_eq!(d.sample_id, c.sample_id);
            assert_eq!((d.grid.rows as u32, d.grid.cols as u32), c.grid);
            assert_eq!(
                c.target.shape,
                vec![16, d.target.height / 8, d.target.width / 8]
            );
        }
    }
}

#[test]
fn inspect_counts_rows_per_bucket_and_draws_bucketed_targets() {
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    write_aspects(&loc, 20);
    let opts = datasets::inspect::InspectOptions {
        samples: 8,
        resolution: 64,
        grid: 4,
        lines_per_ref: 4,
        seed: 0,
        aspect_buckets: true,
    };
    let url = dir.path().display().to_string();
    let (st, kept) = datasets::inspect::inspect(&url, &opts).unwrap();
    assert_eq!(st.target_buckets.values().sum::<usize>(), 20);
    assert_eq!(st.targets_unknown, 0);
    let want: std::collections::BTreeMap<String, usize> =
        sizes(&loc, 20)
            .values()
            .fold(Default::default(), |mut m, &[w, h]| {
                let (bw, bh) = datasets::buckets::pick(64, w, h).unwrap();
                *m.entry(format!("{bw}x{bh}")).or_default() += 1;
                m
            });
    assert_eq!(st.target_buckets, want);
    assert_eq!(st.decoded, 8);
    let img = datasets::inspect::grid(&kept, 4);
    assert_eq!(img.width() % 80, 0, "cells as wide as the widest bucket");
}
