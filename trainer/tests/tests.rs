//! Integration tests of the trainer, one binary (design.md §10).

// A test reads top to bottom as one scenario; the length limit is for the library.
#![allow(clippy::too_many_lines)]

mod cli;
mod common;
mod denoise_profile;
mod distributed;
mod eval;
mod export;
mod failures;
mod gradients;
mod measures;
mod mosaic_parity;
mod parity;
mod pretrain;
mod resume;
mod run_folder;
mod sample;
mod shapes;
mod shards;
mod training;
mod validation;
mod weights_errors;
