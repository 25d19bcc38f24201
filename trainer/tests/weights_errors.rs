//! Weights that do not fit the model are refused, naming every offending tensor.

use candle_core::{DType, Device, Tensor};
use flux::{weights, FluxConfig, Weights};

#[test]
fn missing_and_misshaped_tensors_are_each_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("w.safetensors");
    Weights::random(&FluxConfig::tiny(), 1, DType::F32, &Device::Cpu)
        .unwrap()
        .save(&path)
        .unwrap();
    let mut m = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    m.remove("single_transformer_blocks.1.proj_out.bias");
    m.insert(
        "transformer_blocks.0.attn.to_k.weight".into(),
        Tensor::zeros((64, 63), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&m, &path).unwrap();
    let err = weights::load(&path, DType::F32, &Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("w.safetensors"), "{err}");
    assert!(
        err.contains(
            "missing tensor `single_transformer_blocks.1.proj_out.bias` (expected shape [64])"
        ),
        "{err}"
    );
    assert!(err.contains("tensor `transformer_blocks.0.attn.to_k.weight`: expected shape [64, 64], found [64, 63]"), "{err}");
}

#[test]
fn random_weights_round_trip_through_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("w.safetensors");
    let w = Weights::random(&FluxConfig::tiny(), 1, DType::F32, &Device::Cpu).unwrap();
    w.save(&path).unwrap();
    let (cfg, back) = weights::load(&path, DType::F32, &Device::Cpu, None).unwrap();
    assert_eq!(cfg, FluxConfig::tiny());
    assert_eq!(back.len(), w.len());
}

#[test]
fn a_folder_without_config_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let err = weights::load(tmp.path(), DType::F32, &Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    let err = weights::load(&tmp.path().join("nope"), DType::F32, &Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}
