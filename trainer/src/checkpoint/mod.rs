//! Checkpoints (design.md §7): everything needed to continue a run exactly.
//!
//! Layout under the checkpoint folder (default `<run dir>/checkpoints`):
//! ```text
//! step-00000120/lora.safetensors        LoRA variables by internal name (<module>.lora_A/B)
//!                                       (`trainer pretrain-base`: base.safetensors, every
//!                                       weight of the base by its diffusers name)
//! step-00000120/optimizer.safetensors   AdamW moments: <name>.exp_avg, <name>.exp_avg_sq
//! step-00000120/ema.safetensors         EMA shadows (when EMA is on)
//! step-00000120/config.toml             the resolved config of the run
//! step-00000120/state.json              step, data cursor, world size, fingerprint, sha256s
//! LATEST                                "step-00000120", written last
//! ```
//! A checkpoint is written to `.tmp-step-...`, every file fsynced, then renamed; LATEST is
//! replaced (write, fsync, rename) only after that. A process killed at any point leaves the
//! previous checkpoint and LATEST intact. Loading checks every file's sha256; a damaged
//! checkpoint is skipped with a warning in favour of the newest older one that verifies.
//!
//! Random state: every draw (noise, t, points, shuffles) is a pure function of (seed, purpose,
//! step, sample slot) (`flux::rng`), so the seed and the step are the whole RNG state of every
//! rank.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

#[cfg(test)]
use candle_core::DType;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

mod resume;
mod retention;
mod schedule;

pub use resume::{find, Found, Ledger, Progress, Trainables};
pub use retention::Retention;
pub use schedule::{Checkpointed, Checkpointer};

use crate::error::{Result, TrainerError};
use crate::storage::{Location, Remote};
use datasets::Cursor;

pub const FORMAT: u32 = 1;
pub const LATEST: &str = "LATEST";
const STATE: &str = "state.json";
const CONFIG: &str = "config.toml";
pub const LORA_FILE: &str = "lora.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
/// A pretrained base's variables (`trainer pretrain-base`), by their diffusers names.
pub const BASE_FILE: &str = "base.safetensors";

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// Optimizer steps completed; training continues with step index `step`.
    pub step: u64,
    /// The loader position after `step` steps (synthetic source).
    pub cursor: Cursor,
    /// Every rank's shard position after `step` steps, by rank (shards source).
    #[serde(default)]
    pub data_cursors: Vec<datasets::Cursor>,
    pub world_size: usize,
    /// Samples per global micro-batch (batch_size x world) when written.
    pub global_batch: usize,
    pub fingerprint: String,
    pub seed: u64,
    /// How random draws are made (there is no other RNG state to save).
    pub rng: String,
    /// AdamW's update count (bias correction).
    pub adam_t: u64,
    /// Updates skipped so far for non-finite losses.
    pub skipped: u64,
    /// sha256 (hex) of every other file of the checkpoint.
    pub files: BTreeMap<String, String>,
    /// The run this checkpoint continues: drawn when a run starts from scratch, kept by every
    /// resume. Retention deletes only checkpoints of its own lineage. Empty in checkpoints
    /// written before lineages existed.
    #[serde(default)]
    pub lineage: String,
    /// Every rank's data report so far (shards source), by rank: a resumed run's reports
    /// continue from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_reports: Vec<datasets::DataReport>,
}

pub const RNG_SCHEME: &str =
    "stateless: ChaCha8 streams keyed by (seed, purpose, step, sample slot), see flux/src/rng.rs";

