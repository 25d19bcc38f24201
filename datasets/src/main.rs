//! `datasets`: make, check and measure SemAlign-MS shards.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use datasets::synth::{self, SynthOptions};
use datasets::{DataError, Location, ShardWriter, TransformSpec, WriterOptions};

#[derive(Parser)]
#[command(
    name = "datasets",
    about = "SemAlign-MS shards: write, generate, inspect, measure"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ShardArgs {
    /// Rows per Parquet row group (the unit readers fetch).
    #[arg(long, default_value_t = 64)]
    row_group_rows: usize,
    /// Rows per shard file.
    #[arg(long, default_value_t = 4096)]
    rows_per_shard: usize,
}

impl ShardArgs {
    fn options(&self, created_by: String) -> WriterOptions {
        WriterOptions {
            row_group_rows: self.row_group_rows,
            rows_per_shard: self.rows_per_shard,
            created_by,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate multi-subject scenes with exact correspondences and masks.
    Synth(SynthArgs),
    /// Write shards from your own images: a JSONL listing or a folder of sample folders
    /// (format in the README).
    Write(WriteArgs),
    /// Counts, reference histogram, correspondence statistics and a picture of a few samples.
    Inspect(InspectArgs),
    /// Convert the released SemAlign-MS-Subjects200K layout (Parquet, mask/, coord/) to shards.
    ImportSubjects200k(ImportSubjects200kArgs),
    /// Cache VAE latents and caption embeddings of every sample (the trainer's `data.cache`).
    Precompute(PrecomputeArgs),
    /// Check every shard's sha256 against the manifest (reads everything once).
    Verify(VerifyArgs),
    /// Decoded samples/s at a training resolution, from local files and optionally S3.
    Bench(BenchArgs),
}

/// Generate multi-subject scenes with exact correspondences and masks.
#[derive(clap::Args)]
struct SynthArgs {
    /// Folder or s3:// gs:// az:// URL.
    #[arg(long)]
    out: String,
    #[arg(long, default_value_t = 256)]
    samples: usize,
    #[arg(long, default_value_t = 1)]
    min_refs: usize,
    #[arg(long, default_value_t = 3)]
    max_refs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Target side in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Reference side in pixels.
    #[arg(long, default_value_t = 192)]
    ref_size: u32,
    /// Targets of varied aspect ratios (1:2 to 2:1) of about --size squared pixels.
    #[arg(long)]
    aspects: bool,
    /// Also write this many validation cases (the first scenes of the held-out split:
    /// subjects training never shows) to <out>/validation/cases.json, the official case-list
    /// format (`validation.cases`).
    #[arg(long, default_value_t = 4)]
    validation_cases: usize,
    /// Also write this many held-out scenes (subjects training never shows), with their
    /// correspondences, as a dataset at <out>/heldout (`validation.heldout`, `trainer eval
    /// --heldout`): the attention and identity measures read it.
    #[arg(long, default_value_t = 16)]
    heldout_samples: usize,
    #[command(flatten)]
    shards: ShardArgs,
}

/// Write shards from your own images: a JSONL listing or a folder of sample folders
/// (format in the README).
#[derive(clap::Args)]
struct WriteArgs {
    #[arg(long)]
    from: PathBuf,
    #[arg(long)]
    out: String,
    /// Stop at the first bad entry instead of skipping it.
    #[arg(long)]
    strict: bool,
    #[command(flatten)]
    shards: ShardArgs,
}

/// Counts, reference histogram, correspondence statistics and a picture of a few samples.
#[derive(clap::Args)]
struct InspectArgs {
    url: String,
    /// Samples decoded for the statistics.
    #[arg(long, default_value_t = 64)]
    samples: usize,
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Samples drawn in the grid.
    #[arg(long, default_value_t = 6)]
    grid: usize,
    /// Correspondences drawn per reference.
    #[arg(long, default_value_t = 12)]
    lines: usize,
    /// Where the grid PNG goes.
    #[arg(long, default_value = "inspect.png")]
    png: PathBuf,
    /// Print the statistics as JSON.
    #[arg(long)]
    json: bool,
    /// Decode targets into aspect buckets (as data.aspect_buckets).
    #[arg(long)]
    aspect_buckets: bool,
}

/// Convert the released SemAlign-MS-Subjects200K layout (Parquet, mask/, coord/) to shards.
#[derive(clap::Args)]
struct ImportSubjects200kArgs {
    /// Subjects200K Parquet files, or folders holding them.
    #[arg(long, required = true, num_args = 1..)]
    parquet: Vec<PathBuf>,
    /// Folder of `{uid}.png` target masks.
    #[arg(long)]
    mask_dir: PathBuf,
    /// Folder holding `dift/` and `geoaware/` with `{uid}_ref0.pt`.
    #[arg(long)]
    coord_dir: PathBuf,
    #[arg(long)]
    out: String,
    /// Rows of this collection are kept (the official filter).
    #[arg(long, default_value = "collection_2")]
    collection: String,
    /// Rows whose three quality scores all reach this are kept.
    #[arg(long, default_value_t = 5.0)]
    min_quality: f64,
    /// JSONL of {"file", "row", "uid"}: the exact uids (see docs/data.md).
    #[arg(long)]
    uids: Option<PathBuf>,
    /// Which correspondence pairs: `official` computes the official loader's pairs for a run at
    /// --resolution/--ref-resolution (it averages the coordinate fields to that token grid
    /// before checking the matchers agree); `grid64` the official pairs at 1024 px, which a run
    /// at another resolution maps to its grid by patch centres.
    #[arg(long, value_enum, default_value = "official")]
    mapping: MappingName,
    /// Target size in pixels of the run the official pairs are for (data.resolution).
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// Reference size in pixels of that run (data.ref_resolution).
    #[arg(long, default_value_t = 512)]
    ref_resolution: usize,
    #[command(flatten)]
    shards: ShardArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MappingName {
    Official,
    Grid64,
}

/// Cache VAE latents and caption embeddings of every sample (the trainer's `data.cache`).
#[derive(clap::Args)]
struct PrecomputeArgs {
    /// The dataset.
    #[arg(long)]
    data: String,
    /// Where the cache goes (folder or URL).
    #[arg(long)]
    out: String,
    /// The run's data.resolution.
    #[arg(long)]
    resolution: usize,
    /// The run's data.ref_resolution.
    #[arg(long)]
    ref_resolution: usize,
    /// The run's data.text_tokens.
    #[arg(long)]
    text_tokens: usize,
    /// The run's data.aspect_buckets: targets in aspect buckets of the resolution's area.
    #[arg(long)]
    aspect_buckets: bool,
    /// FLUX.1 pipeline folder or URL (diffusers layout: vae/ or ae.safetensors,
    /// text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/) with the pretrained
    /// encoders; without it, tiny random encoders drawn from --seed.
    #[arg(long)]
    encoders: Option<String>,
    /// The VAE from elsewhere: a .safetensors file (BFL's ae.safetensors) or a diffusers
    /// vae folder (needs --encoders).
    #[arg(long, requires = "encoders")]
    vae: Option<String>,
    /// The model's caption token width (tiny: 32; pretrained: T5's width unless given).
    #[arg(long)]
    context_dim: Option<usize>,
    /// The model's pooled caption width (tiny: 16; pretrained: CLIP's width unless given).
    #[arg(long)]
    pooled_dim: Option<usize>,
    /// The run's run.seed (the tiny encoders' weights derive from it).
    #[arg(long, conflicts_with = "encoders")]
    seed: Option<u64>,
    /// Where the encoders run: cpu, cuda or cuda:N (cuda needs a build with the cuda
    /// feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// This process's part R/W: the shards whose index is R modulo W (run W processes, one
    /// per GPU, with the same options; the last to finish writes the manifest).
    #[arg(long, default_value = "0/1")]
    part: String,
}

/// Check every shard's sha256 against the manifest (reads everything once).
#[derive(clap::Args)]
struct VerifyArgs {
    url: String,
}

/// Decoded samples/s at a training resolution, from local files and optionally S3.
#[derive(clap::Args)]
struct BenchArgs {
    /// Also read from this object-store prefix (data are written there first).
    #[arg(long)]
    remote: Option<String>,
    #[arg(long, default_value_t = 96)]
    samples: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    threads: Vec<usize>,
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    #[arg(long, default_value_t = 3)]
    refs: usize,
}

fn synth_to(out: &str, opts: &SynthOptions, shards: &ShardArgs) -> Result<datasets::Manifest> {
    let loc = Location::parse(out)?;
    let created_by = format!(
        "datasets synth --samples {} --min-refs {} --max-refs {} --seed {} --size {} --ref-size {}",
        opts.samples, opts.min_refs, opts.max_refs, opts.seed, opts.size, opts.ref_size
    );
    Ok(synth::write_dataset(loc, opts, shards.options(created_by))?)
}

fn main() -> Result<()> {
    // Before any thread starts (it sets an environment variable): see kernels::cpu_threads.
    kernels::cpu_threads::settle();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal (a log file gets plain text), and never under NO_COLOR.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Synth(args) => synth_cmd(args),
        Cmd::Write(args) => write_cmd(args),
        Cmd::Inspect(args) => inspect_cmd(args),
        Cmd::ImportSubjects200k(args) => import_subjects200k_cmd(args),
        Cmd::Precompute(args) => precompute_cmd(args),
        Cmd::Verify(args) => verify_cmd(args),
        Cmd::Bench(args) => bench_cmd(args),
    }
}

/// `datasets synth`.
fn synth_cmd(args: SynthArgs) -> Result<()> {
    let SynthArgs {
        out,
        samples,
        min_refs,
        max_refs,
        seed,
        size,
        ref_size,
        aspects,
        validation_cases,
        heldout_samples,
        shards,
    } = args;
    if !(1..=6).contains(&min_refs) || !(min_refs..=6).contains(&max_refs) {
        bail!("--min-refs and --max-refs must satisfy 1 <= min <= max <= 6");
    }
    if size < 16 || ref_size < 16 {
        bail!("--size and --ref-size must be at least 16 pixels");
    }
    let opts = SynthOptions {
        samples,
        min_refs,
        max_refs,
        seed,
        size,
        ref_size,
        aspects,
        ..Default::default()
    };
    let m = synth_to(&out, &opts, &shards)?;
    println!(
        "wrote {} samples in {} shard(s) to {out}; references 1-6: {:?}",
        m.total_rows,
        m.shards.len(),
        m.ref_histogram()
    );
    if validation_cases > 0 {
        let cases =
            synth::write_validation_cases(&Location::parse(&out)?, &opts, validation_cases)?;
        println!("wrote {validation_cases} validation cases (held-out subjects) to {cases}");
    }
    if heldout_samples > 0 {
        let heldout = format!("{}/{}", out.trim_end_matches('/'), synth::HELDOUT_DIR);
        let opts = SynthOptions {
            samples: heldout_samples,
            split: synth::Split::HeldOut,
            ..opts
        };
        synth_to(&heldout, &opts, &shards)?;
        println!("wrote {heldout_samples} held-out scenes to {heldout}");
    }
    Ok(())
}

/// `datasets write`.
fn write_cmd(args: WriteArgs) -> Result<()> {
    let WriteArgs {
        from,
        out,
        strict,
        shards,
    } = args;
    let loc = Location::parse(&out)?;
    let mut w = ShardWriter::new(
        loc,
        shards.options(format!("datasets write --from {}", from.display())),
    )?;
    let mut skipped = Vec::new();
    let mut failure = None;
    let read = datasets::listing::read_listing(&from, |entry| {
        let added = entry.and_then(|s| w.add(s));
        match added {
            Ok(()) => Ok(()),
            Err(e) if strict => Err(e),
            Err(e) => {
                eprintln!("skipped: {}", e.message());
                skipped.push(e.message());
                Ok(())
            }
        }
    });
    if let Err(e) = read {
        failure = Some(e);
    }
    // What was read before a failure is kept: the shards so far get their manifest.
    let m = w.finish()?;
    println!(
        "wrote {} samples in {} shard(s) to {out}; skipped {}",
        m.total_rows,
        m.shards.len(),
        skipped.len()
    );
    if let Some(e) = failure {
        return Err(anyhow::Error::new(e).context(format!(
            "stopped; the {} samples before this one are in {out}",
            m.total_rows
        )));
    }
    Ok(())
}

/// `datasets inspect`.
fn inspect_cmd(args: InspectArgs) -> Result<()> {
    let InspectArgs {
        url,
        samples,
        resolution,
        grid,
        lines,
        png,
        json,
        aspect_buckets,
    } = args;
    if resolution % 16 != 0 || resolution == 0 {
        bail!("--resolution must be a positive multiple of 16");
    }
    let opts = datasets::inspect::InspectOptions {
        samples,
        resolution,
        grid,
        lines_per_ref: lines,
        seed: 0,
        aspect_buckets,
    };
    let (st, kept) = datasets::inspect::inspect(&url, &opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        println!(
            "{url}: {} rows in {} shard(s), {:.1} MiB",
            st.rows,
            st.shards,
            st.bytes as f64 / (1 << 20) as f64
        );
        println!("references per sample (1..6): {:?}", st.ref_histogram);
        println!(
            "over {} decoded samples ({} references, {} without points) at {resolution} px:",
            st.decoded, st.refs, st.refs_without_points
        );
        println!(
            "  points per reference min/mean/max {}/{:.1}/{}",
            st.points_min, st.points_mean, st.points_max
        );
        println!(
            "  token pairs per reference min/mean/max {}/{:.1}/{}",
            st.pairs_min, st.pairs_mean, st.pairs_max
        );
        println!("  data report: {}", st.report);
        let buckets: Vec<String> = st
            .target_buckets
            .iter()
            .map(|(b, n)| format!("{b}: {n}"))
            .collect();
        println!(
            "aspect buckets at {resolution} px: {} ({} rows of unknown size)",
            buckets.join(", "),
            st.targets_unknown
        );
    }
    if grid > 0 && !kept.is_empty() {
        datasets::inspect::grid(&kept, lines)
            .save(&png)
            .with_context(|| format!("writing {}", png.display()))?;
        eprintln!("grid of {} samples: {}", kept.len(), png.display());
    }
    Ok(())
}

/// `datasets import-subjects200k`.
fn import_subjects200k_cmd(args: ImportSubjects200kArgs) -> Result<()> {
    let ImportSubjects200kArgs {
        parquet,
        mask_dir,
        coord_dir,
        out,
        collection,
        min_quality,
        uids,
        mapping,
        resolution,
        ref_resolution,
        shards,
    } = args;
    let mapping = match mapping {
        MappingName::Official => datasets::subjects200k::Mapping::Official {
            resolution,
            ref_resolution,
        },
        MappingName::Grid64 => datasets::subjects200k::Mapping::Grid64,
    };
    mapping.check().map_err(anyhow::Error::msg)?;
    let mut files = Vec::new();
    for p in parquet {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "parquet"))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("{}: no .parquet file inside", p.display());
            }
            files.extend(found);
        } else {
            files.push(p);
        }
    }
    for d in [&mask_dir, &coord_dir] {
        if !d.is_dir() {
            bail!("{}: not a folder", d.display());
        }
    }
    let opts = datasets::subjects200k::ImportOptions {
        parquet: files,
        mask_dir,
        coord_dir,
        collection,
        min_quality,
        uids: uids
            .as_deref()
            .map(datasets::subjects200k::read_uids)
            .transpose()?,
        mapping,
    };
    let (t, r) = mapping.sizes();
    let made_by = format!(
        "datasets import-subjects200k: official pairs for {t} px targets and {r} px references"
    );
    let loc = Location::parse(&out)?;
    let mut w = ShardWriter::new(loc, shards.options(made_by))?;
    let report = datasets::subjects200k::import(&opts, &mut w)?;
    let m = w.finish()?;
    for s in &report.skipped {
        eprintln!("skipped: {s}");
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!(
        "wrote {} samples in {} shard(s) to {out}",
        m.total_rows,
        m.shards.len()
    );
    if report.kept > 0 && report.with_coords == 0 {
        eprintln!(
            "warning: no coordinate file was found for any kept row: the uids computed here \
             differ from the release's (they hash Pillow's PNG bytes); pass --uids (docs/data.md)"
        );
    }
    Ok(())
}

