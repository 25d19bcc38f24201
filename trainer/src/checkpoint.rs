//! Checkpoints (DESIGN.md §8): everything needed to continue a run exactly.
//!
//! Layout under the checkpoint folder (default `<run dir>/checkpoints`):
//! ```text
//! step-00000120/lora.safetensors        LoRA variables by internal name (<module>.lora_A/B)
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
//! step, sample slot) (`rng.rs`), so the seed and the step are the whole RNG state of every rank.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

#[cfg(test)]
use candle_core::DType;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainerError};
use crate::loader::Cursor;

pub const FORMAT: u32 = 1;
pub const LATEST: &str = "LATEST";
const STATE: &str = "state.json";
const CONFIG: &str = "config.toml";
pub const LORA_FILE: &str = "lora.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// Optimizer steps completed; training continues with step index `step`.
    pub step: u64,
    /// The loader position after `step` steps.
    pub cursor: Cursor,
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
}

pub const RNG_SCHEME: &str =
    "stateless: ChaCha8 streams keyed by (seed, purpose, step, sample slot), see trainer/src/rng.rs";

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

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

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

/// Checkpoint folders under `root`, newest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            step_of(&name).map(|s| (s, e.path()))
        })
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.0));
    v
}

/// Writes `snap` under `root` atomically, points LATEST at it and keeps the newest `keep`. On
/// failure (a full disk, say) the partial folder is removed and the previous checkpoint and
/// LATEST are untouched.
pub fn write(root: &Path, snap: &Snapshot, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| TrainerError::io(root, e))?;
    let name = step_dir_name(snap.state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let written = write_into(root, &tmp, &name, snap);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        return written.map_err(|e| TrainerError::Checkpoint {
            path: root.join(&name),
            reason: format!(
                "could not be written ({e}); the previous checkpoint and LATEST are unchanged"
            ),
        });
    }
    for (_, old) in list(root).into_iter().skip(keep.max(1)) {
        if let Err(e) = std::fs::remove_dir_all(&old) {
            tracing::warn!(path = %old.display(), %e, "could not remove an old checkpoint");
        }
    }
    written
}

fn write_into(root: &Path, tmp: &Path, name: &str, snap: &Snapshot) -> Result<PathBuf> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(|e| TrainerError::io(tmp, e))?;
    }
    std::fs::create_dir_all(tmp).map_err(|e| TrainerError::io(tmp, e))?;
    let mut state = snap.state.clone();
    for (file, tensors) in &snap.files {
        let bytes =
            safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), None)
                .map_err(|e| ckpt_err(&tmp.join(file), e.to_string()))?;
        write_synced(&tmp.join(file), &bytes)?;
        state.files.insert(file.to_string(), hex(&bytes));
    }
    write_synced(&tmp.join(CONFIG), snap.config_toml.as_bytes())?;
    state
        .files
        .insert(CONFIG.to_string(), hex(snap.config_toml.as_bytes()));
    let json = serde_json::to_vec_pretty(&state).map_err(|e| ckpt_err(tmp, e.to_string()))?;
    write_synced(&tmp.join(STATE), &json)?;
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
}

impl Writer {
    /// Waits for the previous save, then starts writing `snap`.
    pub fn save(&mut self, root: PathBuf, snap: Snapshot, keep: usize) -> Result<()> {
        self.wait()?;
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || write(&root, &snap, keep))
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

/// Reads and verifies one checkpoint folder.
pub fn load(dir: &Path) -> Result<Loaded> {
    let state_path = dir.join(STATE);
    let text = std::fs::read(&state_path).map_err(|e| TrainerError::io(&state_path, e))?;
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
    let mut tensors = HashMap::new();
    let mut config_toml = String::new();
    for (file, want) in &state.files {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|e| TrainerError::io(&path, e))?;
        let got = hex(&bytes);
        if &got != want {
            return Err(ckpt_err(
                &path,
                format!("sha256 {got} does not match {want} recorded in state.json (truncated or altered)"),
            ));
        }
        if file == CONFIG {
            config_toml = String::from_utf8_lossy(&bytes).into_owned();
        } else {
            let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|e| ckpt_err(&path, e.to_string()))?;
            tensors.insert(file.clone(), map);
        }
    }
    for needed in [LORA_FILE, OPTIMIZER_FILE, CONFIG] {
        if !state.files.contains_key(needed) {
            return Err(ckpt_err(dir, format!("state.json lists no {needed}")));
        }
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        config_toml,
        tensors,
    })
}