/// What a checkpoint holds, detached from the live run (tensors copied to the CPU), so a
/// background thread can write it while training goes on.
pub struct Snapshot {
    pub state: State,
    pub config_toml: String,
    /// File name -> tensors by name.
    pub files: Vec<(&'static str, Vec<(String, Tensor)>)>,
}

/// A CPU copy that later in-place updates (`Var::set`) cannot reach.
pub fn detach(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.copy()?)
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> TrainerError {
    TrainerError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// sha256 of `bytes` as lowercase hex (file hashes, config fingerprints).
pub use datasets::sha256_hex;

/// Writes `bytes` to `path` and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| TrainerError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainerError::io(path, e))?;
    f.sync_all().map_err(|e| TrainerError::io(path, e))
}

/// fsyncs a directory, so a rename inside it is durable.
fn sync_dir(path: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| TrainerError::io(path, e))?;
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Checkpoint folder names under `root`, newest first.
pub fn list(root: &Location) -> Result<Vec<(u64, String)>> {
    let names: Vec<String> = match root {
        Location::Local(p) => std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Location::Remote(r) => r.list_dirs()?,
    };
    let mut v: Vec<(u64, String)> = names
        .into_iter()
        .filter_map(|n| step_of(&n).map(|s| (s, n)))
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(v)
}

/// File name and bytes.
type FileBytes = (String, Vec<u8>);

/// Serialized files of a snapshot and the state.json that lists their sha256.
fn serialize(snap: &Snapshot) -> Result<(Vec<FileBytes>, Vec<u8>)> {
    let mut state = snap.state.clone();
    let mut files = Vec::new();
    for (file, tensors) in &snap.files {
        let bytes =
            safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), None)
                .map_err(|e| TrainerError::Serialize {
                    what: "a checkpoint's tensors",
                    source: Box::new(e),
                })?;
        state.files.insert(file.to_string(), sha256_hex(&bytes));
        files.push((file.to_string(), bytes));
    }
    let config = snap.config_toml.as_bytes().to_vec();
    state.files.insert(CONFIG.to_string(), sha256_hex(&config));
    files.push((CONFIG.to_string(), config));
    let json = serde_json::to_vec_pretty(&state).map_err(|e| TrainerError::Serialize {
        what: "a checkpoint's state.json",
        source: Box::new(e),
    })?;
    Ok((files, json))
}

/// Writes `snap` under `root`, points LATEST at it and applies `retention` (the newest `keep`
/// verified checkpoints of the snapshot's lineage stay). Returns where it went. A failure (a
/// full disk, an unreachable store) leaves the previous checkpoint and LATEST in charge.
pub fn write(
    root: &Location,
    snap: &Snapshot,
    keep: usize,
    retention: &mut Retention,
) -> Result<PathBuf> {
    let name = step_dir_name(snap.state.step);
    set_aside_existing(root, &name)?;
    let written = match root {
        Location::Local(dir) => write_local(dir, &name, snap),
        Location::Remote(r) => write_remote(r, &name, snap),
    };
    let written = written.map_err(|e| TrainerError::Checkpoint {
        path: root.child(&name),
        reason: format!(
            "could not be written ({e}); the previous checkpoint and LATEST are unchanged"
        ),
    })?;
    retention.apply(root, &snap.state.lineage, keep)?;
    Ok(written)
}

/// A folder already named like the checkpoint about to be written (a damaged one the run
/// resumed before, or another run's) is moved aside rather than overwritten: to
/// `corrupt-<name>` when it does not verify, else to `replaced-<name>`.
fn set_aside_existing(root: &Location, name: &str) -> Result<()> {
    let exists = match root {
        Location::Local(p) => p.join(name).exists(),
        Location::Remote(r) => !r.list_prefix(name)?.is_empty(),
    };
    if !exists {
        return Ok(());
    }
    match verify(root, name) {
        Err(e) => set_aside(root, name, "corrupt", &flux::chain(&e)),
        Ok(_) => set_aside(
            root,
            name,
            "replaced",
            "a checkpoint of the same step is being written",
        ),
    }
    .map(|_| ())
}

/// Renames checkpoint `name` to `<prefix>-<name>` (numbered when taken), where no retention
/// or resume looks; returns the new name.
fn set_aside(root: &Location, name: &str, prefix: &str, why: &str) -> Result<String> {
    let mut to = format!("{prefix}-{name}");
    let mut n = 1;
    while match root {
        Location::Local(p) => p.join(&to).exists(),
        Location::Remote(r) => !r.list_prefix(&to)?.is_empty(),
    } {
        n += 1;
        to = format!("{prefix}-{name}.{n}");
    }
    root.rename_dir(name, &to)?;
    tracing::warn!(checkpoint = %root.name(name), moved_to = %root.name(&to), "checkpoint set aside: {why}");
    Ok(to)
}

