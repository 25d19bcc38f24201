//! Validation images during training: grids and images where metrics.jsonl says, the ranks
//! sharing the work, and a resumed run with validation on training bit-identically to an
//! uninterrupted one.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;

use crate::common::tiny_config;

/// Writes `n` validation cases of synthetic scenes under `dir`; returns the case list.
fn cases(dir: &Path, n: usize) -> PathBuf {
    let loc = datasets::Location::local(dir);
    let opts = datasets::synth::SynthOptions {
        samples: 8,
        max_refs: 2,
        size: 96,
        ref_size: 96,
        ..Default::default()
    };
    PathBuf::from(datasets::synth::write_validation_cases(&loc, &opts, n).unwrap())
}

fn sets(cases: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "validation.every=2".to_string(),
        format!("validation.cases={:?}", cases.display().to_string()),
        "validation.seeds=[1, 2]".into(),
        "validation.steps=3".into(),
        "validation.size=32".into(),
        "data.resolution=32".into(),
        "data.ref_resolution=32".into(),
        "data.samples=8".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn config(run: &Path, cases: &Path, extra: &[&str]) -> trainer::config::Config {
    let all = sets(cases, extra);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    tiny_config(run, &refs)
}

/// metrics.jsonl's validation lines: (step, grid, images).
fn validations(run: &Path) -> Vec<(u64, String, Vec<String>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let val = v.get("validation")?;
            Some((
                v["step"].as_u64().unwrap(),
                val["grid"].as_str().unwrap().to_string(),
                val["images"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect(),
            ))
        })
        .collect()
}

#[test]
fn validation_writes_images_and_a_grid_where_metrics_say() {
    let tmp = tempfile::tempdir().unwrap();
    let list = cases(&tmp.path().join("data"), 3);
    let run = tmp.path().join("run");
    // The live LoRA at a high learning rate, so that 5 steps visibly change the images.
    let cfg = config(
        &run,
        &list,
        &[
            "train.max_steps=5",
            "validation.at_start=true",
            "validation.ema=false",
            "optim.lr=5e-2",
            "optim.warmup_steps=0",
        ],
    );
    trainer::train::train(cfg).unwrap();
    let got = validations(&run);
    // Before the first step, every 2 steps, and after the last.
    let steps: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(steps, vec![0, 2, 4, 5]);
    for (step, grid, images) in &got {
        assert_eq!(grid, &format!("samples/step-{step:08}/grid.png"));
        let g = image::open(run.join(grid)).unwrap();
        // 3 rows of 32 px tiles with 4 px gaps; at most 2 reference columns, then 2 seeds.
        assert_eq!(g.height(), 4 + 3 * 36);
        assert!(
            g.width() >= 4 + 3 * 36 && g.width() <= 4 + 4 * 36,
            "{}",
            g.width()
        );
        assert_eq!(images.len(), 6, "3 cases x 2 seeds");
        for i in images {
            assert_eq!(image::open(run.join(i)).unwrap().width(), 32);
        }
    }
    // Two seeds give two images; the LoRA's training changes them between steps.
    let img = |step: usize, k: usize| image::open(run.join(&got[step].2[k])).unwrap().to_rgb8();
    assert_ne!(img(1, 0), img(1, 1), "seeds 1 and 2 differ");
    assert_ne!(img(0, 0), img(3, 0), "the trained LoRA changes the image");
    // Step lines are still one per step.
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(text.lines().filter(|l| l.contains("\"loss\"")).count(), 5);
}

#[test]
fn validation_guided_against_the_empty_caption_renders_what_trainer_sample_renders() {
    // Before the first step the LoRA is the identity, so a validation image is the base's own
    // sample of the case: with validation.true_cfg it must be `trainer sample --true-cfg` with
    // the empty caption as the negative prompt, to the pixel.
    let tmp = tempfile::tempdir().unwrap();
    let list = cases(&tmp.path().join("data"), 1);
    let run = tmp.path().join("run");
    let extra = [
        "train.max_steps=1",
        "validation.at_start=true",
        "validation.ema=false",
        "validation.true_cfg=3.0",
    ];
    let cfg = config(&run, &list, &extra);
    trainer::train::train(cfg.clone()).unwrap();
    let (step, _, images) = &validations(&run)[0];
    assert_eq!(*step, 0);
    let case = &trainer::sample::read_cases(&list.display().to_string()).unwrap()[0];
    let mut sampler = trainer::sample::Sampler::load(&cfg, None, &Device::Cpu).unwrap();
    let render = |sampler: &mut trainer::sample::Sampler, true_cfg: f32| {
        let req = trainer::sample::SampleRequest {
            prompt: case.prompt.clone(),
            refs: case.refs(),
            width: 32,
            height: 32,
            ref_size: 32,
            steps: 3,
            guidance: cfg.validation.guidance,
            true_cfg,
            negative_prompt: String::new(),
            seed: 1,
            ref_cache: cfg.validation.ref_cache,
            start: None,
            init: None,
        };
        sampler.sample(&req).unwrap().image
    };
    let validated = image::open(run.join(&images[0])).unwrap().to_rgb8();
    assert_eq!(validated, render(&mut sampler, 3.0));
    assert_ne!(validated, render(&mut sampler, 1.0), "the guidance acts");
}

