//! `trainer pretrain-base`: the whole base trains (its loss falls), the same config gives the
//! same base, the written base is the EMA of the weights (the last ones beside it) with
//! snapshots on the way, a stopped or killed pretraining resumes to the bits of an
//! uninterrupted one, and the written folder is a base the LoRA training and the sampler
//! load.

use candle_core::{DType, Device};

use crate::common::tiny_config;

fn config(dir: &std::path::Path, steps: u64, ema_decay: f64) -> trainer::config::Config {
    config_with(dir, steps, ema_decay, &[])
}

fn config_with(
    dir: &std::path::Path,
    steps: u64,
    ema_decay: f64,
    extra: &[&str],
) -> trainer::config::Config {
    let (steps, ema) = (
        format!("train.max_steps={steps}"),
        format!("optim.ema_decay={ema_decay}"),
    );
    let mut sets = vec![
        steps.as_str(),
        "train.batch_size=4",
        "data.samples=8",
        "optim.lr=2e-3",
        "optim.warmup_steps=2",
        ema.as_str(),
        "checkpoint.every=20",
        "logging.chart=false",
    ];
    sets.extend_from_slice(extra);
    tiny_config(dir, &sets)
}

/// metrics.jsonl without its wall-clock fields.
fn metrics_without_time(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let m = v.as_object_mut().unwrap();
            m.remove("s_per_step");
            m.remove("tokens_per_s");
            v
        })
        .collect()
}

fn weights_file(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("diffusion_pytorch_model.safetensors")).unwrap()
}

#[test]
fn the_whole_base_learns_and_the_same_config_gives_the_same_base() {
    let tmp = tempfile::tempdir().unwrap();
    let a = trainer::pretrain::pretrain(config(&tmp.path().join("a"), 40, 0.9)).unwrap();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&a.losses[..5]), mean(&a.losses[35..]));
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    assert_eq!(a.skipped, 0);
    let b = trainer::pretrain::pretrain(config(&tmp.path().join("b"), 40, 0.9)).unwrap();
    assert_eq!(
        weights_file(&a.base_dir),
        weights_file(&b.base_dir),
        "seeded: the same bytes"
    );
    let lines = std::fs::read_to_string(tmp.path().join("a/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 40);
    // A snapshot every 20 steps before the last, a loadable base.
    let snap = tmp.path().join("a/base-steps/step-00000020");
    assert_eq!(a.snapshots, vec![snap.clone()]);
    flux::weights::load(
        &snap,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        None,
    )
    .unwrap();
    // The EMA does not change training: the last weights are those of a run without it, and
    // the written base (their average) is not.
    let plain = trainer::pretrain::pretrain(config(&tmp.path().join("c"), 40, 0.0)).unwrap();
    assert!(plain.live_dir.is_none());
    let live = a
        .live_dir
        .as_deref()
        .expect("an EMA run writes its last weights");
    assert_eq!(weights_file(live), weights_file(&plain.base_dir));
    assert_ne!(weights_file(&a.base_dir), weights_file(&plain.base_dir));
}

#[test]
fn a_stopped_or_killed_pretraining_resumes_to_the_bits_of_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    // Shards-free but with caption dropout, so the resumed draws cover the empty caption; the
    // EMA's warmup (its decay below 0.9 for all 30 steps) needs the resumed step counted right.
    let extra = [
        "data.drop_text=0.3",
        "optim.ema_warmup=true",
        "checkpoint.every=10",
        "checkpoint.keep=5",
    ];
    let cfg = |name: &str| config_with(&tmp.path().join(name), 30, 0.9, &extra);
    let whole = trainer::pretrain::pretrain(cfg("whole")).unwrap();
    assert!(!whole.stopped_by_signal);
    // A stop asked before the first step: every rank stops after it, rank 0 saves.
    let dir = tmp.path().join("stopped");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let first =
        trainer::pretrain::pretrain_with(cfg("stopped"), single(), Device::Cpu, stop).unwrap();
    assert!(first.stopped_by_signal);
    assert_eq!(first.losses.len(), 1);
    assert!(dir
        .join("checkpoints/step-00000001/base.safetensors")
        .exists());
    // A pretraining's checkpoint has no LoRA: export says where its base is.
    let opts = trainer::export::ExportOptions {
        format: trainer::export::Format::All,
        ema: false,
        dtype: DType::F32,
        base_model: String::new(),
        license: String::new(),
    };
    let e = trainer::export::export(&dir, &tmp.path().join("export"), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("pretrain-base") && e.contains("base/"), "{e}");
    let rest = trainer::pretrain::pretrain(cfg("stopped")).unwrap();
    assert_eq!((rest.start_step, rest.losses.len()), (1, 29));
    let same = |a: &std::path::Path, b: &std::path::Path| {
        assert_eq!(weights_file(&a.join("base")), weights_file(&b.join("base")));
        assert_eq!(
            weights_file(&a.join("base-live")),
            weights_file(&b.join("base-live"))
        );
        assert_eq!(metrics_without_time(a), metrics_without_time(b));
    };
    same(&tmp.path().join("whole"), &dir);
    // Killed after step 20's checkpoint (its later checkpoint lost): the run resumes from 20
    // and the metrics log drops the steps it runs again.
    let killed = tmp.path().join("killed");
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let status = std::process::Command::new("cp")
            .arg("-r")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    };
    copy(&tmp.path().join("whole"), &killed);
    std::fs::remove_dir_all(killed.join("checkpoints/step-00000030")).unwrap();
    std::fs::remove_dir_all(killed.join("base")).unwrap();
    let again = trainer::pretrain::pretrain(cfg("killed")).unwrap();
    assert_eq!((again.start_step, again.losses.len()), (20, 10));
    same(&tmp.path().join("whole"), &killed);
    // Finished: started again, nothing is left to do and the base stays.
    let done = trainer::pretrain::pretrain(cfg("whole")).unwrap();
    assert_eq!((done.start_step, done.losses.len()), (30, 0));
    same(&tmp.path().join("whole"), &killed);
}

