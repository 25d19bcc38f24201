//! Stop requests: SIGTERM (preemption, `scancel`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
//! `--signal`) set a flag that the loop all-reduces at each step boundary, so every rank stops
//! at the same step. A second SIGTERM or SIGINT exits at once with status 1.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::{Result, TrainerError};

/// Installs the handlers and returns the flag they set.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    install(&flag).map_err(|e| TrainerError::Io {
        path: "signal handlers".into(),
        err: e,
    })?;
    Ok(flag)
}

#[cfg(unix)]
fn install(flag: &Arc<AtomicBool>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    use signal_hook::flag;
    for sig in [SIGTERM, SIGINT] {
        // Registered first, so it sees the flag before this signal sets it: the second signal
        // of a kind exits.
        flag::register_conditional_shutdown(sig, 1, flag.clone())?;
        flag::register(sig, flag.clone())?;
    }
    flag::register(SIGUSR1, flag.clone())?;
    Ok(())
}

#[cfg(not(unix))]
fn install(_flag: &Arc<AtomicBool>) -> std::io::Result<()> {
    Ok(())
}
