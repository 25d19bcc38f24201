//! CPU threads per rank. candle's CPU kernels (matmul, conv) and rayon's pool each start one
//! thread per core of the machine unless `RAYON_NUM_THREADS` says otherwise, so N ranks on a
//! node would run N x cores threads on its cores. On small CPU models that oversubscription
//! costs more than it gives: two ranks of the tiny model on two cores take 0.34 s a step with
//! two threads each and 0.19 s with one (README, "Distributed"). The launcher splits the
//! node's cores between its ranks, as torchrun sets OMP_NUM_THREADS, unless the user set the
//! variable (theirs is passed on unchanged).

/// The variable candle and rayon read.
pub const VAR: &str = "RAYON_NUM_THREADS";

/// The node's `cores` split evenly between its `ranks`, at least one thread each.
pub fn per_rank(cores: usize, ranks: usize) -> usize {
    (cores / ranks.max(1)).max(1)
}

/// What to add to every rank's environment: nothing when the user set [`VAR`] (a non-empty
/// `user`), else [`VAR`] = [`per_rank`].
pub fn rank_env(user: Option<&str>, cores: usize, ranks: usize) -> Option<(String, String)> {
    match user {
        Some(v) if !v.trim().is_empty() => None,
        _ => Some((VAR.to_string(), per_rank(cores, ranks).to_string())),
    }
}

/// Cores this process may run on (its CPU affinity and cgroup quota, as SLURM's
/// `--cpus-per-task` sets them); 1 when the system cannot say.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_split_between_ranks() {
        assert_eq!(per_rank(2, 2), 1);
        assert_eq!(per_rank(16, 8), 2);
        assert_eq!(
            per_rank(10, 4),
            2,
            "rounds down: no core runs two ranks' threads"
        );
        assert_eq!(per_rank(2, 4), 1, "more ranks than cores: one thread each");
        assert_eq!(per_rank(8, 0), 8);
    }

    #[test]
    fn a_users_setting_wins() {
        assert_eq!(rank_env(Some("3"), 16, 2), None);
        assert_eq!(
            rank_env(None, 16, 2),
            Some((VAR.to_string(), "8".to_string()))
        );
        assert_eq!(
            rank_env(Some(""), 2, 2),
            Some((VAR.to_string(), "1".to_string())),
            "an empty value is unset"
        );
    }
}