/// On an object store each put is atomic but there is no rename: the files go first, then
/// state.json (a folder without it, or whose files do not match it, is never loaded), then
/// LATEST.
fn write_remote(r: &Remote, name: &str, snap: &Snapshot) -> Result<PathBuf> {
    let at = PathBuf::from(format!("{}/{name}", r.url()));
    let (files, state) = serialize(snap)?;
    for (file, bytes) in files {
        r.put(&format!("{name}/{file}"), bytes)?;
    }
    r.put(&format!("{name}/{STATE}"), state)?;
    r.put(LATEST, format!("{name}\n").into_bytes())?;
    Ok(at)
}

/// In a folder: a temporary folder, every file fsynced, renamed, then LATEST replaced.
fn write_local(root: &Path, name: &str, snap: &Snapshot) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| TrainerError::io(root, e))?;
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let written = write_into(root, &tmp, name, snap);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

fn write_into(root: &Path, tmp: &Path, name: &str, snap: &Snapshot) -> Result<PathBuf> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(|e| TrainerError::io(tmp, e))?;
    }
    std::fs::create_dir_all(tmp).map_err(|e| TrainerError::io(tmp, e))?;
    let (files, state) = serialize(snap)?;
    for (file, bytes) in files {
        write_synced(&tmp.join(file), &bytes)?;
    }
    write_synced(&tmp.join(STATE), &state)?;
    sync_dir(tmp)?;
    let dest = root.join(name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| TrainerError::io(&dest, e))?;
    }
    std::fs::rename(tmp, &dest).map_err(|e| TrainerError::io(&dest, e))?;
    sync_dir(root)?;
    let latest_tmp = root.join(format!(".{LATEST}.tmp"));
    write_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
    std::fs::rename(&latest_tmp, root.join(LATEST))
        .map_err(|e| TrainerError::io(&root.join(LATEST), e))?;
    sync_dir(root)?;
    Ok(dest)
}

/// Writes checkpoints on a background thread, one at a time.
#[derive(Default)]
pub struct Writer {
    pending: Option<JoinHandle<Result<PathBuf>>>,
    /// What retention has verified so far, shared with the writing thread.
    retention: std::sync::Arc<std::sync::Mutex<Retention>>,
}

impl Writer {
    /// Waits for the previous save, then starts writing `snap`.
    pub fn save(&mut self, root: Location, snap: Snapshot, keep: usize) -> Result<()> {
        self.wait()?;
        let retention = self.retention.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let mut r = retention.lock().unwrap_or_else(|p| p.into_inner());
                write(&root, &snap, keep, &mut r)
            })
            .map_err(|e| TrainerError::io(Path::new("checkpoint thread"), e))?;
        self.pending = Some(handle);
        Ok(())
    }

    /// Waits for the save in flight; returns where it went.
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        match self.pending.take() {
            None => Ok(None),
            Some(h) => {
                let path = h.join().map_err(|_| {
                    ckpt_err(Path::new("checkpoint thread"), "the writer thread panicked")
                })??;
                tracing::info!(path = %path.display(), "checkpoint written");
                Ok(Some(path))
            }
        }
    }
}

/// A checkpoint read back and verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: State,
    pub config_toml: String,
    /// File name -> tensors by name.
    pub tensors: HashMap<String, HashMap<String, Tensor>>,
}

/// Reads and verifies checkpoint `name` under `root`.
pub fn load(root: &Location, name: &str) -> Result<Loaded> {
    let dir = root.child(name);
    let mut tensors = HashMap::new();
    let mut config_toml = String::new();
    let state = read_verified(root, name, |file, bytes| {
        if file == CONFIG {
            config_toml = String::from_utf8_lossy(&bytes).into_owned();
        } else {
            let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|e| TrainerError::read(&dir.join(file), e))?;
            tensors.insert(file.to_string(), map);
        }
        Ok(())
    })?;
    Ok(Loaded {
        dir,
        state,
        config_toml,
        tensors,
    })
}

/// Checks checkpoint `name` under `root` (state.json and every file's sha256) without keeping
/// its contents; returns its state.
pub fn verify(root: &Location, name: &str) -> Result<State> {
    read_verified(root, name, |_, _| Ok(()))
}

