//! FLUX.1 in candle, shared by training and sampling: the transformer with MOSAIC's reference
//! branch and its LoRA ([`transformer`], [`blocks`], [`lora`]), training-safe ops and
//! block-wise recomputation ([`ops`], [`grad`]), base weights in the diffusers and BFL layouts
//! ([`weights`]), LoRA files in this project's, diffusers', PEFT's and kohya's layouts
//! ([`lora_format`]), and the VAE, T5 and CLIP encoders with their tokenizers ([`encoders`]).
//!
//! The crate reads local files only: fetching from object stores, data pipelines and
//! distributed training live in the crates above it (docs/design.md, "Crates").

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embed;
pub mod encoders;
pub mod error;
pub mod eval;
pub mod fused;
pub mod grad;
pub mod lora;
pub mod lora_format;
pub mod matmul;
pub mod ops;
pub mod profile;
pub mod ref_cache;
pub mod reference_image;
pub mod rng;
pub mod sample;
pub mod schedule;
#[cfg(test)]
mod test_util;
pub mod transformer;
pub mod weights;

pub use attention::{Attention, GroupMask};
pub use config::FluxConfig;
pub use error::{chain, BoxError, FluxError, Result, Setting};
pub use lora::{Lora, LoraInit, LoraSpec, LoraView};
pub use transformer::{BlockId, Flux, ForwardOut, ModelInputs, RefInputs, RowBlocks};
pub use weights::Weights;
