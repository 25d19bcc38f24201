//! Peak memory of a measured span: the host heap above its level at the start (the counting
//! allocator the `trainer` binary installs) on the CPU, and the high-water mark of the device's
//! memory pool on a GPU (candle allocates through cudarc's stream-ordered allocator, which
//! draws from that pool).

use candle_core::{Device, DeviceLocation};

use crate::alloc;

/// A peak measurement started by [`PeakMemory::start`].
pub struct PeakMemory {
    /// The CUDA ordinal, on a GPU.
    gpu: Option<usize>,
    host_before: usize,
}

impl PeakMemory {
    /// Resets the peak on `device` and starts measuring.
    pub fn start(device: &Device) -> Self {
        alloc::reset_peak();
        let gpu = match device.location() {
            DeviceLocation::Cuda { gpu_id } => Some(gpu_id),
            _ => None,
        };
        #[cfg(feature = "cuda")]
        if let Some(g) = gpu {
            cuda::reset_high_water(g);
        }
        Self {
            gpu,
            host_before: alloc::current(),
        }
    }

    /// Bytes at the peak since the start, or `None` where nothing measures them (a CPU run
    /// outside the `trainer` binary, a GPU whose pool cannot be read).
    pub fn peak(&self) -> Option<usize> {
        match self.gpu {
            #[cfg(feature = "cuda")]
            Some(g) => cuda::high_water(g),
            #[cfg(not(feature = "cuda"))]
            Some(_) => None,
            None => Some(alloc::peak().saturating_sub(self.host_before)).filter(|&b| b > 0),
        }
    }
}

/// The process's peak resident set so far (Linux `getrusage`), in bytes: what a PyTorch CPU
/// baseline can report too, so CPU runs compare on it. `None` where the call fails.
pub fn process_peak_rss() -> Option<usize> {
    // SAFETY: getrusage only writes into the zeroed struct we own.
    let (rc, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage), usage)
    };
    // ru_maxrss is in KiB on Linux.
    (rc == 0).then(|| usize::try_from(usage.ru_maxrss).unwrap_or(0) * 1024)
}

/// Bytes in use now on `device`: the memory pool's current use on a GPU, the heap on the CPU
/// (`None` where nothing measures them).
pub fn resident(device: &Device) -> Option<usize> {
    match device.location() {
        #[cfg(feature = "cuda")]
        DeviceLocation::Cuda { gpu_id } => cuda::used_now(gpu_id),
        #[cfg(not(feature = "cuda"))]
        DeviceLocation::Cuda { .. } => None,
        _ => Some(alloc::current()).filter(|&b| b > 0),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::sys::{
        self,
        CUmemPool_attribute::{CU_MEMPOOL_ATTR_USED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_HIGH},
    };

    fn pool(ordinal: usize) -> Option<sys::CUmemoryPool> {
        let dev = cudarc::driver::result::device::get(ordinal as i32).ok()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer and `dev` a device handle from the driver.
        let r = unsafe { sys::cuDeviceGetMemPool(&mut pool, dev) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    /// Sets the pool's high-water mark back to its current use.
    pub fn reset_high_water(ordinal: usize) {
        if let Some(p) = pool(ordinal) {
            let mut zero = 0u64;
            // SAFETY: USED_MEM_HIGH takes a cuuint64_t; resetting it to 0 is documented.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    p,
                    CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&raw mut zero).cast(),
                );
            }
        }
    }

    fn attribute(ordinal: usize, attr: sys::CUmemPool_attribute) -> Option<usize> {
        let p = pool(ordinal)?;
        let mut v = 0u64;
        // SAFETY: both USED_MEM attributes write one cuuint64_t into `v`.
        let r = unsafe { sys::cuMemPoolGetAttribute(p, attr, (&raw mut v).cast()) };
        (r == sys::CUresult::CUDA_SUCCESS && v > 0).then_some(v as usize)
    }

    /// The most bytes the pool held in use since the last reset.
    pub fn high_water(ordinal: usize) -> Option<usize> {
        attribute(ordinal, CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Bytes the pool holds in use now.
    pub fn used_now(ordinal: usize) -> Option<usize> {
        attribute(ordinal, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }
}
