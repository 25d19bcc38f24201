//! Helpers: small synthetic datasets, loaders, and shards written without the writer's checks.

use std::collections::BTreeMap;

use datasets::manifest::{Manifest, FORMAT, VERSION};
use datasets::synth::{self, SynthOptions};
use datasets::{
    Cursor, DataReport, Loader, LoaderOptions, Location, PlanSpec, RawSample, TransformSpec,
    WriterOptions,
};

pub fn synth_opts(samples: usize, max_refs: usize) -> SynthOptions {
    SynthOptions {
        samples,
        min_refs: 1,
        max_refs,
        seed: 11,
        size: 64,
        ref_size: 48,
        point_stride: 4,
        aspects: false,
        split: synth::Split::Train,
    }
}

pub fn small_writer() -> WriterOptions {
    WriterOptions {
        row_group_rows: 4,
        rows_per_shard: 12,
        ..Default::default()
    }
}

/// Writes synthetic samples 0..n through the writer.
pub fn write_synth(loc: &Location, n: usize, max_refs: usize) -> Manifest {
    synth::write_dataset(loc.clone(), &synth_opts(n, max_refs), small_writer()).unwrap()
}

/// Writes `rows` as shards of 4-row groups without any checks (to store bad rows).
pub fn write_unchecked(loc: &Location, rows: &[RawSample]) -> Manifest {
    let mut shards = Vec::new();
    for (i, chunk) in rows.chunks(8).enumerate() {
        let file = format!("shard-{i:05}.parquet");
        let bytes = datasets::writer::encode_shard(chunk, 4).unwrap();
        let counts: Vec<datasets::manifest::RowMeta> =
            chunk.iter().map(datasets::manifest::RowMeta::of).collect();
        shards.push(datasets::writer::describe_shard(&file, &bytes, &counts).unwrap());
        loc.put(&file, bytes).unwrap();
    }
    let m = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        total_rows: rows.len(),
        shards,
        created_by: "test".into(),
    };
    m.write(loc).unwrap();
    m
}

pub fn loader_opts(world: usize, rank: usize, batch_size: usize) -> LoaderOptions {
    LoaderOptions {
        plan: PlanSpec {
            seed: 5,
            world,
            rank,
            batch_size,
            shuffle_rows: 6,
            buckets: None,
        },
        transform: TransformSpec {
            resolution: 32,
            ref_resolution: 32,
            aspect_buckets: false,
        },
        io_threads: 3,
        decode_threads: 2,
        prefetch_batches: 3,
        strict: false,
        cached: false,
    }
}

pub fn open(loc: &Location, opts: LoaderOptions, cursor: Cursor) -> Loader {
    let m = std::sync::Arc::new(Manifest::load(loc).unwrap());
    Loader::start(loc.clone(), m, opts, cursor).unwrap()
}

/// Sample ids of the next `n` batches.
pub fn read_ids(loader: &mut Loader, n: usize) -> Vec<Vec<String>> {
    (0..n)
        .map(|_| {
            let b = loader.next_batch().unwrap();
            b.samples.iter().map(|s| s.sample_id.clone()).collect()
        })
        .collect()
}

/// Reads all of epoch 0 with batches of one; returns the ids read and the report.
pub fn read_epoch0(loc: &Location, strict: bool) -> (Vec<String>, DataReport) {
    let mut opts = loader_opts(1, 0, 1);
    opts.strict = strict;
    let mut l = open(loc, opts, Cursor::default());
    let mut ids = Vec::new();
    loop {
        let b = l.next_batch().unwrap();
        if b.epoch > 0 {
            break;
        }
        ids.extend(b.samples.iter().map(|s| s.sample_id.clone()));
        if b.cursor.epoch > 0 {
            break;
        }
    }
    (ids, l.report())
}

/// Skipped sample ids by kind, sorted, each once (a reader that went on into the next epoch
/// before returning may have met a bad sample twice).
pub fn skipped(r: &DataReport) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in &r.skipped {
        m.entry(s.kind.clone())
            .or_default()
            .push(s.sample_id.clone());
    }
    for ids in m.values_mut() {
        ids.sort();
        ids.dedup();
    }
    m
}

/// `remote` holds the same dataset as `local`: objects are found (and missing ones are not),
/// and two ranks' readers yield the same batches from both.
pub fn assert_reads_alike(remote: &Location, local: &Location) {
    assert!(remote.exists("manifest.json").unwrap());
    assert!(!remote.exists("nothing.json").unwrap());
    assert_eq!(remote.get("nothing.json").unwrap(), None);
    for (world, rank) in [(1, 0), (2, 1)] {
        let mut a = open(remote, loader_opts(world, rank, 2), Cursor::default());
        let mut b = open(local, loader_opts(world, rank, 2), Cursor::default());
        for _ in 0..a.batches_in_epoch(0) + 1 {
            assert_eq!(
                a.next_batch().unwrap().samples,
                b.next_batch().unwrap().samples
            );
        }
    }
}

/// A prefix `{base}/{name}-{pid}` below the server URL in the environment variable `var`
/// (exported by the ci/ script `script`). Without it: None, saying the test did not run, or a
/// failure under `MOSAIC_REQUIRE_SERVERS=1` (`.ci/run`).
pub fn server_url(var: &str, script: &str, name: &str) -> Option<String> {
    let base = datasets::testing::server_env(var, script)?;
    Some(format!(
        "{}/{name}-{}",
        base.trim_end_matches('/'),
        std::process::id()
    ))
}
