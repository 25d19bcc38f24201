//! The per-node agent: start this node's ranks, watch them, forward signals, and when a rank
//! dies anywhere, stop the whole group and start it again while restarts remain.
//!
//! Agents coordinate through the rendezvous store (node 0's agent hosts it):
//! - `launcher/gen<g>/failed`: set by the first agent whose rank failed in generation g; every
//!   agent polls it and stops its ranks.
//! - `launcher/gen<g>/stopped`: a counter; once every node has stopped its ranks, all agents
//!   start generation g+1 together (or all give up).
//! - `launcher/exit`: a counter of agents that are done with the store (their ranks finished,
//!   or the job failed); node 0 keeps the store up until every node has counted itself
//!   (bounded), so no agent loses the store in the middle of a request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::logs::{pump, Stream, Tail};
use crate::topology::Topology;
use rendezvous::env as vars;
use rendezvous::{StoreClient, StoreError, StoreServer};

/// How often the agent looks at its ranks and the store.
const TICK: Duration = Duration::from_millis(100);
/// How long to let other ranks fail after the first failure, before naming a root cause.
const SETTLE: Duration = Duration::from_millis(300);
/// Lines of each rank's output kept for a failure report.
const TAIL_LINES: usize = 20;

#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The program each rank runs, and its arguments.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub nproc_per_node: usize,
    pub topology: Topology,
    pub token: String,
    pub run_id: String,
    pub max_restarts: u32,
    /// After asking ranks to stop (SIGTERM), how long to wait before SIGKILL.
    pub stop_timeout: Duration,
    /// How long to wait for the store (other nodes) and for the other nodes to stop.
    pub connect_timeout: Duration,
    /// Extra environment for the ranks.
    pub env: Vec<(String, String)>,
    /// The address node 0's store listens on (default: 127.0.0.1 for one node, else the
    /// address the master's name resolves to).
    pub bind: Option<String>,
    /// A node or rank whose heartbeat stops this long fails the group.
    pub heartbeat_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start rank {rank} ({program}): {err}")]
    Spawn {
        rank: usize,
        program: String,
        err: std::io::Error,
    },
    #[error("{what}\n{tail}")]
    Failed { what: String, tail: String },
    #[error("waiting for rank {rank}: {err}")]
    Wait { rank: usize, err: std::io::Error },
}

/// What the agent reports when the run ends without error: the exit status to pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub exit_code: i32,
    pub restarts: u32,
}

fn describe(status: &ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "exited".into(),
    }
}

/// Sends `sig` to a rank and everything it started: each rank leads its own process group
/// (see [`detach`]), so helpers it spawned are not left holding its output open.
pub fn send_signal(child: &Child, sig: i32) {
    #[cfg(unix)]
    // Safety: kill(2) on the process group of a child we spawned and have not reaped yet.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), sig);
    }
    #[cfg(not(unix))]
    let _ = (child, sig);
}

struct RankProc {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
    tail: Arc<Tail>,
    pumps: Vec<JoinHandle<()>>,
}

/// How long to wait for a rank's output to drain after it exited.
const DRAIN: Duration = Duration::from_secs(2);

impl RankProc {
    /// Waits for the log threads to copy the rest of the output, for at most [`DRAIN`]: a
    /// process the rank left behind may hold its pipes open indefinitely.
    fn join_pumps(&mut self) {
        let deadline = Instant::now() + DRAIN;
        while self.pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in self.pumps.drain(..) {
            if p.is_finished() {
                let _ = p.join();
            }
        }
    }
}

/// The group of this node's ranks for one generation.
struct Group {
    procs: Vec<RankProc>,
}

