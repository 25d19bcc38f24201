//! Training on SemAlign-MS shards: on-the-fly encoding and the latent cache agree, and a cache
//! made for other settings is refused with the command that makes a matching one.

use std::path::Path;

use datasets::Location;
use trainer::run::Run;

use crate::common::tiny_config;

fn shards(dir: &Path) -> String {
    crate::common::write_test_shards(Location::local(dir), 16, 5);
    dir.display().to_string()
}

fn sets(url: &str, cache: &str) -> Vec<String> {
    vec![
        "data.source=\"shards\"".into(),
        format!("data.url={url:?}"),
        format!("data.cache={cache:?}"),
        "data.resolution=32".into(),
        "data.ref_resolution=32".into(),
        "data.text_tokens=8".into(),
        "train.batch_size=1".into(),
    ]
}

fn losses(dir: &Path, sets: &[String]) -> Vec<f64> {
    let s: Vec<&str> = sets.iter().map(String::as_str).collect();
    let mut run = Run::build(tiny_config(dir, &s)).unwrap();
    (0..4)
        .map(|step| run.train_step(step).unwrap().0.loss)
        .collect()
}

/// The error of building a run with `sets`.
fn build_err(dir: &Path, sets: &[String]) -> String {
    let s: Vec<&str> = sets.iter().map(String::as_str).collect();
    match Run::build(tiny_config(dir, &s)) {
        Ok(_) => panic!("the run was built"),
        Err(e) => e.to_string(),
    }
}

/// `datasets precompute` of the shards at `url` into `cache` with the tiny model's widths.
fn precompute(
    url: &str,
    cache: &str,
    weights: datasets::encode::EncoderWeights,
    transform: datasets::TransformSpec,
) {
    let opts = datasets::cache::PrecomputeOptions {
        encoders: datasets::encode::EncoderSpec {
            weights,
            text_tokens: 8,
            context_dim: 32,
            pooled_dim: 16,
        },
        transform,
        device: candle_core::Device::Cpu,
        part: (0, 1),
        created_by: "test".into(),
    };
    datasets::cache::precompute(
        &Location::parse(url).unwrap(),
        &Location::parse(cache).unwrap(),
        &opts,
    )
    .unwrap();
}

/// Losses with and without the cache agree: the cache stores bf16, the same samples in the
/// same order, to about 1%.
fn assert_close(live: &[f64], cached: &[f64]) {
    for (a, b) in live.iter().zip(cached) {
        assert!(
            (a - b).abs() <= 2e-2 * a.abs().max(1.0),
            "{live:?} vs {cached:?}"
        );
    }
}

#[test]
fn a_latent_cache_trains_like_encoding_on_the_fly() {
    let tmp = tempfile::tempdir().unwrap();
    let url = shards(&tmp.path().join("data"));
    let live = losses(&tmp.path().join("a"), &sets(&url, ""));

    let cache = tmp.path().join("cache").display().to_string();
    precompute(
        &url,
        &cache,
        datasets::encode::EncoderWeights::TinyRandom { seed: 42 },
        datasets::TransformSpec {
            resolution: 32,
            ref_resolution: 32,
            aspect_buckets: false,
        },
    );
    let cached = losses(&tmp.path().join("b"), &sets(&url, &cache));
    assert_close(&live, &cached);

    // With condition dropout the cache's empty caption stands in for dropped captions, as the
    // encoders' encoding of "" does on the fly.
    let dropout = |mut s: Vec<String>| {
        s.extend(["data.drop_text=0.5".into(), "data.drop_both=0.25".into()]);
        s
    };
    let live = losses(&tmp.path().join("d"), &dropout(sets(&url, "")));
    let cached = losses(&tmp.path().join("e"), &dropout(sets(&url, &cache)));
    assert_close(&live, &cached);
    // A cache made before it stored the empty caption is refused then, naming the command.
    std::fs::remove_file(Path::new(&cache).join(datasets::cache::EMPTY_CAPTION)).unwrap();
    let err = build_err(&tmp.path().join("f"), &dropout(sets(&url, &cache)));
    assert!(
        err.contains("data.cache") && err.contains("datasets precompute"),
        "{err}"
    );

    // Other tiny encoders (their seed, `data.encoder_seed`, else `run.seed`) need another cache.
    let mut other = sets(&url, &cache);
    other.push("data.encoder_seed=7".into());
    let err = build_err(&tmp.path().join("c"), &other);
    assert!(err.contains("data.cache"), "{err}");
    assert!(
        err.contains("datasets precompute --data") && err.contains("--seed 7"),
        "{err}"
    );
}

