//! Several ranks inside one process, connected over loopback TCP through an in-process store
//! exactly as separate processes are: for tests and the collective benchmark.

use candle_core::Device;
use rendezvous::{RankEnv, StoreServer};

use super::{connect, Dist, DistOptions, DistResult};

/// Connects `world` ranks (TCP backend); element r is rank r. The store lives as long as
/// rank 0's handle.
pub fn loopback(world: usize, opts: &DistOptions, token: &str) -> DistResult<Vec<Dist>> {
    let server = StoreServer::bind("127.0.0.1:0", token)?;
    let addr = server.local_addr().to_string();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let env = RankEnv::on_store(rank, world, &addr, token, "loopback");
            let opts = opts.clone();
            std::thread::spawn(move || connect(&env, &opts, &Device::Cpu))
        })
        .collect();
    let mut dists = handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(super::DistError::ThreadGone))
        })
        .collect::<DistResult<Vec<Dist>>>()?;
    dists[0].keep(Box::new(server));
    Ok(dists)
}
