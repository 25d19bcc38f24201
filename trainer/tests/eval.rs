//! `trainer eval` against transformers (fixture from ci/eval_fixture.py: tiny random CLIPModel,
//! ViTModel and Dinov2Models, their PIL image processors, three cases of one to three
//! references): the models' embeddings from the same pixels (<= 1e-4), our preprocessing
//! against the processors', and the metrics averaged as the paper does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use flux::eval::{ClipFiles, ClipScorer, DinoFiles, DinoScorer};
use trainer::eval::{evaluate, EvalOptions};

use crate::common::{fixtures, max_abs_diff};

const EMBED_TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    fixtures().join("eval")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn folder(name: &str) -> datasets::model_files::ModelFolder {
    datasets::model_files::ModelFolder::open(
        dir().join(name).to_str().unwrap(),
        &datasets::model_files::cache_root(),
    )
    .unwrap()
}

fn scorers() -> (ClipScorer, DinoScorer) {
    let clip = ClipScorer::load(
        &ClipFiles::from_folder(&folder("clip")).unwrap(),
        &Device::Cpu,
    );
    (clip.unwrap(), dino("dino"))
}

/// The DINO scorer of the fixture's folder `name` (`dino`, `dinov2`, `dinov2-swiglu`).
fn dino(name: &str) -> DinoScorer {
    DinoScorer::load(
        &DinoFiles::from_folder(&folder(name)).unwrap(),
        &Device::Cpu,
    )
    .unwrap()
}

/// Every image of the fixture by its key (`refs.0-0.png`, `samples.1.png`).
fn images() -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for sub in ["refs", "samples"] {
        for e in std::fs::read_dir(dir().join(sub)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            v.push((format!("{sub}.{name}"), p));
        }
    }
    v.sort();
    v
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

#[test]
fn clip_and_dino_match_transformers_on_the_same_pixels() {
    let want = expected();
    let (clip, dino) = scorers();
    for (key, _) in images() {
        let e = clip
            .image_pixels(&want[&format!("clip_pixels.{key}")])
            .unwrap();
        let err = max_abs_diff(&e, &want[&format!("clip_image.{key}")]);
        assert!(err <= EMBED_TOL, "CLIP image {key}: {err}");
    }
    dino_matches(&want, &dino, "DINO", "dino_pixels", "dino_cls");
    let cases = trainer::sample::read_cases(dir().join("cases.json").to_str().unwrap()).unwrap();
    for c in &cases {
        let i = c.stem();
        let ids: Vec<i64> = want[&format!("text_ids.{i}")].to_vec1().unwrap();
        let ours: Vec<i64> = clip
            .token_ids(&c.prompt)
            .unwrap()
            .iter()
            .map(|&x| x as i64)
            .collect();
        assert_eq!(ours, ids, "case {i}: token ids");
        let err = max_abs_diff(
            &clip.text(&c.prompt).unwrap(),
            &want[&format!("clip_text.{i}")],
        );
        assert!(err <= EMBED_TOL, "CLIP text {i}: {err}");
    }
}

#[test]
fn dinov2_matches_transformers_on_the_same_pixels() {
    // The fixture's position embeddings are learnt for 5 x 5 patches and the images give
    // 4 x 4, so this also checks their bicubic resizing.
    let want = expected();
    for (name, cls) in [
        ("dinov2", "dinov2_cls"),
        ("dinov2-swiglu", "dinov2_swiglu_cls"),
    ] {
        dino_matches(&want, &dino(name), name, "dinov2_pixels", cls);
    }
}

/// `net`'s CLS feature of every fixture image, from transformers' pixels (`<pixels>.<image>`),
/// within EMBED_TOL of transformers' (`<cls>.<image>`).
fn dino_matches(
    want: &HashMap<String, Tensor>,
    net: &DinoScorer,
    name: &str,
    pixels: &str,
    cls: &str,
) {
    for (key, _) in images() {
        let d = net.image_pixels(&want[&format!("{pixels}.{key}")]).unwrap();
        let err = max_abs_diff(&d, &want[&format!("{cls}.{key}")]);
        assert!(err <= EMBED_TOL, "{name} {key}: {err}");
    }
}