/// `datasets precompute`.
fn precompute_cmd(args: PrecomputeArgs) -> Result<()> {
    let PrecomputeArgs {
        data,
        out,
        resolution,
        ref_resolution,
        text_tokens,
        aspect_buckets,
        encoders,
        vae,
        context_dim,
        pooled_dim,
        seed,
        device,
        part,
    } = args;
    for (name, v) in [
        ("--resolution", resolution),
        ("--ref-resolution", ref_resolution),
    ] {
        if v < 16 || v % 16 != 0 {
            bail!("{name} must be a positive multiple of 16");
        }
    }
    let (weights, widths) = match encoders.clone() {
        Some(folder) => {
            let src = datasets::encode::PretrainedSource {
                folder,
                vae: vae.clone(),
                cache: datasets::model_files::cache_root(),
            };
            let widths = datasets::encode::pretrained_widths(&src)?;
            (datasets::encode::EncoderWeights::Pretrained(src), widths)
        }
        None => {
            let (Some(seed), Some(c), Some(p)) = (seed, context_dim, pooled_dim) else {
                bail!(
                    "without --encoders (tiny random encoders) give --seed, --context-dim and --pooled-dim"
                );
            };
            (
                datasets::encode::EncoderWeights::TinyRandom { seed },
                (c, p),
            )
        }
    };
    let context_dim = context_dim.unwrap_or(widths.0);
    let pooled_dim = pooled_dim.unwrap_or(widths.1);
    let opts = datasets::cache::PrecomputeOptions {
        encoders: datasets::encode::EncoderSpec {
            weights,
            text_tokens,
            context_dim,
            pooled_dim,
        },
        transform: TransformSpec {
            resolution,
            ref_resolution,
            aspect_buckets,
        },
        device: parse_device(&device)?,
        part: parse_part(&part)?,
        created_by: format!(
            "datasets precompute --data {data} --resolution {resolution} --ref-resolution {ref_resolution} --text-tokens {text_tokens} --context-dim {context_dim} --pooled-dim {pooled_dim}{}{}{}{}",
            if aspect_buckets { " --aspect-buckets" } else { "" },
            encoders.as_ref().map(|e| format!(" --encoders {e}")).unwrap_or_default(),
            vae.as_ref().map(|v| format!(" --vae {v}")).unwrap_or_default(),
            seed.map(|s| format!(" --seed {s}")).unwrap_or_default(),
        ),
    };
    let r = datasets::cache::precompute(&Location::parse(&data)?, &Location::parse(&out)?, &opts)?;
    println!(
        "cached {} samples to {out} ({} kept with their problem; {} shards already done)",
        r.cached, r.bad, r.reused_shards
    );
    if r.complete {
        println!("the cache is complete: {out}/cache.json");
    } else {
        println!("part {part} is done; the last part to finish writes the manifest");
    }
    Ok(())
}

