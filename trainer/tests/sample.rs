//! `trainer sample` on the tiny pipeline (seeded base, encoders and decoder): images of the asked
//! size, the same for the same seed, the LoRA acting through the references only, and bad
//! inputs refused before any denoising step.

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};
use trainer::sample::{SampleRequest, Sampler};

use crate::common::{repo_root, tiny_config};

fn reference(dir: &Path, name: &str, colour: [u8; 3]) -> PathBuf {
    let mut img = RgbImage::from_pixel(60, 40, Rgb([255, 255, 255]));
    for y in 5..30 {
        for x in 10..40 {
            img.put_pixel(x, y, Rgb(colour));
        }
    }
    let p = dir.join(name);
    img.save(&p).unwrap();
    p
}

fn request(refs: Vec<PathBuf>, seed: u64) -> SampleRequest {
    SampleRequest {
        prompt: "a red box".into(),
        refs,
        width: 64,
        height: 48,
        ref_size: 64,
        steps: 3,
        guidance: 3.5,
        true_cfg: 1.0,
        negative_prompt: String::new(),
        seed,
        ref_cache: true,
        start: None,
        init: None,
    }
}

#[test]
fn samples_have_the_asked_size_and_depend_on_the_seed_only() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &[]);
    let mut s = Sampler::load(&cfg, None, &candle_core::Device::Cpu).unwrap();
    let refs = vec![
        reference(tmp.path(), "a.png", [200, 20, 20]),
        reference(tmp.path(), "b.png", [20, 20, 200]),
    ];
    let a = s.sample(&request(refs.clone(), 1)).unwrap();
    assert_eq!(a.image.dimensions(), (64, 48));
    assert_eq!(
        a.panel.dimensions(),
        (2 * 48 + 64, 48),
        "references | image"
    );
    let again = s.sample(&request(refs.clone(), 1)).unwrap();
    assert_eq!(a.image, again.image, "same seed, same image");
    let other = s.sample(&request(refs, 2)).unwrap();
    assert_ne!(a.image, other.image, "another seed, another image");
}

#[test]
fn the_reference_cache_changes_what_references_see_and_nothing_without_references() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &[]);
    let mut s = Sampler::load(&cfg, None, &candle_core::Device::Cpu).unwrap();
    let refs = vec![reference(tmp.path(), "a.png", [200, 20, 20])];
    let uncached = |refs: Vec<PathBuf>| SampleRequest {
        ref_cache: false,
        ..request(refs, 1)
    };
    let cached = s.sample(&request(refs.clone(), 1)).unwrap();
    let full = s.sample(&uncached(refs.clone())).unwrap();
    assert_ne!(
        cached.latents.to_vec3::<f32>().unwrap(),
        full.latents.to_vec3::<f32>().unwrap(),
        "cached references see only themselves"
    );
    assert_eq!(
        s.sample(&request(vec![], 1)).unwrap().image,
        s.sample(&uncached(vec![])).unwrap().image
    );
}

#[test]
fn the_lora_acts_through_the_references_only() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = tiny_config(&run, &["train.max_steps=3", "optim.lr=5e-2"]);
    let out = trainer::train::train(cfg.clone()).unwrap();
    let device = candle_core::Device::Cpu;
    let mut base = Sampler::load(&cfg, None, &device).unwrap();
    let mut tuned = Sampler::load(&cfg, Some(&out.lora_path), &device).unwrap();
    let refs = vec![reference(tmp.path(), "a.png", [200, 20, 20])];
    assert_ne!(
        base.sample(&request(refs.clone(), 4)).unwrap().image,
        tuned.sample(&request(refs, 4)).unwrap().image,
        "with a reference the LoRA changes the image"
    );
    assert_eq!(
        base.sample(&request(vec![], 4)).unwrap().image,
        tuned.sample(&request(vec![], 4)).unwrap().image,
        "without references it has no token to act on"
    );
}

