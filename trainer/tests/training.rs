//! The training loop on the tiny config: the loss falls, runs are reproducible, non-finite
//! losses never reach the weights, outputs land in the run folder.

use trainer::config::OnNonFinite;
use trainer::run::Run;
use trainer::train::train;
use trainer::TrainerError;

use crate::common::tiny_config;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn tiny_run_lowers_its_loss_by_half_within_200_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        tmp.path(),
        &["data.samples=8", "optim.lr=1e-2", "train.max_steps=200"],
    );
    let out = train(cfg).unwrap();
    let total: Vec<f64> = out.losses.iter().map(|l| l.total).collect();
    let diff: Vec<f64> = out.losses.iter().map(|l| l.diff).collect();
    let (first, last) = (mean(&total[..20]), mean(&total[180..]));
    assert!(last <= 0.5 * first, "total loss {first} -> {last}");
    // The flow-matching part alone must fall too: a broken path to the target tokens would
    // leave it flat while the attention losses still move.
    let (first_d, last_d) = (mean(&diff[..20]), mean(&diff[180..]));
    assert!(
        last_d <= 0.85 * first_d,
        "diffusion loss {first_d} -> {last_d}"
    );
    assert_eq!(out.skipped, 0);
    let metrics = std::fs::read_to_string(out.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 200);
    let first_line: serde_json::Value =
        serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "loss",
        "loss_diff",
        "loss_scal",
        "loss_mdl",
        "grad_norm",
        "lr",
        "s_per_step",
        "tokens_per_s",
    ] {
        assert!(first_line.get(key).is_some(), "metrics miss {key}");
    }
    let lora = candle_core::safetensors::load(&out.lora_path, &candle_core::Device::Cpu).unwrap();
    assert!(lora.contains_key("transformer.transformer_blocks.0.attn.to_q.lora_A.weight"));
    assert!(lora.contains_key("transformer.single_transformer_blocks.1.proj_out.lora_B.weight"));
    assert!(out.run_dir.join("lora_ema.safetensors").is_file());
}

fn lora_values(run: &Run) -> Vec<Vec<f32>> {
    run.lora
        .named_vars()
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn same_seed_gives_a_bit_identical_run() {
    let run_once = || {
        let tmp = tempfile::tempdir().unwrap();
        let mut run = Run::build(tiny_config(
            tmp.path(),
            &["train.max_steps=5", "train.grad_accum=2"],
        ))
        .unwrap();
        for step in 0..5 {
            run.train_step(step).unwrap();
        }
        lora_values(&run)
    };
    assert_eq!(run_once(), run_once());
}

#[test]
fn nonfinite_loss_skips_the_update_and_keeps_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let mut run = Run::build(tiny_config(tmp.path(), &[])).unwrap();
    run.train_step(0).unwrap();
    for s in run.data.in_memory_mut().unwrap().iter_mut() {
        s.x0 = (&s.x0 * f64::NAN).unwrap();
    }
    let before = lora_values(&run);
    let (m, _) = run.train_step(1).unwrap();
    assert!(m.skipped);
    let after = lora_values(&run);
    assert_eq!(before, after, "a skipped step must not touch the weights");
    assert!(after.iter().flatten().all(|v| v.is_finite()));

    run.cfg.train.on_nonfinite = OnNonFinite::Stop;
    match run.train_step(2) {
        Err(TrainerError::NonFinite { step: 2, .. }) => {}
        other => panic!(
            "expected a NonFinite error, got {:?}",
            other.map(|(m, _)| m)
        ),
    }
}

#[test]
fn gradient_checkpointing_run_matches_the_plain_run() {
    let values = |ckpt: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let mut run = Run::build(tiny_config(
            tmp.path(),
            &[&format!("train.checkpointing={ckpt}")],
        ))
        .unwrap();
        let mut losses = Vec::new();
        for step in 0..3 {
            losses.push(run.train_step(step).unwrap().1.total);
        }
        (losses, lora_values(&run))
    };
    let (la, wa) = values("false");
    let (lb, wb) = values("true");
    for (a, b) in la.iter().zip(&lb) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    }
    for (a, b) in wa.iter().flatten().zip(wb.iter().flatten()) {
        assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
    }
}

/// A shipped FLUX.1-dev config shrunk to the tiny model on the synthetic source for `steps`
/// steps, keeping its recipe (loss settings, dropout, optimizer, EMA).
fn shrunk(config: &str, dir: &std::path::Path, extra: &[&str]) -> trainer::config::Config {
    let mut sets: Vec<String> = [
        "model.weights=\"\"",
        "model.preset=\"tiny\"",
        "model.device=\"cpu\"",
        "model.dtype=\"f32\"",
        "lora.rank=4",
        "lora.alpha=4.0",
        "data.source=\"synthetic\"",
        "validation.every=0",
        "data.cache=\"\"",
        "data.encoders=\"\"",
        "data.samples=6",
        "data.resolution=64",
        "data.ref_resolution=64",
        "data.min_refs=2",
        "data.max_refs=3",
        "data.text_tokens=8",
        "train.max_steps=6",
        "train.progress=false",
        "checkpoint.every=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("run.dir={:?}", dir.display().to_string()));
    sets.extend(extra.iter().map(|s| s.to_string()));
    let path = crate::common::repo_root().join("configs").join(config);
    trainer::config::Config::load(&path, &sets).unwrap()
}

#[test]
fn both_mosaic_configs_run_a_short_tiny_model_run() {
    let tmp = tempfile::tempdir().unwrap();
    // The official MDL ramp starts at step 10,000: moved to step 2 so these steps reach it.
    for (config, extra) in [
        ("mosaic-paper-512.toml", vec![]),
        (
            "mosaic-official-512.toml",
            vec!["loss.mdl_ramp_start=2", "loss.mdl_ramp_steps=2"],
        ),
    ] {
        let cfg = shrunk(config, &tmp.path().join(config), &extra);
        let out = train(cfg).unwrap();
        assert_eq!(out.losses.len(), 6, "{config}");
        assert!(
            out.losses.iter().all(|l| l.total.is_finite()),
            "{config}: {:?}",
            out.losses
        );
        assert!(out.losses.iter().any(|l| l.scal > 0.0), "{config}: SCAL on");
        assert!(out.losses[5].mdl < 0.0, "{config}: MDL on by the last step");
        assert!(out.lora_path.is_file());
    }
}