#[test]
fn the_command_stops_on_sigterm_with_its_exit_code_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["pretrain-base", "--config"])
            .arg(crate::common::repo_root().join("configs/tiny-cpu.toml"))
            .args(crate::common::random_tiny_args())
            .args([
                "--set",
                "data.source=\"synthetic\"",
                "--set",
                "data.samples=8",
            ])
            .args([
                "--set",
                "train.max_steps=400",
                "--set",
                "train.batch_size=2",
            ])
            .args([
                "--set",
                "train.signal_exit_code=75",
                "--set",
                "train.progress=false",
            ])
            .args([
                "--set",
                "logging.chart=false",
                "--set",
                "checkpoint.every=0",
            ])
            .arg("--set")
            .arg(format!("run.dir={:?}", dir.display().to_string()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = spawn();
    crate::distributed::wait_for_steps(&dir, 5);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(75), "{stdout}");
    assert!(stdout.contains("checkpoint saved"), "{stdout}");
    let stopped_at = crate::common::steps_logged(&dir);
    assert!(stopped_at < 400, "stopped at {stopped_at}");
    // Started again with the same command, it continues to the end, each step logged once.
    let out = spawn().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let steps: Vec<u64> = metrics_without_time(&dir)
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=400).collect::<Vec<_>>());
    assert!(dir
        .join("base/diffusion_pytorch_model.safetensors")
        .exists());
}

fn single() -> trainer::ddp::Dist {
    trainer::ddp::Dist::single()
}

