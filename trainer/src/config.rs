//! The run configuration: a TOML file, `--set KEY=VALUE` overrides by dotted path, then one
//! validation step that refuses unknown keys and out-of-range values naming the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checks::{non_negative, positive};
use crate::error::{Result, TrainerError};

use flux::FluxConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunSection,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub lora: flux::LoraSpec,
    #[serde(default)]
    pub conditioning: crate::objective::ConditioningSpec,
    #[serde(default)]
    pub loss: crate::objective::LossSpec,
    #[serde(default)]
    pub optim: crate::optim::OptimSpec,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub distributed: DistributedSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub validation: crate::validation::spec::ValidationSpec,
    #[serde(default)]
    pub logging: crate::run_log::spec::LoggingSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save every this many optimizer steps (0: only when stopping and at the end).
    pub every: u64,
    /// Keep the newest this many checkpoints.
    pub keep: usize,
    /// Folder or object-store URL (s3://, gs://, az://, http(s)://, file://); empty means
    /// `<run dir>/checkpoints`.
    pub dir: String,
    /// Continue from the newest valid checkpoint when the folder holds one.
    pub resume: bool,
    /// Resume from this checkpoint folder (`.../step-00000120`) instead of the newest.
    pub resume_from: String,
    /// A start that would lose an earlier run's checkpoints or metrics (a start over, or
    /// another config) first moves the run folder's contents, and the checkpoints, to
    /// `previous-<time>/` instead of being refused (`trainer train --overwrite`).
    pub overwrite: bool,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 100,
            keep: 3,
            dir: String::new(),
            resume: true,
            resume_from: String::new(),
            overwrite: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedSection {
    /// "auto" (NCCL on CUDA, TCP ring on CPU), "tcp" or "nccl".
    pub backend: crate::ddp::init::Backend,
    /// Gradient bucket size in MiB: each bucket is all-reduced as soon as it is complete.
    pub bucket_mb: f64,
    /// Bound on every collective, in seconds: a rank that waits longer fails with a message
    /// naming the peer. Must cover the slowest rank-local work between collectives.
    pub timeout_s: f64,
    /// Bound on reaching the store and the other ranks at start, in seconds.
    pub connect_timeout_s: f64,
    /// Every this many steps, check that all ranks hold identical LoRA weights (0: never).
    pub check_weights_every: u64,
    /// A node or rank whose heartbeat stops this long (seconds) fails the group; read by the
    /// launcher (docs/distributed.md, "Failure detection").
    pub heartbeat_timeout_s: f64,
}

impl Default for DistributedSection {
    fn default() -> Self {
        Self {
            backend: crate::ddp::init::Backend::Auto,
            bucket_mb: 25.0,
            timeout_s: 600.0,
            connect_timeout_s: 120.0,
            check_weights_every: 100,
            heartbeat_timeout_s: 30.0,
        }
    }
}