impl Group {
    fn spawn(spec: &LaunchSpec, store_addr: &str, generation: u32) -> Result<Self, LaunchError> {
        let n = spec.nproc_per_node;
        let world = n * spec.topology.nodes;
        let port = store_addr.rsplit(':').next().unwrap_or("0").to_string();
        let mut procs = Vec::with_capacity(n);
        for local in 0..n {
            let rank = spec.topology.node_rank * n + local;
            let mut cmd = Command::new(&spec.program);
            cmd.args(&spec.args)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", &spec.topology.master_host)
                .env("MASTER_PORT", &port)
                .env(vars::STORE, store_addr)
                .env(vars::TOKEN, &spec.token)
                .env(vars::RUN_ID, &spec.run_id)
                .env(vars::RESTART, generation.to_string())
                .env(
                    vars::CONNECT_TIMEOUT,
                    spec.connect_timeout.as_secs().max(1).to_string(),
                )
                .envs(spec.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            detach(&mut cmd);
            let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
                rank,
                program: spec.program.display().to_string(),
                err: source,
            })?;
            let tail = Tail::new(TAIL_LINES);
            let prefix = format!("[rank {rank}]");
            let mut pumps = Vec::new();
            let spawn_err = |source| LaunchError::Spawn {
                rank,
                program: "log thread".into(),
                err: source,
            };
            if let Some(out) = child.stdout.take() {
                pumps.push(
                    pump(out, prefix.clone(), Stream::Stdout, tail.clone()).map_err(spawn_err)?,
                );
            }
            if let Some(err) = child.stderr.take() {
                pumps.push(pump(err, prefix, Stream::Stderr, tail.clone()).map_err(spawn_err)?);
            }
            procs.push(RankProc {
                rank,
                child,
                status: None,
                tail,
                pumps,
            });
        }
        Ok(Self { procs })
    }

    /// Reaps exited ranks; returns the first newly failed one.
    fn poll(&mut self) -> Result<Option<usize>, LaunchError> {
        let mut failed = None;
        for (i, p) in self.procs.iter_mut().enumerate() {
            if p.status.is_some() {
                continue;
            }
            let st = p.child.try_wait().map_err(|source| LaunchError::Wait {
                rank: p.rank,
                err: source,
            })?;
            if let Some(st) = st {
                p.status = Some(st);
                if !st.success() && failed.is_none() {
                    failed = Some(i);
                }
            }
        }
        Ok(failed)
    }

    /// Among failed ranks, the likeliest cause ([`likeliest_cause`]); `first` when none stands
    /// out.
    fn root_cause(&self, first: usize) -> usize {
        let candidates: Vec<Candidate> = self
            .procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.status.is_some_and(|s| !s.success()))
            .map(|(i, p)| Candidate {
                index: i,
                status: p.status.unwrap_or_default(),
                last_error: p
                    .tail
                    .lines()
                    .into_iter()
                    .rev()
                    .find(|l| l.contains("error")),
            })
            .collect();
        likeliest_cause(&candidates).unwrap_or(first)
    }

    fn all_exited(&self) -> bool {
        self.procs.iter().all(|p| p.status.is_some())
    }

    fn signal_live(&self, sig: i32) {
        for p in self.procs.iter().filter(|p| p.status.is_none()) {
            send_signal(&p.child, sig);
        }
    }

    /// SIGTERM, then SIGKILL for any rank still alive after `grace`; waits for all.
    fn stop(&mut self, grace: Duration) -> Result<(), LaunchError> {
        #[cfg(unix)]
        self.signal_live(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while !self.all_exited() && Instant::now() < deadline {
            self.poll()?;
            std::thread::sleep(TICK);
        }
        for p in self.procs.iter_mut().filter(|p| p.status.is_none()) {
            #[cfg(unix)]
            send_signal(&p.child, libc::SIGKILL);
            let _ = p.child.kill();
            p.status = p.child.wait().ok();
        }
        // Ranks that exited on their own may have left helpers behind in their groups.
        #[cfg(unix)]
        for p in &self.procs {
            send_signal(&p.child, libc::SIGKILL);
        }
        for p in &mut self.procs {
            p.join_pumps();
        }
        Ok(())
    }

    /// The exit code to pass on once all ranks exited: 0, or the first non-zero code.
    fn exit_code(&self) -> i32 {
        self.procs
            .iter()
            .filter_map(|p| p.status.map(|s| s.code().unwrap_or(1)))
            .find(|&c| c != 0)
            .unwrap_or(0)
    }
}

