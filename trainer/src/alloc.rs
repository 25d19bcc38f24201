//! A counting global allocator, so CPU benchmarks can report peak memory. The `trainer` binary
//! installs it; in other binaries the counters stay at zero and peaks read as unknown.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

pub struct CountingAlloc;

// SAFETY: forwards to the system allocator; only bookkeeping is added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Bytes allocated now.
pub fn current() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Starts a new peak measurement from the current level.
pub fn reset_peak() {
    PEAK.store(current(), Ordering::Relaxed);
}

/// Highest allocation level since the last reset.
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Has glibc's malloc keep freed memory for reuse instead of returning it to the kernel.
///
/// A training step allocates and frees the same activation sizes every step. By default glibc
/// serves each allocation above its (adaptive) mmap threshold with a fresh mapping and trims the
/// heap's top when it is freed, so every step pays the kernel's page faults and page clearing
/// again for every large activation (page faults and memset were 13% of the samples of a
/// profiled CPU step of the medium preset; the setting saved 12-14% of it: docs/kernels.md).
/// Raising the mmap threshold to its maximum (32 MiB on 64-bit) and never trimming keeps those
/// pages mapped; the resident set then stays at the step's peak, which it reaches anyway.
///
/// Skipped when the user tunes malloc through `GLIBC_TUNABLES` (their setting wins), and on
/// targets other than glibc. Returns whether the settings were applied.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"));
        if user_tuned {
            return false;
        }
        const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;
        // SAFETY: mallopt only changes allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    /// glibc accepts both settings (a threshold above its maximum would be refused, and the
    /// allocator would go on trimming), unless the user tuned malloc, whose setting stands.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_keep_freed_memory_settings() {
        let user_tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"));
        assert_eq!(super::keep_freed_memory(), !user_tuned);
        // The allocator still serves large and small blocks afterwards.
        let big = vec![1u8; 64 << 20];
        let small = Box::new([2u8; 100]);
        assert_eq!(big[big.len() - 1] + small[99], 3);
    }
}
