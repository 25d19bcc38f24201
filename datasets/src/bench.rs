//! `datasets bench`: decoded samples per second through the whole reader (range reads, Parquet,
//! image decoding, transforms, correspondence mapping) per number of decode workers, with the
//! peak resident memory of each run.

use std::time::Instant;

use crate::error::Result;
use crate::loader::{Loader, LoaderOptions};
use crate::plan::{Cursor, PlanSpec};
use crate::transform::TransformSpec;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    pub source: String,
    pub decode_threads: usize,
    pub samples: usize,
    pub seconds: f64,
    pub samples_per_s: f64,
    /// Peak resident memory of the process during the run, MiB (None where not measurable).
    pub peak_rss_mib: Option<f64>,
}

/// Resets the kernel's peak-RSS mark for this process (Linux); false where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Reads `samples` samples from `url` with each worker count in `threads`.
pub fn run(
    source: &str,
    url: &str,
    threads: &[usize],
    samples: usize,
    transform: TransformSpec,
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for &t in threads {
        let opts = LoaderOptions {
            plan: PlanSpec {
                seed: 0,
                world: 1,
                rank: 0,
                batch_size: 1,
                shuffle_rows: 64,
                buckets: None,
            },
            transform,
            io_threads: 4,
            decode_threads: t,
            prefetch_batches: 2 * t,
            strict: true,
            cached: false,
        };
        let measurable = reset_peak_rss();
        let mut loader = Loader::open(url, opts, Cursor::default())?;
        // The first batch pays for the manifest and the first range reads.
        loader.next_batch()?;
        let start = Instant::now();
        let mut n = 0;
        while n < samples {
            n += loader.next_batch()?.samples.len();
        }
        let seconds = start.elapsed().as_secs_f64();
        drop(loader);
        rows.push(BenchRow {
            source: source.to_string(),
            decode_threads: t,
            samples: n,
            seconds,
            samples_per_s: n as f64 / seconds,
            peak_rss_mib: if measurable { peak_rss_mib() } else { None },
        });
    }
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| source | decode workers | samples | seconds | samples/s | peak RSS (MiB) |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {} |\n",
            r.source,
            r.decode_threads,
            r.samples,
            r.seconds,
            r.samples_per_s,
            r.peak_rss_mib
                .map_or("n/a".to_string(), |m| format!("{m:.0}"))
        ));
    }
    s
}
