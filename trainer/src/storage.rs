//! Checkpoint and data locations (folders or object-store prefixes) live in the datasets crate;
//! the trainer uses the same ones.

pub use datasets::store::{Location, Remote};
