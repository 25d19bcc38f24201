//! The importer on a fixture in the released Subjects200K layout (made by
//! ci/subjects200k_fixture.py with Pillow and torch): the official filter, crops, mask and
//! matcher agreement give exactly the pairs of a torch re-implementation of the official
//! dataset code, at 512 px (coordinate fields averaged to 32 x 32 first) and at 1024 px.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use datasets::subjects200k::{import, read_uids, ImportOptions, Mapping};
use datasets::{Cursor, Location, ShardWriter};

use crate::common::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/subjects200k")
}

fn options(dir: &Path, uids: bool) -> ImportOptions {
    options_for(dir, uids, Mapping::Grid64)
}

fn official(size: usize) -> Mapping {
    Mapping::Official {
        resolution: size,
        ref_resolution: size,
    }
}

fn options_for(dir: &Path, uids: bool, mapping: Mapping) -> ImportOptions {
    ImportOptions {
        mapping,
        parquet: vec![dir.join("data/train-00000.parquet")],
        mask_dir: dir.join("mask"),
        coord_dir: dir.join("coord"),
        collection: "collection_2".into(),
        min_quality: 5.0,
        uids: uids.then(|| read_uids(&dir.join("uids.jsonl")).unwrap()),
    }
}

fn run(opts: &ImportOptions, out: &Location) -> datasets::subjects200k::ImportReport {
    let mut w = ShardWriter::new(out.clone(), small_writer()).unwrap();
    let report = import(opts, &mut w).unwrap();
    w.finish().unwrap();
    report
}

/// The expected pairs of the fixture for a run at `size` px, by sample id.
fn expected(size: usize) -> BTreeMap<String, Vec<(u32, u32)>> {
    let path = fixture().join(format!("expected_{size}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The pairs the trainer's transform gives each imported sample at `size` px, by sample id.
fn trained_pairs(out: &Location, size: usize) -> BTreeMap<String, Vec<(u32, u32)>> {
    let mut opts = loader_opts(1, 0, 1);
    opts.transform = datasets::TransformSpec {
        resolution: size,
        ref_resolution: size,
        aspect_buckets: false,
    };
    let mut l = open(out, opts, Cursor::default());
    let mut got = BTreeMap::new();
    for _ in 0..l.batches_in_epoch(0) {
        for d in l.next_batch().unwrap().samples {
            let mut pairs: Vec<(u32, u32)> = d.refs[0]
                .pairs
                .iter()
                .map(|p| (p.ref_token, p.tgt_token))
                .collect();
            pairs.sort();
            assert!(d.caption.starts_with("a ") && d.caption.ends_with("on a white table"));
            got.insert(d.sample_id, pairs);
        }
    }
    got
}

#[test]
fn imported_pairs_equal_the_official_mapping_at_512_and_1024_px() {
    for size in [512, 1024] {
        let tmp = tempfile::tempdir().unwrap();
        let out = Location::local(tmp.path());
        let report = run(&options_for(&fixture(), true, official(size)), &out);
        assert_eq!(
            (
                report.rows,
                report.filtered_collection,
                report.filtered_quality,
                report.kept
            ),
            (8, 1, 2, 5),
            "{report:?}"
        );
        assert_eq!((report.with_mask, report.with_coords), (4, 4), "{report:?}");
        assert!(report.skipped.is_empty(), "{report:?}");
        let want = expected(size);
        assert_eq!(trained_pairs(&out, size), want, "{size} px");
        // Four kept samples have correspondences, one (no coordinate files) has none.
        assert_eq!(want.values().filter(|v| !v.is_empty()).count(), 4);
    }
}

#[test]
fn grid64_equals_official_only_at_1024_px() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Location::local(tmp.path());
    run(&options(&fixture(), true), &out);
    assert_eq!(trained_pairs(&out, 1024), expected(1024));
    // At 512 px the official loader checks agreement on the averaged 32 x 32 fields (and maps
    // target tokens from them): every fixture sample with pairs keeps other pairs than the
    // 64-grid pairs mapped to 32 x 32 by centres.
    let at_512 = trained_pairs(&out, 512);
    let want = expected(512);
    let differ = want
        .iter()
        .filter(|(id, pairs)| at_512[*id] != **pairs)
        .count();
    assert_eq!(differ, 4);
}

#[test]
fn without_the_exact_uids_files_are_not_found_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let report = run(&options(&fixture(), false), &Location::local(tmp.path()));
    assert_eq!(report.kept, 5);
    assert_eq!((report.with_mask, report.with_coords), (0, 0), "{report:?}");
}

#[test]
fn a_damaged_coordinate_file_skips_its_row_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("fixture");
    let copy_dir = |from: &Path, to: &Path| {
        fn walk(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let p = e.unwrap().path();
                let t = to.join(p.file_name().unwrap());
                if p.is_dir() {
                    walk(&p, &t);
                } else {
                    std::fs::copy(&p, &t).unwrap();
                }
            }
        }
        walk(from, to)
    };
    copy_dir(&fixture(), &copy);
    let dift = copy.join("coord/dift");
    let victim = std::fs::read_dir(&dift)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&victim, b"PK\x03\x04 not a torch file").unwrap();
    let report = run(
        &options(&copy, true),
        &Location::local(&tmp.path().join("out")),
    );
    assert_eq!(report.kept, 4, "{report:?}");
    assert_eq!(report.skipped.len(), 1);
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert!(report.skipped[0].contains(&name), "{:?}", report.skipped);
}
