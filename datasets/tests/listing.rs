//! `datasets write` from a JSONL listing and from a folder, and its errors naming file, line
//! and field; `datasets synth`, `inspect` and `verify` through the binary.

use std::path::Path;
use std::process::Command;

use datasets::synth;
use datasets::Location;

use crate::common::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_datasets"))
}

/// Writes images and a listing line for synthetic sample `i` below `dir`.
fn listed(dir: &Path, i: usize) -> String {
    let s = synth::sample(&synth_opts(8, 3), i);
    std::fs::write(dir.join(format!("t{i}.img")), &s.target).unwrap();
    let mut refs = Vec::new();
    for (k, r) in s.refs.iter().enumerate() {
        std::fs::write(dir.join(format!("r{i}_{k}.img")), &r.image).unwrap();
        std::fs::write(
            dir.join(format!("r{i}_{k}.mask.png")),
            r.mask.as_ref().unwrap(),
        )
        .unwrap();
        refs.push(serde_json::json!({
            "image": format!("r{i}_{k}.img"),
            "mask": format!("r{i}_{k}.mask.png"),
            "label": r.label,
        }));
    }
    let corr: Vec<_> = s
        .correspondences
        .iter()
        .map(|c| serde_json::json!({"ref": c.reference, "points": c.points}))
        .collect();
    serde_json::json!({
        "sample_id": s.sample_id,
        "caption": s.caption,
        "target": format!("t{i}.img"),
        "refs": refs,
        "correspondences": corr,
    })
    .to_string()
}

#[test]
fn jsonl_listing_is_written_and_read_back() {
    let src = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..5).map(|i| listed(src.path(), i)).collect();
    std::fs::write(src.path().join("list.jsonl"), lines.join("\n") + "\n\n").unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["write", "--from"])
        .arg(src.path().join("list.jsonl"))
        .args([
            "--out",
            out.path().to_str().unwrap(),
            "--row-group-rows",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let loc = datasets::Location::local(out.path());
    let (ids, report) = read_epoch0(&loc, true);
    assert_eq!(ids.len(), 5);
    assert_eq!(report.skipped_total, 0);
    let v = bin()
        .args(["verify", out.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(v.status.success());
}

#[test]
fn folder_listing_is_written() {
    let src = tempfile::tempdir().unwrap();
    for i in 0..3 {
        let d = src.path().join(format!("sample{i}"));
        std::fs::create_dir(&d).unwrap();
        let line = listed(&d, i);
        std::fs::write(d.join("sample.json"), line).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["write", "--from", src.path().to_str().unwrap()])
        .args(["--out", out.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = datasets::Manifest::load(&datasets::Location::local(out.path())).unwrap();
    assert_eq!(m.total_rows, 3);
}

#[test]
fn bad_entries_are_named_skipped_or_fatal_in_strict_mode() {
    let src = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = (0..3).map(|i| listed(src.path(), i)).collect();
    std::fs::write(
        src.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\n truncated",
    )
    .unwrap();
    lines.insert(
        1,
        lines[0]
            .replace("\"t0.img\"", "\"missing.png\"")
            .replace("synth-", "missing-"),
    );
    lines.insert(
        2,
        lines[0]
            .replace("\"t0.img\"", "\"broken.png\"")
            .replace("synth-", "broken-"),
    );
    lines.insert(3, r#"{"sample_id": "x", "caption": 3}"#.to_string());
    std::fs::write(src.path().join("list.jsonl"), lines.join("\n")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["write", "--from"])
        .arg(src.path().join("list.jsonl"))
        .args(["--out", out.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("list.jsonl line 2: target") && err.contains("missing.png"),
        "{err}"
    );
    assert!(
        err.contains("list.jsonl line 3: target: cannot decode image"),
        "{err}"
    );
    assert!(err.contains("list.jsonl line 4"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("wrote 3 samples"));

    let out2 = tempfile::tempdir().unwrap();
    let o = bin()
        .args(["write", "--strict", "--from"])
        .arg(src.path().join("list.jsonl"))
        .args(["--out", out2.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("line 2") && err.contains("the 1 samples before this one"),
        "{err}"
    );
    // What was written before the failure is kept, with its manifest.
    let m = datasets::Manifest::load(&datasets::Location::local(out2.path())).unwrap();
    assert_eq!(m.total_rows, 1);
}

#[test]
fn synth_inspect_and_verify_through_the_binary() {
    let out = tempfile::tempdir().unwrap();
    let url = format!("file://{}", out.path().display());
    let o = bin()
        .args([
            "synth",
            "--out",
            &url,
            "--samples",
            "10",
            "--max-refs",
            "4",
            "--size",
            "64",
        ])
        .args(["--ref-size", "48"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let png = out.path().join("grid.png");
    let o = bin()
        .args(["inspect", &url, "--resolution", "64", "--json", "--png"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["rows"], 10);
    assert_eq!(st["decoded"], 10);
    assert!(st["pairs_mean"].as_f64().unwrap() > 1.0);
    let img = image::open(&png).unwrap();
    assert_eq!(img.height(), 6 * 64);
    // Damage a shard: verify names it.
    let shard = out.path().join("shard-00000.parquet");
    let mut b = std::fs::read(&shard).unwrap();
    let n = b.len();
    b[n / 2] ^= 1;
    std::fs::write(&shard, b).unwrap();
    let o = bin().args(["verify", &url]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("BAD  shard-00000.parquet"));
}

#[test]
fn precompute_with_pretrained_encoders_takes_their_widths() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_synth(&Location::local(&data), 6, 2);
    let encoders = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders");
    let cache = tmp.path().join("cache");
    let run = |extra: &[&str]| {
        bin()
            .args(["precompute", "--data", &data.display().to_string()])
            .args(["--out", &cache.display().to_string()])
            .args([
                "--resolution",
                "32",
                "--ref-resolution",
                "32",
                "--text-tokens",
                "8",
            ])
            .args(extra)
            .env("MOSAIC_CACHE_DIR", tmp.path().join("model-cache"))
            .output()
            .unwrap()
    };
    let o = run(&["--encoders", &encoders.display().to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("cached 6 samples"));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cache.join("cache.json")).unwrap()).unwrap();
    let fp = info["fingerprint"].as_str().unwrap();
    assert!(fp.starts_with("flux-pretrained-v1/"), "{fp}");
    let by = info["created_by"].as_str().unwrap();
    assert!(
        by.contains("--context-dim 32 --pooled-dim 16 --encoders"),
        "{by}"
    );
    // The digests were memoised where MOSAIC_CACHE_DIR says.
    assert!(tmp.path().join("model-cache/sha256").is_dir());

    let o = run(&[
        "--encoders",
        &encoders.display().to_string(),
        "--pooled-dim",
        "768",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("CLIP is 16 wide"),
        "{err}"
    );
    let o = run(&["--encoders", &encoders.display().to_string(), "--seed", "1"]);
    assert!(!o.status.success());
    let o = run(&["--seed", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--context-dim"),
        "{err}"
    );
    let o = run(&[
        "--seed",
        "1",
        "--context-dim",
        "32",
        "--pooled-dim",
        "16",
        "--device",
        "tpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--device tpu"), "{err}");
}
