//! `trainer bench-sample`: seconds per image of `trainer sample` for 1, 2 and 4 references,
//! with and without the reference cache, side by side in one run, as a markdown table (and
//! JSON lines). Each case renders `reps` images after one warm-up image and reports medians:
//! the whole image, the denoising loop per step, and the peak memory of the image (heap on the
//! CPU, the memory pool on a GPU).
//!
//! The references are generated (one coloured shape each, on white), the prompt is fixed, and
//! the base, encoders and decoder are the config's (the tiny seeded pipeline by default;
//! `--set model.preset="flux-dev" --set model.init="device"` for FLUX.1-dev dimensions with
//! random weights on a GPU).

use std::path::{Path, PathBuf};

use candle_core::Device;
use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::bench::median;
use crate::config::Config;
use crate::device_memory::PeakMemory;
use crate::error::{Result, TrainerError};
use crate::sample::{SampleRequest, Sampler};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSampleSpec {
    /// Target side in pixels.
    pub size: usize,
    pub steps: usize,
    /// Reference counts, one case each (with and without the cache).
    pub refs: Vec<usize>,
    /// Measured images per case (after one warm-up image).
    pub reps: usize,
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct SampleBench {
    pub device: String,
    pub dtype: String,
    pub size: usize,
    pub steps: usize,
    pub refs: usize,
    pub ref_cache: bool,
    /// Tokens of the first step's sequence: text + target + references.
    pub tokens: usize,
    /// Medians over the measured images.
    pub s_per_image: f64,
    pub denoise_s_per_step: f64,
    pub encode_s: f64,
    pub decode_s: f64,
    pub ref_cache_bytes: usize,
    pub peak_bytes: Option<usize>,
    pub reps: usize,
}

/// A reference image of a shape in its own colour, so references differ.
fn reference(dir: &Path, k: usize) -> Result<PathBuf> {
    const COLOURS: [[u8; 3]; 6] = [
        [200, 30, 30],
        [30, 160, 40],
        [30, 60, 200],
        [210, 170, 20],
        [150, 40, 170],
        [20, 170, 170],
    ];
    let mut img = RgbImage::from_pixel(96, 96, Rgb([255, 255, 255]));
    let c = COLOURS[k % COLOURS.len()];
    for y in 16..80 {
        for x in 16..80 {
            // Squares for even k, discs for odd k.
            let (dx, dy) = (x as i32 - 48, y as i32 - 48);
            if k.is_multiple_of(2) || dx * dx + dy * dy <= 32 * 32 {
                img.put_pixel(x, y, Rgb(c));
            }
        }
    }
    let path = dir.join(format!("ref{k}.png"));
    img.save(&path).map_err(|e| TrainerError::read(&path, e))?;
    Ok(path)
}

/// Measures every case of `spec` with the pipeline of `cfg` on `device`.
pub fn measure(cfg: &Config, spec: &BenchSampleSpec, device: &Device) -> Result<Vec<SampleBench>> {
    if spec.reps == 0 || spec.steps == 0 {
        return Err(TrainerError::Input {
            name: "--reps / --steps".into(),
            reason: "must be at least 1".into(),
        });
    }
    let dir = std::env::temp_dir().join(format!("mosaic-bench-sample-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| TrainerError::io(&dir, e))?;
    let result = measure_in(cfg, spec, device, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure_in(
    cfg: &Config,
    spec: &BenchSampleSpec,
    device: &Device,
    dir: &Path,
) -> Result<Vec<SampleBench>> {
    let mut sampler = Sampler::load(cfg, None, device)?;
    let most = spec.refs.iter().copied().max().unwrap_or(0);
    let paths = (0..most)
        .map(|k| reference(dir, k))
        .collect::<Result<Vec<_>>>()?;
    let grid = |px: usize| (px / 16) * (px / 16);
    let mut rows = Vec::new();
    for &k in &spec.refs {
        for ref_cache in [false, true] {
            let req = SampleRequest {
                prompt: "a red cube, a green ball and a blue cube on a table".into(),
                refs: paths[..k].to_vec(),
                width: spec.size,
                height: spec.size,
                ref_size: cfg.data.ref_resolution,
                steps: spec.steps,
                guidance: 3.5,
                true_cfg: 1.0,
                negative_prompt: String::new(),
                seed: 42,
                ref_cache,
                start: None,
                init: None,
            };
            sampler.sample(&req)?; // warm-up
            let (mut total, mut per_step, mut encode, mut decode) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut peak: Option<usize> = None;
            let mut cache_bytes = 0;
            for _ in 0..spec.reps {
                let mem = PeakMemory::start(device);
                let out = sampler.sample(&req)?;
                peak = peak.max(mem.peak());
                let t = out.timings;
                total.push(t.total().as_secs_f64());
                per_step.push(t.denoise.as_secs_f64() / spec.steps as f64);
                encode.push(t.encode.as_secs_f64());
                decode.push(t.decode.as_secs_f64());
                cache_bytes = out.ref_cache_bytes;
            }
            rows.push(SampleBench {
                device: format!("{:?}", device.location()),
                dtype: format!("{:?}", sampler.dtype()),
                size: spec.size,
                steps: spec.steps,
                refs: k,
                ref_cache,
                tokens: cfg.data.text_tokens + grid(spec.size) + k * grid(cfg.data.ref_resolution),
                s_per_image: median(total),
                denoise_s_per_step: median(per_step),
                encode_s: median(encode),
                decode_s: median(decode),
                ref_cache_bytes: cache_bytes,
                peak_bytes: peak,
                reps: spec.reps,
            });
        }
    }
    Ok(rows)
}

fn mib(b: usize) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

/// The markdown table: one row per case, with the cache's speed-up against the same case
/// without it.
pub fn table(rows: &[SampleBench]) -> String {
    let mut out = String::from(
        "| refs | tokens | ref cache | s/image | denoise s/step | speed-up | encode s | decode s | cache MiB | peak MiB |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let base = rows
            .iter()
            .find(|b| b.refs == r.refs && !b.ref_cache)
            .map_or(r.s_per_image, |b| b.s_per_image);
        out.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.4} | {:.2}x | {:.3} | {:.3} | {} | {} |\n",
            r.refs,
            r.tokens,
            if r.ref_cache { "on" } else { "off" },
            r.s_per_image,
            r.denoise_s_per_step,
            base / r.s_per_image,
            r.encode_s,
            r.decode_s,
            mib(r.ref_cache_bytes),
            r.peak_bytes.map_or("n/a".into(), mib),
        ));
    }
    out
}
