//! A lease on a checkpoint location where no file lock reaches (an object store): the object
//! `LEASE.json` names its holder and when it was last renewed; the holder renews it from a
//! thread every `renew` and deletes it when done.
//!
//! Clocks of different machines disagree, so a starting run does not trust the timestamp: it
//! watches the lease. If the holder renews it while the starter watches (at most `ttl`), the
//! holder is alive and the start is refused naming it; if it stays unrenewed for `ttl` the
//! holder is gone and the lease is taken over with a warning. A lease whose holder is a dead
//! process of this machine, or an earlier start of the same launcher run (a restart after a
//! failure), is taken over at once. Writes are followed by a read-back, so of two starts racing
//! for a free lease one wins and the other sees the winner.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::holder::{now_s, Holder};
use crate::error::{Result, TrainerError};
use crate::storage::Location;

pub const LEASE_FILE: &str = "LEASE.json";

/// Lease timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    /// A lease unrenewed this long belongs to nobody.
    pub ttl: Duration,
    /// The holder renews this often (well under `ttl`).
    pub renew: Duration,
    /// A starting run reads the lease this often while it watches it.
    pub poll: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            renew: Duration::from_secs(8),
            poll: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Body {
    holder: Holder,
    /// Unix seconds of the last renewal (for people reading the object).
    renewed: u64,
    /// Increases at every renewal: what a watcher compares.
    beat: u64,
}

/// A held lease; renewed until dropped, then deleted.
pub struct Lease {
    loc: Location,
    token: String,
    stop: Arc<AtomicBool>,
    renewer: Option<JoinHandle<()>>,
}

fn read(loc: &Location) -> Result<Option<Body>> {
    Ok(match loc.get(LEASE_FILE)? {
        None => None,
        // An unreadable lease (a partial or foreign object) counts as absent.
        Some(bytes) => serde_json::from_slice(&bytes).ok(),
    })
}

fn write(loc: &Location, body: &Body) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(body).map_err(|e| TrainerError::Serialize {
        what: "a checkpoint lease",
        source: Box::new(e),
    })?;
    Ok(loc.put(LEASE_FILE, bytes)?)
}