/// Children in their own process group (a terminal's Ctrl-C reaches only the launcher, which
/// forwards it once) that die with the launcher.
fn detach(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        // Safety: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    #[cfg(not(unix))]
    let _ = cmd;
}

/// A failed rank, as the root-cause search sees it.
struct Candidate {
    index: usize,
    status: ExitStatus,
    /// The last line of its output that mentions an error.
    last_error: Option<String>,
}

/// Error messages that report a peer's failure rather than a failure of their own.
const SECONDARY: [&str; 8] = [
    "connection to rank",
    "cannot connect to rank",
    "waiting for rank",
    "has not completed after",
    "communication thread has stopped",
    "refused to start",
    "ranks disagree",
    "is stuck or gone",
];

/// The likeliest cause among failed ranks: one killed by a signal, else one whose status is not
/// 1 (the status a rank exits with when a peer vanished), else one whose own error is not about
/// a peer; None when none stands out.
fn likeliest_cause(failed: &[Candidate]) -> Option<usize> {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(c) = failed.iter().find(|c| c.status.signal().is_some()) {
            return Some(c.index);
        }
        if let Some(c) = failed.iter().find(|c| c.status.code() != Some(1)) {
            return Some(c.index);
        }
    }
    failed
        .iter()
        .find(|c| {
            c.last_error
                .as_deref()
                .is_some_and(|l| !SECONDARY.iter().any(|m| l.contains(m)))
        })
        .map(|c| c.index)
}

/// The address node 0's store listens on: `--bind`, else 127.0.0.1 for a one-node job (nothing
/// outside the machine needs it), else the first non-loopback address the master's name
/// resolves to (the interface the other nodes reach), else every interface, with a warning.
fn store_bind_ip(spec: &LaunchSpec) -> String {
    use std::net::ToSocketAddrs;
    if let Some(b) = &spec.bind {
        return b.clone();
    }
    if spec.topology.nodes == 1 {
        return "127.0.0.1".into();
    }
    let resolved = (spec.topology.master_host.as_str(), 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| !a.ip().is_loopback()));
    match resolved {
        Some(a) => a.ip().to_string(),
        None => {
            crate::say!(
                "launcher: {} resolves to no non-loopback address here: the store listens on every interface (pass --bind ADDR to choose one)",
                spec.topology.master_host
            );
            "0.0.0.0".into()
        }
    }
}

/// Binds node 0's store; returns it and the address clients use.
fn host_store(spec: &LaunchSpec) -> Result<(StoreServer, String), LaunchError> {
    let topo = &spec.topology;
    let port = topo.master_port.unwrap_or(0);
    let ip = store_bind_ip(spec);
    let s = match StoreServer::bind(&format!("{ip}:{port}"), &spec.token) {
        Ok(s) => s,
        Err(e) if spec.bind.is_none() && ip != "0.0.0.0" && ip != "127.0.0.1" => {
            crate::say!("launcher: cannot listen on {ip} ({e}); listening on every interface");
            StoreServer::bind(&format!("0.0.0.0:{port}"), &spec.token)?
        }
        Err(e) => return Err(e.into()),
    };
    let host = if topo.nodes == 1 {
        "127.0.0.1"
    } else {
        topo.master_host.as_str()
    };
    let addr = format!("{host}:{}", s.local_addr().port());
    Ok((s, addr))
}

