//! Exact resumption: a run stopped by SIGTERM (or killed with SIGKILL) and started again with
//! the same command ends with the same bits as a run that was never interrupted: LoRA, EMA,
//! optimizer moments, data position and the metrics log (minus wall-clock fields).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use launcher::agent;
use trainer::storage::Location;

use crate::common::{repo_root, steps_logged};
use crate::distributed::{free_port, never, trainer_spec, wait_for_steps};

const STEPS: u64 = 40;

/// The checkpoint location of a test run: `<run dir>/checkpoints`, or the URL written next to
/// the run folder (`<run dir>.ckpt-url`) for a run whose checkpoints go to an object store.
fn ckpt_root(dir: &Path) -> Location {
    match std::fs::read_to_string(dir.with_extension("ckpt-url")) {
        Ok(url) => Location::parse(url.trim()).unwrap(),
        Err(_) => Location::local(&dir.join("checkpoints")),
    }
}

fn read(root: &Location, rel: &str) -> Vec<u8> {
    match root {
        Location::Local(p) => std::fs::read(p.join(rel)).unwrap(),
        Location::Remote(r) => r.get(rel).unwrap().unwrap(),
    }
}

/// The data of a test run: the in-memory synthetic source, or the shards whose URL is written
/// next to the run folder (`<run dir>.data-url`), encoded while training at 64 px (cheap, yet
/// slow enough for a stop to land in the middle of the run). The shards runs also train with
/// condition dropout (the empty caption encoded at start) and the official loss settings, so
/// their resume covers those draws and rows.
fn data_sets(dir: &Path) -> Vec<String> {
    match std::fs::read_to_string(dir.with_extension("data-url")) {
        Ok(url) => vec![
            "data.source=\"shards\"".into(),
            format!("data.url={:?}", url.trim()),
            "data.cache=\"\"".into(),
            "data.resolution=64".into(),
            "data.ref_resolution=64".into(),
            "data.drop_refs=0.2".into(),
            "data.drop_text=0.2".into(),
            "data.drop_both=0.2".into(),
            "loss.points_per_ref=0".into(),
            "loss.scal_reduce=\"pooled\"".into(),
            "loss.mdl_rows=\"all-tokens\"".into(),
            "loss.mdl_divergence=\"jsd\"".into(),
        ],
        Err(_) => vec!["data.source=\"synthetic\"".into()],
    }
}

fn sets(dir: &Path, every: u64) -> Vec<String> {
    let ckpt = match ckpt_root(dir) {
        Location::Remote(r) => format!("checkpoint.dir={:?}", r.url()),
        Location::Local(_) => "checkpoint.dir=\"\"".into(),
    };
    let mut all = data_sets(dir);
    all.extend(crate::common::RANDOM_TINY.iter().map(|s| s.to_string()));
    all.extend([
        ckpt,
        format!("run.dir={:?}", dir.display().to_string()),
        format!("train.max_steps={STEPS}"),
        "train.progress=false".into(),
        "validation.every=0".into(),
        "data.samples=8".into(),
        "train.batch_size=1".into(),
        format!("checkpoint.every={every}"),
        "train.signal_exit_code=75".into(),
        // The EMA's decay then depends on the step (below 0.99 for all 40): a resumed run must
        // count it from where it stopped.
        "optim.ema_warmup=true".into(),
    ]);
    all
}

