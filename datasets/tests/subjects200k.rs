//! The importer on a fixture in the released Subjects200K layout (made by
//! ci/subjects200k_fixture.py with Pillow and torch): the official filter, crops, mask and
//! matcher agreement give exactly the official `build_ref2tgt_mapping` pairs at 1024 px.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use datasets::subjects200k::{import, read_uids, ImportOptions};
use datasets::{Cursor, Location, ShardWriter};

use crate::common::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/subjects200k")
}

fn options(dir: &Path, uids: bool) -> ImportOptions {
    ImportOptions {
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

#[test]
fn imported_pairs_equal_the_official_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Location::local(tmp.path());
    let report = run(&options(&fixture(), true), &out);
    assert_eq!(
        (
            report.rows,
            report.filtered_collection,
            report.filtered_quality,
            report.kept
        ),
        (6, 1, 2, 3),
        "{report:?}"
    );
    assert_eq!((report.with_mask, report.with_coords), (2, 2), "{report:?}");
    assert!(report.skipped.is_empty(), "{report:?}");

    let expected: BTreeMap<String, Vec<(u32, u32)>> =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
            .unwrap();
    let mut opts = loader_opts(1, 0, 1);
    opts.transform = datasets::TransformSpec {
        resolution: 1024,
        ref_resolution: 1024,
        aspect_buckets: false,
    };
    let mut l = open(&out, opts, Cursor::default());
    let mut seen = 0;
    for _ in 0..3 {
        for d in l.next_batch().unwrap().samples {
            let mut got: Vec<(u32, u32)> = d.refs[0]
                .pairs
                .iter()
                .map(|p| (p.ref_token, p.tgt_token))
                .collect();
            got.sort();
            assert_eq!(&got, &expected[&d.sample_id], "sample {}", d.sample_id);
            assert!(d.caption.starts_with("a ") && d.caption.ends_with("on a white table"));
            seen += 1;
        }
    }
    assert_eq!(seen, 3);
    // Two kept samples have correspondences, one (no coordinate files) has none.
    assert_eq!(expected.values().filter(|v| !v.is_empty()).count(), 2);
}

#[test]
fn without_the_exact_uids_files_are_not_found_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let report = run(&options(&fixture(), false), &Location::local(tmp.path()));
    assert_eq!(report.kept, 3);
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
    assert_eq!(report.kept, 2, "{report:?}");
    assert_eq!(report.skipped.len(), 1);
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert!(report.skipped[0].contains(&name), "{:?}", report.skipped);
}
