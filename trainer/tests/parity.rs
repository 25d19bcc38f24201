//! Our forward against diffusers' FluxTransformer2DModel (fixtures from ci/parity.sh), for the
//! diffusers layout (sharded, with an index) and the BFL single file.

use candle_core::DType;
use trainer::forward::{forward_file, ForwardOptions};

use crate::common::{fixtures, max_abs, max_abs_diff};

fn expected() -> candle_core::Tensor {
    let m = candle_core::safetensors::load(
        fixtures().join("parity/expected.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    m["output"].clone()
}

#[test]
fn diffusers_layout_matches_diffusers_forward() {
    let dir = fixtures().join("parity");
    let out = forward_file(&ForwardOptions::new(
        &dir.join("diffusers"),
        &dir.join("inputs.safetensors"),
        DType::F32,
    ))
    .unwrap()
    .output;
    let err = max_abs_diff(&out, &expected());
    assert!(
        err <= 1e-4,
        "max abs error {err} (output scale {})",
        max_abs(&expected())
    );
}

#[test]
fn bfl_single_file_matches_diffusers_forward() {
    let dir = fixtures().join("parity");
    let out = forward_file(&ForwardOptions::new(
        &dir.join("bfl.safetensors"),
        &dir.join("inputs.safetensors"),
        DType::F32,
    ))
    .unwrap()
    .output;
    let err = max_abs_diff(&out, &expected());
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn bf16_forward_stays_close() {
    let dir = fixtures().join("parity");
    let out = forward_file(&ForwardOptions::new(
        &dir.join("diffusers"),
        &dir.join("inputs.safetensors"),
        DType::BF16,
    ))
    .unwrap()
    .output;
    let err = max_abs_diff(&out, &expected());
    // bf16 keeps ~3 significant digits through 3 blocks.
    assert!(err <= 0.1 * max_abs(&expected()), "max abs error {err}");
}

#[test]
fn forward_command_writes_output() {
    let dir = fixtures().join("parity");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    trainer::forward::forward_cmd(
        &ForwardOptions::new(
            &dir.join("diffusers"),
            &dir.join("inputs.safetensors"),
            DType::F32,
        ),
        &out,
    )
    .unwrap();
    let m = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(m["output"].dims(), expected().dims());
}

#[test]
fn missing_input_tensor_is_named() {
    let dir = fixtures().join("parity");
    let tmp = tempfile::tempdir().unwrap();
    let mut m =
        candle_core::safetensors::load(dir.join("inputs.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    m.remove("pooled_projections");
    let bad = tmp.path().join("in.safetensors");
    candle_core::safetensors::save(&m, &bad).unwrap();
    let err = forward_file(&ForwardOptions::new(
        &dir.join("diffusers"),
        &bad,
        DType::F32,
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("pooled_projections"), "{err}");
}

/// flux::sample::denoise against diffusers' FluxPipeline denoising loop (ci/make_sampling_fixture.py):
/// the same final latents from the same start latents and prompt embeddings, at 1, 4 and 8
/// steps with guidance 3.5.
#[test]
fn the_denoising_loop_matches_diffusers_flux_pipeline() {
    use flux::embed::{grid_ids, text_ids};
    use flux::schedule::FlowMatchSchedule;
    let dev = candle_core::Device::Cpu;
    let (cfg, w) =
        flux::weights::load(&fixtures().join("parity/diffusers"), DType::F32, &dev, None).unwrap();
    let model = flux::Flux::new(cfg.clone(), &w, flux::RowBlocks::default()).unwrap();
    let lora = flux::Lora::new(
        &cfg,
        &flux::lora::LoraSpec {
            targets: vec![],
            ..Default::default()
        },
        0,
        DType::F32,
        &dev,
    )
    .unwrap();
    let load = |f: &str| {
        candle_core::safetensors::load(fixtures().join("sampling").join(f), &dev).unwrap()
    };
    let (inp, want) = (load("inputs.safetensors"), load("expected.safetensors"));
    let latents = inp["latents"].clone();
    let n = latents.dim(1).unwrap();
    for steps in [1usize, 4, 8] {
        let inputs = flux::ModelInputs {
            img: latents.clone(),
            img_ids: grid_ids(4, 4, 0),
            txt: inp["prompt_embeds"].clone(),
            txt_ids: text_ids(inp["prompt_embeds"].dim(1).unwrap()),
            pooled: inp["pooled_prompt_embeds"].clone(),
            timestep: vec![],
            guidance: vec![],
            refs: None,
            isolate_refs: true,
            row_queries: None,
        };
        let schedule = FlowMatchSchedule::flux(steps, n);
        let got = flux::sample::denoise(&model, lora.view(false), inputs, &schedule, 3.5, false)
            .unwrap()
            .latents;
        let expected = &want[&format!("final_{steps}")];
        let err = max_abs_diff(&got, expected);
        assert!(
            err <= 1e-3,
            "{steps} steps: max abs error {err} (scale {})",
            max_abs(expected)
        );
    }
}
