//! Helpers shared by the crate's unit tests.

use candle_core::{DType, Device, Tensor};

/// Seeded f64 values uniform in (-bound, bound) on the CPU.
pub fn uniform(shape: &[usize], seed: u64, bound: f64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches the values")
}

/// max |a - b| over all elements, as f64 (any float dtype, same device).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("same shapes")
}

/// max |a - b| / max |a| (how far `b` is from the reference `a`, relative to its scale).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let zero = a.zeros_like().expect("zeros of a's shape");
    max_diff(a, b) / max_diff(a, &zero).max(1e-12)
}
