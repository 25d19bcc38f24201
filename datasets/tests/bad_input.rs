//! Each kind of bad input is skipped and reported with its sample id (and, in strict mode, is
//! an error at the first one); the good samples around it are all read, once.

use datasets::synth;
use datasets::{Cursor, DataError, Location, RawSample};
use parquet::file::metadata::ParquetMetaDataReader;

use crate::common::*;

fn good(n: usize) -> Vec<RawSample> {
    let opts = synth_opts(n, 2);
    (0..n).map(|i| synth::sample(&opts, i)).collect()
}

/// Writes 8 good samples with `bad` in the middle; checks that exactly `bad` is reported under
/// `kind` with a reason containing `reason`, that the others are all read, and that strict mode
/// stops naming it.
fn expect_skipped(bad: RawSample, kind: &str, reason: &str) {
    let mut rows = good(8);
    let id = bad.sample_id.clone();
    rows.insert(4, bad);
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    write_unchecked(&loc, &rows);
    let (ids, report) = read_epoch0(&loc, false);
    let mut ids_sorted = ids.clone();
    ids_sorted.sort();
    let mut want: Vec<String> = good(8).into_iter().map(|s| s.sample_id).collect();
    want.sort();
    assert_eq!(ids_sorted, want, "the good samples are read once each");
    assert_eq!(
        skipped(&report).get(kind),
        Some(&vec![id.clone()]),
        "{report:?}"
    );
    assert!(
        report.skipped.iter().all(|s| s.sample_id == id),
        "{report:?}"
    );
    assert!(
        report.skipped[0].reason.contains(reason),
        "{:?}",
        report.skipped[0]
    );
    assert!(
        report.skipped[0].at.contains("row group 1 row 0"),
        "{:?}",
        report.skipped[0]
    );

    let mut opts = loader_opts(1, 0, 1);
    opts.strict = true;
    let mut l = open(&loc, opts, Cursor::default());
    let err = loop {
        match l.next_batch() {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    match &err {
        DataError::Sample { sample_id, .. } => assert_eq!(sample_id, &id),
        other => panic!("strict mode: {other}"),
    }
    assert!(err.message().contains(reason), "{}", err.message());
}

fn named(id: &str) -> RawSample {
    let mut s = good(9).pop().unwrap();
    s.sample_id = id.to_string();
    s
}

#[test]
fn truncated_image_bytes() {
    let mut s = named("bad-truncated");
    s.target.truncate(s.target.len() / 2);
    expect_skipped(s, "bad-image", "target");
}

#[test]
fn unknown_image_format() {
    let mut s = named("bad-format");
    s.refs[0].image = b"GIF87a this is no format the reader decodes".to_vec();
    expect_skipped(s, "bad-image", "refs[0].image");
}

#[test]
fn correspondence_point_outside_the_unit_square() {
    let mut s = named("bad-point");
    s.correspondences[0].points[2][3] = -0.25;
    expect_skipped(s, "point-out-of-range", "tgt_y = -0.25");
}

#[test]
fn correspondence_naming_a_missing_reference() {
    let mut s = named("bad-ref");
    s.correspondences[0].reference = 5;
    expect_skipped(s, "unknown-ref", "names reference 5");
}

#[test]
fn zero_references() {
    let mut s = named("no-refs");
    s.refs.clear();
    s.correspondences.clear();
    expect_skipped(s, "ref-count", "0 references");
}

#[test]
fn seven_references() {
    let mut s = named("seven-refs");
    let r = s.refs[0].clone();
    s.refs = vec![r; 7];
    expect_skipped(s, "ref-count", "7 references");
}

/// A shard whose rows lack the `caption` column: every row is skipped naming the column.
#[test]
fn missing_column() {
    let rows = good(6);
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    let batch = datasets::schema::to_batch(&rows).unwrap();
    let keep: Vec<usize> = (0..batch.num_columns()).filter(|&i| i != 1).collect();
    let batch = batch.project(&keep).unwrap();
    let mut bytes = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let counts: Vec<datasets::manifest::RowMeta> =
        rows.iter().map(datasets::manifest::RowMeta::of).collect();
    let info = datasets::writer::describe_shard("shard-00000.parquet", &bytes, &counts).unwrap();
    loc.put("shard-00000.parquet", bytes).unwrap();
    datasets::Manifest {
        format: datasets::manifest::FORMAT.into(),
        version: datasets::manifest::VERSION,
        total_rows: 6,
        shards: vec![info],
        created_by: String::new(),
    }
    .write(&loc)
    .unwrap();
    let mut l = open(&loc, loader_opts(1, 0, 1), Cursor::default());
    let err = l.next_batch().unwrap_err().message();
    assert!(err.contains("epoch 0 had no usable batch"), "{err}");
    assert!(err.contains("bad-column 6"), "{err}");
    let r = l.report();
    assert_eq!(r.skipped_by_kind.get("bad-column"), Some(&6), "{r:?}");
    assert!(r.skipped[0].reason.contains("column `caption`: missing"));
    let mut ids: Vec<String> = r.skipped.iter().map(|s| s.sample_id.clone()).collect();
    ids.sort();
    let mut want: Vec<String> = rows.into_iter().map(|s| s.sample_id).collect();
    want.sort();
    assert_eq!(ids, want);
}

/// The byte range of column `column` in row group `g` of a shard file.
fn column_range(bytes: &[u8], g: usize, column: usize) -> (usize, usize) {
    let meta = ParquetMetaDataReader::new()
        .parse_and_finish(&bytes::Bytes::copy_from_slice(bytes))
        .unwrap();
    let (s, l) = meta.row_group(g).column(column).byte_range();
    (s as usize, l as usize)
}

fn shard_with_damage(
    damage: impl FnOnce(&mut Vec<u8>),
    fix_hash: bool,
) -> (tempfile::TempDir, Location, Vec<RawSample>) {
    let rows = good(8);
    let dir = tempfile::tempdir().unwrap();
    let loc = Location::local(dir.path());
    let mut m = write_unchecked(&loc, &rows);
    let mut bytes = std::fs::read(dir.path().join("shard-00000.parquet")).unwrap();
    damage(&mut bytes);
    if fix_hash {
        let span = &mut m.shards[0].row_groups[1].span;
        let s = span.offset as usize;
        span.sha256 = datasets::sha256_hex(&bytes[s..s + span.length as usize]);
        m.write(&loc).unwrap();
    }
    std::fs::write(dir.path().join("shard-00000.parquet"), &bytes).unwrap();
    (dir, loc, rows)
}

/// A damaged page header in row group 1's `target` column: the hash in the manifest matches
/// (the damage happened before it was computed), so the Parquet decoder meets it. The four rows
/// are skipped, named by their ids (read from the intact `sample_id` column).
#[test]
fn corrupt_parquet_page() {
    let (_dir, loc, rows) = shard_with_damage(
        |b| {
            let (s, _) = column_range(b, 1, 2);
            for x in &mut b[s..s + 16] {
                *x = 0xff;
            }
        },
        true,
    );
    let (ids, report) = read_epoch0(&loc, false);
    let bad: Vec<String> = rows[4..8].iter().map(|s| s.sample_id.clone()).collect();
    let got = skipped(&report).remove("bad-shard").unwrap_or_default();
    assert_eq!(got, bad, "{report:?}");
    assert_eq!(ids.len(), 4);
    assert!(
        report.skipped[0].reason.contains("row group 1"),
        "{:?}",
        report.skipped[0]
    );
}

/// Bytes changed after the manifest was written: the row group's sha256 differs; its rows are
/// skipped and named.
#[test]
fn shard_bytes_differ_from_the_manifest() {
    let (_dir, loc, rows) = shard_with_damage(
        |b| {
            let (s, l) = column_range(b, 1, 2);
            b[s + l / 2] ^= 0x55;
        },
        false,
    );
    let (ids, report) = read_epoch0(&loc, false);
    let got = skipped(&report).remove("bad-shard").unwrap_or_default();
    let want: Vec<String> = rows[4..8].iter().map(|s| s.sample_id.clone()).collect();
    assert_eq!(got, want, "{report:?}");
    assert!(
        report.skipped[0].reason.contains("sha256"),
        "{:?}",
        report.skipped[0]
    );
    assert_eq!(ids.len(), 4);
}

/// Random damage anywhere in a shard never panics the reader: every row is either read or
/// reported.
#[test]
fn random_damage_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for round in 0..12 {
        let (_dir, loc, _rows) = shard_with_damage(
            |b| {
                for _ in 0..1 + round % 4 {
                    let i = rng.random_range(4..b.len() - 8);
                    b[i] = rng.random();
                }
            },
            round % 2 == 0,
        );
        let mut l = open(&loc, loader_opts(1, 0, 1), Cursor::default());
        let mut read = 0;
        loop {
            match l.next_batch() {
                Ok(b) => {
                    read += b.samples.len();
                    if b.cursor.epoch > 0 {
                        break;
                    }
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    break;
                }
            }
        }
        let r = l.report();
        assert!(
            read + r.skipped_total <= 8 + 8,
            "round {round}: {read} read, {r:?}"
        );
    }
}

/// Inputs the fuzz target (datasets/fuzz) found panicking inside the parquet crate: each now
/// decodes to an error or to rows, without a panic.
#[test]
fn fuzz_findings_do_not_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    for f in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        let _ = datasets::shard::decode_file_rows(&bytes, true);
    }
}

