//! The launcher: it finds its place among nodes (flags or SLURM, [`topology`]), hosts or joins
//! the rendezvous store (the `rendezvous` crate), spawns one rank per GPU or CPU slot with the
//! rank environment, relays their output and signals, and stops or restarts the group when a
//! rank fails ([`agent`]).

pub mod agent;
pub mod hostlist;
pub mod logs;
pub mod topology;

pub use rendezvous::{EnvError, RankEnv, StoreClient, StoreError, StoreServer};
