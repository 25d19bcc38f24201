//! Who holds a run: written into the run folder's lock file and the checkpoint location's
//! lease, so a refused second run can name the first.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The process that holds a run folder or a checkpoint location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Unix seconds.
    pub started: u64,
    /// The launcher's run id (MOSAIC_RUN_ID), when started by one.
    #[serde(default)]
    pub run_id: String,
    /// The launcher's restart count (MOSAIC_RESTART).
    #[serde(default)]
    pub restart: u32,
    /// A random id of this holding (told apart from a later holding by the same process).
    pub token: String,
}

/// Unix seconds now.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This machine's host name ("unknown host" where the system gives none).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // Safety: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Holder {
    /// This process, now.
    pub fn this_process() -> Self {
        Self {
            host: host_name(),
            pid: std::process::id(),
            started: now_s(),
            run_id: std::env::var(rendezvous::env::RUN_ID).unwrap_or_default(),
            restart: std::env::var(rendezvous::env::RESTART)
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0),
            token: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// "host H, pid P, since T" for messages.
    pub fn describe(&self) -> String {
        let since =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(self.started));
        let launcher = if self.run_id.is_empty() {
            String::new()
        } else {
            format!(", launcher run {} restart {}", self.run_id, self.restart)
        };
        format!(
            "host {}, pid {}, since {since}{launcher}",
            self.host, self.pid
        )
    }

    /// Whether this holder is a process of this machine that no longer exists.
    pub fn is_dead_here(&self) -> bool {
        if self.host != host_name() {
            return false;
        }
        // Safety: signal 0 only checks that the process exists.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
        rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }

    /// Whether `self` is a later start of the same launcher run as `other` (a restart after a
    /// failure: the earlier process is gone by construction).
    pub fn restarts(&self, other: &Holder) -> bool {
        !self.run_id.is_empty() && self.run_id == other.run_id && self.restart > other.restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_not_dead_and_a_finished_one_is() {
        let me = Holder::this_process();
        assert!(!me.is_dead_here());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = Holder { pid, ..me.clone() };
        assert!(gone.is_dead_here());
        let elsewhere = Holder {
            host: "another-host".into(),
            ..gone
        };
        assert!(
            !elsewhere.is_dead_here(),
            "a process elsewhere cannot be checked"
        );
        assert!(me
            .describe()
            .contains(&format!("pid {}", std::process::id())));
    }

    #[test]
    fn a_launcher_restart_supersedes_its_earlier_start() {
        let first = Holder {
            run_id: "r1".into(),
            restart: 0,
            ..Holder::this_process()
        };
        let second = Holder {
            restart: 1,
            ..first.clone()
        };
        assert!(second.restarts(&first));
        assert!(!first.restarts(&second));
        let other_run = Holder {
            run_id: "r2".into(),
            ..second.clone()
        };
        assert!(!other_run.restarts(&first));
    }
}
