//! Run folders (docs/checkpoints.md, "Run folders"): who may use one, and what a start may do
//! to what an earlier run left there.
//!
//! - Ownership: rank 0 holds the run folder's lock ([`lock`]) for the whole run, and the
//!   checkpoint location's when it lies elsewhere (a lock for a folder, a lease for an object
//!   store, [`lease`]). A second run on the same folder is refused naming the holder.
//! - Nothing is lost at start: a start that would lose an earlier run's checkpoints or metrics
//!   (a start over with `--no-resume`, or another config) is refused, unless `--overwrite`
//!   (`checkpoint.overwrite`) asks to move them to `previous-<time>/` first. Nothing is
//!   deleted.
//! - Leftover temporary checkpoint folders (`.tmp-step-*`, from writers killed mid-save) are
//!   removed: with the lock held no other writer exists, so every one is garbage.

pub mod holder;
pub mod lease;
pub mod lock;

use std::path::{Path, PathBuf};

use crate::checkpoint::{config_differences, list, LATEST};
use crate::config::Config;
use crate::error::{Result, TrainerError};
use crate::storage::Location;
use lease::{Lease, LeaseTiming, LEASE_FILE};
use lock::{FolderLock, LOCK_FILE};

/// What a run holds while it runs; released when dropped.
pub struct Ownership {
    _folder: FolderLock,
    _checkpoints: Option<CheckpointHold>,
}

/// Held only to be released on drop.
#[allow(dead_code)]
enum CheckpointHold {
    Folder(FolderLock),
    Lease(Lease),
}

/// Takes the run folder of `cfg`, and its checkpoint location when that lies outside it.
pub fn take(cfg: &Config, timing: LeaseTiming) -> Result<Ownership> {
    let dir = cfg.run_dir();
    let folder = FolderLock::acquire(&dir)?;
    let checkpoints = match cfg.checkpoint_location()? {
        Location::Local(p) if p.starts_with(&dir) => None,
        Location::Local(p) => Some(CheckpointHold::Folder(FolderLock::acquire(&p)?)),
        remote @ Location::Remote(_) => {
            Some(CheckpointHold::Lease(Lease::acquire(&remote, timing)?))
        }
    };
    Ok(Ownership {
        _folder: folder,
        _checkpoints: checkpoints,
    })
}

/// What an earlier run left: its checkpoints and whether it logged metrics.
struct History {
    checkpoints: usize,
    metrics: bool,
    at: String,
}

impl History {
    fn of(cfg: &Config, ckpt: &Location) -> Result<Self> {
        let metrics =
            std::fs::metadata(cfg.run_dir().join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
        Ok(Self {
            checkpoints: list(ckpt)?.len(),
            metrics,
            at: ckpt.describe(),
        })
    }

    fn is_empty(&self) -> bool {
        self.checkpoints == 0 && !self.metrics
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.checkpoints > 0 {
            parts.push(format!("{} checkpoint(s) in {}", self.checkpoints, self.at));
        }
        if self.metrics {
            parts.push("metrics.jsonl".to_string());
        }
        parts.join(" and ")
    }
}

/// Why starting `cfg` here would lose an earlier run's work, if it would.
fn conflict(cfg: &Config, history: &History) -> Result<Option<String>> {
    if history.is_empty() {
        return Ok(None);
    }
    let c = &cfg.checkpoint;
    if !c.resume && c.resume_from.is_empty() {
        return Ok(Some(format!(
            "it holds {} of an earlier run, which starting over (--no-resume, checkpoint.resume = false) would lose",
            history.describe()
        )));
    }
    let saved = cfg.run_dir().join("config.toml");
    if let Ok(saved) = std::fs::read_to_string(&saved) {
        let diff = config_differences(&saved, &cfg.to_toml()?);
        if !diff.is_empty() {
            return Ok(Some(format!(
                "it holds {} of a run of another config; these fields differ:\n  {}\n",
                history.describe(),
                diff.join("\n  ")
            )));
        }
    }
    Ok(None)
}

/// `previous-<time>`, a name that sorts by time and suits every file system.
fn previous_name() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    format!("previous-{}", t.replace(':', "-"))
}

/// Moves every entry of folder `dir` but its lock (or lease) and earlier `previous-*` into
/// `dir/to`.
fn move_folder_contents(dir: &Path, to: &str) -> Result<usize> {
    let target = dir.join(to);
    let mut moved = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == LOCK_FILE || name == LEASE_FILE || name.starts_with("previous-") {
            continue;
        }
        std::fs::create_dir_all(&target).map_err(|e| TrainerError::io(&target, e))?;
        std::fs::rename(e.path(), target.join(&name))
            .map_err(|err| TrainerError::io(&e.path(), err))?;
        moved += 1;
    }
    Ok(moved)
}

/// Moves the checkpoints (and LATEST) under an object-store prefix to `to/` below it.
fn move_remote_checkpoints(ckpt: &Location, to: &str) -> Result<()> {
    let Location::Remote(r) = ckpt else {
        return Ok(());
    };
    for name in r.list_dirs()? {
        if name.starts_with("step-") || name.starts_with("corrupt-") {
            ckpt.rename_dir(&name, &format!("{to}/{name}"))?;
        }
    }
    if let Some(bytes) = ckpt.get(LATEST)? {
        ckpt.put(&format!("{to}/{LATEST}"), bytes)?;
        ckpt.delete(LATEST)?;
    }
    Ok(())
}

/// Removes what writers killed mid-save left in a local checkpoint folder.
fn remove_leftovers(ckpt: &Location) -> Result<()> {
    let Location::Local(dir) = ckpt else {
        return Ok(());
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let removed = if name.starts_with(".tmp-") && path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else if name == format!(".{LATEST}.tmp") || name.ends_with(".partial") {
            std::fs::remove_file(&path)
        } else {
            continue;
        };
        removed.map_err(|err| TrainerError::io(&path, err))?;
        tracing::info!(removed = %path.display(), "removed what an interrupted checkpoint save left");
    }
    Ok(())
}

/// Checks that starting `cfg` loses nothing an earlier run left (refusing, or with
/// `checkpoint.overwrite` moving it to `previous-<time>/`), then clears leftovers. Rank 0, with
/// the run folder held.
pub fn prepare(cfg: &Config) -> Result<Option<PathBuf>> {
    let dir = cfg.run_dir();
    let ckpt = cfg.checkpoint_location()?;
    let history = History::of(cfg, &ckpt)?;
    let moved_to = match (conflict(cfg, &history)?, cfg.checkpoint.overwrite) {
        (Some(reason), false) => return Err(TrainerError::RunFolderTaken { dir, reason }),
        (Some(reason), true) => {
            let to = previous_name();
            move_folder_contents(&dir, &to)?;
            match &ckpt {
                Location::Local(p) if !p.starts_with(&dir) => {
                    move_folder_contents(p, &to)?;
                }
                Location::Local(_) => {}
                remote @ Location::Remote(_) => move_remote_checkpoints(remote, &to)?,
            }
            tracing::warn!(moved_to = %dir.join(&to).display(), "--overwrite: the earlier run ({reason}) was moved aside");
            Some(dir.join(to))
        }
        (None, true) if !history.is_empty() => {
            tracing::info!("--overwrite: nothing to move, the run continues its own checkpoints");
            None
        }
        (None, _) => None,
    };
    remove_leftovers(&ckpt)?;
    Ok(moved_to)
}
