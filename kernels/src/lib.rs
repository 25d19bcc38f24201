//! The sampled attention rows of MOSAIC and the losses on them (design.md §5).
//!
//! `rows::attention_rows` computes, for sampled reference points, their head-averaged softmax
//! over the target tokens without any full attention map (a candle op with a CPU and an NVRTC
//! CUDA forward and a backward); `losses` turns rows into SCAL and MDL (candle ops with a
//! backward on the small rows tensor). `softmax` and `fused` are the fused softmax and row ops
//! of the training step (CUDA and CPU), `cpu_attention` the CPU's whole attention call in
//! cache-sized tiles, `cpu_threads` candle's CPU thread count fixed once per process, `optim`
//! the in-place AdamW and EMA on CUDA.

pub mod cpu_attention;
pub mod cpu_threads;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod fused;
pub mod losses;
#[cfg(feature = "cuda")]
pub mod optim;
pub mod rows;
pub mod sampling;
pub mod softmax;

pub use error::KernelError;
pub use losses::{
    mdl_loss, scal_loss, Divergence, MdlSettings, RefSegments, ScalReduce, ScalSettings,
};
pub use rows::{attention_rows, attention_rows_plain};
pub use sampling::{sample_points, RefPoints, Sampled};