impl DistributedSection {
    pub fn options(&self) -> crate::ddp::DistOptions {
        crate::ddp::DistOptions {
            backend: self.backend,
            timeout: std::time::Duration::from_secs_f64(self.timeout_s),
            connect_timeout: std::time::Duration::from_secs_f64(self.connect_timeout_s),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    pub name: String,
    /// Output folder; empty means `runs/<name>`.
    pub dir: String,
    pub seed: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            name: "run".into(),
            dir: String::new(),
            seed: 42,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    Tiny,
    Small,
    Medium,
    FluxDev,
}

impl Preset {
    pub fn config(self) -> FluxConfig {
        match self {
            Preset::Tiny => FluxConfig::tiny(),
            Preset::Small => FluxConfig::small(),
            Preset::Medium => FluxConfig::medium(),
            Preset::FluxDev => FluxConfig::flux_dev(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeName {
    F32,
    Bf16,
    F16,
    F64,
}

impl DTypeName {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            DTypeName::F32 => candle_core::DType::F32,
            DTypeName::Bf16 => candle_core::DType::BF16,
            DTypeName::F16 => candle_core::DType::F16,
            DTypeName::F64 => candle_core::DType::F64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceName {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Architecture when no weights are given (random init): tiny, medium or flux-dev.
    pub preset: Preset,
    /// A diffusers folder or a single safetensors file (BFL or diffusers naming); empty means
    /// seeded random initialisation of `preset`.
    pub weights: String,
    pub dtype: DTypeName,
    pub device: DeviceName,
    /// RoPE split, needed only for BFL files whose head dim has no default.
    pub axes_dims: Option<[usize; 3]>,
    /// How random weights are drawn (no `weights` given): per-tensor seeded streams on the
    /// host, the same on every machine, or the device's own generator (fast, for benchmarks).
    pub init: InitName,
    /// How blocks compute attention: memory-linear chunks, or the full maps (the reference).
    pub attention: AttentionName,
    /// Query rows per chunk of chunked attention (at most: on the CPU fewer, down to 128,
    /// when a chunk's scores would pass `flux::attention::CPU_SCORES_BUDGET`).
    pub attention_chunk: usize,
    /// Fused kernels for the block norms, RoPE, the attention softmax (CUDA) and the optimizer
    /// update (CUDA), or the composed candle ops they are tested against.
    pub kernels: KernelsName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelsName {
    Fused,
    Composed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitName {
    Portable,
    Device,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionName {
    Chunked,
    Full,
}

impl ModelSection {
    /// The attention the model runs, from `attention` and `attention_chunk`.
    pub fn attention(&self) -> flux::Attention {
        match self.attention {
            AttentionName::Chunked => flux::Attention::Chunked {
                chunk: self.attention_chunk,
                cpu_tiles: true,
            },
            AttentionName::Full => flux::Attention::Full,
        }
    }

    /// Range checks, naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.attention_chunk == 0 {
            return Err(TrainerError::config(
                "model.attention_chunk",
                "must be at least 1",
            ));
        }
        if self.init == InitName::Device && self.device == DeviceName::Cpu {
            return Err(TrainerError::config(
                "model.init",
                "\"device\" draws with the GPU's generator and needs model.device = \"cuda\" \
                 (use \"portable\" on the CPU)",
            ));
        }
        Ok(())
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            preset: Preset::Tiny,
            weights: String::new(),
            dtype: DTypeName::F32,
            device: DeviceName::Cpu,
            axes_dims: None,
            init: InitName::Portable,
            attention: AttentionName::Chunked,
            attention_chunk: flux::attention::DEFAULT_CHUNK,
            kernels: KernelsName::Fused,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    Skip,
    Stop,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub max_steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Block-wise recomputation (gradient checkpointing).
    pub checkpointing: bool,
    pub log_every: u64,
    pub on_nonfinite: OnNonFinite,
    pub progress: bool,
    /// Exit status after a stop requested by SIGTERM, SIGINT or SIGUSR1 (all ranks stop at the
    /// same step). Set it to what your scheduler treats as "requeue".
    pub signal_exit_code: u8,
    /// Seconds a stop request may take (finish the step, write the checkpoint) before the
    /// process exits anyway; 0 waits as long as it takes.
    pub stop_grace_s: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            max_steps: 100,
            batch_size: 1,
            grad_accum: 1,
            checkpointing: false,
            log_every: 10,
            on_nonfinite: OnNonFinite::Skip,
            progress: true,
            signal_exit_code: 0,
            stop_grace_s: 120.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSource {
    /// Generated in memory with exact correspondences (no files).
    Synthetic,
    /// SemAlign-MS shards at `data.url`, read through the datasets crate.
    Shards,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub source: DataSource,
    /// Shards: folder or s3:// gs:// az:// http(s):// URL of the dataset (its manifest.json).
    pub url: String,
    /// Shards: latent cache made by `datasets precompute` (empty: encode while training).
    pub cache: String,
    /// Shards: FLUX.1 pipeline folder or URL (diffusers layout) holding the pretrained VAE, T5
    /// and CLIP with their tokenizers; empty: tiny random encoders drawn from `encoder_seed`.
    pub encoders: String,
    /// The seed of the tiny random encoders (absent: `run.seed`). A tiny base is trained with
    /// one set of encoders; runs of other seeds on it keep that set by naming its seed here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder_seed: Option<u64>,
    /// Shards: the VAE from elsewhere (BFL `ae.safetensors` or a diffusers vae folder).
    pub vae: String,
    /// Shards: rows shuffled together (per rank) beyond the shuffle of row groups.
    pub shuffle_rows: usize,
    /// Shards: row groups fetched concurrently.
    pub io_threads: usize,
    /// Shards: batches decoded concurrently.
    pub decode_threads: usize,
    /// Shards: decoded batches kept ready.
    pub prefetch_batches: usize,
    /// Shards: stop at the first unusable sample instead of skipping and reporting it.
    pub strict: bool,
    /// Synthetic: dataset size.
    pub samples: usize,
    /// Target size in pixels (16 px per token).
    pub resolution: usize,
    pub ref_resolution: usize,
    /// Shards: targets go to the aspect bucket of `resolution`'s area nearest their own aspect
    /// (sides in whole tokens, 1:2 to 2:1) instead of a square crop; a batch shares one bucket.
    pub aspect_buckets: bool,
    pub min_refs: usize,
    pub max_refs: usize,
    /// Text tokens per caption.
    pub text_tokens: usize,
    /// Condition dropout (objective::dropout): the share of samples trained without their
    /// references, without their caption, and without both (official 0.05 each).
    pub drop_refs: f64,
    pub drop_text: f64,
    pub drop_both: f64,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            source: DataSource::Synthetic,
            url: String::new(),
            cache: String::new(),
            encoders: String::new(),
            encoder_seed: None,
            vae: String::new(),
            shuffle_rows: 256,
            io_threads: 4,
            decode_threads: 2,
            prefetch_batches: 4,
            strict: false,
            samples: 32,
            resolution: 128,
            ref_resolution: 128,
            aspect_buckets: false,
            min_refs: 1,
            max_refs: 2,
            text_tokens: 16,
            drop_refs: 0.0,
            drop_text: 0.0,
            drop_both: 0.0,
        }
    }
}

impl DataSection {
    /// The condition dropout of `drop_refs`, `drop_text` and `drop_both`.
    pub fn dropout(&self) -> crate::objective::DropoutSpec {
        crate::objective::DropoutSpec {
            refs: self.drop_refs,
            text: self.drop_text,
            both: self.drop_both,
        }
    }
}

/// A config file longer than this is refused unread (a device or a wrong file).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The most references MOSAIC handles (design.md §2).
pub const MAX_REFS: usize = 6;

/// Sets `path` (dotted) in `root` to `raw` parsed as a TOML value, or as a string if it is not one.
fn apply_override(root: &mut toml::Table, path: &str, raw: &str) -> Result<()> {
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(TrainerError::config(path, "empty segment in --set key"));
    }
    let mut table = root;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(TrainerError::config(
                    path,
                    format!("`{part}` is a value, not a section"),
                ))
            }
        };
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl Config {
    /// Parses TOML text with overrides `KEY=VALUE`, then validates. `origin` names the file in
    /// errors.
    pub fn from_toml(text: &str, origin: &Path, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| TrainerError::read(origin, e))?;
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| TrainerError::config(o, "--set expects KEY=VALUE"))?;
            apply_override(&mut table, k.trim(), v.trim())?;
        }
        let de = toml::Value::Table(table);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            // Say where the offending key came from: a --set, or the file.
            let from_set = overrides
                .iter()
                .filter_map(|o| o.split_once('='))
                .any(|(k, _)| k.trim() == key || key.starts_with(&format!("{}.", k.trim())));
            let place = if from_set {
                format!("given with --set {key}=...")
            } else {
                format!("in {}", origin.display())
            };
            TrainerError::Config {
                key,
                reason: format!("{} ({place})", e.inner()),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads the config file at `path` (at most [`MAX_CONFIG_BYTES`]) with `overrides`.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        use std::io::Read;
        let file = std::fs::File::open(path).map_err(|e| TrainerError::io(path, e))?;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| TrainerError::io(path, e))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(TrainerError::Parse {
                file: path.to_path_buf(),
                reason: format!(
                    "longer than {} KiB: not a run config",
                    MAX_CONFIG_BYTES / 1024
                ),
            });
        }
        if text.trim().is_empty() {
            tracing::warn!(
                config = %path.display(),
                "the config file is empty: every key takes its default (configs/tiny-cpu.toml documents them)"
            );
        }
        Self::from_toml(&text, path, overrides)
    }

    pub fn run_dir(&self) -> PathBuf {
        if self.run.dir.is_empty() {
            PathBuf::from("runs").join(&self.run.name)
        } else {
            PathBuf::from(&self.run.dir)
        }
    }

    /// Where checkpoints go: `checkpoint.dir` (a folder or an object-store URL), by default
    /// `<run dir>/checkpoints`.
    pub fn checkpoint_location(&self) -> Result<crate::storage::Location> {
        if self.checkpoint.dir.is_empty() {
            Ok(crate::storage::Location::Local(
                self.run_dir().join("checkpoints"),
            ))
        } else {
            Ok(crate::storage::Location::parse(&self.checkpoint.dir)?)
        }
    }

    /// The config as canonical TOML: what the run folder's `config.toml`, checkpoints and
    /// fingerprints hold.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| TrainerError::Serialize {
            what: "the config as TOML",
            source: Box::new(e),
        })
    }

    /// sha256 of the canonical TOML of the config: runs and checkpoints compare it.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(crate::checkpoint::sha256_hex(self.to_toml()?.as_bytes()))
    }

    /// Every range check, naming the key.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.lora.validate()?;
        self.loss.validate()?;
        self.conditioning.validate()?;
        self.optim.validate()?;
        self.train.validate()?;
        if self.checkpoint.keep == 0 {
            return Err(TrainerError::config(
                "checkpoint.keep",
                "must be at least 1",
            ));
        }
        self.distributed.validate()?;
        self.validation.validate(self.optim.ema_decay)?;
        self.data.validate()
    }
}