/// Connects to the store, for at most `spec.connect_timeout`, giving up at once on a signal.
fn connect_store(
    spec: &LaunchSpec,
    addr: &str,
    signals: &Receiver<i32>,
) -> Result<StoreClient, LaunchError> {
    let started = Instant::now();
    loop {
        let left = spec.connect_timeout.saturating_sub(started.elapsed());
        match StoreClient::connect(addr, &spec.token, left.min(Duration::from_secs(1))) {
            Ok(c) => return Ok(c),
            Err(e @ StoreError::Refused { .. }) => return Err(e.into()),
            Err(e) if left.is_zero() => return Err(e.into()),
            Err(_) => {}
        }
        if let Ok(sig) = signals.try_recv() {
            return Err(LaunchError::Failed {
                what: format!(
                    "launcher: signal {sig} while waiting for the store at {addr}; nothing was started"
                ),
                tail: String::new(),
            });
        }
    }
}

/// Runs the job on this node until it ends. `signals` delivers signals the launcher received
/// (SIGTERM, SIGINT, SIGUSR1), which are forwarded to the ranks.
pub fn run(spec: &LaunchSpec, signals: &Receiver<i32>) -> Result<Finished, LaunchError> {
    let topo = &spec.topology;
    let mut server = None;
    let store_addr = if topo.node_rank == 0 {
        let (s, addr) = host_store(spec)?;
        server = Some(s);
        addr
    } else {
        format!(
            "{}:{}",
            topo.master_host,
            topo.master_port.unwrap_or(crate::topology::DEFAULT_PORT)
        )
    };
    let mut store = connect_store(spec, &store_addr, signals)?;
    crate::say!(
        "launcher: node {}/{} ({}), {} ranks per node, world size {}, store {}",
        topo.node_rank,
        topo.nodes,
        topo.source,
        spec.nproc_per_node,
        topo.nodes * spec.nproc_per_node,
        store_addr
    );
    let mut generation = 0u32;
    let mut signalled = false;
    let result = loop {
        let mut group = Group::spawn(spec, &store_addr, generation)?;
        match watch(spec, &mut group, &mut store, generation, signals)? {
            Outcome::Done(code, by_signal) => {
                signalled = by_signal;
                break Ok(Finished {
                    exit_code: code,
                    restarts: generation,
                });
            }
            Outcome::Failed {
                what,
                tail,
                store_lost,
            } => {
                let mut interrupted = signals.try_recv().is_ok();
                signalled |= interrupted;
                if !store_lost && !interrupted {
                    // Every node stops its group before any restarts; a node that does not
                    // report within the heartbeat timeout is gone and is not waited for.
                    let stopped = format!("launcher/gen{generation}/stopped");
                    let bound = spec.heartbeat_timeout + spec.stop_timeout;
                    interrupted = store
                        .add(&stopped, 1)
                        .map_err(LaunchError::from)
                        .and_then(|_| wait_count(&mut store, &stopped, topo.nodes, bound, signals))
                        .unwrap_or(false);
                }
                if generation < spec.max_restarts && !interrupted && !store_lost {
                    generation += 1;
                    crate::say!(
                        "launcher: {what}; restarting the group (restart {generation} of {})",
                        spec.max_restarts
                    );
                    continue;
                }
                let why = if interrupted {
                    "a signal asked the launcher to stop".to_string()
                } else if store_lost {
                    "no restart without node 0's store".to_string()
                } else {
                    format!("no restarts left (--max-restarts {})", spec.max_restarts)
                };
                break Err(LaunchError::Failed {
                    what: format!("launcher: {what}; {why}"),
                    tail,
                });
            }
        }
    };
    if store.add("launcher/exit", 1).is_ok() && server.is_some() && !signalled {
        // Other nodes still talk to the store until they are done: keep it up, bounded, and
        // not past a signal (a signalled job does not wait for nodes that may never come).
        let bound = spec.heartbeat_timeout + spec.stop_timeout;
        let _ = wait_count(&mut store, "launcher/exit", topo.nodes, bound, signals);
    }
    drop(server);
    result
}

