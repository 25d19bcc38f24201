//! Data parallelism. Ranks as threads of this process talk over loopback TCP through a real
//! store exactly as separate processes do; the launcher tests run real `trainer` processes
//! under the launcher's agent, as two nodes and through a killed rank.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use launcher::agent::{self, LaunchSpec};
use launcher::topology::Topology;
use launcher::{RankEnv, StoreServer};
use trainer::ddp::{self, Dist, ReduceOp};
use trainer::run::Run;

use crate::common::{repo_root, steps_logged, tiny_config, with_ranks};

#[test]
fn ring_collectives_give_every_rank_the_same_exact_answer() {
    // 3 ranks and 7 elements: uneven chunks, and a 2-element buffer leaves a chunk empty.
    let results = with_ranks(3, |rank, dist| {
        let r = rank as f32;
        let v: Vec<f32> = (0..7).map(|i| i as f32 * 0.1 + r).collect();
        let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let sum = dist
            .call("all-reduce", move |c| c.all_reduce(&t, ReduceOp::Sum))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let t = Tensor::new(&[1.0f64 + rank as f64, 2.0], &Device::Cpu).unwrap();
        let mean = dist
            .call("all-reduce", move |c| c.all_reduce(&t, ReduceOp::Mean))
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let t = Tensor::new(&[0.5f32 * (rank + 1) as f32; 5], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bf = dist
            .call("all-reduce", move |c| c.all_reduce(&t, ReduceOp::Sum))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let t = Tensor::new(&[[rank as f32; 2]; 2], &Device::Cpu).unwrap();
        let bc = dist
            .call("broadcast", move |c| c.broadcast(&t, 1))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mine = vec![rank as u8; rank + 1];
        let gathered = dist
            .call("all-gather", move |c| c.all_gather_bytes(&mine))
            .unwrap();
        dist.call("barrier", |c| c.barrier()).unwrap();
        (sum, mean, bf, bc, gathered)
    });
    let expect_sum: Vec<f32> = (0..7).map(|i| 3.0 * (i as f32 * 0.1) + 3.0).collect();
    for (sum, mean, bf, bc, gathered) in &results {
        for (a, b) in sum.iter().zip(&expect_sum) {
            assert!((a - b).abs() < 1e-5, "{sum:?}");
        }
        assert_eq!(sum, &results[0].0, "every rank holds the same bits");
        assert_eq!(mean, &vec![2.0, 2.0]);
        assert_eq!(bf, &vec![3.0; 5]);
        assert_eq!(bc, &vec![vec![1.0; 2]; 2]);
        assert_eq!(gathered, &vec![vec![0], vec![1, 1], vec![2, 2, 2]]);
    }
}

/// The LoRA weights and per-step losses of `steps` steps as rank `rank` of `dist`.
fn train_rank(dir: &Path, sets: &[String], dist: Dist, steps: u64) -> (Vec<Vec<f64>>, Vec<f64>) {
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let cfg = tiny_config(dir, &sets);
    let mut run = Run::build_with(cfg, dist, Device::Cpu).unwrap();
    let losses = (0..steps)
        .map(|s| run.train_step(s).unwrap().1.total)
        .collect();
    let weights = run
        .lora
        .named_vars()
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect();
    (weights, losses)
}

fn assert_same_run(a: &(Vec<Vec<f64>>, Vec<f64>), b: &(Vec<Vec<f64>>, Vec<f64>), what: &str) {
    for (x, y) in a.1.iter().zip(&b.1) {
        assert!(
            (x - y).abs() <= 1e-12 * x.abs().max(1.0),
            "{what}: losses {:?} vs {:?}",
            a.1,
            b.1
        );
    }
    let mut worst = 0f64;
    for (wa, wb) in a.0.iter().zip(&b.0) {
        for (x, y) in wa.iter().zip(wb) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst < 1e-10, "{what}: LoRA weights differ by {worst}");
}

/// Trains the same global batch on `world` ranks with `per_rank` samples each; returns rank 0's
/// result after checking every rank ended with identical weights.
fn data_parallel(world: usize, per_rank: usize, extra: &[&str]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut sets: Vec<String> = [
        "model.dtype=\"f64\"",
        "data.samples=16",
        "train.max_steps=3",
        "optim.warmup_steps=0",
        "distributed.check_weights_every=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("train.batch_size={per_rank}"));
    sets.extend(extra.iter().map(|s| s.to_string()));
    let results = with_ranks(world, move |_, dist| train_rank(&dir, &sets, dist, 3));
    for r in &results[1..] {
        assert_eq!(r.0, results[0].0, "ranks must hold bit-identical weights");
    }
    results.into_iter().next().unwrap()
}

#[test]
fn one_two_and_four_ranks_train_the_same_global_batch_identically() {
    let one = data_parallel(1, 4, &[]);
    // Recomputation with tiny buckets: many all-reduces overlap the block-wise backward.
    let two = data_parallel(
        2,
        2,
        &["train.checkpointing=true", "distributed.bucket_mb=0.01"],
    );
    let four = data_parallel(4, 1, &[]);
    assert_same_run(&one, &two, "1 vs 2 ranks");
    assert_same_run(&one, &four, "1 vs 4 ranks");
    // Gradient accumulation: no communication on the first micro-step, same result.
    let acc_one = data_parallel(1, 2, &["train.grad_accum=2"]);
    let acc_two = data_parallel(2, 1, &["train.grad_accum=2"]);
    assert_same_run(&acc_one, &acc_two, "accumulation, 1 vs 2 ranks");
}

#[test]
fn ranks_with_different_configs_refuse_to_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let errors = with_ranks(2, move |rank, dist| {
        let lr = format!("optim.lr={}", if rank == 0 { "1e-3" } else { "2e-3" });
        let cfg = tiny_config(&dir, &[&lr]);
        Run::build_with(cfg, dist, Device::Cpu)
            .err()
            .map(|e| e.to_string())
    });
    for e in errors {
        let e = e.expect("a mismatched config must be refused");
        assert!(e.contains("config fingerprint"), "{e}");
        assert!(e.contains("rank 1 has"), "{e}");
    }
}

#[test]
fn a_rank_with_the_wrong_job_token_is_refused() {
    let server = StoreServer::bind("127.0.0.1:0", "right").unwrap();
    let env = RankEnv::on_store(0, 2, &server.local_addr().to_string(), "wrong", "test");
    let e = ddp::connect(&env, &crate::common::tcp_options(), &Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("wrong job token"), "{e}");
}

#[test]
fn diverged_weights_are_caught_and_a_stop_request_reaches_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let results = with_ranks(2, move |rank, dist| {
        let cfg = tiny_config(&dir, &["distributed.check_weights_every=2"]);
        let mut run = Run::build_with(cfg, dist, Device::Cpu).unwrap();
        if rank == 1 {
            run.stop_requested
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        run.train_step(0).unwrap();
        let stopped = run.stop_agreed;
        if rank == 1 {
            let (_, v) = &run.lora.named_vars()[0];
            v.set(&(v.as_tensor() + 1e-3).unwrap()).unwrap();
        }
        let err = run.train_step(1).err().map(|e| e.to_string());
        (stopped, err)
    });
    for (stopped, err) in results {
        assert!(stopped, "the stop flag of rank 1 must reach rank 0 too");
        let err = err.expect("diverged weights must be detected");
        assert!(err.contains("LoRA weights after step 2"), "{err}");
    }
}

pub fn trainer_spec(
    dir: &Path,
    nodes: usize,
    node_rank: usize,
    port: u16,
    steps: u64,
) -> LaunchSpec {
    LaunchSpec {
        program: env!("CARGO_BIN_EXE_trainer").into(),
        args: [
            "train",
            "--config",
            &repo_root()
                .join("configs/tiny-cpu.toml")
                .display()
                .to_string(),
            "--set",
            &format!("run.dir={:?}", dir.display().to_string()),
            "--set",
            &format!("train.max_steps={steps}"),
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
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(crate::common::random_tiny_args())
        .collect(),
        nproc_per_node: 2,
        topology: Topology {
            nodes,
            node_rank,
            master_host: "127.0.0.1".into(),
            master_port: Some(port),
            source: "test".into(),
        },
        token: "test-token".into(),
        run_id: format!("t{port}"),
        max_restarts: 0,
        stop_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(60),
        env: vec![("NO_COLOR".into(), "1".into())],
        bind: Some("127.0.0.1".into()),
        heartbeat_timeout: Duration::from_secs(30),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn never() -> std::sync::mpsc::Receiver<i32> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::mem::forget(tx);
    rx
}

/// The `launcher` binary next to `trainer`: `cargo test --workspace` builds both.
fn launcher_binary() -> Option<std::path::PathBuf> {
    let p = Path::new(env!("CARGO_BIN_EXE_trainer")).with_file_name("launcher");
    p.exists().then_some(p)
}

#[test]
fn two_launchers_on_loopback_run_as_two_nodes_of_two_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    if let Some(bin) = launcher_binary() {
        // Two launcher processes, exactly as on two machines.
        let spec = trainer_spec(tmp.path(), 2, 0, port, 6);
        let children: Vec<_> = (0..2)
            .map(|node| {
                std::process::Command::new(&bin)
                    .env("MOSAIC_JOB_TOKEN", "two-nodes")
                    .env_remove("SLURM_JOB_ID")
                    .args(["--nodes", "2", "--node-rank", &node.to_string()])
                    .args(["--master-addr", &format!("127.0.0.1:{port}")])
                    .args(["--bind", "127.0.0.1"])
                    .args([
                        "--nproc-per-node",
                        "2",
                        "--trainer",
                        env!("CARGO_BIN_EXE_trainer"),
                    ])
                    .args(["--config", &spec.args[2], "--"])
                    .args(&spec.args[3..])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{log}");
            assert!(log.contains("world size 4"), "{log}");
        }
    } else {
        // `cargo test -p trainer` does not build the launcher: run its agent in this process.
        eprintln!("launcher binary not built; running the two node agents in-process");
        let handles: Vec<_> = (0..2)
            .map(|node| {
                let spec = trainer_spec(tmp.path(), 2, node, port, 6);
                std::thread::spawn(move || agent::run(&spec, &never()))
            })
            .collect();
        for h in handles {
            let done = h.join().unwrap().unwrap();
            assert_eq!((done.exit_code, done.restarts), (0, 0));
        }
    }
    let metrics = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    assert!(tmp.path().join("lora.safetensors").exists());
}

/// Pid of the trainer process of `rank` in generation `generation` of run `run_id` (Linux).
pub fn find_rank_pid(run_id: &str, rank: usize, generation: u32) -> Option<i32> {
    let want = [
        format!("MOSAIC_RUN_ID={run_id}"),
        format!("RANK={rank}"),
        format!("MOSAIC_RESTART={generation}"),
    ];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = env
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if want.iter().all(|w| vars.contains(w)) {
            return Some(pid);
        }
    }
    None
}

/// Waits until the run in `dir` has logged `n` steps.
pub fn wait_for_steps(dir: &Path, n: usize) {
    let started = Instant::now();
    loop {
        if steps_logged(dir) >= n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "run never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg(unix)]
fn sigterm_stops_every_rank_at_the_same_step_with_the_configured_status() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = trainer_spec(tmp.path(), 1, 0, free_port(), 500);
    spec.args
        .extend(["--set".to_string(), "train.signal_exit_code=75".to_string()]);
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || agent::run(&spec, &rx));
    wait_for_steps(tmp.path(), 3);
    tx.send(libc::SIGTERM).unwrap();
    let done = h.join().unwrap().unwrap();
    assert_eq!(
        done.exit_code, 75,
        "both ranks exit with the requeue status"
    );
    let steps = std::fs::read_to_string(tmp.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!((3..500).contains(&steps), "stopped after {steps} steps");
    assert!(tmp.path().join("lora.safetensors").exists());
}

/// Starts a 2-rank run of `steps` steps, SIGKILLs rank 1 once 3 steps are logged, and returns
/// the agent's result.
fn kill_rank_mid_run(
    dir: &Path,
    max_restarts: u32,
    steps: u64,
) -> (Result<agent::Finished, agent::LaunchError>, Vec<String>) {
    let mut spec = trainer_spec(dir, 1, 0, free_port(), steps);
    spec.max_restarts = max_restarts;
    spec.args
        .extend(["--set".to_string(), "checkpoint.every=2".to_string()]);
    let run_id = spec.run_id.clone();
    let h = std::thread::spawn(move || agent::run(&spec, &never()));
    wait_for_steps(dir, 5);
    let kept = crate::resume::lines_to_keep(dir);
    let pid = find_rank_pid(&run_id, 1, 0).expect("rank 1 process");
    // Safety: kill(2) on a pid we just found.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    (h.join().unwrap(), kept)
}

#[test]
#[cfg(target_os = "linux")]
fn a_killed_rank_stops_the_group_and_the_group_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let (done, kept) = kill_rank_mid_run(tmp.path(), 1, 60);
    let done = done.unwrap();
    assert_eq!((done.exit_code, done.restarts), (0, 1));
    // The restarted group continued from the last checkpoint instead of starting over.
    crate::resume::assert_resumed(tmp.path(), &kept);
    let metrics = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().count(),
        60,
        "the restarted group ran to the end"
    );
    assert!(tmp.path().join("lora.safetensors").exists());
}

#[test]
#[cfg(target_os = "linux")]
fn without_restarts_a_killed_rank_fails_the_job_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let err = kill_rank_mid_run(tmp.path(), 0, 60)
        .0
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rank 1 on node 0 was killed by signal 9"),
        "{err}"
    );
    assert!(err.contains("no restarts left"), "{err}");
    assert!(err.contains("last lines of rank 1"), "{err}");
}

#[test]
fn ranks_started_by_another_launcher_rendezvous_on_master_port_plus_one() {
    let tmp = tempfile::tempdir().unwrap();
    // torchrun would own MASTER_PORT; rank 0 hosts our store on MASTER_PORT + 1.
    let port = loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("0.0.0.0", p + 1)).is_ok() {
            break p;
        }
    };
    let spec = trainer_spec(tmp.path(), 1, 0, port, 4);
    let children: Vec<_> = (0..2)
        .map(|rank| {
            std::process::Command::new(&spec.program)
                .args(&spec.args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("MOSAIC_JOB_TOKEN", "external")
                .env_remove("MOSAIC_STORE")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let metrics = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
}