/// One `trainer train` process (a single rank, no launcher).
fn spawn_one(dir: &Path, every: u64) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.args(["train", "--config"])
        .arg(repo_root().join("configs/tiny-cpu.toml"));
    for s in sets(dir, every) {
        c.args(["--set", &s]);
    }
    c.env("NO_COLOR", "1")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(c: Child) -> Option<i32> {
    let out = c.wait_with_output().unwrap();
    if !out.status.success() && out.status.code() != Some(75) {
        panic!("trainer failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.code()
}

/// Runs 1 rank to the end, interrupting it with `signal` once `at` steps are logged (if any),
/// then starting it again until it finishes.
fn one_rank(dir: &Path, every: u64, interrupt: Option<(usize, i32)>) {
    let c = spawn_one(dir, every);
    if let Some((at, signal)) = interrupt {
        wait_for_steps(dir, at);
        // Safety: kill(2) on our own child.
        unsafe {
            libc::kill(c.id() as i32, signal);
        }
        let code = c.wait_with_output().unwrap().status;
        if signal == libc::SIGTERM {
            assert_eq!(
                code.code(),
                Some(75),
                "a stopped rank exits with the requeue status"
            );
        }
        assert!(
            steps_logged(dir) < STEPS as usize,
            "the run was interrupted"
        );
        let kept = lines_to_keep(dir);
        assert_eq!(finish(spawn_one(dir, every)), Some(0));
        assert_resumed(dir, &kept);
    } else {
        assert_eq!(finish(c), Some(0));
    }
}

/// Runs 2 ranks under the launcher's agent, with a SIGTERM once `at` steps are logged.
fn two_ranks(dir: &Path, every: u64, stop_at: Option<usize>) {
    let spec = |dir: &Path| {
        let mut s = trainer_spec(dir, 1, 0, free_port(), STEPS);
        s.args.truncate(3);
        for x in sets(dir, every) {
            s.args.extend(["--set".to_string(), x]);
        }
        s
    };
    match stop_at {
        None => {
            let done = agent::run(&spec(dir), &never()).unwrap();
            assert_eq!(done.exit_code, 0);
        }
        Some(at) => {
            let (tx, rx) = std::sync::mpsc::channel();
            let s = spec(dir);
            let h = std::thread::spawn(move || agent::run(&s, &rx));
            wait_for_steps(dir, at);
            tx.send(libc::SIGTERM).unwrap();
            assert_eq!(h.join().unwrap().unwrap().exit_code, 75);
            assert!(steps_logged(dir) < STEPS as usize);
            let kept = lines_to_keep(dir);
            let done = agent::run(&spec(dir), &never()).unwrap();
            assert_eq!(done.exit_code, 0);
            assert_resumed(dir, &kept);
        }
    }
}

/// The metrics lines up to the step of the checkpoint a restart will resume from.
pub fn lines_to_keep(dir: &Path) -> Vec<String> {
    let latest = String::from_utf8(read(&ckpt_root(dir), "LATEST")).unwrap();
    let step: usize = latest.trim().trim_start_matches("step-").parse().unwrap();
    assert!(step > 0, "a checkpoint was written before the interruption");
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().take(step).map(String::from).collect()
}

/// A run that really resumed kept those lines verbatim (wall-clock fields included); one that
/// started over would have rewritten them.
pub fn assert_resumed(dir: &Path, kept: &[String]) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let now: Vec<&str> = text.lines().take(kept.len()).collect();
    assert_eq!(
        now, kept,
        "the restarted run did not resume from its checkpoint"
    );
}

/// The metrics log without its wall-clock fields.
fn metrics_without_timing(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("s_per_step");
            o.remove("tokens_per_s");
            v
        })
        .collect()
}

fn assert_identical(a: &Path, b: &Path) {
    let last = |d: &Path, f: &str| read(&ckpt_root(d), &format!("step-{STEPS:08}/{f}"));
    // The runs differ only in run.dir, which enters the fingerprint and config.toml, and in
    // their lineage (drawn at each fresh start).
    let state = |d: &Path| {
        let mut v: serde_json::Value = serde_json::from_slice(&last(d, "state.json")).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("fingerprint");
        o.remove("lineage");
        o["files"].as_object_mut().unwrap().remove("config.toml");
        v
    };
    assert_eq!(state(a), state(b), "state.json differs");
    for f in [
        "lora.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
    ] {
        let (x, y) = (last(a, f), last(b, f));
        assert!(
            x == y,
            "{f} differs between the uninterrupted and the resumed run"
        );
    }
    for f in ["lora.safetensors", "lora_ema.safetensors"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let (ma, mb) = (metrics_without_timing(a), metrics_without_timing(b));
    assert_eq!(ma.len(), STEPS as usize);
    assert_eq!(ma, mb, "metrics logs differ");
}

#[test]
#[cfg(unix)]
fn one_rank_stopped_by_sigterm_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));
    one_rank(&full, 10, None);
    one_rank(&cut, 10, Some((7, libc::SIGTERM)));
    assert_identical(&full, &cut);
}

#[test]
#[cfg(unix)]
fn one_rank_killed_with_sigkill_resumes_from_its_last_checkpoint_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));
    // A checkpoint every step, so the kill likely lands while one is being written.
    one_rank(&full, 1, None);
    one_rank(&cut, 1, Some((13, libc::SIGKILL)));
    assert_identical(&full, &cut);
}

#[test]
#[cfg(unix)]
fn two_ranks_stopped_at_two_points_resume_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    two_ranks(&full, 10, None);
    for at in [4, 23] {
        let cut = tmp.path().join(format!("cut{at}"));
        two_ranks(&cut, 10, Some(at));
        assert_identical(&full, &cut);
    }
}

