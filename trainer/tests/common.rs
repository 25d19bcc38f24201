//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use flux::Lora;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use trainer::config::Config;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// The overrides that make configs/tiny-cpu.toml the tests' model: the tiny preset from its
/// seeded random init (not the committed base: the tests' numbers do not depend on it) and
/// 16 caption tokens, with validation off.
pub const RANDOM_TINY: [&str; 4] = [
    "model.weights=\"\"",
    "data.text_tokens=16",
    "validation.every=0",
    "validation.heldout=\"\"",
];

/// [`RANDOM_TINY`] as command-line arguments (`--set KEY=VALUE` each).
pub fn random_tiny_args() -> Vec<String> {
    RANDOM_TINY
        .iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

/// configs/tiny-cpu.toml with overrides, writing under `dir`, on the in-memory synthetic
/// source (whose global batches do not depend on the number of ranks) with [`RANDOM_TINY`]
/// unless `sets` says otherwise.
pub fn tiny_config(dir: &Path, sets: &[&str]) -> Config {
    let mut all: Vec<String> = vec![
        format!("run.dir={:?}", dir.display().to_string()),
        "train.progress=false".into(),
        "data.source=\"synthetic\"".into(),
    ];
    all.extend(RANDOM_TINY.iter().map(|s| s.to_string()));
    all.extend(sets.iter().map(|s| s.to_string()));
    Config::load(&repo_root().join("configs").join("tiny-cpu.toml"), &all).expect("tiny config")
}

/// Lines in the run's metrics.jsonl so far (0 before it exists).
pub fn steps_logged(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A seeded N(0, std^2) tensor shaped like `like`, in its dtype.
pub fn randn_like(like: &Tensor, std: f64, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> = (0..like.elem_count())
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            std * z
        })
        .collect();
    Tensor::from_vec(v, like.shape(), like.device())
        .unwrap()
        .to_dtype(like.dtype())
        .unwrap()
}

/// B starts at zero, which makes dL/dA zero: give every B a random value so every LoRA tensor
/// has a non-trivial gradient.
pub fn randomize_lora_b(lora: &Lora, seed: u64) {
    for (i, (name, var)) in lora.named_vars().into_iter().enumerate() {
        if name.ends_with("lora_B") {
            var.set(&randn_like(var.as_tensor(), 0.05, seed + i as u64))
                .unwrap();
        }
    }
}

/// Synthetic shards of `samples` small scenes (48 px targets, 1 or 2 references, row groups of
/// 4) written to `loc`.
pub fn write_test_shards(loc: datasets::Location, samples: usize, seed: u64) {
    let opts = datasets::synth::SynthOptions {
        samples,
        max_refs: 2,
        size: 48,
        ref_size: 40,
        seed,
        ..Default::default()
    };
    write_synth_shards(loc, &opts);
}

/// The synthetic scenes of `opts` written to `loc` in row groups of 4.
pub fn write_synth_shards(loc: datasets::Location, opts: &datasets::synth::SynthOptions) {
    let wopts = datasets::WriterOptions {
        row_group_rows: 4,
        ..Default::default()
    };
    datasets::synth::write_dataset(loc, opts, wopts).unwrap();
}

/// Loopback TCP ranks' options for the tests: generous timeouts for a loaded CI machine.
pub fn tcp_options() -> trainer::ddp::DistOptions {
    trainer::ddp::DistOptions {
        backend: trainer::ddp::init::Backend::Tcp,
        timeout: std::time::Duration::from_secs(60),
        connect_timeout: std::time::Duration::from_secs(30),
    }
}

/// Runs `f(rank, dist)` for every rank of a `world`-rank job, each on its own thread.
pub fn with_ranks<R, F>(world: usize, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(usize, trainer::ddp::Dist) -> R + Send + Sync + Clone + 'static,
{
    let dists = trainer::ddp::loopback(world, &tcp_options(), "token").unwrap();
    let handles: Vec<_> = dists
        .into_iter()
        .enumerate()
        .map(|(rank, dist)| {
            let f = f.clone();
            std::thread::spawn(move || f(rank, dist))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A held-out split (subjects never in training, design.md §14) of `samples` scenes of
/// `size` px with 1 or 2 references, written to the folder `dir`; returns its path.
pub fn write_heldout(dir: &Path, samples: usize, size: u32) -> String {
    let opts = datasets::synth::SynthOptions {
        samples,
        max_refs: 2,
        size,
        ref_size: size,
        split: datasets::synth::Split::HeldOut,
        ..Default::default()
    };
    write_synth_shards(datasets::Location::local(dir), &opts);
    dir.display().to_string()
}
