//! `trainer denoise-profile`: its errors equal those of one batched computation on the same
//! noise draws, and its command line writes the table, the JSON and the sheet, and names a bad
//! noise level.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use flux::embed::{grid_ids, text_ids};
use flux::schedule::FlowMatchSchedule;
use flux::{Flux, ModelInputs, RowBlocks};
use trainer::denoise_profile::{measure, noise_of, ProfileSpec};

use crate::common::{random_tiny_args, tiny_config};

fn spec() -> ProfileSpec {
    ProfileSpec {
        noise_levels: vec![0.25, 1.0],
        strengths: vec![0.5],
        steps: 4,
        guidance: 1.0,
        seed: 3,
        sheet_rows: 2,
    }
}

fn mse(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-4 * want.abs().max(1e-3),
        "{what}: {got} vs batched {want}"
    );
}

#[test]
fn the_profile_equals_one_batched_computation_on_the_same_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &["data.samples=4"]);
    let dev = Device::Cpu;
    let (fc, weights) = trainer::run::base_weights(&cfg, &dev).unwrap();
    let model = Flux::new(fc.clone(), &weights, RowBlocks::default()).unwrap();
    let lora = trainer::sample::load_lora(&fc, None, &dev).unwrap();
    let mut data = trainer::data::DataFeed::build(&cfg, &fc, 0, 1, &dev).unwrap();
    let samples =
        trainer::denoise_profile::first_samples(&mut data, 3, cfg.train.batch_size).unwrap();
    let spec = spec();
    let (profile, sheet) = measure(&model, lora.view(false), &samples, &spec).unwrap();

    // The slow path: all samples in one batch, the same noise, the formulas written out.
    let stack = |f: &dyn Fn(&trainer::data::Sample) -> Tensor| {
        Tensor::stack(&samples.iter().map(f).collect::<Vec<_>>(), 0).unwrap()
    };
    let x0 = stack(&|s| s.x0.to_dtype(DType::F32).unwrap());
    let n = Tensor::cat(
        &(0..samples.len())
            .map(|k| noise_of(spec.seed, k, &samples[k].x0.unsqueeze(0).unwrap()).unwrap())
            .collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let g = samples[0].grid;
    let b = samples.len();
    let inputs = |img: Tensor| ModelInputs {
        img,
        img_ids: grid_ids(g.rows, g.cols, 0),
        txt_ids: text_ids(samples[0].txt.dim(0).unwrap()),
        txt: stack(&|s| s.txt.clone()),
        pooled: stack(&|s| s.pooled.clone()),
        timestep: vec![],
        guidance: vec![],
        refs: None,
        isolate_refs: true,
        row_queries: None,
    };
    let noised = |t: f64| ((&x0 * (1.0 - t)).unwrap() + (&n * t).unwrap()).unwrap();
    for (level, &t) in profile.levels.iter().zip(&spec.noise_levels) {
        let xt = noised(t);
        let mut inp = inputs(xt.clone());
        inp.timestep = vec![t as f32; b];
        inp.guidance = vec![1.0; b];
        let v = model.forward(&inp, lora.view(false)).unwrap().pred;
        close(
            "velocity",
            level.velocity_mse,
            mse(&v, &(&n - &x0).unwrap()),
        );
        let x0_hat = (xt - (v * t).unwrap()).unwrap();
        close("x0", level.x0_mse, mse(&x0_hat, &x0));
    }
    let tail = FlowMatchSchedule::flux(4, g.len()).img2img(0.5).unwrap();
    assert_eq!(
        profile.img2img[0].steps, 2,
        "diffusers: int(4 - 4 * 0.5) = 2 kept"
    );
    let start = noised(tail.sigmas[0] as f64);
    let end = flux::sample::denoise(&model, lora.view(false), inputs(start), &tail, 1.0, false)
        .unwrap()
        .latents;
    close("img2img", profile.img2img[0].x0_mse, mse(&end, &x0));
    let mean = x0
        .mean_keepdim(0)
        .unwrap()
        .broadcast_as(x0.shape())
        .unwrap();
    close(
        "mean image",
        profile.mean_image_mse.unwrap(),
        mse(&mean, &x0),
    );
    // The sheet: the first two samples, each clean + 2 levels + 1 strength.
    assert_eq!(sheet.rows.len(), 2);
    assert!(sheet.rows.iter().all(|r| r.len() == 4));
    assert_eq!(mse(&sheet.rows[1][0], &x0.narrow(0, 1, 1).unwrap()), 0.0);
}

fn profile_cmd(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let config = crate::common::repo_root().join("configs/tiny-cpu.toml");
    let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
    c.args(["denoise-profile", "--config"])
        .arg(config)
        .args(random_tiny_args())
        .args([
            "--set",
            "data.source=\"synthetic\"",
            "--set",
            "data.samples=4",
        ])
        .args([
            "--samples",
            "3",
            "--steps",
            "4",
            "--sheet-rows",
            "2",
            "--out",
        ])
        .arg(dir)
        .args(extra)
        .env_remove("RUST_LOG");
    c.output().unwrap()
}

#[test]
fn the_command_writes_table_json_and_sheet_and_names_a_bad_level() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p");
    let o = profile_cmd(&out, &["--t", "0.5,1", "--strength", "0.5"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("| 0.5 |") && stdout.contains("img2img strength"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("profile.json")).unwrap()).unwrap();
    assert_eq!(json["samples"], 3);
    assert_eq!(json["levels"].as_array().unwrap().len(), 2);
    assert_eq!(json["img2img"][0]["steps"], 2);
    let sheet = image::open(out.join("profile.png")).unwrap();
    // Two rows of 4 tiles (clean, 2 levels, 1 strength) of the config's 64 px.
    assert!(
        sheet.width() > 4 * 64 && sheet.height() > 2 * 64,
        "{sheet:?}"
    );

    let bad = profile_cmd(&tmp.path().join("q"), &["--t", "0.5,0"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(err.contains("--t") && err.contains("(0, 1]"), "{err}");
    assert!(!tmp.path().join("q/profile.json").exists());
}