/// The heartbeats this node sends and watches: its own, every node's launcher, and its ranks'.
struct Beats {
    mine: String,
    /// Key -> (what beats there, last value, when it last changed).
    watched: HashMap<String, (String, i64, Instant)>,
    last_sent: Instant,
}

impl Beats {
    fn new(spec: &LaunchSpec, generation: u32, group: &Group) -> Self {
        let node = spec.topology.node_rank;
        let mut watched = HashMap::new();
        let now = Instant::now();
        for n in (0..spec.topology.nodes).filter(|&n| n != node) {
            watched.insert(
                format!("launcher/gen{generation}/beat/node{n}"),
                (format!("node {n}"), i64::MIN, now),
            );
        }
        let prefix = format!("{}/gen{generation}", spec.run_id);
        for p in &group.procs {
            watched.insert(
                vars::rank_beat_key(&prefix, p.rank),
                (format!("rank {}", p.rank), i64::MIN, now),
            );
        }
        Self {
            mine: format!("launcher/gen{generation}/beat/node{node}"),
            watched,
            last_sent: now - vars::HEARTBEAT_EVERY,
        }
    }

    /// Beats, then returns what has not beaten for `timeout` (None: all alive). A rank that
    /// has not beaten yet (still starting) or has exited is not judged; a node is judged from
    /// the start of the generation.
    fn check(
        &mut self,
        store: &mut StoreClient,
        group: &Group,
        timeout: Duration,
    ) -> Result<Option<String>, StoreError> {
        if self.last_sent.elapsed() >= vars::HEARTBEAT_EVERY {
            store.add(&self.mine, 1)?;
            self.last_sent = Instant::now();
        }
        let exited: Vec<String> = group
            .procs
            .iter()
            .filter(|p| p.status.is_some())
            .map(|p| format!("rank {}", p.rank))
            .collect();
        for (key, (who, last, since)) in &mut self.watched {
            let now = store.add(key, 0)?;
            if now != *last {
                (*last, *since) = (now, Instant::now());
                continue;
            }
            let started = now > 0 || who.starts_with("node");
            if started && !exited.contains(who) && since.elapsed() > timeout {
                return Ok(Some(format!(
                    "{who} sent no heartbeat for {timeout:?} (it died, froze or was cut off)"
                )));
            }
        }
        Ok(None)
    }
}

/// How one generation ended on this node.
enum Outcome {
    /// Every rank exited: their status, and whether a signal asked them to.
    Done(i32, bool),
    Failed {
        what: String,
        tail: String,
        /// The store (node 0) is gone: nothing more can be agreed through it.
        store_lost: bool,
    },
}

