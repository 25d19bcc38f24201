//! `trainer shapes`: the command names a shape and a colour for every plain prompt, scores the
//! data's own scenes (through the codec) as the ceiling, writes the report and the sheet, and
//! refuses a bad flag naming it before any file is written.

use std::process::Command;

use crate::common::repo_root;

fn shapes_cmd(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .current_dir(repo_root())
        .args([
            "shapes",
            "--config",
            "configs/tiny-cpu.toml",
            "--steps",
            "2",
        ])
        .args(["--ceiling", "16", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn the_command_names_every_prompt_and_the_ceiling_and_refuses_bad_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let o = shapes_cmd(&out, &["--seeds", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("| ceiling: the data's scenes | 16 |"),
        "{table}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("shapes.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 32, "8 colours x 4 shapes x 1 seed");
    assert_eq!(json["base"]["pictures"], 32);
    let train = json["base_train_identities"]["pictures"].as_u64().unwrap();
    let held = json["base_held_out_identities"]["pictures"]
        .as_u64()
        .unwrap();
    assert_eq!(
        (train, held),
        (24, 8),
        "one plain identity in four is held out"
    );
    let confusion = json["base"]["confusion"].as_array().unwrap();
    let counted: u64 = confusion
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(counted, 32);
    for key in ["shape_accuracy", "colour_accuracy", "mean_iou_asked"] {
        let v = json["base"][key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key} {v}");
    }
    // The generator's own scenes, through the same codec, are named right.
    assert!(json["ceiling"]["shape_accuracy"].as_f64().unwrap() >= 0.9);
    assert!(json["ceiling"]["colour_accuracy"].as_f64().unwrap() >= 0.9);

    // One row per (shape, seed), one column per colour, 128-pixel tiles and 4-pixel gaps.
    let sheet = image::open(out.join("shapes.png")).unwrap();
    assert_eq!((sheet.width(), sheet.height()), (4 + 8 * 132, 4 + 4 * 132));

    let bad_out = tmp.path().join("bad");
    let bad = shapes_cmd(&bad_out, &["--seeds", "0"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--seeds"), "{err}");
    assert!(!bad_out.join("shapes.json").exists());
}