fn fixture_encoders() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../datasets/tests/fixtures/encoders")
        .display()
        .to_string()
}

#[test]
fn pretrained_encoders_train_from_a_pipeline_folder_with_and_without_a_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let url = shards(&tmp.path().join("data"));
    let enc = fixture_encoders();
    let with_encoders = |cache: &str| {
        let mut s = sets(&url, cache);
        s.push(format!("data.encoders={enc:?}"));
        s
    };
    let tiny = losses(&tmp.path().join("tiny"), &sets(&url, ""));
    let live = losses(&tmp.path().join("a"), &with_encoders(""));
    assert!(live.iter().all(|l| l.is_finite()), "{live:?}");
    assert_ne!(live, tiny, "the pretrained encoders are used");

    let cache = tmp.path().join("cache").display().to_string();
    precompute(
        &url,
        &cache,
        datasets::encode::EncoderWeights::Pretrained(datasets::encode::PretrainedSource {
            folder: enc.clone(),
            vae: None,
            cache: tmp.path().join("model-cache"),
        }),
        datasets::TransformSpec {
            resolution: 32,
            ref_resolution: 32,
            aspect_buckets: false,
        },
    );
    let cached = losses(&tmp.path().join("b"), &with_encoders(&cache));
    assert_close(&live, &cached);

    // The cache of the pretrained encoders is refused by a run with the tiny ones, and the
    // message gives the command for the run's encoders.
    let s = sets(&url, &cache);
    let err = build_err(&tmp.path().join("c"), &s);
    assert!(
        err.contains("data.cache") && err.contains("--seed 42"),
        "{err}"
    );
}

#[test]
fn aspect_buckets_train_with_and_without_a_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let opts = datasets::synth::SynthOptions {
        samples: 24,
        max_refs: 2,
        size: 64,
        ref_size: 40,
        seed: 5,
        aspects: true,
        ..Default::default()
    };
    crate::common::write_synth_shards(Location::local(&data), &opts);
    let url = data.display().to_string();
    let with = |cache: &str| {
        let mut s = sets(&url, cache);
        s.extend([
            "data.resolution=64".into(),
            "data.aspect_buckets=true".into(),
        ]);
        s
    };
    let live = losses(&tmp.path().join("a"), &with(""));
    assert!(live.iter().all(|l| l.is_finite()), "{live:?}");

    let cache = tmp.path().join("cache").display().to_string();
    precompute(
        &url,
        &cache,
        datasets::encode::EncoderWeights::TinyRandom { seed: 42 },
        datasets::TransformSpec {
            resolution: 64,
            ref_resolution: 32,
            aspect_buckets: true,
        },
    );
    let cached = losses(&tmp.path().join("b"), &with(&cache));
    assert_close(&live, &cached);
    // A cache of square targets is refused by a bucketed run, with the flag in the command.
    let mut s = sets(&url, &cache);
    s.push("data.resolution=64".into());
    let err = build_err(&tmp.path().join("c"), &s);
    assert!(err.contains("data.cache"), "{err}");
    let mut s = with(&cache);
    s.push("data.ref_resolution=48".into());
    let err = build_err(&tmp.path().join("d"), &s);
    assert!(err.contains("--aspect-buckets"), "{err}");
}
