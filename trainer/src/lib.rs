//! MOSAIC training on FLUX.1 in candle: the flow-matching + SCAL/MDL objective on the `flux`
//! crate's model, the optimizer, data sources, data parallelism, checkpoints, export and the
//! loop.

pub mod alloc;
pub mod bench;
pub mod bench_attention;
pub mod bench_rows;
pub mod bench_sample;
pub mod bench_step;
pub mod charts;
pub mod checkpoint;
mod checks;
pub mod config;
pub mod data;
pub mod ddp;
pub mod denoise_profile;
pub mod device_check;
pub mod device_memory;
pub mod error;
pub mod eval;
pub mod export;
pub mod forward;
pub mod hub;
pub mod measures;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod pretrain;
pub mod run;
pub mod run_dir;
pub mod run_log;
pub mod sample;
pub mod shape_check;
pub mod signals;
pub mod step;
pub mod storage;
pub mod tensorboard;
pub mod train;
pub mod validation;

pub use error::{Result, TrainerError};
