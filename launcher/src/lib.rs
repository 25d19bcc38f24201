//! The rank environment contract shared by `launcher` and every rank (DESIGN.md §7): the
//! torchrun variable names, so other launchers and schedulers work too.

pub mod env;

pub use env::{EnvError, RankEnv};