/// The state.json of checkpoint `name`, unverified (None when it cannot be read).
pub fn peek_state(root: &Location, name: &str) -> Option<State> {
    let bytes = root.get(&format!("{name}/{STATE}")).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Reads checkpoint `name` under `root` file by file, checking each against the sha256 that
/// state.json records before handing its bytes to `take`.
fn read_verified(
    root: &Location,
    name: &str,
    mut take: impl FnMut(&str, Vec<u8>) -> Result<()>,
) -> Result<State> {
    let dir = root.child(name);
    let read = |file: &str| -> Result<Vec<u8>> {
        let path = dir.join(file);
        match root {
            Location::Local(p) => {
                let full = p.join(name).join(file);
                std::fs::read(&full).map_err(|e| TrainerError::io(&full, e))
            }
            Location::Remote(r) => r
                .get(&format!("{name}/{file}"))?
                .ok_or_else(|| ckpt_err(&path, "does not exist")),
        }
    };
    let state_path = dir.join(STATE);
    let text = read(STATE)?;
    let state: State = serde_json::from_slice(&text)
        .map_err(|e| ckpt_err(&state_path, format!("not a valid state.json: {e}")))?;
    if state.format != FORMAT {
        return Err(ckpt_err(
            &state_path,
            format!(
                "checkpoint format {} is not the supported {FORMAT}",
                state.format
            ),
        ));
    }
    for needed in [OPTIMIZER_FILE, CONFIG] {
        if !state.files.contains_key(needed) {
            return Err(ckpt_err(&dir, format!("state.json lists no {needed}")));
        }
    }
    if ![LORA_FILE, BASE_FILE]
        .iter()
        .any(|w| state.files.contains_key(*w))
    {
        return Err(ckpt_err(
            &dir,
            format!("state.json lists no weights ({LORA_FILE} or {BASE_FILE})"),
        ));
    }
    for (file, want) in &state.files {
        let path = dir.join(file);
        let bytes = read(file)?;
        let got = sha256_hex(&bytes);
        if &got != want {
            return Err(ckpt_err(
                &path,
                format!("sha256 {got} does not match {want} recorded in state.json (truncated or altered)"),
            ));
        }
        take(file, bytes)?;
    }
    Ok(state)
}

/// A checkpoint folder given by its own path or URL (`.../step-00000120`).
pub fn load_folder(location: &str) -> Result<Loaded> {
    let trimmed = location.trim_end_matches('/');
    let (parent, name) = trimmed
        .rsplit_once('/')
        .ok_or_else(|| ckpt_err(Path::new(location), "expected .../step-NNNNNNNN"))?;
    load(&Location::parse(parent)?, name)
}

/// The checkpoint to resume from under `root`: the one LATEST names if it verifies, else the
/// newest one that does (each rejected one is reported with the reason). None when `root`
/// holds no checkpoint at all.
pub fn latest_valid(root: &Location) -> Result<Option<Loaded>> {
    let mut candidates = list(root)?;
    let latest = match root {
        Location::Local(p) => std::fs::read(p.join(LATEST)).ok(),
        Location::Remote(r) => r.get(LATEST)?,
    };
    if let Some(name) = latest {
        let name = String::from_utf8_lossy(&name).trim().to_string();
        if let Some(pos) = candidates.iter().position(|(_, n)| *n == name) {
            let first = candidates.remove(pos);
            candidates.insert(0, first);
        }
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    let mut problems = Vec::new();
    for (_, name) in &candidates {
        match load(root, name) {
            Ok(l) => {
                if !problems.is_empty() {
                    tracing::warn!(
                        using = %l.dir.display(),
                        skipped = %problems.join("; "),
                        "newer checkpoint(s) are damaged; resuming from an older one"
                    );
                }
                return Ok(Some(l));
            }
            Err(e) => problems.push(flux::chain(&e)),
        }
    }
    Err(TrainerError::Checkpoint {
        path: PathBuf::from(root.describe()),
        reason: format!("no checkpoint verifies:\n  {}", problems.join("\n  ")),
    })
}

impl Loaded {
    /// The tensor `name` of `file`, checked against the live one's shape and dtype.
    pub fn tensor(&self, file: &str, name: &str, like: &Tensor) -> Result<Tensor> {
        let path = self.dir.join(file);
        let t = self
            .tensors
            .get(file)
            .and_then(|m| m.get(name))
            .ok_or_else(|| ckpt_err(&path, format!("tensor `{name}` is missing")))?;
        if t.dims() != like.dims() {
            return Err(ckpt_err(
                &path,
                format!(
                    "tensor `{name}` has shape {:?}, this run needs {:?} (another model size or LoRA rank?)",
                    t.dims(),
                    like.dims()
                ),
            ));
        }
        if t.dtype() != like.dtype() {
            return Err(ckpt_err(
                &path,
                format!(
                    "tensor `{name}` is {:?}, this run needs {:?}",
                    t.dtype(),
                    like.dtype()
                ),
            ));
        }
        Ok(t.to_device(like.device())?)
    }
}

/// Config keys that may change between a checkpoint and the run resuming from it.
const MAY_CHANGE: [&str; 16] = [
    // What to render and log, not what to train.
    "validation.",
    "logging.",
    "run.dir",
    "run.name",
    "train.max_steps",
    "train.progress",
    "train.log_every",
    "train.signal_exit_code",
    "train.on_nonfinite",
    "distributed.",
    "checkpoint.",
    // How shards are read, not which samples in which order.
    "data.io_threads",
    "data.decode_threads",
    "data.prefetch_batches",
    "data.strict",
    // The cache holds the same samples in the same order (its fingerprint and dataset are
    // checked when it is opened); only the bf16 rounding of the latents differs.
    "data.cache",
];

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The keys (outside [`MAY_CHANGE`]) whose values differ, as "key (checkpoint: a, now: b)".
pub fn config_differences(saved_toml: &str, current_toml: &str) -> Vec<String> {
    let parse = |s: &str| {
        let mut m = BTreeMap::new();
        if let Ok(v) = s.parse::<toml::Table>() {
            flatten("", &toml::Value::Table(v), &mut m);
        }
        m
    };
    let (a, b) = (parse(saved_toml), parse(current_toml));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| {
            !MAY_CHANGE
                .iter()
                .any(|m| k.as_str() == *m || (m.ends_with('.') && k.starts_with(m)))
        })
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &BTreeMap<String, String>| {
                m.get(k).cloned().unwrap_or_else(|| "(absent)".into())
            };
            format!("{k} (checkpoint: {}, now: {})", show(&a), show(&b))
        })
        .collect()
}

