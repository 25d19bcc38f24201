//! Stop requests: SIGTERM (preemption, `scancel`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
//! `--signal`) set a flag that the loop all-reduces at each step boundary, so every rank stops
//! at the same step. A second SIGTERM or SIGINT exits at once with status 1.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Result, TrainerError};

/// Installs the handlers and returns the flag they set.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    install(&flag).map_err(|e| TrainerError::Io {
        path: "signal handlers".into(),
        source: e,
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

/// Set once the run takes its first step: before that a stop has nothing to save.
static STEPPING: AtomicBool = AtomicBool::new(false);

/// Marks that the run has started stepping (a stop now waits for the step and the save).
pub fn mark_stepping() {
    STEPPING.store(true, Ordering::SeqCst);
}

/// Once `flag` is set, gives the run `grace` to finish its step and write its checkpoint, then
/// exits with `code` regardless (a scheduler's SIGKILL would follow anyway). Checkpoints are
/// written atomically, so exiting mid-write leaves the previous one in charge. A stop that
/// comes before the first step (while ranks connect or the model loads) exits at once: there
/// is nothing to save, and waiting for peers that may never come would ignore the signal.
pub fn arm_grace(flag: Arc<AtomicBool>, grace: Duration, code: u8) {
    let spawned = std::thread::Builder::new()
        .name("stop-grace".into())
        .spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            if !STEPPING.load(Ordering::SeqCst) {
                tracing::warn!("stop requested before the first step: exiting now, nothing to save");
                std::process::exit(i32::from(code));
            }
            std::thread::sleep(grace);
            tracing::error!(
                grace_s = grace.as_secs_f64(),
                "stop requested but the step and checkpoint did not finish within train.stop_grace_s: exiting now; the previous checkpoint stays valid"
            );
            std::process::exit(i32::from(code));
        });
    if let Err(e) = spawned {
        tracing::warn!(%e, "could not start the stop-grace watchdog");
    }
}
