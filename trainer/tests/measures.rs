//! The held-out measures on the committed tiny base: what SCAL changes (the regression test
//! of issue 17), the measures recorded at validation, and `trainer eval --heldout`.

use std::path::{Path, PathBuf};
use std::process::Command;

use datasets::synth::{write_dataset, SynthOptions};
use datasets::{Location, WriterOptions};
use trainer::config::Config;
use trainer::measures::{eval_heldout, Measures};

use crate::common::repo_root;

/// The main job's data at a smaller scale: training scenes and held-out scenes (subjects
/// training never shows), as `datasets synth` writes them.
fn synth_data(dir: &Path, samples: usize, heldout: usize) -> (String, String) {
    let opts = SynthOptions {
        samples,
        max_refs: 2,
        size: 160,
        ref_size: 160,
        ..Default::default()
    };
    let wopts = WriterOptions {
        row_group_rows: 8,
        ..Default::default()
    };
    let train = dir.join("data");
    write_dataset(Location::local(&train), &opts, wopts).unwrap();
    let held = crate::common::write_heldout(&dir.join("heldout"), heldout, opts.size);
    (train.display().to_string(), held)
}

fn base() -> PathBuf {
    repo_root().join("trainer/assets/tiny-base")
}

/// configs/tiny-cpu.toml as the main job runs it (the committed base), one process, on the
/// data at `url` encoded while training.
fn main_job_config(run: &Path, url: &str, heldout: &str, sets: &[String]) -> Config {
    let mut all = vec![
        format!("run.dir={:?}", run.display().to_string()),
        format!("model.weights={:?}", base().display().to_string()),
        format!("data.url={url:?}"),
        "data.cache=\"\"".into(),
        format!("validation.heldout={heldout:?}"),
        "validation.every=0".into(),
        "train.progress=false".into(),
        "logging.tensorboard=false".into(),
        "logging.chart=false".into(),
        "checkpoint.every=0".into(),
    ];
    all.extend(sets.iter().cloned());
    Config::load(&repo_root().join("configs/tiny-cpu.toml"), &all).unwrap()
}

fn trained_measures(dir: &Path, url: &str, heldout: &str, name: &str, sets: &[&str]) -> Measures {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = main_job_config(&dir.join(name), url, heldout, &sets);
    let out = trainer::train::train(cfg.clone()).unwrap();
    let m = eval_heldout(
        &cfg,
        heldout,
        Some(&out.lora_path),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    eprintln!("{name}: {m:?}");
    m
}

/// Issue 17's regression test: after a short run, the correspondence accuracy on held-out
/// subjects with SCAL is above 3x chance and above the L_diff-only run's (same seed, data
/// and steps).
#[test]
fn scal_makes_references_attend_to_their_corresponding_target_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, heldout) = synth_data(tmp.path(), 64, 16);
    let steps = "train.max_steps=120";
    let diff = trained_measures(
        tmp.path(),
        &url,
        &heldout,
        "diff",
        &[steps, "loss.scal_weight=0", "loss.mdl_weight=0"],
    );
    let scal = trained_measures(
        tmp.path(),
        &url,
        &heldout,
        "scal",
        &[steps, "loss.mdl_weight=0"],
    );
    assert!(
        scal.correspondence_accuracy > 3.0 * scal.correspondence_chance,
        "SCAL: accuracy {} vs chance {}",
        scal.correspondence_accuracy,
        scal.correspondence_chance
    );
    assert!(
        scal.correspondence_accuracy > diff.correspondence_accuracy,
        "SCAL {} vs L_diff only {}",
        scal.correspondence_accuracy,
        diff.correspondence_accuracy
    );
}

/// The base alone: measures are finite, in range, the same twice (seeded probe noise), and the
/// chance levels are what the held-out grid gives.
#[test]
fn the_base_alone_is_measured_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, heldout) = synth_data(tmp.path(), 8, 4);
    let cfg = main_job_config(&tmp.path().join("run"), &url, &heldout, &[]);
    let a = eval_heldout(&cfg, &heldout, None, &candle_core::Device::Cpu).unwrap();
    let b = eval_heldout(&cfg, &heldout, None, &candle_core::Device::Cpu).unwrap();
    assert_eq!(a, b);
    assert_eq!((a.samples, a.skipped), (4, 0));
    assert!(a.pairs > 50, "{a:?}");
    for v in [
        a.correspondence_accuracy,
        a.separation,
        a.identity,
        a.identity_refs_zeroed,
    ] {
        assert!((0.0..=1.0).contains(&v), "{a:?}");
    }
    // An 8 x 8 target grid: 9 of 64 tokens inside, fewer at the border.
    assert!(
        a.correspondence_chance > 4.0 / 64.0 && a.correspondence_chance <= 9.0 / 64.0,
        "{a:?}"
    );
    // The clean target matches its references far better than the base's denoising does.
    assert!(
        a.identity_ceiling > 0.9 && a.identity_ceiling > a.identity,
        "{a:?}"
    );
}

/// At each validation the measures go into `measures.json` and the metrics line; `trainer
/// eval --heldout` prints and writes the same numbers for the same LoRA.
#[test]
fn validation_records_the_measures_and_eval_heldout_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, heldout) = synth_data(tmp.path(), 8, 4);
    let cases = tmp.path().join("cases");
    datasets::synth::write_validation_cases(
        &Location::local(&cases),
        &SynthOptions {
            samples: 8,
            max_refs: 2,
            size: 160,
            ref_size: 160,
            ..Default::default()
        },
        1,
    )
    .unwrap();
    let run = tmp.path().join("run");
    let sets = vec![
        "train.max_steps=4".to_string(),
        "validation.every=4".into(),
        "validation.steps=2".into(),
        "validation.ema=false".into(),
        format!(
            "validation.cases={:?}",
            cases.join("validation/cases.json").display().to_string()
        ),
    ];
    let cfg = main_job_config(&run, &url, &heldout, &sets);
    let out = trainer::train::train(cfg.clone()).unwrap();
    let text = std::fs::read_to_string(run.join("samples/step-00000004/measures.json")).unwrap();
    let written: serde_json::Value = serde_json::from_str(&text).unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l.get("measures").is_some())
        .expect("a validation line with measures");
    assert_eq!(line["measures"], written);

    let json = tmp.path().join("eval.json");
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "--heldout", &heldout, "--config"])
        .arg(run.join("config.toml"))
        .arg("--lora")
        .arg(&out.lora_path)
        .arg("--out")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("correspondence accuracy"), "{stdout}");
    let evaluated: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(evaluated, written, "the same LoRA measures the same");
}

#[test]
fn eval_heldout_names_a_missing_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = main_job_config(&tmp.path().join("run"), "unused", "unused", &[]);
    let missing = tmp.path().join("nowhere").display().to_string();
    let e = eval_heldout(&cfg, &missing, None, &candle_core::Device::Cpu)
        .expect_err("no dataset there");
    let msg = flux::chain(&e);
    assert!(
        msg.contains("validation.heldout") && msg.contains("nowhere"),
        "{msg}"
    );
}
