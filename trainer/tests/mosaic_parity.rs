//! `trainer forward` against the official MOSAIC code (fixtures from
//! ci/make_mosaic_parity_fixtures.py, a torch re-implementation of the official per-branch
//! forward and of train.py's compute_align_sep_losses, on a tiny diffusers model with a PEFT
//! LoRA): the output, the attention rows and both recipes' losses for 1, 2 and 3 references of
//! unequal token counts. Each case also holds outputs of three broken variants (the LoRA on text
//! and target tokens too, references shifted the wrong way, references that see each other); the
//! test checks ours is far from each, so such a bug cannot pass it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use trainer::forward::{forward_cmd, forward_file, ForwardOptions, ForwardOutputs};

use crate::common::{fixtures, max_abs_diff, repo_root};

const OUTPUT_TOL: f64 = 1e-4;
const ROWS_TOL: f64 = 1e-5;
const LOSS_REL_TOL: f64 = 1e-5;

fn dir() -> PathBuf {
    fixtures().join("mosaic")
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(case).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn options(inputs: &Path, loss_config: Option<&str>) -> ForwardOptions {
    ForwardOptions {
        lora: Some(dir().join("lora.safetensors")),
        loss_config: loss_config.map(|c| repo_root().join(c)),
        ..ForwardOptions::new(&dir().join("transformer"), inputs, DType::F32)
    }
}

fn run(case: &str, loss_config: Option<&str>) -> ForwardOutputs {
    let inputs = dir().join(case).join("inputs.safetensors");
    forward_file(&options(&inputs, loss_config)).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

fn assert_loss(case: &str, what: &str, got: f64, want: &Tensor) {
    let want = scalar(want);
    let err = (got - want).abs();
    assert!(
        err <= LOSS_REL_TOL * want.abs().max(1e-6),
        "{case} {what}: {got} vs official {want}"
    );
}

#[test]
fn forward_rows_and_losses_match_the_official_code_for_one_to_three_references() {
    for case in ["k1", "k2", "k3"] {
        let want = expected(case);
        let official = run(case, Some("configs/mosaic-official-512.toml"));
        let err = max_abs_diff(&official.output, &want["output"]);
        eprintln!("{case}: output error {err}");
        assert!(err <= OUTPUT_TOL, "{case}: output differs by {err}");
        let rows = official.attention_rows.as_ref().unwrap();
        let err = max_abs_diff(rows, &want["attention_rows"]);
        assert!(err <= ROWS_TOL, "{case}: attention rows differ by {err}");
        let (scal, mdl) = official.losses.unwrap();
        assert_loss(case, "official SCAL", scal, &want["loss_scal_official"]);
        assert_loss(case, "official MDL", mdl, &want["loss_mdl_official"]);
        let (scal, mdl) = run(case, Some("configs/mosaic-paper-512.toml"))
            .losses
            .unwrap();
        assert_loss(case, "paper SCAL", scal, &want["loss_scal_paper"]);
        assert_loss(case, "paper MDL", mdl, &want["loss_mdl_paper"]);
        if case != "k1" {
            assert!(mdl < 0.0, "{case}: MDL is active with several references");
        }
        // The fixture tells a correct forward from each broken one by far more than the
        // tolerance, so a LoRA that leaks, a flipped offset or references that see each other
        // fail the comparison above.
        for control in [
            "control_lora_everywhere",
            "control_offset_flipped",
            "control_refs_see_each_other",
        ] {
            if let Some(c) = want.get(control) {
                let gap = max_abs_diff(&official.output, c);
                assert!(gap > 10.0 * OUTPUT_TOL, "{case}: {control} only {gap} away");
            }
        }
    }
}

#[test]
fn the_reference_cache_step_matches_the_official_kv_cache_mode() {
    for case in ["k1", "k2", "k3"] {
        let want = expected(case);
        let inputs = dir().join(case).join("inputs.safetensors");
        let got = forward_file(&ForwardOptions {
            ref_cache: true,
            ..options(&inputs, None)
        })
        .unwrap();
        let err = max_abs_diff(&got.output, &want["output_kv_cache"]);
        eprintln!("{case}: kv-cache output error {err}");
        assert!(
            err <= OUTPUT_TOL,
            "{case}: kv-cache output differs by {err}"
        );
        // References that also see text and target (training's forward) are far from it.
        let gap = max_abs_diff(&got.output, &want["output"]);
        assert!(
            gap > 10.0 * OUTPUT_TOL,
            "{case}: only {gap} from training's"
        );
    }
}

#[test]
fn the_default_loss_settings_are_the_paper_s() {
    let want = expected("k3");
    let (scal, mdl) = run("k3", None).losses.unwrap();
    assert_loss("k3", "default SCAL", scal, &want["loss_scal_paper"]);
    assert_loss("k3", "default MDL", mdl, &want["loss_mdl_paper"]);
}

#[test]
fn rows_blocks_choose_the_averaged_blocks() {
    let inputs = dir().join("k2").join("inputs.safetensors");
    let all = run("k2", None).attention_rows.unwrap();
    let first = forward_file(&ForwardOptions {
        rows_blocks: Some(vec![0]),
        ..options(&inputs, None)
    })
    .unwrap()
    .attention_rows
    .unwrap();
    assert!(
        max_abs_diff(&all, &first) > 1e-4,
        "block 0 alone differs from the mean"
    );
    let e = forward_file(&ForwardOptions {
        rows_blocks: Some(vec![5]),
        ..options(&inputs, None)
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--rows-blocks") && e.contains("block 5"), "{e}");
}

#[test]
fn the_command_writes_every_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let inputs = dir().join("k2").join("inputs.safetensors");
    forward_cmd(
        &options(&inputs, Some("configs/mosaic-official-512.toml")),
        &out,
    )
    .unwrap();
    let m = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let want = expected("k2");
    for name in ["output", "attention_rows", "loss_scal", "loss_mdl"] {
        assert!(m.contains_key(name), "{name} missing");
    }
    assert_eq!(m["attention_rows"].dims(), want["attention_rows"].dims());
    assert_eq!(m["loss_mdl"].dims(), &[1]);
}

/// An edit of an inputs file.
type Change = dyn FnOnce(&mut HashMap<String, Tensor>);

/// The k2 inputs changed by `change`, written to `dir`.
fn changed_inputs(dir: &Path, change: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut m = candle_core::safetensors::load(
        self::dir().join("k2").join("inputs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    change(&mut m);
    let p = dir.join("in.safetensors");
    candle_core::safetensors::save(&m, &p).unwrap();
    p
}

fn error_of(opts: &ForwardOptions) -> String {
    format!(
        "{:#}",
        anyhow::Error::new(forward_file(opts).err().unwrap())
    )
}

#[test]
fn bad_inputs_are_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Box<Change>)> = vec![
        (
            "ref_points",
            Box::new(|m| {
                m.insert(
                    "ref_points".into(),
                    Tensor::new(&[0i64, 13], &Device::Cpu).unwrap(),
                );
                m.remove("ref_targets");
            }),
        ),
        (
            "ref_targets",
            Box::new(|m| {
                m.remove("ref_points");
            }),
        ),
        (
            "ref_img_ids.1",
            Box::new(|m| {
                m.insert(
                    "ref_img_ids.1".into(),
                    Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
                );
            }),
        ),
        (
            "ref_hidden_states.0",
            Box::new(|m| {
                m.insert(
                    "ref_hidden_states.0".into(),
                    Tensor::zeros((1, 0, 64), DType::F32, &Device::Cpu).unwrap(),
                );
            }),
        ),
        (
            "ref_hidden_states.3",
            Box::new(|m| {
                let t = m["ref_hidden_states.1"].clone();
                m.insert("ref_hidden_states.3".into(), t);
            }),
        ),
    ];
    for (name, change) in cases {
        let sub = tmp.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let inputs = changed_inputs(&sub, change);
        let e = error_of(&options(&inputs, Some("configs/mosaic-official-512.toml")));
        assert!(e.contains(name), "{name}: {e}");
    }
}

#[test]
fn a_lora_for_modules_the_base_lacks_is_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m =
        candle_core::safetensors::load(dir().join("lora.safetensors"), &Device::Cpu).unwrap();
    let a = m["transformer.x_embedder.lora_A.weight"].clone();
    let b = m["transformer.x_embedder.lora_B.weight"].clone();
    m.insert(
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight".into(),
        a,
    );
    m.insert(
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight".into(),
        b,
    );
    let bad = tmp.path().join("lora.safetensors");
    candle_core::safetensors::save(&m, &bad).unwrap();
    let inputs = dir().join("k1").join("inputs.safetensors");
    let e = error_of(&ForwardOptions {
        lora: Some(bad),
        ..options(&inputs, None)
    });
    assert!(
        e.contains("lora.safetensors") && e.contains("transformer_blocks.7.attn.to_q"),
        "{e}"
    );
}

#[test]
fn a_loss_config_without_a_loss_table_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.toml");
    std::fs::write(&p, "[optim]\nlr = 1.0\n").unwrap();
    let inputs = dir().join("k1").join("inputs.safetensors");
    let e = error_of(&ForwardOptions {
        loss_config: Some(p.clone()),
        ..options(&inputs, None)
    });
    assert!(e.contains("c.toml") && e.contains("[loss]"), "{e}");
    std::fs::write(&p, "[loss]\nmdl_rows = \"every\"\n").unwrap();
    let e = error_of(&ForwardOptions {
        loss_config: Some(p),
        ..options(&inputs, None)
    });
    assert!(e.contains("mdl_rows") || e.contains("every"), "{e}");
}