/// `datasets verify`.
fn verify_cmd(args: VerifyArgs) -> Result<()> {
    let VerifyArgs { url } = args;
    let loc = Location::parse(&url)?;
    let m = datasets::Manifest::load(&loc)?;
    let mut bad = 0;
    for s in &m.shards {
        let got = match loc.get(&s.file)? {
            Some(bytes) => datasets::sha256_hex(&bytes),
            None => "missing".into(),
        };
        if got == s.sha256 {
            println!("ok   {}", s.file);
        } else {
            bad += 1;
            println!("BAD  {}: sha256 {got}, manifest {}", s.file, s.sha256);
        }
    }
    if bad > 0 {
        bail!(
            "{bad} of {} shards differ from {url}/manifest.json",
            m.shards.len()
        );
    }
    Ok(())
}

/// `datasets bench`.
fn bench_cmd(args: BenchArgs) -> Result<()> {
    let BenchArgs {
        remote,
        samples,
        threads,
        resolution,
        refs,
    } = args;
    if !(1..=6).contains(&refs) {
        bail!("--refs must be 1 to 6");
    }
    let opts = SynthOptions {
        samples: samples + 16,
        min_refs: refs,
        max_refs: refs,
        seed: 1,
        size: (resolution * 3 / 2) as u32,
        ref_size: resolution as u32,
        ..Default::default()
    };
    let shards = ShardArgs {
        row_group_rows: 16,
        rows_per_shard: 64,
    };
    let dir = tempfile_dir()?;
    let local = dir.to_string_lossy().to_string();
    eprintln!(
        "writing {} samples ({refs} references, {}px targets) to {local}",
        opts.samples, opts.size
    );
    let m = synth_to(&local, &opts, &shards)?;
    let mb = m.shards.iter().map(|s| s.bytes).sum::<u64>() as f64 / (1 << 20) as f64;
    let spec = TransformSpec {
        resolution,
        ref_resolution: resolution,
        aspect_buckets: false,
    };
    let mut rows = datasets::bench::run("local files", &local, &threads, samples, spec)?;
    if let Some(url) = remote {
        synth_to(&url, &opts, &shards)?;
        rows.extend(datasets::bench::run(
            "object store",
            &url,
            &threads,
            samples,
            spec,
        )?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} samples at {resolution} px with {refs} references ({:.2} MiB/sample stored), {} cores:\n",
        samples,
        mb / m.total_rows as f64,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    print!("{}", datasets::bench::table(&rows));
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf, DataError> {
    let dir = std::env::temp_dir().join(format!("datasets-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| DataError::input(dir.display().to_string(), e))?;
    Ok(dir)
}

/// `cpu`, `cuda` or `cuda:N`.
fn parse_device(name: &str) -> Result<candle_core::Device> {
    if name == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(n) => match n.strip_prefix(':').and_then(|n| n.parse().ok()) {
            Some(i) => i,
            None => bail!("--device {name}: expected cpu, cuda or cuda:N"),
        },
        None => bail!("--device {name}: expected cpu, cuda or cuda:N"),
    };
    candle_core::Device::new_cuda(ordinal)
        .with_context(|| format!("--device {name} (is this a build with the cuda feature?)"))
}

/// `R/W` with R < W.
fn parse_part(text: &str) -> Result<(usize, usize)> {
    let parsed = text
        .split_once('/')
        .and_then(|(r, w)| Some((r.trim().parse().ok()?, w.trim().parse().ok()?)));
    match parsed {
        Some((r, w)) if r < w => Ok((r, w)),
        _ => bail!("--part {text}: expected R/W with 0 <= R < W, like 0/8"),
    }
}