impl TrainSection {
    /// Range checks, naming the key.
    pub fn validate(&self) -> Result<()> {
        let err = |k: &str, why: String| Err(TrainerError::config(k, why));
        let t = self;
        if t.max_steps == 0 {
            return err("train.max_steps", "must be at least 1".into());
        }
        if t.batch_size == 0 {
            return err("train.batch_size", "must be at least 1".into());
        }
        if t.grad_accum == 0 {
            return err("train.grad_accum", "must be at least 1".into());
        }
        if t.log_every == 0 {
            return err("train.log_every", "must be at least 1".into());
        }
        if !non_negative(t.stop_grace_s) || !t.stop_grace_s.is_finite() {
            return err(
                "train.stop_grace_s",
                format!("{} must be a non-negative number", t.stop_grace_s),
            );
        }
        Ok(())
    }
}

impl DistributedSection {
    /// Range checks, naming the key.
    pub fn validate(&self) -> Result<()> {
        let err = |k: &str, why: String| Err(TrainerError::config(k, why));
        let d = self;
        for (k, v) in [
            ("distributed.bucket_mb", d.bucket_mb),
            ("distributed.timeout_s", d.timeout_s),
            ("distributed.connect_timeout_s", d.connect_timeout_s),
            ("distributed.heartbeat_timeout_s", d.heartbeat_timeout_s),
        ] {
            if !positive(v) || !v.is_finite() {
                return err(k, format!("{v} must be a positive number"));
            }
        }
        Ok(())
    }
}