#[test]
fn preprocessing_is_within_a_grey_level_of_transformers_pil_processors() {
    let want = expected();
    let (clip, dino) = scorers();
    let dinov2 = self::dino("dinov2");
    for (key, path) in images() {
        let img = image::open(&path).unwrap().to_rgb8();
        for (what, ours, theirs, std) in [
            (
                "CLIP",
                clip.pixels(&img).unwrap(),
                &want[&format!("clip_pixels.{key}")],
                0.26,
            ),
            (
                "DINO",
                dino.pixels(&img).unwrap(),
                &want[&format!("dino_pixels.{key}")],
                0.224,
            ),
            (
                "DINOv2",
                dinov2.pixels(&img).unwrap(),
                &want[&format!("dinov2_pixels.{key}")],
                0.224,
            ),
        ] {
            assert_eq!(ours.dims(), theirs.dims(), "{what} {key}");
            // PIL rounds its first resampling pass to 8 bits, the image crate does not: at
            // most one grey level apart (measured: 1.0 worst, 0.15 mean for CLIP's bicubic).
            let d = (&ours - theirs).unwrap().abs().unwrap();
            let worst = d.max_all().unwrap().to_scalar::<f32>().unwrap() as f64 * std * 255.0;
            let mean = d.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64 * std * 255.0;
            assert!(
                worst <= 1.5 && mean <= 0.5,
                "{what} {key}: worst {worst:.2}, mean {mean:.2} grey levels"
            );
        }
    }
}

fn evaluate_with(dino: &str) -> trainer::eval::EvalReport {
    evaluate(
        &EvalOptions {
            samples: dir().join("samples"),
            cases: dir().join("cases.json"),
            clip: Some(dir().join("clip").display().to_string()),
            dino: Some(dir().join(dino).display().to_string()),
        },
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn metrics_are_averaged_as_the_paper_does() {
    let want = expected();
    let r = evaluate_with("dino");
    // Preprocessing differs from PIL's by about a grey level, so the scores agree to ~1e-3.
    let close = |got: Option<f64>, key: &str| {
        let w = scalar(&want[key]);
        let g = got.unwrap();
        assert!((g - w).abs() <= 2e-3, "{key}: {g} vs transformers' {w}");
    };
    close(r.clip_i, "clip_i");
    close(r.clip_t, "clip_t");
    close(r.dino, "dino");
    for c in &r.cases {
        let i = c.index.to_string();
        close(c.clip_i, &format!("clip_i.{i}"));
        close(c.clip_t, &format!("clip_t.{i}"));
        close(c.dino, &format!("dino.{i}"));
    }
    assert_eq!(
        r.cases.iter().map(|c| c.references).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // The DINO score with DINOv2, the network the paper cites.
    let r = evaluate_with("dinov2");
    close(r.dino, "dinov2");
    for c in &r.cases {
        close(c.dino, &format!("dinov2.{}", c.index));
    }
}

#[test]
fn the_command_writes_metrics_and_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("metrics.json");
    let run = |samples: &Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["eval", "--samples"])
            .arg(samples)
            .arg("--cases")
            .arg(dir().join("cases.json"))
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let clip = dir().join("clip").display().to_string();
    let o = run(&dir().join("samples"), &["--clip", &clip]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| **all (3 cases)** |"), "{table}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(m["clip_i"].is_number() && m["dino"].is_null(), "{m}");
    // A sample folder missing case 2's sample, seeded names for the others.
    let partial = tmp.path().join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    for (from, to) in [
        ("0.png", "0-seed1.png"),
        ("0.png", "0-seed2.png"),
        ("1.png", "1.png"),
    ] {
        std::fs::copy(dir().join("samples").join(from), partial.join(to)).unwrap();
    }
    let o = run(&partial, &["--clip", &clip]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no sample of case 2"),
        "{err}"
    );
    // No model at all.
    let o = run(&dir().join("samples"), &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least one model"));
    // A folder that is not a CLIP checkpoint is named.
    let o = run(
        &dir().join("samples"),
        &["--clip", &dir().join("dino").display().to_string()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("tokenizer.json"),
        "{err}"
    );
    // Nor one that is not a DINO checkpoint, with its config.
    let o = run(
        &dir().join("samples"),
        &["--dino", &dir().join("clip").display().to_string()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("model_type `clip`") && err.contains("config.json"),
        "{err}"
    );
}
