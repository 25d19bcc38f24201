//! The CUDA forward of `attention_rows`, compiled at run time with NVRTC (no nvcc at build
//! time) and loaded through candle's custom-module cache.
//!
//! One thread block per sampled row p. For each head: the block loads the gathered query
//! q[h, idx[p], :] into shared memory, each thread computes the logits of its target tokens
//! into shared memory (f32 accumulation), a block reduction gives the max, a second the sum of
//! exp, and each thread adds exp(l - max) / (sum * H) to its outputs. Shared memory: D + N_tgt
//! floats, so N_tgt up to about 12k tokens (6 references at 1024 px need 4096).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{CudaStorage, DType, Layout, Shape};

const MODULE: &str = "mosaic_attention_rows";
const THREADS: u32 = 256;
/// Shared memory a block may use without opting in.
const MAX_SHARED_BYTES: usize = 48 * 1024;

const SOURCE: &str = include_str!("attention_rows.cu");
/// The helpers every kernel source starts with (prepended at compile time).
const COMMON: &str = include_str!("common.cuh");

/// The kernel source, for tools that compile it ahead of time (a syntax check with nvcc).
pub fn source() -> &'static str {
    SOURCE
}

fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    compiled(&PTX, SOURCE, "attention_rows")
}

/// The PTX of `source` after `common.cuh`, compiled with NVRTC once per process (and the
/// error, once).
pub(crate) fn compiled(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    source: &str,
    what: &str,
) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| {
        let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
            use_fast_math: Some(false),
            ..Default::default()
        };
        let full = format!("{COMMON}\n{source}");
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(full, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile the {what} kernels: {e:?}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

#[allow(clippy::too_many_arguments)]
pub fn rows_fwd(
    h: usize,
    n_ref: usize,
    n_tgt: usize,
    d: usize,
    scale: f64,
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    idx: &CudaStorage,
    li: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let shared = (d + n_tgt + THREADS as usize) * 4;
    if shared > MAX_SHARED_BYTES {
        candle_core::bail!(
            "attention_rows: {n_tgt} target tokens x head dim {d} need {shared} bytes of shared memory, more than {MAX_SHARED_BYTES}"
        );
    }
    let dev = q.device().clone();
    let off = |l: &Layout| -> candle_core::Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("attention_rows: non-contiguous input".into()))
    };
    let (iq, jq) = off(lq)?;
    let (ik, jk) = off(lk)?;
    let (ii, ji) = off(li)?;
    let p = ji - ii;
    let idx = idx.as_cuda_slice::<u32>()?.slice(ii..ji);
    // Safety: the kernel writes every element of `out` (row init) before reading it.
    let out = unsafe { dev.alloc::<f32>(p * n_tgt)? };
    let cfg = LaunchConfig {
        grid_dim: (p as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let (h_, nr, nt, d_, sc) = (h as i32, n_ref as i32, n_tgt as i32, d as i32, scale as f32);
    match q.dtype() {
        DType::F32 => {
            let f = dev.get_or_load_custom_func("attention_rows_f32", MODULE, ptx()?)?;
            let (qs, ks) = (
                q.as_cuda_slice::<f32>()?.slice(iq..jq),
                k.as_cuda_slice::<f32>()?.slice(ik..jk),
            );
            let mut b = f.builder();
            b.arg(&qs).arg(&ks).arg(&idx).arg(&out);
            b.arg(&h_).arg(&nr).arg(&nt).arg(&d_).arg(&sc);
            // Safety: argument types and counts match the kernel's signature; indices were
            // checked against n_ref on the host.
            unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        }
        DType::BF16 => {
            let f = dev.get_or_load_custom_func("attention_rows_bf16", MODULE, ptx()?)?;
            let (qs, ks) = (
                q.as_cuda_slice::<half::bf16>()?.slice(iq..jq),
                k.as_cuda_slice::<half::bf16>()?.slice(ik..jk),
            );
            let mut b = f.builder();
            b.arg(&qs).arg(&ks).arg(&idx).arg(&out);
            b.arg(&h_).arg(&nr).arg(&nt).arg(&d_).arg(&sc);
            // Safety: as above.
            unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        }
        other => candle_core::bail!(
            "attention_rows on CUDA takes f32 or bf16, not {other:?} (f64 runs on the CPU)"
        ),
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((p, n_tgt)),
    ))
}

/// The launch of a grid-stride elementwise kernel over `n` items: 256 threads a block, at most
/// 524k blocks (each thread loops over the rest).
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535 * 8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
