//! A node that dies or freezes fails the group within seconds: two `launcher` processes on
//! loopback, as on two machines, one of which is frozen (SIGSTOP: its sockets stay open, so
//! only the heartbeat tells) or killed with SIGKILL together with its ranks.
#![cfg(target_os = "linux")]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::repo_root;
use crate::distributed::{find_rank_pid, free_port, wait_for_steps};

const HEARTBEAT_S: u64 = 3;
const STOP_S: u64 = 3;

fn launcher_binary() -> std::path::PathBuf {
    Path::new(env!("CARGO_BIN_EXE_trainer")).with_file_name("launcher")
}

/// Node `node` of a two-node job of 2 ranks each, training long enough to be interrupted.
fn node(dir: &Path, port: u16, run_id: &str, node: usize) -> Child {
    node_with(dir, port, run_id, node, "failure-test", HEARTBEAT_S)
}

fn node_with_token(dir: &Path, port: u16, run_id: &str, node: usize, token: &str) -> Child {
    node_with(dir, port, run_id, node, token, HEARTBEAT_S)
}

fn node_with(
    dir: &Path,
    port: u16,
    run_id: &str,
    node: usize,
    token: &str,
    heartbeat_s: u64,
) -> Child {
    Command::new(launcher_binary())
        .env("MOSAIC_JOB_TOKEN", token)
        .env_remove("SLURM_JOB_ID")
        .args(["--nodes", "2", "--node-rank", &node.to_string()])
        .args(["--master-addr", &format!("127.0.0.1:{port}")])
        .args(["--bind", "127.0.0.1", "--run-id", run_id])
        .args([
            "--nproc-per-node",
            "2",
            "--stop-timeout",
            &STOP_S.to_string(),
        ])
        .args([
            "--connect-timeout",
            "60",
            "--trainer",
            env!("CARGO_BIN_EXE_trainer"),
        ])
        .arg("--config")
        .arg(repo_root().join("configs/tiny-cpu.toml"))
        .arg("--")
        .args(crate::common::random_tiny_args())
        .args([
            "--set",
            &format!("run.dir={:?}", dir.display().to_string()),
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.progress=false",
            "--set",
            "data.source=\"synthetic\"",
            "--set",
            "validation.every=0",
            "--set",
            "data.samples=8",
            "--set",
            "train.batch_size=1",
            "--set",
            "checkpoint.every=0",
            "--set",
            &format!("distributed.heartbeat_timeout_s={heartbeat_s}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(pid: i32, sig: i32) {
    // Safety: kill(2) on processes this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits for `c` to exit, for at most `limit`; returns its stderr and how long it took.
fn exit_within(c: Child, limit: Duration) -> (bool, String, Duration) {
    let t = Instant::now();
    let mut c = c;
    loop {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > limit {
            signal(c.id() as i32, libc::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

/// The processes of `node` (its launcher and ranks), once they are all up.
fn node_pids(launcher: &Child, run_id: &str, node: usize) -> Vec<i32> {
    let mut pids = vec![launcher.id() as i32];
    for rank in [2 * node, 2 * node + 1] {
        pids.push(find_rank_pid(run_id, rank, 0).expect("rank process"));
    }
    pids
}

#[test]
fn a_frozen_node_fails_the_group_within_its_heartbeat_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, run_id) = (free_port(), format!("frozen{}", std::process::id()));
    let n0 = node(tmp.path(), port, &run_id, 0);
    let n1 = node(tmp.path(), port, &run_id, 1);
    wait_for_steps(tmp.path(), 3);
    let frozen = node_pids(&n1, &run_id, 1);
    for &p in &frozen {
        signal(p, libc::SIGSTOP);
    }
    // Heartbeat timeout, then the stop timeout, then the wait for the frozen node's report
    // (bounded by both again): well under the collective timeout (600 s).
    let bound = Duration::from_secs(2 * (HEARTBEAT_S + STOP_S) + 15);
    let (ok, log, took) = exit_within(n0, bound);
    for &p in &frozen {
        signal(p, libc::SIGKILL);
    }
    let _ = exit_within(n1, Duration::from_secs(10));
    assert!(!ok, "the job failed: {log}");
    assert!(took < bound, "node 0 took {took:?}: {log}");
    assert!(log.contains("node 1 sent no heartbeat"), "{log}");
}

#[test]
fn a_killed_node_0_takes_its_store_and_node_1_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, run_id) = (free_port(), format!("killed{}", std::process::id()));
    let n0 = node(tmp.path(), port, &run_id, 0);
    let n1 = node(tmp.path(), port, &run_id, 1);
    wait_for_steps(tmp.path(), 3);
    let dead = node_pids(&n0, &run_id, 0);
    for &p in &dead {
        signal(p, libc::SIGKILL);
    }
    let bound = Duration::from_secs(HEARTBEAT_S + STOP_S + 15);
    let (ok, log, took) = exit_within(n1, bound);
    let _ = exit_within(n0, Duration::from_secs(5));
    assert!(!ok, "{log}");
    assert!(took < bound, "node 1 took {took:?}: {log}");
    assert!(
        log.contains("no restart without node 0's store") || log.contains("unreachable"),
        "{log}"
    );
}

#[test]
fn a_node_with_the_wrong_token_is_refused_and_node_0_does_not_wait_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, run_id) = (free_port(), format!("token{}", std::process::id()));
    let n0 = node(tmp.path(), port, &run_id, 0);
    std::thread::sleep(Duration::from_millis(500));
    let n1 = node_with_token(tmp.path(), port, &run_id, 1, "another-job");
    let (ok1, log1, took1) = exit_within(n1, Duration::from_secs(20));
    assert!(!ok1 && log1.contains("refused"), "{log1}");
    assert!(took1 < Duration::from_secs(5), "refused in {took1:?}");
    // Node 0 hears nothing from node 1: the heartbeat timeout ends the wait, not the ranks'
    // connect timeout.
    let bound = Duration::from_secs(2 * (HEARTBEAT_S + STOP_S) + 15);
    let (ok0, log0, took0) = exit_within(n0, bound);
    assert!(!ok0, "{log0}");
    assert!(took0 < bound, "node 0 took {took0:?}: {log0}");
    assert!(log0.contains("node 1 sent no heartbeat"), "{log0}");
}

#[test]
fn sigterm_ends_a_launcher_waiting_for_a_node_that_never_comes() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, run_id) = (free_port(), format!("alone{}", std::process::id()));
    // A heartbeat timeout and a connect timeout of a minute: only the signal can end this soon.
    let n0 = node_with(tmp.path(), port, &run_id, 0, "failure-test", 60);
    // Its ranks are up and waiting for ranks 2 and 3: a SIGTERM now must end the wait at once.
    let t = Instant::now();
    while find_rank_pid(&run_id, 1, 0).is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "ranks did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    signal(n0.id() as i32, libc::SIGTERM);
    let (_, log, took) = exit_within(n0, Duration::from_secs(20));
    assert!(
        took < Duration::from_secs(STOP_S + 5),
        "took {took:?}: {log}"
    );
}