/// The checkpoint to resume from under `root`: the one LATEST names if it verifies, else the
/// newest one that does (each rejected one is reported with the reason). None when `root`
/// holds no checkpoint at all.
pub fn latest_valid(root: &Path) -> Result<Option<Loaded>> {
    let mut candidates = list(root);
    if let Ok(name) = std::fs::read_to_string(root.join(LATEST)) {
        let name = name.trim();
        if let Some(pos) = candidates
            .iter()
            .position(|(_, p)| p.file_name().is_some_and(|n| n == name))
        {
            let first = candidates.remove(pos);
            candidates.insert(0, first);
        }
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    let mut problems = Vec::new();
    for (_, dir) in &candidates {
        match load(dir) {
            Ok(l) => {
                if !problems.is_empty() {
                    tracing::warn!(
                        using = %dir.display(),
                        skipped = %problems.join("; "),
                        "newer checkpoint(s) are damaged; resuming from an older one"
                    );
                }
                return Ok(Some(l));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    Err(ckpt_err(
        root,
        format!("no checkpoint verifies:\n  {}", problems.join("\n  ")),
    ))
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
const MAY_CHANGE: [&str; 9] = [
    "run.dir",
    "run.name",
    "train.max_steps",
    "train.progress",
    "train.log_every",
    "train.signal_exit_code",
    "train.on_nonfinite",
    "distributed.",
    "checkpoint.",
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
                world_size: 1,
                global_batch: 2,
                fingerprint: "f".into(),
                seed: 1,
                rng: RNG_SCHEME.into(),
                adam_t: step,
                skipped: 0,
                files: BTreeMap::new(),
            },
            config_toml: "[run]\nseed = 1\n".into(),
            files: vec![
                (LORA_FILE, vec![("m.lora_A".into(), t.clone())]),
                (OPTIMIZER_FILE, vec![("m.lora_A.exp_avg".into(), t)]),
            ],
        }
    }

    #[test]
    fn written_checkpoints_load_back_and_only_the_newest_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        for step in [10, 20, 30] {
            write(tmp.path(), &snap(step), 2).unwrap();
        }
        let steps: Vec<u64> = list(tmp.path()).iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, vec![30, 20]);
        let l = latest_valid(tmp.path()).unwrap().unwrap();
        assert_eq!(l.state.step, 30);
        assert_eq!(l.state.cursor, Cursor { epoch: 0, batch: 3 });
        let like = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let t = l.tensor(LORA_FILE, "m.lora_A", &like).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![30.0, 2.0]);
    }

    #[test]
    fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &snap(1), 3).unwrap();
        let newest = write(tmp.path(), &snap(2), 3).unwrap();
        let f = newest.join(LORA_FILE);
        let mut bytes = std::fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&f, &bytes).unwrap();
        let err = load(&newest).err().unwrap().to_string();
        assert!(
            err.contains("sha256") && err.contains("lora.safetensors"),
            "{err}"
        );
        assert_eq!(latest_valid(tmp.path()).unwrap().unwrap().state.step, 1);
        // Truncation too.
        std::fs::write(&f, &bytes[..10]).unwrap();
        assert_eq!(latest_valid(tmp.path()).unwrap().unwrap().state.step, 1);
    }

    #[test]
    fn a_writer_killed_midway_leaves_the_previous_checkpoint_in_charge() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &snap(5), 3).unwrap();
        // What a process killed while writing step 6 leaves: a partial temporary folder.
        let partial = tmp.path().join(".tmp-step-00000006-999");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join(LORA_FILE), b"partial").unwrap();
        assert_eq!(latest_valid(tmp.path()).unwrap().unwrap().state.step, 5);
        // And a folder renamed but never completed (state.json missing) is skipped too.
        std::fs::create_dir_all(tmp.path().join("step-00000007")).unwrap();
        assert_eq!(latest_valid(tmp.path()).unwrap().unwrap().state.step, 5);
    }

    #[test]
    fn a_failed_write_leaves_the_previous_checkpoint_and_latest_alone() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &snap(1), 3).unwrap();
        // Something in the way of the temporary folder stands in for a full disk.
        let blocker = tmp
            .path()
            .join(format!(".tmp-step-00000002-{}", std::process::id()));
        std::fs::write(&blocker, b"x").unwrap();
        let e = write(tmp.path(), &snap(2), 3).err().unwrap().to_string();
        assert!(
            e.contains("step-00000002") && e.contains("unchanged"),
            "{e}"
        );
        let latest = std::fs::read_to_string(tmp.path().join(LATEST)).unwrap();
        assert_eq!(latest.trim(), "step-00000001");
        assert_eq!(latest_valid(tmp.path()).unwrap().unwrap().state.step, 1);
    }

    #[test]
    fn shape_and_dtype_mismatches_name_the_tensor_and_file() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), &snap(1), 1).unwrap();
        let l = latest_valid(tmp.path()).unwrap().unwrap();
        let e = l
            .tensor(
                LORA_FILE,
                "m.lora_A",
                &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            )
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("m.lora_A") && e.contains("lora.safetensors") && e.contains("[2]"),
            "{e}"
        );
        let e = l
            .tensor(
                LORA_FILE,
                "m.lora_A",
                &Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap(),
            )
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("F32"), "{e}");
        let e = l
            .tensor(
                LORA_FILE,
                "nope",
                &Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
            )
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
