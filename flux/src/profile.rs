//! Where a step's time goes: named phases timed while profiling is switched on
//! (`trainer bench-step --profile`). Each phase synchronises its device before its clock stops,
//! so GPU work is charged to the phase that queued it. Off (the default), a phase costs one
//! atomic load and nothing is recorded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Switches recording on or off, clearing what was recorded.
pub fn enable(on: bool) {
    TOTALS.lock().unwrap_or_else(|p| p.into_inner()).clear();
    ON.store(on, Ordering::SeqCst);
}

/// Seconds and calls per phase since [`enable`], by name.
pub fn totals() -> BTreeMap<&'static str, (f64, u64)> {
    TOTALS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A running phase; recorded when dropped.
pub struct Phase {
    started: Option<(Instant, &'static str, Device)>,
}

/// Starts phase `name` on `device` (records nothing unless profiling is on). Phases may nest;
/// a nested phase's time is counted in its parent too.
pub fn phase(name: &'static str, device: &Device) -> Phase {
    if !ON.load(Ordering::Relaxed) {
        return Phase { started: None };
    }
    // Work queued before the phase belongs to whoever queued it.
    let _ = device.synchronize();
    Phase {
        started: Some((Instant::now(), name, device.clone())),
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some((t, name, device)) = self.started.take() {
            let _ = device.synchronize();
            let secs = t.elapsed().as_secs_f64();
            let mut totals = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
            let e = totals.entry(name).or_insert((0.0, 0));
            e.0 += secs;
            e.1 += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_recorded_only_when_on() {
        let dev = Device::Cpu;
        enable(false);
        drop(phase("off", &dev));
        assert!(totals().is_empty());
        enable(true);
        for _ in 0..3 {
            let _p = phase("on", &dev);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let t = totals();
        enable(false);
        let (secs, calls) = t["on"];
        assert_eq!(calls, 3);
        assert!(secs >= 0.006, "{secs}");
    }
}
