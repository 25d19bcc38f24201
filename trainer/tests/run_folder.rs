//! Run folders: a start that would lose an earlier run's work is refused (or, with --overwrite,
//! moves it aside), two trainers never share a folder, retention never lets a damaged
//! checkpoint push out a good one, and what interrupted saves left is cleared.

use std::path::Path;
use std::process::{Command, Stdio};

use trainer::train::train;

use crate::common::{repo_root, steps_logged, tiny_config, RANDOM_TINY};

fn cfg(dir: &Path, extra: &[&str]) -> trainer::config::Config {
    let mut sets = vec![
        "data.samples=4",
        "train.max_steps=6",
        "checkpoint.every=2",
        "checkpoint.keep=2",
    ];
    sets.extend(extra);
    tiny_config(dir, &sets)
}

fn error_of(c: trainer::config::Config) -> String {
    match train(c) {
        Ok(_) => panic!("the run started"),
        Err(e) => format!("{:#}", anyhow::Error::new(e)),
    }
}

fn checkpoint_steps(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") || n.starts_with("corrupt-"))
        .collect();
    v.sort();
    v
}

#[test]
fn starting_over_on_an_earlier_run_is_refused_and_overwrite_moves_it_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    train(cfg(&dir, &[])).unwrap();
    let before = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    let ckpts = checkpoint_steps(&dir);
    assert_eq!(ckpts, vec!["step-00000004", "step-00000006"]);

    // --no-resume would lose them: refused, and nothing changes.
    let e = error_of(cfg(&dir, &["checkpoint.resume=false"]));
    assert!(
        e.contains("--no-resume") && e.contains("--overwrite") && e.contains("2 checkpoint(s)"),
        "{e}"
    );
    // Another config too, naming the fields.
    let e = error_of(cfg(&dir, &["optim.lr=0.5", "train.max_steps=8"]));
    assert!(e.contains("optim.lr") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), before);
    assert_eq!(checkpoint_steps(&dir), ckpts);

    // --overwrite moves the earlier run to previous-<time>/ and starts over.
    let out = train(cfg(
        &dir,
        &[
            "checkpoint.resume=false",
            "checkpoint.overwrite=true",
            "train.max_steps=2",
        ],
    ))
    .unwrap();
    assert_eq!(out.losses.len(), 2);
    let previous: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("previous-"))
        .collect();
    assert_eq!(previous.len(), 1);
    let old = previous[0].path();
    assert_eq!(std::fs::read(old.join("metrics.jsonl")).unwrap(), before);
    assert!(old.join("checkpoints/step-00000006/state.json").is_file());
    assert_eq!(checkpoint_steps(&dir), vec!["step-00000002"]);
    assert_eq!(steps_logged(&dir), 2);
}

#[test]
fn a_damaged_newest_checkpoint_is_quarantined_and_the_good_one_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    train(cfg(&dir, &[])).unwrap();
    let lora = dir.join("checkpoints/step-00000006/lora.safetensors");
    let bytes = std::fs::read(&lora).unwrap();
    std::fs::write(&lora, &bytes[..bytes.len() / 2]).unwrap();
    // What writers killed mid-save leave.
    let tmp_dir = dir.join("checkpoints/.tmp-step-00000008-4242");
    std::fs::create_dir_all(&tmp_dir).unwrap();
    std::fs::write(tmp_dir.join("lora.safetensors"), b"partial").unwrap();

    // keep = 2: the run resumed from step 4 saves step 5; the damaged step 6 is newer but
    // must not count, so 4 stays beside 5.
    let out = train(cfg(&dir, &["train.max_steps=5"])).unwrap();
    assert_eq!(out.start_step, 4, "resumed from the newest good checkpoint");
    assert_eq!(
        checkpoint_steps(&dir),
        vec!["corrupt-step-00000006", "step-00000004", "step-00000005"],
        "the damaged one is set aside, the good one kept beside the new one"
    );
    assert!(
        !tmp_dir.exists(),
        "leftovers of interrupted saves are removed"
    );
}

#[test]
#[cfg(unix)]
fn a_second_trainer_on_the_same_folder_is_refused_naming_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let spawn = |steps: u32| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["train", "--config"])
            .arg(repo_root().join("configs/tiny-cpu.toml"))
            .args(RANDOM_TINY.iter().flat_map(|s| ["--set", s]))
            .args([
                "--set",
                "data.source=\"synthetic\"",
                "--set",
                "validation.every=0",
                "--set",
                "train.progress=false",
                "--set",
                &format!("train.max_steps={steps}"),
                "--set",
                "checkpoint.every=20",
                "--set",
                &format!("run.dir={:?}", dir.display().to_string()),
            ])
            .env("NO_COLOR", "1")
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn(300);
    let t = std::time::Instant::now();
    while steps_logged(&dir) < 3 {
        assert!(t.elapsed().as_secs() < 120, "the first run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = spawn(300).wait_with_output().unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("in use by") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first run's log is whole: one JSON line per step, nothing interleaved.
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 300);
    for l in lines {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
}
