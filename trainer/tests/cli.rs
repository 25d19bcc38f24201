//! The `trainer train` command line: what it says about odd configs, where its colours go, and
//! how it reports a stop.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::steps_logged;

fn train(config: &Path, sets: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.args(["train", "--config"]).arg(config);
    for s in sets {
        c.args(["--set", s]);
    }
    c.env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG");
    c
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[test]
fn an_empty_config_says_so_and_that_the_data_are_synthetic_in_plain_text() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let sets = vec![
        "train.max_steps=1".to_string(),
        "train.progress=false".to_string(),
        format!("run.dir={:?}", tmp.path().join("run").display().to_string()),
    ];
    // stderr is a pipe here, as it is a file under a scheduler: no colour codes.
    let out: Output = train(&config, &sets).output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("config file is empty"), "{err}");
    assert!(err.contains("synthetic"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "ANSI codes in a non-terminal stderr: {err:?}"
    );
}

#[test]
fn a_device_given_as_config_is_refused_unread() {
    let out = train(Path::new("/dev/zero"), &[]).output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("/dev/zero") && err.contains("not a run config"),
        "{err}"
    );
}

#[test]
#[cfg(unix)]
fn a_run_stopped_by_a_signal_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let config = crate::common::repo_root().join("configs/tiny-cpu.toml");
    let mut sets: Vec<String> = crate::common::RANDOM_TINY
        .iter()
        .map(|s| s.to_string())
        .collect();
    sets.extend([
        "data.source=\"synthetic\"".to_string(),
        "validation.every=0".to_string(),
        "train.progress=false".to_string(),
        "train.max_steps=400".to_string(),
        "train.signal_exit_code=75".to_string(),
        format!("run.dir={:?}", dir.display().to_string()),
    ]);
    let child = train(&config, &sets)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while steps_logged(&dir) < 3 {
        assert!(t.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Safety: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(75));
    let said = text(&out.stdout);
    assert!(
        said.contains("stopped by a signal after step") && said.contains("of 400"),
        "{said}"
    );
}

#[test]
fn plot_draws_a_run_s_curves_and_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = crate::common::tiny_config(&run, &["train.max_steps=4", "logging.chart=false"]);
    trainer::train::train(cfg).unwrap();
    assert!(
        !run.join("metrics.png").exists(),
        "chart = false draws none"
    );
    let plot = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .arg("plot")
            .args(args)
            .output()
            .unwrap()
    };
    let out = plot(&[run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let img = image::open(run.join("metrics.png")).unwrap();
    assert_eq!(img.width(), 1200);
    let other = tmp.path().join("elsewhere.png");
    let out = plot(&[run.to_str().unwrap(), "--out", other.to_str().unwrap()]);
    assert!(out.status.success() && other.exists());
    // A folder without metrics.jsonl is named.
    let out = plot(&[tmp.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("metrics.jsonl"),
        "{}",
        text(&out.stderr)
    );
}