impl DataSection {
    /// Range checks, naming the key.
    pub fn validate(&self) -> Result<()> {
        let err = |k: &str, why: String| Err(TrainerError::config(k, why));
        let d = self;
        if d.max_refs == 0 || d.max_refs > MAX_REFS {
            return err(
                "data.max_refs",
                format!("{} must be between 1 and {MAX_REFS}", d.max_refs),
            );
        }
        if d.min_refs == 0 || d.min_refs > d.max_refs {
            return err(
                "data.min_refs",
                format!(
                    "{} must be between 1 and data.max_refs ({})",
                    d.min_refs, d.max_refs
                ),
            );
        }
        for (k, v) in [
            ("data.resolution", d.resolution),
            ("data.ref_resolution", d.ref_resolution),
        ] {
            if v < 32 || v % 16 != 0 {
                return err(k, format!("{v} must be a multiple of 16 and at least 32"));
            }
        }
        if d.samples == 0 {
            return err("data.samples", "must be at least 1".into());
        }
        if d.text_tokens == 0 {
            return err("data.text_tokens", "must be at least 1".into());
        }
        d.dropout().validate()?;
        for (k, v) in [
            ("data.shuffle_rows", d.shuffle_rows),
            ("data.io_threads", d.io_threads),
            ("data.decode_threads", d.decode_threads),
            ("data.prefetch_batches", d.prefetch_batches),
        ] {
            if v == 0 {
                return err(k, "must be at least 1".into());
            }
        }
        if d.source == DataSource::Shards && d.url.is_empty() {
            return err(
                "data.url",
                "is empty; set the folder or URL of the shards (`datasets synth --out DIR` makes some)".into(),
            );
        }
        if d.aspect_buckets && d.source != DataSource::Shards {
            return err(
                "data.aspect_buckets",
                "applies to shards (data.source = \"shards\"); the synthetic source is square"
                    .into(),
            );
        }
        if !d.vae.is_empty() && d.encoders.is_empty() {
            return err(
                "data.vae",
                "needs data.encoders (the folder with T5, CLIP and their tokenizers)".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<Config> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml(text, Path::new("test.toml"), &sets)
    }

    #[test]
    fn defaults_are_valid_and_overrides_apply() {
        let c = parse(
            "",
            &[
                "train.max_steps=40",
                "run.name=abc",
                "loss.double_blocks=[0, 1]",
            ],
        )
        .unwrap();
        assert_eq!(c.train.max_steps, 40);
        assert_eq!(c.run.name, "abc");
        assert_eq!(
            c.loss.double_blocks,
            crate::objective::BlockSelection::List(vec![0, 1])
        );
        assert_eq!(c.run_dir(), PathBuf::from("runs/abc"));
    }

    #[test]
    fn unknown_key_is_named_with_its_path_and_where_it_came_from() {
        let e = parse("[lora]\nrnak = 3\n", &[]).unwrap_err().to_string();
        assert!(e.contains("lora.rnak") && e.contains("in test.toml"), "{e}");
        let e = parse("", &["optim.lrr=1"]).unwrap_err().to_string();
        assert!(
            e.contains("optim.lrr") && e.contains("given with --set optim.lrr"),
            "{e}"
        );
    }

    #[test]
    fn a_file_too_long_for_a_config_is_refused_unread() {
        let e = Config::load(Path::new("/dev/zero"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/zero") && e.contains("not a run config"),
            "{e}"
        );
    }

    #[test]
    fn tiny_cpu_toml_documents_every_key() {
        fn keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in t {
                let key = format!("{prefix}{k}");
                match v {
                    toml::Value::Table(t) => keys(&format!("{key}."), t, out),
                    _ => out.push(key),
                }
            }
        }
        let all: toml::Table = toml::from_str(&parse("", &[]).unwrap().to_toml().unwrap()).unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-cpu.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let (mut want, mut have) = (Vec::new(), Vec::new());
        keys("", &all, &mut want);
        let documented: toml::Table = toml::from_str(&text).unwrap();
        keys("", &documented, &mut have);
        // Keys whose default is a list of patterns are documented in a comment.
        let missing: Vec<&String> = want
            .iter()
            .filter(|k| {
                !have.contains(k) && !text.contains(&format!("# {}", k.rsplit('.').next().unwrap()))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "tiny-cpu.toml does not document {missing:?}"
        );
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        for (set, key) in [
            ("lora.rank=0", "lora.rank"),
            ("data.max_refs=7", "data.max_refs"),
            ("loss.scal_eps=0", "loss.scal_eps"),
            ("data.drop_text=1.5", "data.drop_text"),
            ("optim.lr=-1e-4", "optim.lr"),
            ("data.resolution=100", "data.resolution"),
        ] {
            let e = parse("", &[set]).unwrap_err().to_string();
            assert!(e.contains(key), "{set}: {e}");
        }
        let e = parse("", &["train.batch_size=x"]).unwrap_err().to_string();
        assert!(e.contains("train.batch_size"), "{e}");
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        use crate::objective::{LossSpec, Recipe};
        for (name, recipe) in [
            ("tiny-cpu.toml", Recipe::Paper),
            ("mosaic-paper-512.toml", Recipe::Paper),
            ("mosaic-official-512.toml", Recipe::Official),
        ] {
            let c = Config::load(&dir.join(name), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.data.source, DataSource::Shards, "{name}");
            assert_eq!(c.loss.recipe(), recipe, "{name}");
        }
        // The code defaults are the paper config's loss settings.
        let paper = Config::load(&dir.join("mosaic-paper-512.toml"), &[]).unwrap();
        assert_eq!(paper.loss, LossSpec::default());
        let official = Config::load(&dir.join("mosaic-official-512.toml"), &[]).unwrap();
        let fc = flux::config::FluxConfig::flux_dev();
        let blocks = official.loss.row_blocks(&fc);
        assert_eq!(blocks.double.len(), 19, "all 19 double blocks");
        assert_eq!(
            paper.loss.row_blocks(&fc).double,
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(official.loss.mdl_weight_at(10_500), 0.5);
        assert_eq!(
            (
                official.data.drop_refs,
                official.data.drop_text,
                official.data.drop_both
            ),
            (0.05, 0.05, 0.05)
        );
    }

    #[test]
    fn data_vae_needs_data_encoders() {
        let e = parse("", &["data.vae=\"ae.safetensors\""])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.vae") && e.contains("data.encoders"), "{e}");
        assert!(parse("", &["data.vae=\"ae.safetensors\"", "data.encoders=\"m\""]).is_ok());
    }

    #[test]
    fn fingerprint_changes_with_the_config() {
        let a = parse("", &[]).unwrap();
        let b = parse("", &["optim.lr=0.5"]).unwrap();
        let fp = |c: &Config| c.fingerprint().unwrap();
        assert_eq!(fp(&a), fp(&parse("", &[]).unwrap()));
        assert_ne!(fp(&a), fp(&b));
    }
}
