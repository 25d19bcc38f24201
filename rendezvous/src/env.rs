//! Reading RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (the
//! torchrun names), plus what `launcher` adds: the job token, the store address, the run id and
//! the restart generation.

/// The job token every process presents to the rendezvous store.
pub const TOKEN: &str = "MOSAIC_JOB_TOKEN";
/// "host:port" of the store that `launcher` runs; absent under other launchers.
pub const STORE: &str = "MOSAIC_STORE";
/// The run id (names the job in logs and store keys).
pub const RUN_ID: &str = "MOSAIC_RUN_ID";
/// How many times the launcher restarted the group (0 at first); namespaces store keys.
pub const RESTART: &str = "MOSAIC_RESTART";
/// The launcher's --connect-timeout in seconds: a rank waits for its peers no longer.
pub const CONNECT_TIMEOUT: &str = "MOSAIC_CONNECT_TIMEOUT_S";
/// Store key under which rank `rank` of a group beats (a counter it adds to every
/// [`HEARTBEAT_EVERY`]), `prefix` being "<run id>/gen<restart>".
pub fn rank_beat_key(prefix: &str, rank: usize) -> String {
    format!("{prefix}/beat/rank{rank}")
}
/// How often ranks and launchers beat.
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Where this process sits in the job. A process started by hand (no variables) is rank 0 of 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    pub token: Option<String>,
    pub store: Option<String>,
    pub run_id: Option<String>,
    pub restart: u32,
    /// The launcher's bound on waiting for peers, in seconds.
    pub connect_timeout_s: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvError {
    #[error("environment variable {name}={value:?} is not a valid {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("RANK={rank} is not below WORLD_SIZE={world_size}")]
    RankOutOfRange { rank: usize, world_size: usize },
    #[error("{set} is set but {missing} is not; set both or neither")]
    Incomplete {
        set: &'static str,
        missing: &'static str,
    },
}

impl RankEnv {
    /// The single-process default.
    pub fn single() -> Self {
        Self {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            master_addr: None,
            master_port: None,
            token: None,
            store: None,
            run_id: None,
            restart: 0,
            connect_timeout_s: None,
        }
    }

    /// Rank `rank` of `world` on one node, reaching the store at `store` with `token`: how
    /// in-process ranks (tests, benchmarks) are described.
    pub fn on_store(rank: usize, world: usize, store: &str, token: &str, run_id: &str) -> Self {
        Self {
            rank,
            local_rank: rank,
            world_size: world,
            local_world_size: world,
            token: Some(token.to_string()),
            store: Some(store.to_string()),
            run_id: Some(run_id.to_string()),
            ..Self::single()
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get`, so tests need not touch the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        fn num<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            name: &'static str,
            expected: &'static str,
        ) -> Result<Option<T>, EnvError> {
            match get(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| EnvError::Invalid {
                    name,
                    value: v,
                    expected,
                }),
            }
        }
        let rank: Option<usize> = num(&get, "RANK", "rank (non-negative integer)")?;
        let world: Option<usize> = num(&get, "WORLD_SIZE", "world size (positive integer)")?;
        let (rank, world_size) = match (rank, world) {
            (None, None) => return Ok(Self::single()),
            (Some(_), None) => {
                return Err(EnvError::Incomplete {
                    set: "RANK",
                    missing: "WORLD_SIZE",
                })
            }
            (None, Some(_)) => {
                return Err(EnvError::Incomplete {
                    set: "WORLD_SIZE",
                    missing: "RANK",
                })
            }
            (Some(r), Some(w)) => (r, w),
        };
        if world_size == 0 {
            return Err(EnvError::Invalid {
                name: "WORLD_SIZE",
                value: "0".into(),
                expected: "world size (positive integer)",
            });
        }
        if rank >= world_size {
            return Err(EnvError::RankOutOfRange { rank, world_size });
        }
        Ok(Self {
            rank,
            local_rank: num(&get, "LOCAL_RANK", "local rank (non-negative integer)")?
                .unwrap_or(rank),
            world_size,
            local_world_size: num(
                &get,
                "LOCAL_WORLD_SIZE",
                "local world size (positive integer)",
            )?
            .unwrap_or(world_size),
            master_addr: get("MASTER_ADDR"),
            master_port: num(&get, "MASTER_PORT", "port (0-65535)")?,
            token: get(TOKEN),
            store: get(STORE),
            run_id: get(RUN_ID),
            restart: num(&get, RESTART, "restart count (non-negative integer)")?.unwrap_or(0),
            connect_timeout_s: num(&get, CONNECT_TIMEOUT, "seconds (non-negative integer)")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<RankEnv, EnvError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn empty_environment_is_one_rank() {
        assert_eq!(env(&[]).unwrap(), RankEnv::single());
    }

    #[test]
    fn torchrun_variables_are_read() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!(
            (e.rank, e.local_rank, e.world_size, e.local_world_size),
            (3, 1, 8, 2)
        );
        assert_eq!(e.master_addr.as_deref(), Some("node0"));
        assert_eq!(e.master_port, Some(29500));
    }

    #[test]
    fn bad_values_are_named() {
        assert!(matches!(
            env(&[("RANK", "x"), ("WORLD_SIZE", "2")]),
            Err(EnvError::Invalid { name: "RANK", .. })
        ));
        assert_eq!(
            env(&[("RANK", "2"), ("WORLD_SIZE", "2")]),
            Err(EnvError::RankOutOfRange {
                rank: 2,
                world_size: 2
            })
        );
        assert!(matches!(
            env(&[("RANK", "0")]),
            Err(EnvError::Incomplete { .. })
        ));
        assert!(matches!(
            env(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_PORT", "99999")]),
            Err(EnvError::Invalid {
                name: "MASTER_PORT",
                ..
            })
        ));
    }
}
