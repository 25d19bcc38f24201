//! `datasets precompute`: the cache mirrors its dataset, reads back in the same plan order with
//! latents equal to on-the-fly encoding (to bf16), keeps bad rows' problems, and is refused
//! for other encoders or another version of the dataset.

use datasets::cache::{self, PrecomputeOptions};
use datasets::encode::{load_encoders, EncoderSpec, EncoderWeights};
use datasets::{Cursor, Location, Manifest};

use crate::common::*;

fn options() -> PrecomputeOptions {
    PrecomputeOptions {
        encoders: EncoderSpec {
            weights: EncoderWeights::TinyRandom { seed: 9 },
            text_tokens: 8,
            context_dim: 32,
            pooled_dim: 16,
        },
        transform: loader_opts(1, 0, 1).transform,
        device: candle_core::Device::Cpu,
        part: (0, 1),
        created_by: "test".into(),
    }
}

#[test]
fn cache_reads_back_in_plan_order_with_the_encoders_values() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Location::local(&tmp.path().join("data"));
    let out = Location::local(&tmp.path().join("cache"));
    let mut rows: Vec<_> = (0..10)
        .map(|i| datasets::synth::sample(&synth_opts(10, 2), i))
        .collect();
    rows[3].target.truncate(10);
    let bad_id = rows[3].sample_id.clone();
    write_unchecked(&data, &rows);
    let opts = options();
    let r = cache::precompute(&data, &out, &opts).unwrap();
    assert_eq!((r.cached, r.bad, r.complete), (9, 1, true));
    let fp = cache::fingerprint(&opts.encoders, &opts.transform).unwrap();
    let m = cache::open(&out, &data, &fp).unwrap();

    let mut raw = open(&data, loader_opts(1, 0, 1), Cursor::default());
    let mut lo = loader_opts(1, 0, 1);
    lo.cached = true;
    let mut cached =
        datasets::Loader::start(out.clone(), std::sync::Arc::new(m), lo, Cursor::default())
            .unwrap();
    let mut enc = load_encoders(
        &opts.encoders,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let n = raw.batches_in_epoch(0);
    for _ in 0..n {
        let (a, b) = (raw.next_batch().unwrap(), cached.next_batch().unwrap());
        assert_eq!((a.epoch, a.index), (b.epoch, b.index));
        assert_eq!(a.samples.len(), b.cached.len());
        for (d, c) in a.samples.iter().zip(&b.cached) {
            assert_eq!(d.sample_id, c.sample_id);
            let want = cache::encode_one(&mut enc, d).unwrap();
            assert_eq!(want.target.shape, c.target.shape);
            for (x, y) in want.target.values.iter().zip(&c.target.values) {
                assert!((x - y).abs() <= 1e-2 * x.abs().max(1.0), "{x} vs {y}");
            }
            assert_eq!(want.pairs, c.pairs);
        }
    }
    // The empty caption's embeddings (for condition dropout) are those of "" to bf16.
    let (txt, pooled) = cache::read_empty_caption(&out).unwrap().unwrap();
    let (want_txt, want_pooled) = enc.encode_text(&[""]).unwrap();
    for (want, got) in [(want_txt, &txt), (want_pooled, &pooled)] {
        let want = want.get(0).unwrap();
        assert_eq!(want.dims(), got.shape.as_slice());
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in want.iter().zip(&got.values) {
            assert!((x - y).abs() <= 1e-2 * x.abs().max(1.0), "{x} vs {y}");
        }
    }
    // The bad row is reported by both readers alike.
    let (ra, rb) = (raw.report(), cached.report());
    assert_eq!(ra.skipped_total, rb.skipped_total);
    assert!(rb.skipped_total >= 1, "{rb:?}");
    assert!(rb.skipped.iter().all(|s| s.sample_id == bad_id), "{rb:?}");
    assert!(
        rb.skipped[0]
            .reason
            .contains("at precompute time (bad-image)"),
        "{:?}",
        rb.skipped[0]
    );
}

