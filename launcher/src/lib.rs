//! The launcher: it finds its place among nodes (flags or SLURM, [`topology`]), hosts or joins
//! the rendezvous store (the `rendezvous` crate), spawns one rank per GPU or CPU slot with the
//! rank environment, relays their output and signals, and stops or restarts the group when a
//! rank fails ([`agent`]); each rank gets its share of the node's cores ([`threads`]).

/// Writes a line to stderr, ignoring a closed stream: the launcher's output is often piped
/// (`| head`, a log collector that went away), and a message must never take the job down.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod agent;
pub mod hostlist;
pub mod logs;
pub mod threads;
pub mod topology;

pub use rendezvous::{EnvError, RankEnv, StoreClient, StoreError, StoreServer};
