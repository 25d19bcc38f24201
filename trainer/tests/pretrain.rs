//! `trainer pretrain-base`: the whole base trains (its loss falls), the same config gives the
//! same base, and the written folder is a base the LoRA training and the sampler load.

use crate::common::tiny_config;

fn config(dir: &std::path::Path, steps: u64) -> trainer::config::Config {
    tiny_config(
        dir,
        &[
            &format!("train.max_steps={steps}"),
            "train.batch_size=4",
            "data.samples=8",
            "optim.lr=2e-3",
            "optim.warmup_steps=2",
            "logging.chart=false",
        ],
    )
}

#[test]
fn the_whole_base_learns_and_the_same_config_gives_the_same_base() {
    let tmp = tempfile::tempdir().unwrap();
    let a = trainer::pretrain::pretrain(config(&tmp.path().join("a"), 40)).unwrap();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&a.losses[..5]), mean(&a.losses[35..]));
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    assert_eq!(a.skipped, 0);
    let b = trainer::pretrain::pretrain(config(&tmp.path().join("b"), 40)).unwrap();
    let file = |o: &trainer::pretrain::PretrainOutcome| {
        std::fs::read(o.base_dir.join("diffusion_pytorch_model.safetensors")).unwrap()
    };
    assert_eq!(file(&a), file(&b), "seeded: the same bytes");
    let lines = std::fs::read_to_string(tmp.path().join("a/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 40);
}

#[test]
fn the_pretrained_base_is_a_base_training_and_sampling_load() {
    let tmp = tempfile::tempdir().unwrap();
    let out = trainer::pretrain::pretrain(config(&tmp.path().join("pre"), 3)).unwrap();
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
            seed: 1,
            ref_cache: true,
            start: None,
        })
        .unwrap();
    assert_eq!(img.image.dimensions(), (32, 32));
}
