//! Integration tests of the trainer, one binary (DESIGN.md §10).

mod common;
mod distributed;
mod export;
mod gradients;
mod parity;
mod resume;
mod shards;
mod training;
mod weights_errors;
