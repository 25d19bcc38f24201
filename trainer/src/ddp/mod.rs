//! Data parallelism: collectives behind one trait (a TCP ring on CPU, NCCL on GPU), the thread
//! that owns them, gradient buckets that are reduced while the backward pass goes on, and the
//! rendezvous that connects the ranks (design.md §6).

pub mod bench;
pub mod buckets;
pub mod comm;
pub mod consistency;
pub mod init;
pub mod loopback;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

use candle_core::Tensor;

pub use buckets::{BucketPlan, GradReducer};
pub use comm::{Dist, Pending};
pub use init::{connect, DistOptions};
pub use loopback::loopback;

/// How an all-reduce combines the ranks' buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Mean,
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{op} timed out after {waited:?} waiting for rank {peer} (collective timeout: distributed.timeout_s); that rank is slow, stuck or gone")]
    Timeout {
        op: &'static str,
        peer: usize,
        waited: std::time::Duration,
    },
    #[error("{op}: the connection to rank {peer} failed")]
    Peer {
        op: &'static str,
        peer: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("cannot connect to rank {peer} at {addr}")]
    Connect {
        peer: usize,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("ring setup: {what}")]
    Socket {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] rendezvous::StoreError),
    #[error(transparent)]
    Env(#[from] rendezvous::EnvError),
    #[error("collectives support f32, f64 and bf16 buffers, not {0:?}")]
    Dtype(candle_core::DType),
    #[error("ranks disagree: {0}")]
    Mismatch(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("the communication thread has stopped (an earlier collective failed)")]
    ThreadGone,
    #[error("{op} on rank {rank} of {world} has not completed after {waited:?} (collective timeout: distributed.timeout_s); another rank is stuck or gone, so the communicator was aborted")]
    Stuck {
        op: &'static str,
        rank: usize,
        world: usize,
        waited: std::time::Duration,
    },
    #[error("{op}: not run, an earlier collective was stuck and the communicator was aborted")]
    Poisoned { op: &'static str },
}

/// Unblocks a backend's pending collectives from another thread (they then fail).
pub type AbortHandle = std::sync::Arc<dyn Fn() + Send + Sync>;

pub type DistResult<T> = std::result::Result<T, DistError>;

/// The operations data parallelism needs. Implementations are driven from one thread (the one
/// [`Dist`] owns), so they need not be `Send` (NCCL communicators are not).
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// "single", "tcp" or "nccl".
    fn backend(&self) -> &'static str;
    /// The sum or mean over ranks of a 1-D tensor (f32, f64 or bf16); every rank gets the same
    /// bits back.
    fn all_reduce(&mut self, t: &Tensor, op: ReduceOp) -> DistResult<Tensor>;
    /// Rank `root`'s tensor on every rank (same shape and dtype on all ranks).
    fn broadcast(&mut self, t: &Tensor, root: usize) -> DistResult<Tensor>;
    /// Every rank's bytes, in rank order (small values: fingerprints, hashes, flags).
    fn all_gather_bytes(&mut self, mine: &[u8]) -> DistResult<Vec<Vec<u8>>>;
    /// A way to abort this backend's collectives from another thread, for the watchdog of
    /// [`Dist`]; None when the backend bounds its own waits.
    fn abort_handle(&self) -> Option<AbortHandle> {
        None
    }
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> DistResult<()> {
        self.all_gather_bytes(&[]).map(|_| ())
    }
}

/// World size 1: every collective is the identity.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce(&mut self, t: &Tensor, _op: ReduceOp) -> DistResult<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&mut self, t: &Tensor, _root: usize) -> DistResult<Tensor> {
        Ok(t.clone())
    }
    fn all_gather_bytes(&mut self, mine: &[u8]) -> DistResult<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
}