impl Lease {
    /// Takes the lease of `loc`, waiting at most `timing.ttl` (plus a poll) to tell a live
    /// holder from a gone one; refuses naming a live holder.
    pub fn acquire(loc: &Location, timing: LeaseTiming) -> Result<Self> {
        let me = Holder::this_process();
        let mine = Body {
            holder: me.clone(),
            renewed: now_s(),
            beat: 0,
        };
        let mut watched: Option<(u64, String, Instant)> = None;
        loop {
            let current = read(loc)?;
            let take = match &current {
                None => true,
                Some(b) if b.holder.token == me.token => break,
                Some(b) if me.restarts(&b.holder) || b.holder.is_dead_here() => {
                    tracing::warn!(lease = %loc.name(LEASE_FILE), "taking over the checkpoint location from {}, which is gone", b.holder.describe());
                    true
                }
                Some(b) => match &watched {
                    Some((beat, token, _)) if *token != b.holder.token || *beat != b.beat => {
                        return Err(TrainerError::RunInUse {
                            what: loc.describe(),
                            holder: b.holder.describe(),
                        })
                    }
                    Some((_, _, since)) if since.elapsed() >= timing.ttl => {
                        tracing::warn!(lease = %loc.name(LEASE_FILE), "taking over the checkpoint location from {}, which has not renewed its lease for {:?}", b.holder.describe(), timing.ttl);
                        true
                    }
                    Some(_) => false,
                    None => {
                        watched = Some((b.beat, b.holder.token.clone(), Instant::now()));
                        false
                    }
                },
            };
            if take {
                write(loc, &mine)?;
                watched = None;
            }
            // After a write, a short pause before the read-back that tells who won.
            std::thread::sleep(if take {
                Duration::from_millis(50)
            } else {
                timing.poll
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let renewer = spawn_renewer(loc.clone(), stop.clone(), mine, timing)?;
        Ok(Self {
            loc: loc.clone(),
            token: me.token,
            stop,
            renewer: Some(renewer),
        })
    }
}

/// Renews `body`'s lease every `timing.renew` until `stop` is set; stops renewing (loudly) if
/// another holder took the lease.
fn spawn_renewer(
    loc: Location,
    stop: Arc<AtomicBool>,
    mut body: Body,
    timing: LeaseTiming,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lease".into())
        .spawn(move || {
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if last.elapsed() < timing.renew {
                    continue;
                }
                last = Instant::now();
                match read(&loc) {
                    Ok(Some(b)) if b.holder.token != body.holder.token => {
                        tracing::error!(lease = %loc.name(LEASE_FILE), "the checkpoint location was taken over by {}; this run no longer holds it", b.holder.describe());
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %flux::chain(&e), "could not read the checkpoint lease; renewing it anyway");
                    }
                    _ => {}
                }
                body.beat += 1;
                body.renewed = now_s();
                if let Err(e) = write(&loc, &body) {
                    tracing::warn!(error = %flux::chain(&e), "could not renew the checkpoint lease");
                }
            }
        })
        .map_err(|e| TrainerError::io(std::path::Path::new("lease thread"), e))
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
        if matches!(read(&self.loc), Ok(Some(b)) if b.holder.token == self.token) {
            if let Err(e) = self.loc.delete(LEASE_FILE) {
                tracing::warn!(error = %flux::chain(&e), "could not release the checkpoint lease");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> LeaseTiming {
        LeaseTiming {
            ttl: Duration::from_millis(900),
            renew: Duration::from_millis(150),
            poll: Duration::from_millis(100),
        }
    }

    #[test]
    fn a_live_lease_is_refused_and_a_released_one_is_free() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = Location::local(tmp.path());
        let first = Lease::acquire(&loc, fast()).unwrap();
        let t = Instant::now();
        let e = Lease::acquire(&loc, fast()).err().unwrap().to_string();
        assert!(e.contains("in use") && e.contains("pid"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "refused once a renewal was seen"
        );
        drop(first);
        assert!(loc.get(LEASE_FILE).unwrap().is_none(), "released");
        let _second = Lease::acquire(&loc, fast()).unwrap();
    }

    #[test]
    fn leases_work_the_same_on_an_object_store() {
        let Some(url) = datasets::testing::server_env("MOSAIC_TEST_S3_URL", "ci/s3.sh") else {
            return;
        };
        let at = format!(
            "{}/lease-{}-{}",
            url.trim_end_matches('/'),
            std::process::id(),
            now_s()
        );
        let loc = Location::parse(&at).unwrap();
        let first = Lease::acquire(&loc, fast()).unwrap();
        let e = Lease::acquire(&loc, fast()).err().unwrap().to_string();
        assert!(e.contains("in use") && e.contains(&at), "{e}");
        drop(first);
        assert!(loc.get(LEASE_FILE).unwrap().is_none(), "released");
        drop(Lease::acquire(&loc, fast()).unwrap());
    }

    #[test]
    fn an_unrenewed_lease_of_another_machine_is_taken_over_after_ttl() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = Location::local(tmp.path());
        let gone = Body {
            holder: Holder {
                host: "node-that-died".into(),
                ..Holder::this_process()
            },
            renewed: now_s(),
            beat: 7,
        };
        write(&loc, &gone).unwrap();
        let t = Instant::now();
        let lease = Lease::acquire(&loc, fast()).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "waited for the ttl"
        );
        let now = read(&loc).unwrap().unwrap();
        assert_eq!(now.holder.token, lease.token);
    }

    #[test]
    fn a_dead_local_holder_or_an_earlier_launcher_start_is_taken_over_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let loc = Location::local(tmp.path());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Body {
            holder: Holder {
                pid,
                ..Holder::this_process()
            },
            renewed: now_s(),
            beat: 3,
        };
        write(&loc, &dead).unwrap();
        let t = Instant::now();
        drop(Lease::acquire(&loc, fast()).unwrap());
        assert!(t.elapsed() < Duration::from_millis(900));
    }
}
