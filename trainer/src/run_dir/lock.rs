//! The run folder's exclusive lock: `RUN/.lock`, held with flock(2) for the whole run, holding
//! the holder's description. The kernel releases a flock when its process dies however it dies
//! (kill -9 included), so a lock can never outlive its holder on this machine; on a shared file
//! system (NFS, Lustre with flock) the lock is seen from every node. A lock file that still
//! names a holder when its flock is free was left by a process that did not exit cleanly: it is
//! taken over with a warning.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::holder::Holder;
use crate::error::{Result, TrainerError};

pub const LOCK_FILE: &str = ".lock";

/// The held lock; released (and the file emptied) when dropped.
#[derive(Debug)]
pub struct FolderLock {
    file: File,
    path: PathBuf,
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    // Safety: flock on a file descriptor this File owns.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether flock failed because the file system does not do it (some network mounts).
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Whether `e` says the folder cannot be locked with flock (then a lease stands in).
pub fn is_unsupported(e: &TrainerError) -> bool {
    matches!(e, TrainerError::Io { source, .. } if source.kind() == std::io::ErrorKind::Unsupported)
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

impl FolderLock {
    /// Takes the lock of run folder `dir` (creating the folder), or refuses naming the holder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| TrainerError::io(&path, e))?;
        if let Err(e) = flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            if unsupported(&e) {
                return Err(TrainerError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::Unsupported, e),
                });
            }
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let who = read_holder(&mut file)
                    .map_or("another process (it has not said who yet)".into(), |h| {
                        h.describe()
                    });
                return Err(TrainerError::RunInUse {
                    what: dir.display().to_string(),
                    holder: who,
                });
            }
            return Err(TrainerError::io(&path, e));
        }
        if let Some(old) = read_holder(&mut file) {
            tracing::warn!(
                lock = %path.display(),
                "taking over the run folder from {}, which is gone without releasing it",
                old.describe()
            );
        }
        let me = Holder::this_process();
        let text = serde_json::to_string(&me).map_err(|e| TrainerError::Serialize {
            what: "the run folder's lock",
            source: Box::new(e),
        })?;
        file.set_len(0).map_err(|e| TrainerError::io(&path, e))?;
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(text.as_bytes()))
            .and_then(|_| file.sync_all())
            .map_err(|e| TrainerError::io(&path, e))?;
        Ok(Self { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // An empty file says the holder left cleanly; the flock goes with the descriptor.
        let _ = self.file.set_len(0);
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        let first = FolderLock::acquire(tmp.path()).unwrap();
        let e = FolderLock::acquire(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("in use"),
            "{e}"
        );
        drop(first);
        let again = FolderLock::acquire(tmp.path()).unwrap();
        assert!(again.path().is_file());
    }

    #[test]
    fn a_lock_file_left_by_a_dead_holder_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let stale = Holder {
            pid: 999_999,
            ..Holder::this_process()
        };
        std::fs::write(
            tmp.path().join(LOCK_FILE),
            serde_json::to_string(&stale).unwrap(),
        )
        .unwrap();
        let lock = FolderLock::acquire(tmp.path()).unwrap();
        let text = std::fs::read_to_string(lock.path()).unwrap();
        let now: Holder = serde_json::from_str(&text).unwrap();
        assert_eq!(now.pid, std::process::id());
        drop(lock);
        assert_eq!(
            std::fs::read_to_string(tmp.path().join(LOCK_FILE)).unwrap(),
            ""
        );
    }
}
