//! Attention-row losses of MOSAIC (SCAL and MDL) on the sampled reference-to-target softmax
//! rows, as compositions of candle ops with a backward.
//!
//! The rows tensor holds, for each sampled reference point, its head-averaged softmax over the
//! target tokens (DESIGN.md §6). How the rows are produced (plain candle in the trainer, or a
//! fused kernel later) does not matter here: this crate only turns rows into losses.

pub mod error;
pub mod losses;

pub use error::KernelError;
pub use losses::{mdl_jsd_loss, mdl_kl_loss, mdl_loss, scal_loss, MdlVariant, RefSegments};