/// A shard cut short after the manifest was written (a failed copy, a full disk), or gone:
/// every row of it is skipped and reported with the reason, the other shards are read, and in
/// strict mode the first of them is an error.
#[test]
fn a_truncated_or_missing_shard_is_skipped_and_reported() {
    for damage in ["truncated", "missing"] {
        let rows = good(16);
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::local(dir.path());
        write_unchecked(&loc, &rows);
        let second = dir.path().join("shard-00001.parquet");
        if damage == "truncated" {
            let bytes = std::fs::read(&second).unwrap();
            std::fs::write(&second, &bytes[..bytes.len() / 3]).unwrap();
        } else {
            std::fs::remove_file(&second).unwrap();
        }
        let (ids, report) = read_epoch0(&loc, false);
        let mut want: Vec<String> = rows[..8].iter().map(|s| s.sample_id.clone()).collect();
        want.sort();
        let mut got = ids.clone();
        got.sort();
        got.dedup();
        assert_eq!(got, want, "{damage}: the intact shard is read");
        let bad = report
            .skipped
            .iter()
            .filter(|s| s.at.starts_with("shard-00001.parquet"))
            .count();
        assert!(
            bad >= 8,
            "{damage}: every row of the shard is reported: {report:?}"
        );
        let reason = &report.skipped[0].reason;
        let want_reason = if damage == "truncated" {
            "truncated"
        } else {
            "does not exist"
        };
        assert!(reason.contains(want_reason), "{damage}: {reason}");
        let mut opts = loader_opts(1, 0, 1);
        opts.strict = true;
        let mut l = open(&loc, opts, Cursor::default());
        let e = (0..16)
            .find_map(|_| l.next_batch().err())
            .expect("strict mode stops at the damaged shard")
            .to_string();
        assert!(e.contains("shard-00001.parquet"), "{damage}: {e}");
    }
}
