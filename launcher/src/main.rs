//! `launcher`: start one `trainer` rank per GPU (or a number of CPU ranks) on this node, host the
//! rendezvous store on node 0, forward signals, and restart the group when a rank dies.
//!
//! Exit status: what the ranks exited with (0, or the configured requeue status after a
//! forwarded signal); 1 when a rank failed and no restarts were left or on a launcher error;
//! 2 for a bad command line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use launcher::agent::{self, LaunchSpec};
use launcher::topology::{self, NodeArgs};

#[derive(Parser)]
#[command(
    name = "launcher",
    version,
    about = "Run MOSAIC training on every GPU (or several CPU ranks) of one or more nodes",
    after_help = "Examples:\n  launcher --config configs/tiny-cpu.toml\n  launcher --nodes 2 --node-rank 0 --master-addr node0:29500 --config configs/mosaic-paper-512.toml\n  launcher --config c.toml -- --set train.max_steps=10\n  launcher --job pretrain-base --config configs/tiny-base.toml\nUnder SLURM (one launcher per node), --nodes, --node-rank and --master-addr come from SLURM_*."
)]
struct Cli {
    /// Run config (TOML), passed to every rank as `trainer <JOB> --config FILE`.
    #[arg(long)]
    config: PathBuf,
    /// What every rank runs: `train` (a LoRA) or `pretrain-base` (all weights of a small
    /// base, data parallel).
    #[arg(long, value_enum, default_value_t = Job::Train)]
    job: Job,
    /// Number of nodes (default 1, or SLURM_NNODES).
    #[arg(long)]
    nodes: Option<usize>,
    /// This node's index, 0..nodes (or SLURM_NODEID).
    #[arg(long)]
    node_rank: Option<usize>,
    /// Node 0's address, HOST[:PORT] (port 29500 when several nodes and none given).
    #[arg(long)]
    master_addr: Option<String>,
    /// Ranks on this node: a number, or "auto" (one per GPU for a CUDA config, else --cpu-ranks).
    #[arg(long, default_value = "auto")]
    nproc_per_node: String,
    /// Ranks per node for a CPU config with --nproc-per-node auto.
    #[arg(long, default_value_t = 2)]
    cpu_ranks: usize,
    /// Restart the whole group this many times after a rank fails.
    #[arg(long, default_value_t = 0)]
    max_restarts: u32,
    /// Names the job in logs and store keys (default: SLURM_JOB_ID, else "mosaic").
    #[arg(long)]
    run_id: Option<String>,
    /// Seconds between asking ranks to stop (SIGTERM) and killing them, when a group fails.
    #[arg(long, default_value_t = 10.0)]
    stop_timeout: f64,
    /// Seconds to wait for node 0 and for the other nodes.
    #[arg(long, default_value_t = 300.0)]
    connect_timeout: f64,
    /// The address node 0's store listens on (default: 127.0.0.1 for one node, else the
    /// address the master's name resolves to here).
    #[arg(long)]
    bind: Option<String>,
    /// The trainer binary (default: `trainer` next to this launcher).
    #[arg(long)]
    trainer: Option<PathBuf>,
    /// Extra arguments for every rank's `trainer <JOB>`, e.g. -- --set train.max_steps=10.
    #[arg(last = true)]
    trainer_args: Vec<String>,
}

/// The trainer subcommand the ranks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Job {
    Train,
    PretrainBase,
}

impl Job {
    fn subcommand(self) -> &'static str {
        match self {
            Job::Train => "train",
            Job::PretrainBase => "pretrain-base",
        }
    }
}

/// `trainer` next to this executable, else on PATH.
fn find_trainer(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.exists() {
            bail!("--trainer {}: no such file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the launcher executable")?;
    let name = format!("trainer{}", std::env::consts::EXE_SUFFIX);
    if let Some(sibling) = exe.parent().map(|d| d.join(&name)) {
        if sibling.exists() {
            return Ok(sibling);
        }
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(&name))
            .find(|p| p.exists())
    });
    on_path.with_context(|| {
        format!(
            "cannot find the trainer binary next to {} or on PATH; build it (`cargo build --bins`) or pass --trainer",
            exe.display()
        )
    })
}

/// Config key `key` (dotted) of the config file, after any `--set key=...` among the trainer
/// args; None when neither sets it.
fn config_value(config: &Path, extra: &[String], key: &str) -> anyhow::Result<Option<String>> {
    use std::io::Read;
    // At most 1 MiB, as the trainer reads it: a device or a wrong file is not read forever.
    let mut text = String::new();
    std::fs::File::open(config)
        .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
        .with_context(|| format!("reading config {}", config.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing config {}", config.display()))?;
    let mut v: Option<&toml::Value> = None;
    let mut t = Some(&table);
    for part in key.split('.') {
        v = t.and_then(|t| t.get(part));
        t = v.and_then(|v| v.as_table());
    }
    let mut value = v.map(|v| match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    for pair in extra.windows(2) {
        if pair[0] == "--set" {
            if let Some(v) = pair[1].strip_prefix(&format!("{key}=")) {
                value = Some(v.trim_matches('"').to_string());
            }
        }
    }
    Ok(value)
}

/// `model.device` of the config (default "cpu").
fn config_device(config: &Path, extra: &[String]) -> anyhow::Result<String> {
    Ok(config_value(config, extra, "model.device")?.unwrap_or_else(|| "cpu".into()))
}

/// `distributed.heartbeat_timeout_s` of the config (default 30 s; a config the launcher cannot
/// read is left for the ranks to report).
fn heartbeat_timeout(config: &Path, extra: &[String]) -> anyhow::Result<Duration> {
    let key = "distributed.heartbeat_timeout_s";
    let s = match config_value(config, extra, key).unwrap_or(None) {
        None => 30.0,
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .with_context(|| format!("{key} = {v}: expected a positive number of seconds"))?,
    };
    Ok(Duration::from_secs_f64(s))
}

/// Visible GPUs: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`.
fn gpu_count() -> usize {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let v = v.trim();
        if v.is_empty() || v == "-1" {
            return 0;
        }
        return v.split(',').filter(|s| !s.trim().is_empty()).count();
    }
    std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count()
        })
        .unwrap_or(0)
}

