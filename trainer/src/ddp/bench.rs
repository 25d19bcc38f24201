//! Bandwidth of the CPU (TCP ring) all-reduce on loopback, by rank count and message size.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::init::Backend;
use super::{loopback, DistOptions, DistResult, ReduceOp};

/// One measured case.
pub struct Row {
    pub ranks: usize,
    pub bytes: usize,
    /// Median seconds per all-reduce.
    pub secs: f64,
}

impl Row {
    /// Message size over time.
    pub fn algbw_gbs(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }
    /// What each link carried: 2 (w-1)/w of the message for a ring (comparable across w).
    pub fn busbw_gbs(&self) -> f64 {
        let w = self.ranks as f64;
        self.algbw_gbs() * 2.0 * (w - 1.0) / w
    }
}

/// Median time of `iters` f32 all-reduces of `bytes` on `ranks` loopback ranks.
pub fn measure(ranks: usize, bytes: usize, iters: usize) -> DistResult<Row> {
    let opts = DistOptions {
        backend: Backend::Tcp,
        timeout: Duration::from_secs(600),
        connect_timeout: Duration::from_secs(60),
    };
    let dists = loopback(ranks, &opts, "bench")?;
    let n = (bytes / 4).max(1);
    let handles: Vec<_> = dists
        .into_iter()
        .map(|dist| {
            std::thread::spawn(move || -> DistResult<Vec<f64>> {
                let t = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?;
                let mut times = Vec::with_capacity(iters);
                for i in 0..=iters {
                    dist.call("barrier", |c| c.barrier())?;
                    let t = t.clone();
                    let started = Instant::now();
                    dist.call("all-reduce", move |c| c.all_reduce(&t, ReduceOp::Sum))?;
                    if i > 0 {
                        times.push(started.elapsed().as_secs_f64());
                    }
                }
                Ok(times)
            })
        })
        .collect();
    let mut slowest = vec![0f64; iters];
    for h in handles {
        let times = h.join().unwrap_or(Err(super::DistError::ThreadGone))?;
        for (s, t) in slowest.iter_mut().zip(times) {
            *s = s.max(t);
        }
    }
    slowest.sort_by(f64::total_cmp);
    Ok(Row {
        ranks,
        bytes: n * 4,
        secs: slowest[slowest.len() / 2],
    })
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

/// A markdown table over every (ranks, size) pair.
pub fn report(ranks: &[usize], sizes: &[usize], iters: usize) -> DistResult<String> {
    let mut out = String::from(
        "| ranks | message | time per all-reduce (median) | algorithm bandwidth | bus bandwidth |\n|---|---|---|---|---|\n",
    );
    for &w in ranks {
        for &b in sizes {
            let r = measure(w, b, iters.max(1))?;
            out += &format!(
                "| {} | {} | {:.3} ms | {:.3} GB/s | {:.3} GB/s |\n",
                r.ranks,
                human(r.bytes),
                r.secs * 1e3,
                r.algbw_gbs(),
                r.busbw_gbs()
            );
        }
    }
    Ok(out)
}
