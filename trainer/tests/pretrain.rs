//! `trainer pretrain-base`: the whole base trains (its loss falls), the same config gives the
//! same base, the written base is the EMA of the weights (the last ones beside it) with
//! snapshots on the way, and the written folder is a base the LoRA training and the sampler
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
        trainer::pretrain::pretrain_with(cfg, dist, Device::Cpu).map_err(|e| e.to_string())
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