/// Watches one generation until every rank exits or the group fails somewhere.
fn watch(
    spec: &LaunchSpec,
    group: &mut Group,
    store: &mut StoreClient,
    generation: u32,
    signals: &Receiver<i32>,
) -> Result<Outcome, LaunchError> {
    let failed_key = format!("launcher/gen{generation}/failed");
    let mut forwarded: HashMap<i32, u32> = HashMap::new();
    let mut beats = Beats::new(spec, generation, group);
    let mut last_store_check = Instant::now();
    loop {
        while let Ok(sig) = signals.try_recv() {
            let n = forwarded.entry(sig).or_default();
            *n += 1;
            #[cfg(unix)]
            if sig == libc::SIGINT && *n > 1 {
                crate::say!("launcher: second interrupt: killing all ranks");
                group.signal_live(libc::SIGKILL);
                continue;
            }
            crate::say!("launcher: forwarding signal {sig} to the ranks");
            group.signal_live(sig);
        }
        if let Some(first) = group.poll()? {
            if forwarded.is_empty() {
                // Peers of a dead rank fail right after it (their connections break): give
                // them a moment, then blame the most likely root cause.
                std::thread::sleep(SETTLE);
                group.poll()?;
                let i = group.root_cause(first);
                let (rank, status) = (group.procs[i].rank, group.procs[i].status);
                let what = format!(
                    "rank {rank} on node {} {}",
                    spec.topology.node_rank,
                    describe(&status.unwrap_or_default())
                );
                let store_lost = match store.try_get(&failed_key) {
                    Ok(None) => store.set(&failed_key, what.as_bytes()).is_err(),
                    Ok(Some(_)) => false,
                    Err(_) => true,
                };
                group.stop(spec.stop_timeout)?;
                let tail = group.procs[i]
                    .tail
                    .lines()
                    .iter()
                    .map(|l| format!("  [rank {rank}] {l}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Ok(Outcome::Failed {
                    what,
                    tail: format!("last lines of rank {rank}:\n{tail}"),
                    store_lost,
                });
            }
            // After a forwarded signal a non-zero status is the requested stop, not a crash.
        }
        if group.all_exited() {
            for p in &mut group.procs {
                p.join_pumps();
            }
            return Ok(Outcome::Done(group.exit_code(), !forwarded.is_empty()));
        }
        if last_store_check.elapsed() >= TICK * 5 {
            last_store_check = Instant::now();
            let verdict = store.try_get(&failed_key).and_then(|failed| match failed {
                Some(what) => Ok(Some(String::from_utf8_lossy(&what).into_owned())),
                None => beats
                    .check(store, group, spec.heartbeat_timeout)
                    .map(|silent| {
                        silent.inspect(|what| {
                            let _ = store.set(&failed_key, what.as_bytes());
                        })
                    }),
            });
            let (what, store_lost) = match verdict {
                Ok(None) => {
                    std::thread::sleep(TICK);
                    continue;
                }
                Ok(Some(what)) => (what, false),
                Err(e) => (
                    format!("the rendezvous store on node 0 is unreachable ({e}); node 0 died or the network is cut"),
                    true,
                ),
            };
            group.stop(spec.stop_timeout)?;
            return Ok(Outcome::Failed {
                what,
                tail: "(see the failed node's launcher for its ranks' output)".into(),
                store_lost,
            });
        }
        std::thread::sleep(TICK);
    }
}

/// Waits until counter `key` reaches `n`, for at most `wait`; returns early, with `true`, when
/// a signal arrives.
fn wait_count(
    store: &mut StoreClient,
    key: &str,
    n: usize,
    wait: Duration,
    signals: &Receiver<i32>,
) -> Result<bool, LaunchError> {
    let started = Instant::now();
    loop {
        if signals.try_recv().is_ok() {
            return Ok(true);
        }
        let have = store.add(key, 0)?;
        if have as usize >= n {
            return Ok(false);
        }
        if started.elapsed() > wait {
            return Err(StoreError::Timeout {
                key: key.to_string(),
                waited: started.elapsed(),
                hint: format!(" ({have} of {n} nodes reported)"),
            }
            .into());
        }
        std::thread::sleep(TICK);
    }
}

#[cfg(all(test, unix))]
mod cause_tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn failed(index: usize, code: i32, last: &str) -> Candidate {
        Candidate {
            index,
            status: ExitStatus::from_raw(code << 8),
            last_error: Some(last.to_string()),
        }
    }

    #[test]
    fn a_rank_reporting_its_own_error_is_blamed_over_one_reporting_a_peer() {
        let ranks = [
            failed(
                0,
                1,
                "trainer: error: training failed: all_reduce: the connection to rank 3 failed",
            ),
            failed(
                3,
                1,
                "trainer: error: training failed: config key `train.batch_size`: too large",
            ),
        ];
        assert_eq!(likeliest_cause(&ranks), Some(3));
        let killed = Candidate {
            index: 5,
            status: ExitStatus::from_raw(9),
            last_error: None,
        };
        assert_eq!(
            likeliest_cause(&[failed(0, 1, "error: x"), killed]),
            Some(5),
            "a signal first"
        );
        let only_peers = [failed(0, 1, "error: waiting for rank 1 timed out")];
        assert_eq!(likeliest_cause(&only_peers), None);
    }
}