#[test]
fn caption_dropout_trains_the_empty_caption_and_reference_dropout_is_moot() {
    // The base learns the unconditional branch of classifier-free guidance when captions are
    // dropped (data.drop_text, or drop_both: there are no references to drop with them).
    // With every caption dropped, the captions cannot matter; reference dropout changes
    // nothing in a pretraining (its scenes' references are never inputs).
    let tmp = tempfile::tempdir().unwrap();
    let losses = |name: &str, drop: &str| {
        let cfg = config_with(&tmp.path().join(name), 3, 0.0, &[drop]);
        trainer::pretrain::pretrain(cfg).unwrap().losses
    };
    let plain = losses("plain", "data.drop_text=0.0");
    let text = losses("text", "data.drop_text=1.0");
    assert_ne!(plain, text, "the empty caption is another input");
    assert_eq!(text, losses("both", "data.drop_both=1.0"));
    assert_eq!(plain, losses("refs", "data.drop_refs=1.0"));
}

#[test]
fn two_ranks_pretrain_what_one_rank_pretrains_from_the_same_global_batches() {
    // One rank of batch 4 against two of batch 2: the synthetic source's global batches and
    // the draws (keyed by the slot in the global batch) do not depend on the ranks, so only
    // the order of float sums differs.
    let tmp = tempfile::tempdir().unwrap();
    let sets = |b: &'static str| ["optim.warmup_steps=0", b];
    let one = trainer::pretrain::pretrain(config_with(
        &tmp.path().join("one"),
        3,
        0.9,
        &sets("train.batch_size=4"),
    ))
    .unwrap();
    let run = tmp.path().join("two");
    let dir = run.clone();
    let two: Vec<_> = crate::common::with_ranks(2, move |_, dist| {
        let cfg = config_with(&dir, 3, 0.9, &sets("train.batch_size=2"));
        trainer::pretrain::pretrain_with(cfg, dist, Device::Cpu, Default::default())
            .map_err(|e| e.to_string())
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect();
    for out in &two {
        for (a, b) in one.losses.iter().zip(&out.losses) {
            assert!(
                (a - b).abs() < 1e-5 * a.abs(),
                "{:?} {:?}",
                one.losses,
                out.losses
            );
        }
    }
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3, "rank 0 alone logs");
    let weights = |dir: &std::path::Path| {
        let (_, w) = flux::weights::load(dir, DType::F32, &Device::Cpu, None).unwrap();
        w
    };
    let (a, b) = (weights(&one.base_dir), weights(&two[0].base_dir));
    let mut worst = 0f32;
    for (name, t) in a.iter() {
        let d = (t - b.get(name).unwrap()).unwrap().abs().unwrap();
        worst = worst.max(d.max_all().unwrap().to_scalar::<f32>().unwrap());
    }
    assert!(worst < 1e-4, "the bases differ by {worst}");
}

#[test]
fn the_pretrained_base_is_a_base_training_and_sampling_load() {
    let tmp = tempfile::tempdir().unwrap();
    let out = trainer::pretrain::pretrain(config(&tmp.path().join("pre"), 3, 0.9)).unwrap();
    let weights = format!("model.weights={:?}", out.base_dir.display().to_string());
    // The folder's config.json says the architecture (RoPE split included).
    let (fc, _) = flux::weights::load(
        &out.base_dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        None,
    )
    .unwrap();
    assert_eq!(fc, flux::FluxConfig::tiny());
    let run = tmp.path().join("lora");
    let cfg = tiny_config(&run, &[&weights, "train.max_steps=2"]);
    let trained = trainer::train::train(cfg.clone()).unwrap();
    assert!(trained.lora_path.exists());
    let mut s =
        trainer::sample::Sampler::load(&cfg, Some(&trained.lora_path), &candle_core::Device::Cpu)
            .unwrap();
    let img = s
        .sample(&trainer::sample::SampleRequest {
            prompt: "a red square".into(),
            refs: vec![],
            width: 32,
            height: 32,
            ref_size: 32,
            steps: 2,
            guidance: 3.5,
            true_cfg: 1.0,
            negative_prompt: String::new(),
            seed: 1,
            ref_cache: true,
            start: None,
            init: None,
        })
        .unwrap();
    assert_eq!(img.image.dimensions(), (32, 32));
}
