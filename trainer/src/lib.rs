//! MOSAIC training on FLUX.1 in candle: the model with its reference branch and LoRA, the
//! flow-matching + SCAL/MDL objective, the optimizer, a synthetic data source and the loop.

pub mod alloc;
pub mod bench;
pub mod bench_rows;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod ddp;
pub mod error;
pub mod export;
pub mod forward;
pub mod hub;
pub mod loader;
pub mod lora_format;
pub mod metrics;
pub mod model;
pub mod objective;
pub mod optim;
pub mod rng;
pub mod signals;
pub mod storage;
pub mod synth;
pub mod train;

pub use error::{Result, TrainerError};
