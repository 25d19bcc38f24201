//! The FLUX.1 transformer with MOSAIC's reference branch, written for training in candle.

pub mod blocks;
pub mod config;
pub mod embed;
pub mod flux;
pub mod grad;
pub mod lora;
pub mod ops;
pub mod weights;

pub use config::FluxConfig;
pub use flux::{BlockId, Flux, ForwardOut, ModelInputs, RefInputs, RowBlocks};
pub use lora::{Lora, LoraInit, LoraSpec, LoraView};
pub use weights::Weights;
