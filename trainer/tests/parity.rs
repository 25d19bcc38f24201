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