/// Tensors as (name, detached copy) pairs.
pub fn detached<'a>(
    named: impl IntoIterator<Item = (String, &'a Tensor)>,
) -> Result<Vec<(String, Tensor)>> {
    named
        .into_iter()
        .map(|(n, t)| Ok((n, detach(t)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(step: u64) -> Snapshot {
        let t = Tensor::new(&[step as f32, 2.0], &Device::Cpu).unwrap();
        Snapshot {
            state: State {
                format: FORMAT,
                step,
                cursor: Cursor { epoch: 0, batch: 3 },
                data_cursors: vec![],
                world_size: 1,
                global_batch: 2,
                fingerprint: "f".into(),
                seed: 1,
                rng: RNG_SCHEME.into(),
                adam_t: step,
                skipped: 0,
                files: BTreeMap::new(),
                lineage: "lineage-a".into(),
                data_reports: vec![],
            },
            config_toml: "[run]\nseed = 1\n".into(),
            files: vec![
                (LORA_FILE, vec![("m.lora_A".into(), t.clone())]),
                (OPTIMIZER_FILE, vec![("m.lora_A.exp_avg".into(), t)]),
            ],
        }
    }

    /// A fresh local folder, and a fresh prefix on the S3 test server when MOSAIC_TEST_S3_URL
    /// names one (ci/s3.sh starts it and sets the AWS_* variables).
    fn roots(test: &str) -> Vec<(Location, Option<tempfile::TempDir>)> {
        let tmp = tempfile::tempdir().unwrap();
        let mut v = vec![(Location::local(tmp.path()), Some(tmp))];
        match datasets::testing::server_env("MOSAIC_TEST_S3_URL", "ci/s3.sh") {
            Some(url) => {
                let unique = format!(
                    "{}/{test}-{}-{}",
                    url.trim_end_matches('/'),
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_nanos()
                );
                v.push((Location::parse(&unique).unwrap(), None));
            }
            None => eprintln!("{test}: the object-store part did not run"),
        }
        v
    }

    /// Writes `snap` with a retention that has verified nothing yet.
    fn save(root: &Location, snap: &Snapshot, keep: usize) -> Result<PathBuf> {
        write(root, snap, keep, &mut Retention::default())
    }

    fn read(root: &Location, rel: &str) -> Vec<u8> {
        match root {
            Location::Local(p) => std::fs::read(p.join(rel)).unwrap(),
            Location::Remote(r) => r.get(rel).unwrap().unwrap(),
        }
    }

    fn put(root: &Location, rel: &str, bytes: &[u8]) {
        match root {
            Location::Local(p) => {
                let f = p.join(rel);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, bytes).unwrap()
            }
            Location::Remote(r) => r.put(rel, bytes.to_vec()).unwrap(),
        }
    }

    #[test]
    fn written_checkpoints_load_back_and_only_the_newest_are_kept() {
        for (root, _keep) in roots("kept") {
            for step in [10, 20, 30] {
                save(&root, &snap(step), 2).unwrap();
            }
            let steps: Vec<u64> = list(&root).unwrap().iter().map(|(s, _)| *s).collect();
            assert_eq!(steps, vec![30, 20], "{root:?}");
            let l = latest_valid(&root).unwrap().unwrap();
            assert_eq!(l.state.step, 30);
            assert_eq!(l.state.cursor, Cursor { epoch: 0, batch: 3 });
            let like = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
            let t = l.tensor(LORA_FILE, "m.lora_A", &like).unwrap();
            assert_eq!(t.to_vec1::<f32>().unwrap(), vec![30.0, 2.0]);
        }
    }

    #[test]
    fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
        for (root, _keep) in roots("damaged") {
            save(&root, &snap(1), 3).unwrap();
            save(&root, &snap(2), 3).unwrap();
            let rel = format!("step-00000002/{LORA_FILE}");
            let mut bytes = read(&root, &rel);
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            put(&root, &rel, &bytes);
            let err = load(&root, "step-00000002").err().unwrap().to_string();
            assert!(
                err.contains("sha256") && err.contains("lora.safetensors"),
                "{err}"
            );
            assert_eq!(latest_valid(&root).unwrap().unwrap().state.step, 1);
            // Truncation too.
            put(&root, &rel, &bytes[..10]);
            assert_eq!(latest_valid(&root).unwrap().unwrap().state.step, 1);
        }
    }

    #[test]
    fn retention_quarantines_damage_and_never_lets_it_push_out_a_good_checkpoint() {
        for (root, _keep) in roots("quarantine") {
            let mut retention = Retention::default();
            write(&root, &snap(1), 2, &mut retention).unwrap();
            write(&root, &snap(2), 2, &mut retention).unwrap();
            let rel = format!("step-00000002/{LORA_FILE}");
            let bytes = read(&root, &rel);
            put(&root, &rel, &bytes[..bytes.len() / 2]);
            // A resumed run (a new process: nothing verified yet) saves step 3 with keep = 2.
            write(&root, &snap(3), 2, &mut Retention::default()).unwrap();
            let steps: Vec<u64> = list(&root).unwrap().iter().map(|(s, _)| *s).collect();
            assert_eq!(steps, vec![3, 1], "{root:?}: the good step 1 stays");
            let moved = match &root {
                Location::Local(p) => p.join("corrupt-step-00000002").join(LORA_FILE).is_file(),
                Location::Remote(r) => r
                    .exists(&format!("corrupt-step-00000002/{LORA_FILE}"))
                    .unwrap(),
            };
            assert!(moved, "{root:?}: the damaged one is set aside, not deleted");
        }
    }

    #[test]
    fn writing_over_an_existing_step_sets_the_old_folder_aside() {
        for (root, _keep) in roots("aside") {
            save(&root, &snap(1), 3).unwrap();
            save(&root, &snap(2), 3).unwrap();
            let rel = format!("step-00000002/{LORA_FILE}");
            let bytes = read(&root, &rel);
            put(&root, &rel, &bytes[..8]);
            // A run resumed from step 1 reaches step 2 again.
            save(&root, &snap(2), 3).unwrap();
            assert_eq!(latest_valid(&root).unwrap().unwrap().state.step, 2);
            let kept = match &root {
                Location::Local(p) => p.join("corrupt-step-00000002").join(LORA_FILE).is_file(),
                Location::Remote(r) => r
                    .exists(&format!("corrupt-step-00000002/{LORA_FILE}"))
                    .unwrap(),
            };
            assert!(
                kept,
                "{root:?}: the damaged folder is set aside, not deleted"
            );
            // A good folder of the same step (another run's) is kept as replaced-.
            save(&root, &snap(2), 3).unwrap();
            let replaced = match &root {
                Location::Local(p) => p.join("replaced-step-00000002").is_dir(),
                Location::Remote(r) => !r.list_prefix("replaced-step-00000002").unwrap().is_empty(),
            };
            assert!(replaced, "{root:?}");
        }
    }

    #[test]
    fn retention_leaves_other_lineages_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Location::local(tmp.path());
        for step in [1, 2, 3] {
            save(&root, &snap(step), 1).unwrap();
        }
        let mut other = snap(10);
        other.state.lineage = "lineage-b".into();
        save(&root, &other, 1).unwrap();
        let mut other = snap(20);
        other.state.lineage = "lineage-b".into();
        save(&root, &other, 1).unwrap();
        let steps: Vec<u64> = list(&root).unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, vec![20, 3], "each lineage keeps its newest one");
    }

    #[test]
    fn a_writer_killed_midway_leaves_the_previous_checkpoint_in_charge() {
        for (root, _keep) in roots("killed") {
            save(&root, &snap(5), 3).unwrap();
            // What a writer killed while writing step 7 leaves: some files and no state.json
            // (on an object store), or a folder renamed but never completed.
            put(&root, &format!("step-00000007/{LORA_FILE}"), b"partial");
            assert_eq!(latest_valid(&root).unwrap().unwrap().state.step, 5);
            if let Location::Local(p) = &root {
                // The temporary folder of a local write.
                let partial = p.join(".tmp-step-00000006-999");
                std::fs::create_dir_all(&partial).unwrap();
                std::fs::write(partial.join(LORA_FILE), b"partial").unwrap();
                assert_eq!(latest_valid(&root).unwrap().unwrap().state.step, 5);
            }
        }
    }

    #[test]
    fn a_failed_write_leaves_the_previous_checkpoint_and_latest_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Location::local(tmp.path());
        save(&root, &snap(1), 3).unwrap();
        // Something in the way of the temporary folder stands in for a full disk.
        let blocker = tmp
            .path()
            .join(format!(".tmp-step-00000002-{}", std::process::id()));
        std::fs::write(&blocker, b"x").unwrap();
        let e = save(&root, &snap(2), 3).err().unwrap().to_string();
        assert!(
            e.contains("step-00000002") && e.contains("unchanged"),
            "{e}"
        );
        let latest = std::fs::read_to_string(tmp.path().join(LATEST)).unwrap();
        assert_eq!(latest.trim(), "step-00000001");
        assert_eq!(latest_valid(&root).unwrap().unwrap().state.step, 1);
    }

    #[test]
    fn shape_and_dtype_mismatches_name_the_tensor_and_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Location::local(tmp.path());
        save(&root, &snap(1), 1).unwrap();
        let l = latest_valid(&root).unwrap().unwrap();
        let zeros = |n: usize, d: DType| Tensor::zeros(n, d, &Device::Cpu).unwrap();
        let e = l
            .tensor(LORA_FILE, "m.lora_A", &zeros(3, DType::F32))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("m.lora_A") && e.contains("lora.safetensors") && e.contains("[2]"),
            "{e}"
        );
        let e = l
            .tensor(LORA_FILE, "m.lora_A", &zeros(2, DType::F64))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("F32"), "{e}");
        let e = l
            .tensor(LORA_FILE, "nope", &zeros(2, DType::F32))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`nope` is missing"), "{e}");
    }

    #[test]
    fn config_differences_name_the_fields_and_ignore_the_allowed_ones() {
        let a = "[optim]\nlr = 0.001\n[train]\nmax_steps = 10\n[lora]\nrank = 8\n";
        let b = "[optim]\nlr = 0.002\n[train]\nmax_steps = 40\n[lora]\nrank = 8\n";
        assert_eq!(
            config_differences(a, b),
            vec!["optim.lr (checkpoint: 0.001, now: 0.002)".to_string()]
        );
    }
}
