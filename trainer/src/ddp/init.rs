//! Connecting the ranks: find the store (the launcher's, or one rank 0 hosts under another
//! launcher), then build the backend on the communication thread.

use std::time::Duration;

use candle_core::Device;
use rendezvous::{RankEnv, StoreClient, StoreServer};
use serde::{Deserialize, Serialize};

use super::tcp::TcpRing;
use super::{Collective, Dist, DistError, DistResult};

/// Which collective backend the ranks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// NCCL on CUDA devices, the TCP ring on CPU.
    Auto,
    Tcp,
    Nccl,
}

#[derive(Debug, Clone)]
pub struct DistOptions {
    pub backend: Backend,
    /// Bound on every collective (long enough for a checkpoint save on another rank).
    pub timeout: Duration,
    /// Bound on reaching the store and the other ranks at start.
    pub connect_timeout: Duration,
}

/// Connects this process to the others described by `env`. World size 1 needs nothing, unless
/// `distributed.backend = "nccl"` asks for a one-rank NCCL communicator: it runs every
/// collective through NCCL, which checks that path on a machine with one GPU (NCCL refuses two
/// ranks on one device).
///
/// Under `launcher`, MOSAIC_STORE names its store. Under another launcher (torchrun, a SLURM
/// script) rank 0 hosts a store at MASTER_ADDR:MASTER_PORT+1, since MASTER_PORT itself belongs
/// to that launcher.
pub fn connect(env: &RankEnv, opts: &DistOptions, device: &Device) -> DistResult<Dist> {
    if env.world_size == 1 && opts.backend != Backend::Nccl {
        return Ok(Dist::single());
    }
    let token = env.token.clone().unwrap_or_default();
    let mut hosted = None;
    let store_addr = match &env.store {
        Some(a) => a.clone(),
        None => {
            let missing = || {
                DistError::Rendezvous(format!(
                    "WORLD_SIZE={} but neither {} (set by `launcher`) nor MASTER_ADDR and MASTER_PORT (set by torchrun or your script) are set",
                    env.world_size,
                    rendezvous::env::STORE
                ))
            };
            let host = env.master_addr.clone().ok_or_else(missing)?;
            let port = env
                .master_port
                .ok_or_else(missing)?
                .checked_add(1)
                .ok_or_else(|| {
                    DistError::Rendezvous(
                        "MASTER_PORT=65535 leaves no port for the store (MASTER_PORT+1)".into(),
                    )
                })?;
            if env.rank == 0 {
                if token.is_empty() {
                    tracing::warn!(
                        "no {} set: the store accepts any process that reaches it",
                        rendezvous::env::TOKEN
                    );
                }
                hosted = Some(StoreServer::bind(&format!("0.0.0.0:{port}"), &token)?);
            }
            format!("{host}:{port}")
        }
    };
    let prefix = prefix_of(env);
    let (beat_addr, beat_token) = (store_addr.clone(), token.clone());
    let use_nccl = match opts.backend {
        Backend::Auto => device.is_cuda(),
        Backend::Tcp => false,
        Backend::Nccl => true,
    };
    let (rank, world) = (env.rank, env.world_size);
    let (timeout, connect_timeout) = (opts.timeout, opts.connect_timeout);
    let device = device.clone();
    let mut dist = Dist::start(
        move || -> DistResult<Box<dyn Collective>> {
            let mut store = StoreClient::connect(&store_addr, &token, connect_timeout)?;
            if use_nccl {
                return nccl_backend(store, &prefix, rank, world, &device, connect_timeout);
            }
            Ok(Box::new(TcpRing::connect(
                &mut store,
                &prefix,
                &token,
                (rank, world),
                connect_timeout,
                timeout,
            )?))
        },
        timeout,
    )?;
    if let Some(server) = hosted {
        dist.keep(Box::new(server));
    }
    let key = rendezvous::env::rank_beat_key(&prefix_of(env), rank);
    dist.keep(Box::new(Heartbeat::start(&beat_addr, &beat_token, key)?));
    Ok(dist)
}

/// The store key prefix of the group `env` belongs to.
fn prefix_of(env: &RankEnv) -> String {
    format!(
        "{}/gen{}",
        env.run_id.as_deref().unwrap_or("run"),
        env.restart
    )
}

/// This rank's heartbeat: a thread adding to its store counter every
/// [`rendezvous::env::HEARTBEAT_EVERY`], so launchers tell a frozen or cut-off rank from a busy
/// one. It stops with the process, or quietly when the store is gone (the job is ending).
struct Heartbeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Heartbeat {
    fn start(addr: &str, token: &str, key: String) -> DistResult<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let mut store = StoreClient::connect(addr, token, Duration::from_secs(30))?;
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if store.add(&key, 1).is_err() {
                        return;
                    }
                    std::thread::sleep(rendezvous::env::HEARTBEAT_EVERY);
                }
            })
            .map_err(|e| DistError::Socket {
                what: "cannot start the heartbeat thread",
                source: e,
            })?;
        Ok(Self { stop })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(feature = "cuda")]
fn nccl_backend(
    store: StoreClient,
    prefix: &str,
    rank: usize,
    world: usize,
    device: &Device,
    timeout: Duration,
) -> DistResult<Box<dyn Collective>> {
    Ok(Box::new(super::nccl::Nccl::connect(
        store, prefix, rank, world, device, timeout,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_backend(
    _store: StoreClient,
    _prefix: &str,
    _rank: usize,
    _world: usize,
    _device: &Device,
    _timeout: Duration,
) -> DistResult<Box<dyn Collective>> {
    Err(DistError::Nccl(
        "this trainer was built without CUDA support (build with --features cuda) or set distributed.backend = \"tcp\"".into(),
    ))
}
