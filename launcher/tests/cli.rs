//! The `launcher` binary with a stand-in rank program (a shell script), so these tests check
//! the launcher alone: log prefixes, signal forwarding, failure reports and bad command lines.
//! The real trainer under the launcher is tested in the trainer's integration tests.
#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn launcher() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_launcher"));
    c.env_remove("SLURM_JOB_ID")
        .env_remove("MOSAIC_JOB_TOKEN")
        .env_remove("MASTER_PORT");
    c
}

/// An executable script in `dir` standing in for the trainer.
fn fake_rank(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("fake-trainer.sh");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// The launcher running 2 ranks of a stand-in trainer with `body`.
fn two_fake_ranks(dir: &Path, body: &str) -> Command {
    let mut c = launcher();
    c.args([
        "--config",
        "unused.toml",
        "--nproc-per-node",
        "2",
        "--trainer",
    ])
    .arg(fake_rank(dir, body));
    c
}

fn run(dir: &Path, body: &str, extra: &[&str]) -> Output {
    two_fake_ranks(dir, body).args(extra).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn rank_output_is_prefixed_and_ranks_get_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        tmp.path(),
        r#"echo "out $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE args $*"; echo "err $MOSAIC_STORE" >&2"#,
        &["--", "--set", "x=1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for r in 0..2 {
        let want =
            format!("[rank {r}] out {r}/2 local {r}/2 args train --config unused.toml --set x=1");
        assert!(stdout.contains(&want), "{stdout}");
    }
    let stderr = text(&out.stderr);
    assert!(stderr.contains("[rank 1] err 127.0.0.1:"), "{stderr}");
}

/// `--job pretrain-base` runs the base's pretraining on every rank instead of `train`.
#[test]
fn the_job_names_the_trainer_command_every_rank_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        tmp.path(),
        r#"echo "rank $RANK runs $1""#,
        &["--job", "pretrain-base"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for r in 0..2 {
        assert!(
            stdout.contains(&format!("rank {r} runs pretrain-base")),
            "{stdout}"
        );
    }
    let out = run(tmp.path(), "true", &["--job", "finetune"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--job"), "{}", text(&out.stderr));
}

/// Each rank gets its share of the cores in RAYON_NUM_THREADS, unless the user set it.
#[test]
fn ranks_get_their_share_of_the_cores_unless_the_user_chose() {
    let tmp = tempfile::tempdir().unwrap();
    let body = r#"echo "threads $RANK $RAYON_NUM_THREADS""#;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = (cores / 2).max(1);
    let out = two_fake_ranks(tmp.path(), body)
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for r in 0..2 {
        assert!(stdout.contains(&format!("threads {r} {share}")), "{stdout}");
    }
    assert!(
        text(&out.stderr).contains(&format!("RAYON_NUM_THREADS={share} for each")),
        "{}",
        text(&out.stderr)
    );
    let out = two_fake_ranks(tmp.path(), body)
        .env("RAYON_NUM_THREADS", "7")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    for r in 0..2 {
        assert!(stdout.contains(&format!("threads {r} 7")), "{stdout}");
    }
}

#[test]
fn a_failed_rank_is_named_with_its_last_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        tmp.path(),
        r#"if [ "$RANK" = 1 ]; then echo "loading shard 7"; echo "boom" >&2; exit 3; fi; sleep 30"#,
        &["--stop-timeout", "2"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("rank 1 on node 0 exited with status 3"),
        "{stderr}"
    );
    assert!(stderr.contains("no restarts left"), "{stderr}");
    assert!(stderr.contains("  [rank 1] boom"), "{stderr}");
    assert!(stderr.contains("  [rank 1] loading shard 7"), "{stderr}");
}

#[test]
fn restarts_rerun_the_group_with_the_next_generation() {
    let tmp = tempfile::tempdir().unwrap();
    // Generation 0 fails on rank 0; generation 1 succeeds.
    let out = run(
        tmp.path(),
        r#"echo "gen $MOSAIC_RESTART"; if [ "$MOSAIC_RESTART" = 0 ] && [ "$RANK" = 0 ]; then exit 4; fi; if [ "$MOSAIC_RESTART" = 0 ]; then sleep 30; fi"#,
        &["--max-restarts", "2", "--stop-timeout", "1"],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("restarting the group (restart 1 of 2)"),
        "{stderr}"
    );
    assert!(stderr.contains("finished after 1 restart(s)"), "{stderr}");
    assert!(text(&out.stdout).contains("[rank 1] gen 1"));
}

#[test]
fn sigterm_is_forwarded_and_the_ranks_status_passed_on() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = two_fake_ranks(
        tmp.path(),
        r#"trap 'echo "rank $RANK stopping"; exit 7' TERM; echo ready; while true; do sleep 0.05; done"#,
    )
    .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ready = 0;
    let started = Instant::now();
    while ready < 2 {
        let line = lines.next().unwrap().unwrap();
        ready += line.ends_with("] ready") as usize;
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    // Safety: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(7), "{rest:?}");
    for r in 0..2 {
        assert!(
            rest.contains(&format!("[rank {r}] rank {r} stopping")),
            "{rest:?}"
        );
    }
}

#[test]
fn several_nodes_without_a_master_or_token_are_refused_with_what_to_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(tmp.path(), "true", &["--nodes", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--master-addr HOST[:PORT]"), "{stderr}");
    let out = run(
        tmp.path(),
        "true",
        &[
            "--nodes",
            "2",
            "--node-rank",
            "0",
            "--master-addr",
            "127.0.0.1",
        ],
    );
    let stderr = text(&out.stderr);
    assert!(stderr.contains("MOSAIC_JOB_TOKEN"), "{stderr}");
}

#[test]
fn a_port_in_use_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = run(
        tmp.path(),
        "true",
        &["--master-addr", &format!("127.0.0.1:{port}")],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
}

#[test]
fn an_unreachable_master_fails_after_a_bounded_wait() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let out = launcher()
        .env("MOSAIC_JOB_TOKEN", "t")
        .args(["--config", "unused.toml", "--nproc-per-node", "1"])
        .args(["--nodes", "2", "--node-rank", "1", "--connect-timeout", "1"])
        .args(["--master-addr", &format!("127.0.0.1:{port}"), "--trainer"])
        .arg(fake_rank(tmp.path(), "true"))
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("could not reach the rendezvous store"),
        "{stderr}"
    );
}

/// With its output piped into a reader that went away (`launcher ... | head`), the launcher
/// still ends with its own status, never a panic on the closed pipe.
#[test]
#[cfg(unix)]
fn a_closed_output_pipe_does_not_panic_the_launcher() {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // Safety: pipe(2) fills two descriptors; the read end is closed at once, the write end is
    // handed to the child as both outputs (each Stdio owns a duplicate).
    let write_end = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        std::fs::File::from_raw_fd(fds[1])
    };
    let out = Command::new(env!("CARGO_BIN_EXE_launcher"))
        .args(["--nproc-per-node", "0", "--config", "no-such.toml"])
        .stdout(write_end.try_clone().unwrap())
        .stderr(write_end)
        .status()
        .unwrap();
    assert_eq!(out.code(), Some(1), "the error status, not a panic (101)");
}