#[test]
fn a_resumed_run_with_validation_on_is_bit_identical_to_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let list = cases(&tmp.path().join("data"), 2);
    let whole = tmp.path().join("whole");
    let cut = tmp.path().join("cut");
    let base = ["checkpoint.every=2", "validation.at_start=true"];
    trainer::train::train(config(
        &whole,
        &list,
        &[&base[..], &["train.max_steps=6"]].concat(),
    ))
    .unwrap();
    trainer::train::train(config(
        &cut,
        &list,
        &[&base[..], &["train.max_steps=3"]].concat(),
    ))
    .unwrap();
    // Started again with more steps: resumes from the step-3 checkpoint of the first part.
    let out = trainer::train::train(config(
        &cut,
        &list,
        &[&base[..], &["train.max_steps=6"]].concat(),
    ))
    .unwrap();
    assert_eq!(out.start_step, 3);
    let bytes = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    assert_eq!(
        bytes(&whole, "lora.safetensors"),
        bytes(&cut, "lora.safetensors")
    );
    assert_eq!(
        bytes(&whole, "lora_ema.safetensors"),
        bytes(&cut, "lora_ema.safetensors")
    );
    // The same validations, with the same images.
    let (a, b) = (validations(&whole), validations(&cut));
    let steps = |v: &[(u64, String, Vec<String>)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(steps(&a), vec![0, 2, 4, 6]);
    assert_eq!(
        steps(&b),
        vec![0, 2, 3, 4, 6],
        "the cut run also rendered its last step"
    );
    for (step, _, images) in &a {
        let other = b.iter().find(|x| x.0 == *step).unwrap();
        for (x, y) in images.iter().zip(&other.2) {
            assert_eq!(bytes(&whole, x), bytes(&cut, y), "step {step}: {x}");
        }
    }
}

#[test]
fn two_ranks_share_the_images_and_measures_and_rank_0_writes_them_all() {
    let tmp = tempfile::tempdir().unwrap();
    let list = cases(&tmp.path().join("data"), 3);
    // 3 held-out scenes: rank 0 measures two, rank 1 one.
    let held = format!(
        "validation.heldout={:?}",
        crate::common::write_heldout(&tmp.path().join("heldout"), 3, 96)
    );
    // Before the first step every rank holds rank 0's initial LoRA, so the images and the
    // measures must equal a single rank's, each image in its place, the measures to the bit.
    let extra = [
        "train.max_steps=1",
        "validation.at_start=true",
        "validation.seeds=[7]",
        "validation.identity_steps=2",
        "train.batch_size=1",
        held.as_str(),
    ];
    let single = tmp.path().join("single");
    trainer::train::train(config(&single, &list, &extra)).unwrap();
    let run = tmp.path().join("two");
    // 3 images on 2 ranks: the second round has one image, rank 1 sends none.
    let cfg = config(&run, &list, &extra);
    for done in crate::common::with_ranks(2, move |_, dist| {
        let stop = Arc::new(AtomicBool::new(false));
        trainer::train::train_with(cfg.clone(), dist, Device::Cpu, stop)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }) {
        done.unwrap();
    }
    let (one, two) = (validations(&single), validations(&run));
    assert_eq!(two.len(), 2, "before the first step and after the last");
    assert_eq!(two[0].2.len(), 3);
    for (a, b) in one[0].2.iter().zip(&two[0].2) {
        assert_eq!(a, b);
        assert_eq!(
            std::fs::read(single.join(a)).unwrap(),
            std::fs::read(run.join(b)).unwrap(),
            "{a}"
        );
    }
    let measures = |run: &Path| {
        std::fs::read_to_string(run.join("samples/step-00000000/measures.json")).unwrap()
    };
    let (m1, m2) = (measures(&single), measures(&run));
    let m: serde_json::Value = serde_json::from_str(&m1).unwrap();
    assert_eq!(m["samples"], 3, "{m1}");
    assert!(m["pairs"].as_u64().unwrap() > 0, "{m1}");
    assert!(m["identity"].as_f64().unwrap() > 0.0, "{m1}");
    assert_eq!(m1, m2, "the measures of two ranks are one rank's");
}