#[test]
fn bad_inputs_are_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &[]);
    let mut s = Sampler::load(&cfg, None, &candle_core::Device::Cpu).unwrap();
    let one = reference(tmp.path(), "a.png", [200, 20, 20]);
    let e = s
        .sample(&request(vec![one.clone(); 7], 1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--ref") && e.contains("at most 6"), "{e}");
    let broken = tmp.path().join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\n not really").unwrap();
    let e = s
        .sample(&request(vec![broken.clone()], 1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("broken.png"), "{e}");
    let mut odd = request(vec![], 1);
    odd.width = 50;
    let e = s.sample(&odd).err().unwrap().to_string();
    assert!(e.contains("--width"), "{e}");
    // img2img: a strength outside (0, 1] or leaving no step, and an unreadable picture.
    for strength in [0.0, 1.5, 1e-300] {
        let mut i2i = request(vec![], 1);
        i2i.init = Some(trainer::sample::InitImage {
            path: one.clone(),
            strength,
        });
        let e = s.sample(&i2i).err().unwrap().to_string();
        assert!(
            e.contains("--strength") && e.contains(&strength.to_string()),
            "{e}"
        );
    }
    let mut i2i = request(vec![], 1);
    i2i.init = Some(trainer::sample::InitImage {
        path: broken.clone(),
        strength: 0.5,
    });
    let e = s.sample(&i2i).err().unwrap().to_string();
    assert!(e.contains("broken.png"), "{e}");
    for scale in [0.5, f32::NAN] {
        let mut weak = request(vec![], 1);
        weak.true_cfg = scale;
        let e = s.sample(&weak).err().unwrap().to_string();
        assert!(e.contains("--true-cfg") && e.contains(">= 1"), "{e}");
    }
    // A LoRA for a module the base lacks is refused when loading, naming the file.
    let lora = tmp.path().join("lora.safetensors");
    let t = candle_core::Tensor::zeros((4, 8), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let mut m = std::collections::HashMap::new();
    m.insert(
        "transformer.transformer_blocks.9.attn.to_q.lora_A.weight".to_string(),
        t.clone(),
    );
    m.insert(
        "transformer.transformer_blocks.9.attn.to_q.lora_B.weight".to_string(),
        t.t().unwrap().contiguous().unwrap(),
    );
    candle_core::safetensors::save(&m, &lora).unwrap();
    let e = match Sampler::load(&cfg, Some(&lora), &candle_core::Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("lora.safetensors"), "{e}");
}

/// The final latents of `req` in f32, flattened.
fn latents(s: &mut Sampler, req: &SampleRequest) -> Vec<f32> {
    let out = s.sample(req).unwrap();
    out.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn prompt_guidance_moves_along_the_prompt_minus_the_negative_prompt() {
    // One Euler step is linear in the velocity: x = x0 + dt * v. So with guidance scale S the
    // result must be x_neg + S * (x_pos - x_neg), where x_pos and x_neg are the unguided
    // results of the prompt and of the negative prompt: a check of the combination, the
    // negative prompt's encoding and each prompt's own reference cache (the references'
    // modulation reads the pooled prompt) against separate runs.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), &[]);
    let mut s = Sampler::load(&cfg, None, &candle_core::Device::Cpu).unwrap();
    let refs = vec![reference(tmp.path(), "a.png", [200, 20, 20])];
    for ref_cache in [true, false] {
        let one_step = |prompt: &str, true_cfg: f32| SampleRequest {
            prompt: prompt.into(),
            steps: 1,
            true_cfg,
            negative_prompt: "a blue ball".into(),
            ref_cache,
            ..request(refs.clone(), 7)
        };
        let pos = latents(&mut s, &one_step("a red box", 1.0));
        let neg = latents(&mut s, &one_step("a blue ball", 1.0));
        let scale = 3.0;
        let guided = latents(&mut s, &one_step("a red box", scale));
        assert_ne!(pos, neg, "the two prompts give different velocities");
        let worst = guided
            .iter()
            .zip(pos.iter().zip(&neg))
            .map(|(g, (p, n))| (g - (n + scale * (p - n))).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "ref_cache {ref_cache}: off by {worst}");
    }
    // A negative prompt equal to the prompt leaves every step's velocity as it is.
    let same = SampleRequest {
        true_cfg: 4.0,
        negative_prompt: "a red box".into(),
        ..request(refs.clone(), 7)
    };
    let plain = latents(&mut s, &request(refs.clone(), 7));
    let guided = latents(&mut s, &same);
    let worst = guided
        .iter()
        .zip(&plain)
        .map(|(g, p)| (g - p).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "off by {worst}");
}

#[test]
fn a_negative_prompt_without_prompt_guidance_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["sample", "--config"])
        .arg(repo_root().join("configs/tiny-cpu.toml"))
        .args(crate::common::random_tiny_args())
        .args(["--prompt", "a red box", "--negative-prompt", "a blue ball"])
        .args(["--steps", "1", "--size", "64", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--negative-prompt") && err.contains("--true-cfg"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn the_command_samples_image_to_image_and_wants_an_image_for_a_strength() {
    let tmp = tempfile::tempdir().unwrap();
    let init = reference(tmp.path(), "init.png", [200, 20, 20]);
    let sample = |extra: &[&str], out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["sample", "--config"])
            .arg(repo_root().join("configs/tiny-cpu.toml"))
            .args(crate::common::random_tiny_args())
            .args(["--prompt", "a red box", "--steps", "4", "--size", "64"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = tmp.path().join("i2i.png");
    let init_arg = init.display().to_string();
    let o = sample(&["--image", &init_arg, "--strength", "0.5"], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    let lone = tmp.path().join("lone.png");
    let o = sample(&["--strength", "0.5"], &lone);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--image"), "{err}");
    assert!(!lone.exists());
}

#[test]
fn the_command_writes_the_image_and_its_panel() {
    let tmp = tempfile::tempdir().unwrap();
    let r = reference(tmp.path(), "a.png", [200, 20, 20]);
    let out = tmp.path().join("out/x.png");
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["sample", "--config"])
        .arg(repo_root().join("configs/tiny-cpu.toml"))
        .args(crate::common::random_tiny_args())
        .args([
            "--prompt",
            "a red box",
            "--steps",
            "2",
            "--size",
            "64",
            "--ref",
        ])
        .arg(&r)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    let panel = image::open(tmp.path().join("out/x.panel.png")).unwrap();
    assert_eq!((panel.width(), panel.height()), (128, 64));
}

#[test]
fn a_case_list_renders_every_case_and_fixed_latents_override_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = reference(tmp.path(), "a.png", [200, 20, 20]);
    let b = reference(tmp.path(), "b.png", [20, 20, 200]);
    let cases = tmp.path().join("cases.json");
    std::fs::write(
        &cases,
        serde_json::json!([
            {"index": 1, "prompt": "a red box", "image_paths": a.display().to_string()},
            {"index": "two", "prompt": "two things",
             "image_paths": [a.display().to_string(), b.display().to_string()]},
        ])
        .to_string(),
    )
    .unwrap();
    let dir = tmp.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["sample", "--config"])
        .arg(repo_root().join("configs/tiny-cpu.toml"))
        .args(crate::common::random_tiny_args())
        .args(["--steps", "2", "--size", "32", "--cases"])
        .arg(&cases)
        .arg("--out-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (name, w) in [("1", 64), ("two", 96)] {
        let panel = image::open(dir.join(format!("{name}.panel.png"))).unwrap();
        assert_eq!(panel.width(), w, "{name}: references | image");
        assert!(dir.join(format!("{name}.png")).is_file());
    }
    // The same start latents give the same image whatever the seed.
    let tmp2 = tmp.path().join("cfg");
    let cfg = tiny_config(&tmp2, &[]);
    let mut s = Sampler::load(&cfg, None, &candle_core::Device::Cpu).unwrap();
    let start =
        candle_core::Tensor::randn(0f32, 1.0, (1, 12, 64), &candle_core::Device::Cpu).unwrap();
    let with = |seed| {
        let mut r = request(vec![], seed);
        r.start = Some(start.clone());
        r
    };
    assert_eq!(
        s.sample(&with(1)).unwrap().image,
        s.sample(&with(9)).unwrap().image
    );
    let mut wrong = with(1);
    wrong.start = Some(
        candle_core::Tensor::zeros(
            (1, 5, 64),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let e = s.sample(&wrong).err().unwrap().to_string();
    assert!(e.contains("--latents"), "{e}");
}

/// The whole pipeline against diffusers' FluxPipeline (ci/make_pipeline_fixture.py): the tiny
/// transformer, T5, CLIP and VAE, a prompt and fixed start latents give the same final latents
/// and the same image.
/// The sampler of the diffusers parity fixtures: the tiny transformer, encoders and VAE
/// `ci/make_pipeline_fixture.py` and `ci/make_img2img_fixture.py` give diffusers.
fn parity_sampler(tmp: &Path, case: &serde_json::Value) -> Sampler {
    let fx = crate::common::fixtures();
    let datasets_fx = repo_root().join("datasets/tests/fixtures");
    let cfg = tiny_config(
        tmp,
        &[
            &format!(
                "model.weights={:?}",
                fx.join("parity/diffusers").display().to_string()
            ),
            &format!(
                "data.encoders={:?}",
                datasets_fx.join("encoders").display().to_string()
            ),
            &format!(
                "data.vae={:?}",
                datasets_fx.join("vae_decoder/vae").display().to_string()
            ),
            &format!("data.text_tokens={}", case["t5_tokens"]),
        ],
    );
    Sampler::load(&cfg, None, &candle_core::Device::Cpu).unwrap()
}

/// A fixture folder's case.json, inputs and expected outputs.
fn parity_case(
    folder: &str,
) -> (
    serde_json::Value,
    std::collections::HashMap<String, candle_core::Tensor>,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    let dir = crate::common::fixtures().join(folder);
    let case =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let load = |f: &str| candle_core::safetensors::load(dir.join(f), &candle_core::Device::Cpu);
    (
        case,
        load("inputs.safetensors").unwrap(),
        load("expected.safetensors").unwrap(),
    )
}

/// The request of a parity case: its prompt, size, steps and guidance, from `start`.
fn parity_request(case: &serde_json::Value, start: &candle_core::Tensor) -> SampleRequest {
    let size = case["size"].as_u64().unwrap() as usize;
    SampleRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        refs: vec![],
        width: size,
        height: size,
        ref_size: size,
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap() as f32,
        true_cfg: 1.0,
        negative_prompt: String::new(),
        seed: 0,
        ref_cache: true,
        start: Some(start.clone()),
        init: None,
    }
}

/// `got` against diffusers' final latents and image (floats in [0, 1] against ours rounded
/// to 8 bits).
fn assert_matches_diffusers(
    got: &trainer::sample::Sampled,
    want: &std::collections::HashMap<String, candle_core::Tensor>,
) {
    let err = crate::common::max_abs_diff(&got.latents, &want["latents"]);
    assert!(err <= 1e-3, "final latents differ by {err}");
    let expected: Vec<f32> = want["image"].flatten_all().unwrap().to_vec1().unwrap();
    let ours: Vec<f32> = got
        .image
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 255.0)
        .collect();
    assert_eq!(ours.len(), expected.len());
    let mean = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / ours.len() as f32;
    assert!(mean <= 1.0 / 255.0, "mean pixel error {mean}");
}

#[test]
fn the_pipeline_matches_diffusers_flux_pipeline() {
    let (case, inp, want) = parity_case("pipeline");
    let tmp = tempfile::tempdir().unwrap();
    let mut s = parity_sampler(tmp.path(), &case);
    let got = s.sample(&parity_request(&case, &inp["latents"])).unwrap();
    assert_matches_diffusers(&got, &want);
}

#[test]
fn image_to_image_matches_diffusers_flux_img2img_pipeline() {
    let (case, inp, want) = parity_case("img2img");
    let tmp = tempfile::tempdir().unwrap();
    let mut s = parity_sampler(tmp.path(), &case);
    let init = trainer::sample::InitImage {
        path: crate::common::fixtures().join("img2img/init.png"),
        strength: case["strength"].as_f64().unwrap(),
    };
    let req = SampleRequest {
        init: Some(init.clone()),
        ..parity_request(&case, &inp["noise"])
    };
    let got = s.sample(&req).unwrap();
    assert_matches_diffusers(&got, &want);
    // The picture matters: the same noise from pure noise (strength 1) ends elsewhere.
    let full = s
        .sample(&SampleRequest {
            init: Some(trainer::sample::InitImage {
                strength: 1.0,
                ..init
            }),
            ..req.clone()
        })
        .unwrap();
    let moved = crate::common::max_abs_diff(&full.latents, &got.latents);
    assert!(moved > 1e-2, "strength 1 ends {moved} from strength 0.6");
}

#[test]
fn lora_references_and_case_lists_come_from_urls_too() {
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    std::fs::create_dir_all(served.join("refs")).unwrap();
    reference(&served.join("refs"), "a.png", [200, 20, 20]);
    // A LoRA file: a short run's export.
    let run = tmp.path().join("run");
    let out = trainer::train::train(tiny_config(&run, &["train.max_steps=2"])).unwrap();
    std::fs::copy(&out.lora_path, served.join("lora.safetensors")).unwrap();
    // Relative image paths start at the list's folder, here a URL's.
    std::fs::write(
        served.join("cases.json"),
        serde_json::json!([{"index": 7, "prompt": "a red box", "image_paths": "refs/a.png"}])
            .to_string(),
    )
    .unwrap();
    let (url, gets) = datasets::testing::serve_folder(served.clone());
    let sample = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["sample", "--config"])
            .arg(repo_root().join("configs/tiny-cpu.toml"))
            .args(crate::common::random_tiny_args())
            .args([
                "--steps",
                "2",
                "--size",
                "32",
                "--lora",
                &format!("{url}/lora.safetensors"),
            ])
            .args(extra)
            .env("MOSAIC_CACHE_DIR", tmp.path().join("cache"))
            .output()
            .unwrap()
    };
    let single = tmp.path().join("one.png");
    let o = sample(&[
        "--prompt",
        "a red box",
        "--ref",
        &format!("{url}/refs/a.png"),
        "--out",
        single.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = sample(&[
        "--cases",
        &format!("{url}/cases.json"),
        "--out-dir",
        tmp.path().join("cases").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same inputs by URL and by path: the same image.
    assert_eq!(
        image::open(&single).unwrap().to_rgb8(),
        image::open(tmp.path().join("cases/7.png"))
            .unwrap()
            .to_rgb8()
    );
    let gets = gets.lock().unwrap();
    assert!(
        gets.contains_key("/refs/a.png") && gets.contains_key("/cases.json"),
        "{gets:?}"
    );
    // A URL that is not there is named.
    let o = sample(&[
        "--prompt",
        "x",
        "--ref",
        &format!("{url}/refs/none.png"),
        "--out",
        "x.png",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("none.png"), "{err}");
}