#[test]
fn a_cache_for_other_encoders_or_another_dataset_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Location::local(&tmp.path().join("data"));
    let out = Location::local(&tmp.path().join("cache"));
    write_synth(&data, 6, 2);
    let opts = options();
    cache::precompute(&data, &out, &opts).unwrap();
    let mut other = opts.encoders.clone();
    other.weights = EncoderWeights::TinyRandom { seed: 10 };
    let err = cache::open(
        &out,
        &data,
        &cache::fingerprint(&other, &opts.transform).unwrap(),
    )
    .unwrap_err()
    .message();
    assert!(
        err.contains("other encoders or transforms")
            && err.contains("made for:")
            && err.contains("seed10"),
        "{err}"
    );
    // The dataset changes (one more sample): its manifest no longer matches the cache's pin.
    write_synth(&data, 7, 2);
    let err = cache::open(
        &out,
        &data,
        &cache::fingerprint(&opts.encoders, &opts.transform).unwrap(),
    )
    .unwrap_err()
    .message();
    assert!(err.contains("another version of the dataset"), "{err}");
    assert!(Manifest::load(&out).is_ok());
    // Precomputing into it again is refused too, saying which changed and what to do.
    let err = cache::precompute(&data, &out, &opts).unwrap_err().message();
    assert!(
        err.contains("another version of the dataset") && err.contains("delete this folder"),
        "{err}"
    );
    write_synth(&data, 6, 2);
    let again = PrecomputeOptions {
        encoders: other,
        ..options()
    };
    let err = cache::precompute(&data, &out, &again)
        .unwrap_err()
        .message();
    assert!(
        err.contains("other encoders or transforms")
            && err.contains("made for:")
            && err.contains("seed10"),
        "{err}"
    );
    assert!(Manifest::load(&out).is_ok());
}

#[test]
fn precompute_in_parts_makes_the_same_cache_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Location::local(&tmp.path().join("data"));
    let m = write_synth(&data, 30, 2);
    assert_eq!(m.shards.len(), 3);
    let whole = Location::local(&tmp.path().join("whole"));
    let opts = options();
    assert!(cache::precompute(&data, &whole, &opts).unwrap().complete);

    let split = Location::local(&tmp.path().join("split"));
    let part = |r: usize| PrecomputeOptions {
        part: (r, 2),
        ..options()
    };
    // Part 1 of 2 (shard 1) alone: no manifest yet, so no reader takes the cache.
    let r1 = cache::precompute(&data, &split, &part(1)).unwrap();
    assert_eq!((r1.complete, r1.reused_shards), (false, 0));
    assert_eq!(r1.cached + r1.bad, m.shards[1].rows);
    let fp = cache::fingerprint(&opts.encoders, &opts.transform).unwrap();
    assert!(cache::open(&split, &data, &fp).is_err());
    // Part 0 (shards 0 and 2) finishes last and writes the manifest: the same cache.
    let r0 = cache::precompute(&data, &split, &part(0)).unwrap();
    assert!(r0.complete);
    assert_eq!(r0.cached + r0.bad, m.shards[0].rows + m.shards[2].rows);
    let (a, b) = (
        cache::open(&whole, &data, &fp).unwrap(),
        cache::open(&split, &data, &fp).unwrap(),
    );
    assert_eq!(a.shards, b.shards, "byte-identical shards");

    // Run again (as after a preemption): every finished shard is kept, nothing is encoded.
    let again = cache::precompute(&data, &split, &part(0)).unwrap();
    assert_eq!(
        (again.cached, again.reused_shards, again.complete),
        (0, 2, true)
    );
    // A shard lost since is encoded again.
    std::fs::remove_file(tmp.path().join("split").join(&m.shards[2].file)).unwrap();
    let redo = cache::precompute(&data, &split, &part(0)).unwrap();
    assert_eq!(
        (redo.reused_shards, redo.cached + redo.bad),
        (1, m.shards[2].rows)
    );
    assert_eq!(cache::open(&split, &data, &fp).unwrap().shards, a.shards);

    // Other encoders into the same folder: refused, naming the progress file.
    let mut other = part(0);
    other.encoders.weights = EncoderWeights::TinyRandom { seed: 10 };
    let e = cache::precompute(&data, &split, &other)
        .unwrap_err()
        .message();
    assert!(e.contains("precompute/part-0000-of-0002.json"), "{e}");
    let mut bad = options();
    bad.part = (2, 2);
    assert!(cache::precompute(&data, &split, &bad).is_err());
}
