//! The rank environment contract shared by `launcher` and every rank (DESIGN.md §7): the
//! torchrun variable names, so other launchers and schedulers work too; the rendezvous store;
//! and how the launcher finds its place among nodes (flags or SLURM).

pub mod agent;
pub mod env;
pub mod hostlist;
pub mod logs;
pub mod store;
pub mod topology;

pub use env::{EnvError, RankEnv};
pub use store::{StoreClient, StoreError, StoreServer};
