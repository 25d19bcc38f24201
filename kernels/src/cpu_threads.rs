//! candle's CPU thread count, decided once per process instead of at every product.
//!
//! candle's CPU matmul asks `candle_core::utils::get_num_threads()` how many threads to give
//! `gemm` at every call. Unless `RAYON_NUM_THREADS` is set, that counts the physical cores
//! again, which on Linux reads and parses /proc/cpuinfo (`num_cpus::get_physical`): about 400
//! reads per training step of the tiny model, a fifth of a one-process step on a 2-core
//! machine (docs/kernels.md). The launcher sets the variable for its ranks; a process started
//! alone (`trainer sample`, `trainer shapes`, `trainer train` without the launcher,
//! `datasets precompute`) calls [`settle`] first thing in `main`.

/// The variable candle and rayon read for their thread counts.
pub const VAR: &str = "RAYON_NUM_THREADS";

/// Fixes candle's per-product thread count to the value it would compute, so that later calls
/// read it from the environment. Leaves both pools as they would have been: rayon's global
/// pool is started first, at its own default (every logical CPU), since it reads the same
/// variable when it starts. Does nothing when the variable is already set (by the user or
/// the launcher), and returns the count it set otherwise.
///
/// Call it before the process starts any thread: it changes the environment, which other
/// threads may be reading.
pub fn settle() -> Option<usize> {
    if std::env::var_os(VAR).is_some() {
        return None;
    }
    let candle_threads = candle_core::utils::get_num_threads();
    // An error means the global pool was already started (a second call): it keeps its size.
    let _ = rayon::ThreadPoolBuilder::new().build_global();
    std::env::set_var(VAR, candle_threads.to_string());
    Some(candle_threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The only test in this crate that changes the environment. Other tests start rayon's
    // global pool too, but it reads the variable only when it starts, and `settle` has it
    // started before setting it. What a process would have: the same counts for candle and
    // rayon before and after, and the variable set only when it was not.
    #[test]
    fn settle_keeps_candle_and_rayon_counts_and_sets_the_variable_once() {
        let was_set = std::env::var_os(VAR).is_some();
        let candle_before = candle_core::utils::get_num_threads();
        let settled = settle();
        assert_eq!(settled.is_some(), !was_set);
        if let Some(n) = settled {
            assert_eq!(n, candle_before);
            assert_eq!(std::env::var(VAR).ok(), Some(n.to_string()));
            // rayon's pool kept its own default, whatever candle's count.
            let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert_eq!(rayon::current_num_threads(), logical);
        }
        assert_eq!(candle_core::utils::get_num_threads(), candle_before);
        assert_eq!(settle(), None, "a second call changes nothing");
    }
}