fn ranks_per_node(cli: &Cli) -> anyhow::Result<usize> {
    if cli.nproc_per_node != "auto" {
        let n: usize = cli.nproc_per_node.parse().with_context(|| {
            format!(
                "--nproc-per-node {:?}: expected a number or \"auto\"",
                cli.nproc_per_node
            )
        })?;
        if n == 0 {
            bail!("--nproc-per-node must be at least 1");
        }
        return Ok(n);
    }
    let device = config_device(&cli.config, &cli.trainer_args)?;
    if device == "cuda" {
        let n = gpu_count();
        if n == 0 {
            bail!(
                "{} asks for model.device = \"cuda\" but no GPU is visible (CUDA_VISIBLE_DEVICES, nvidia-smi); pass --nproc-per-node N to force a count",
                cli.config.display()
            );
        }
        Ok(n)
    } else {
        Ok(cli.cpu_ranks.max(1))
    }
}

fn spec(cli: &Cli) -> anyhow::Result<LaunchSpec> {
    let env = |k: &str| std::env::var(k).ok();
    let topology = topology::resolve(
        &NodeArgs {
            nodes: cli.nodes,
            node_rank: cli.node_rank,
            master_addr: cli.master_addr.clone(),
        },
        env,
    )?;
    let token = match env(topology::TOKEN_VAR) {
        Some(t) if !t.is_empty() => t,
        _ if topology.nodes == 1 => rendezvous::random_token(),
        _ => bail!(
            "{} nodes need the same secret job token on every node: set {} (for example `export {}=$(openssl rand -hex 16)` in the batch script before srun)",
            topology.nodes,
            topology::TOKEN_VAR,
            topology::TOKEN_VAR
        ),
    };
    let run_id = cli
        .run_id
        .clone()
        .or_else(|| env("SLURM_JOB_ID"))
        .unwrap_or_else(|| "mosaic".into());
    let mut args = vec![
        cli.job.subcommand().to_string(),
        "--config".into(),
        cli.config.display().to_string(),
    ];
    args.extend(cli.trainer_args.iter().cloned());
    let mut extra_env = Vec::new();
    if !std::io::stderr().is_terminal() {
        extra_env.push(("NO_COLOR".to_string(), "1".to_string()));
    }
    let nproc_per_node = ranks_per_node(cli)?;
    let cores = launcher::threads::available_cores();
    match launcher::threads::rank_env(
        env(launcher::threads::VAR).as_deref(),
        cores,
        nproc_per_node,
    ) {
        Some((k, v)) => {
            launcher::say!(
                "launcher: {nproc_per_node} rank(s) on {cores} core(s): {k}={v} for each (set {k} to choose)"
            );
            extra_env.push((k, v));
        }
        None => launcher::say!(
            "launcher: {} from the environment for each rank",
            launcher::threads::VAR
        ),
    }
    let secs = |name: &str, v: f64| -> anyhow::Result<Duration> {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} {v}: expected a non-negative number of seconds");
        }
        Ok(Duration::from_secs_f64(v))
    };
    Ok(LaunchSpec {
        program: find_trainer(cli.trainer.clone())?,
        args,
        nproc_per_node,
        topology,
        token,
        run_id,
        max_restarts: cli.max_restarts,
        stop_timeout: secs("--stop-timeout", cli.stop_timeout)?,
        connect_timeout: secs("--connect-timeout", cli.connect_timeout)?,
        env: extra_env,
        bind: cli.bind.clone(),
        heartbeat_timeout: heartbeat_timeout(&cli.config, &cli.trainer_args)?,
    })
}

/// Signals the launcher forwards, delivered on a channel.
fn signal_channel() -> anyhow::Result<mpsc::Receiver<i32>> {
    let (tx, rx) = mpsc::channel();
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])
            .context("installing signal handlers")?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
            })
            .context("starting the signal thread")?;
    }
    #[cfg(not(unix))]
    drop(tx);
    Ok(rx)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = spec(&cli).and_then(|spec| {
        let signals = signal_channel()?;
        Ok(agent::run(&spec, &signals)?)
    });
    match result {
        Ok(done) => {
            if done.restarts > 0 {
                launcher::say!("launcher: finished after {} restart(s)", done.restarts);
            }
            ExitCode::from(u8::try_from(done.exit_code).unwrap_or(1))
        }
        Err(e) => {
            launcher::say!("launcher: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