/// Synthetic shards for a test run: on the S3 test server when there is one, else in `at`.
fn shards_for_test(at: &Path) -> String {
    let url = match datasets::testing::server_env("MOSAIC_TEST_S3_URL", "ci/s3.sh") {
        Some(base) => format!(
            "{}/shards-{}-{}",
            base.trim_end_matches('/'),
            std::process::id(),
            at.file_name().unwrap().to_string_lossy()
        ),
        None => at.display().to_string(),
    };
    let loc = Location::parse(&url).unwrap();
    crate::common::write_test_shards(loc.clone(), 24, 3);
    // One damaged byte in the middle of the first shard: its row group no longer matches the
    // manifest, so its samples are skipped and reported (the reports must add up across a
    // resume).
    let m = datasets::Manifest::load(&loc).unwrap();
    let file = &m.shards[0].file;
    let g = &m.shards[0].row_groups[0].span;
    let mut bytes = loc.get(file).unwrap().unwrap();
    bytes[(g.offset + g.length / 2) as usize] ^= 0x5a;
    loc.put(file, bytes).unwrap();
    url
}

/// On shards each rank has its own data cursor; the checkpoint keeps both and each rank
/// continues exactly where it was.
#[test]
#[cfg(unix)]
fn two_ranks_on_shards_stopped_resume_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let url = shards_for_test(&tmp.path().join("data"));
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));
    for d in [&full, &cut] {
        std::fs::write(d.with_extension("data-url"), &url).unwrap();
    }
    two_ranks(&full, 10, None);
    two_ranks(&cut, 10, Some(14));
    assert_identical(&full, &cut);
    let state: serde_json::Value = serde_json::from_slice(&read(
        &ckpt_root(&cut),
        &format!("step-{STEPS:08}/state.json"),
    ))
    .unwrap();
    assert_eq!(
        state["data_cursors"].as_array().unwrap().len(),
        2,
        "{state}"
    );
    // Each rank's data report of the resumed run holds what was read and skipped before the
    // stop too: it equals the uninterrupted run's.
    let report = |dir: &Path, rank: usize| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("data_report.rank{rank}.json"))).unwrap(),
        )
        .unwrap()
    };
    let mut skipped = 0;
    for rank in 0..2 {
        let (a, b) = (report(&full, rank), report(&cut, rank));
        for key in [
            "samples_read",
            "skipped_total",
            "batches_dropped",
            "skipped",
        ] {
            assert_eq!(a[key], b[key], "rank {rank}: {key}");
        }
        assert!(b["samples_read"].as_u64().unwrap() > 0);
        skipped += b["skipped_total"].as_u64().unwrap();
    }
    assert!(skipped > 0, "the damaged row group was met");
}

#[test]
fn a_checkpoint_of_another_config_is_refused_naming_the_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cfg = crate::common::tiny_config(dir, &["train.max_steps=2"]);
    trainer::train::train(cfg).unwrap();
    let cfg =
        crate::common::tiny_config(dir, &["train.max_steps=4", "optim.lr=0.5", "lora.rank=4"]);
    let err = trainer::train::train(cfg).err().unwrap().to_string();
    assert!(
        err.contains("optim.lr (checkpoint: 0.003, now: 0.5)"),
        "{err}"
    );
    assert!(err.contains("lora.rank (checkpoint: 8, now: 4)"), "{err}");
    assert!(err.contains("--overwrite"), "{err}");
    // Raising max_steps is allowed: the run continues from step 2.
    let cfg = crate::common::tiny_config(dir, &["train.max_steps=4"]);
    let out = trainer::train::train(cfg).unwrap();
    assert_eq!(out.losses.len(), 2, "steps 3 and 4 only");
    assert_eq!(steps_logged(dir), 4);
}

#[test]
#[cfg(unix)]
fn checkpoints_on_an_object_store_resume_bit_identically() {
    let Some(url) = datasets::testing::server_env("MOSAIC_TEST_S3_URL", "ci/s3.sh") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));
    let unique = format!(
        "{}/resume-{}-{}",
        url.trim_end_matches('/'),
        std::process::id(),
        tmp.path().file_name().unwrap().to_string_lossy()
    );
    std::fs::write(cut.with_extension("ckpt-url"), &unique).unwrap();
    one_rank(&full, 10, None);
    one_rank(&cut, 10, Some((7, libc::SIGTERM)));
    assert_identical(&full, &cut);
    assert!(
        !cut.join("checkpoints").exists(),
        "nothing went to the local folder"
    );
    // Export reads the checkpoints straight from the store.
    let out = tmp.path().join("export");
    let opts = trainer::export::ExportOptions {
        format: trainer::export::Format::Diffusers,
        ema: true,
        dtype: candle_core::DType::F32,
        base_model: String::new(),
        license: "other".into(),
    };
    trainer::export::export(Path::new(&unique), &out, &opts).unwrap();
    assert!(out.join("pytorch_lora_weights.safetensors").exists());
}
