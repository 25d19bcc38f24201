//! `trainer`: train MOSAIC LoRAs on FLUX.1, and run a plain forward for parity checks.
//!
//! Exit codes: 0 success, 1 error (printed with its cause chain), 2 bad command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trainer::config::{Config, DTypeName};

#[global_allocator]
static ALLOC: trainer::alloc::CountingAlloc = trainer::alloc::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "MOSAIC multi-subject personalization training on FLUX.1"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA as the config says.
    Train(TrainArgs),
    /// Plain FLUX forward (no references) on diffusers-named inputs; writes tensor `output`.
    Forward {
        /// A diffusers transformer folder or a single safetensors file (BFL or diffusers names).
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DtypeArg,
        /// RoPE split "a,b,c" for files that do not say it (BFL) and a non-FLUX head size.
        #[arg(long, value_parser = parse_axes)]
        axes_dims: Option<[usize; 3]>,
        /// A LoRA (this project's, diffusers, PEFT, kohya or the released MOSAIC layout),
        /// applied to the reference tokens at the scale the file gives.
        #[arg(long)]
        lora: Option<PathBuf>,
        /// Double blocks whose attention rows are averaged, "0,1,2" (default: all).
        #[arg(long, value_delimiter = ',')]
        rows_blocks: Option<Vec<usize>>,
        /// A TOML file with a [loss] table (a run config, or a shipped one such as
        /// configs/mosaic-official-512.toml) for loss_scal and loss_mdl (default: the paper's).
        #[arg(long)]
        loss_config: Option<PathBuf>,
        /// References see only their own tokens (the first step of sampling with the
        /// reference cache, the official inference's kv_cache).
        #[arg(long)]
        ref_cache: bool,
    },
    /// Step time and peak memory on CPU (tiny, medium; recomputation off/on) and the computed
    /// FLUX.1-dev memory budget, as markdown tables.
    Bench {
        /// The base config the measured cases override.
        #[arg(long, default_value = "configs/tiny-cpu.toml")]
        config: PathBuf,
        /// Measured steps per case, after one warm-up step.
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
    /// Export a checkpoint as a Hugging Face model folder (diffusers/PEFT/kohya + model card).
    Export(ExportArgs),
    /// Make an image from a prompt and reference images with a base and a LoRA (MOSAIC
    /// inference: FLUX's Euler sampler, references clean with the LoRA on their tokens).
    Sample(SampleArgs),
    /// Attention rows at FLUX.1-dev sizes: the official full maps vs the fused op, forward and
    /// backward time and peak heap, as a markdown table.
    BenchRows {
        /// Repetitions per case (the fastest is reported).
        #[arg(long, default_value_t = 1)]
        reps: usize,
        /// cuda needs a build with --features cuda.
        #[arg(long, value_enum, default_value = "cpu")]
        device: trainer::config::DeviceName,
    },
    /// One block's attention at FLUX.1-dev's shape on the CPU, chunked against full, forward and
    /// backward time and peak heap, and the memory budget from the measured bytes per token.
    BenchAttention {
        /// Query rows per chunk.
        #[arg(long, default_value_t = flux::attention::DEFAULT_CHUNK)]
        chunk: usize,
    },
    /// Time, peak memory and model FLOP utilisation of training steps of one config (any
    /// model, device, dtype), as a markdown row; `--json` appends the numbers as a JSON line.
    BenchStep(BenchStepArgs),
    /// Seconds per image of `trainer sample` for 1, 2 and 4 references, with and without the
    /// reference cache, as a markdown table.
    BenchSample(BenchSampleArgs),
    /// DreamBench's metrics of rendered samples: CLIP-I, CLIP-T and DINO per case and
    /// overall, as a table and a JSON file.
    Eval(EvalArgs),
    /// Train ALL weights of a (small) FLUX base with flow matching on the data's targets and
    /// captions, no references, no LoRA; writes RUN/base/ (load it as model.weights). Under
    /// `launcher --job pretrain-base` the ranks train data parallel. Checkpoints and resumes
    /// as `train` does.
    PretrainBase(TrainArgs),
    /// How well a base denoises the run's data: per noise level t the velocity error (L_diff
    /// at t) and the error of the clean latents one step recovers, per img2img strength the
    /// error FLUX's sampler ends at; prints a markdown table, writes OUT/profile.json and
    /// OUT/profile.png (per sample: clean, one tile per level, one per strength).
    DenoiseProfile(DenoiseProfileArgs),
    /// Whether a base draws the tiny world's shapes: samples "<colour> <shape>" for every
    /// colour and shape of `datasets synth` from noise, names the shape and colour each picture
    /// shows, and prints the accuracies beside the data's own scenes' (the ceiling); writes
    /// OUT/shapes.json and OUT/shapes.png (framed green when the shape is right).
    Shapes(ShapesArgs),
    /// A PNG of a run's curves (total loss, L_diff, SCAL, MDL, lr, grad norm, s/step) from its
    /// metrics.jsonl, raw and smoothed.
    Plot {
        /// The run folder (holding metrics.jsonl).
        run: PathBuf,
        /// Where to write the PNG (default: RUN/metrics.png).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One step's losses and LoRA gradients on the config's device against the CPU, from the
    /// same weights and batch (synthetic data); fails when they differ beyond the tolerance.
    CheckDevice {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Append the result as a JSON line to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Bandwidth of the CPU (TCP ring) all-reduce between ranks of this process on loopback.
    BenchAllreduce {
        /// Rank counts, comma-separated.
        #[arg(long, default_value = "2,4", value_delimiter = ',')]
        ranks: Vec<usize>,
        /// Message sizes in bytes, comma-separated.
        #[arg(
            long,
            default_value = "4096,262144,4194304,33554432",
            value_delimiter = ','
        )]
        sizes: Vec<usize>,
        /// Measured all-reduces per case (median reported), after one warm-up.
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Run config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override a config key by its dotted path, e.g. --set train.max_steps=40.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue from this checkpoint folder (default: the newest valid one of the run).
    #[arg(long, value_name = "DIR", conflicts_with = "no_resume")]
    resume: Option<PathBuf>,
    /// Start from scratch (refused where the run folder holds an earlier run's checkpoints or
    /// metrics, unless --overwrite).
    #[arg(long)]
    no_resume: bool,
    /// Where starting would lose an earlier run's checkpoints or metrics (--no-resume, another
    /// config), move them to RUN/previous-<time>/ first instead of refusing.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct SampleArgs {
    /// A run config (a run's resolved config.toml, or a shipped one): the base, encoders and
    /// sizes that run used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The base (overrides the config's model.weights): a diffusers folder or a safetensors file.
    #[arg(long)]
    weights: Option<String>,
    /// A LoRA file or URL (this project's, diffusers, PEFT or kohya keys, or the released
    /// MOSAIC LoRA).
    #[arg(long)]
    lora: Option<String>,
    /// FLUX.1 pipeline folder or URL for T5, CLIP and the VAE (overrides data.encoders).
    #[arg(long)]
    encoders: Option<String>,
    /// The prompt (or give --cases).
    #[arg(long, required_unless_present = "cases")]
    prompt: Option<String>,
    /// An official case list (`[{"index", "prompt", "image_paths"}]`, image_paths a path or a
    /// list) rendered into --out-dir as <index>.png and <index>.panel.png.
    #[arg(long, requires = "out_dir", conflicts_with_all = ["prompt", "refs", "out"])]
    cases: Option<String>,
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Start latents (safetensors tensor `latents`, [1, N, 64] packed) instead of the seed's
    /// noise (with --image: the noise mixed into it).
    #[arg(long)]
    latents: Option<String>,
    /// Image-to-image (diffusers' FluxImg2ImgPipeline): start from this picture (a path or
    /// URL), resized to the target size, noised to where the last --strength of the schedule
    /// begins.
    #[arg(long, conflicts_with = "cases")]
    image: Option<String>,
    /// With --image: the share of the --steps schedule that runs, in (0, 1]; 1 starts from
    /// pure noise (diffusers' default 0.6).
    #[arg(long, requires = "image", default_value_t = 0.6)]
    strength: f64,
    /// A reference image, a path or URL (repeat for several, up to 6).
    #[arg(long = "ref")]
    refs: Vec<String>,
    /// Square side in pixels (default: the config's data.resolution, else 512).
    #[arg(long)]
    size: Option<usize>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// Distilled guidance (FLUX.1-dev's embedded guidance; training uses 1).
    #[arg(long, default_value_t = 3.5)]
    guidance: f32,
    /// Classifier-free guidance on the prompt (diffusers' true_cfg_scale): each step runs the
    /// model again with --negative-prompt and takes neg + S * (prompt - neg). 1: off.
    #[arg(long, default_value_t = 1.0)]
    true_cfg: f32,
    /// The negative prompt of --true-cfg; the default "" is the empty caption, the
    /// unconditional branch a model trained with data.drop_text learnt.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The PNG to write; its panel (references | result) goes beside it as <OUT>.panel.png.
    #[arg(long, required_unless_present = "cases")]
    out: Option<PathBuf>,
    /// "cpu" or "cuda" (overrides model.device).
    #[arg(long)]
    device: Option<String>,
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// References attend only to themselves, so their keys and values are computed once per
    /// image (the official inference's kv_cache). The default.
    #[arg(long, overrides_with = "no_ref_cache")]
    ref_cache: bool,
    /// References attend to text and target at every step, exactly as in training.
    #[arg(long, overrides_with = "ref_cache")]
    no_ref_cache: bool,
    /// Override a config key, e.g. --set model.preset="tiny".
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args)]
struct DenoiseProfileArgs {
    /// A run config: its base (model.*) and data (data.*) are profiled.
    #[arg(long)]
    config: PathBuf,
    /// The base (overrides model.weights): a diffusers folder or a safetensors file.
    #[arg(long)]
    weights: Option<String>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Samples profiled (the data's first).
    #[arg(long, default_value_t = 32)]
    samples: usize,
    /// Noise levels, comma-separated, each in (0, 1].
    #[arg(
        long = "t",
        default_value = "0.1,0.3,0.5,0.7,0.9,1",
        value_delimiter = ','
    )]
    noise_levels: Vec<f64>,
    /// img2img strengths, comma-separated, each in (0, 1].
    #[arg(
        long = "strength",
        default_value = "0.3,0.5,0.7,0.9",
        value_delimiter = ','
    )]
    strengths: Vec<f64>,
    /// Steps of the full sampling schedule img2img runs the tail of.
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// Distilled guidance (default: the config's conditioning.guidance, as in training).
    #[arg(long)]
    guidance: Option<f32>,
    /// Seed of the noise draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples shown in profile.png.
    #[arg(long, default_value_t = 4)]
    sheet_rows: usize,
    /// Folder for profile.json and profile.png.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ShapesArgs {
    /// A run config: its base (model.*), encoders (data.*) and resolution.
    #[arg(long)]
    config: PathBuf,
    /// The base (overrides model.weights): a diffusers folder or a safetensors file.
    #[arg(long)]
    weights: Option<String>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Seeds per prompt (1 to N).
    #[arg(long, default_value_t = 4)]
    seeds: u64,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// Distilled guidance (default: the config's conditioning.guidance, as in training).
    #[arg(long)]
    guidance: Option<f32>,
    /// Classifier-free guidance against the empty caption (1: off).
    #[arg(long, default_value_t = 1.0)]
    true_cfg: f32,
    /// Picture side in pixels (default: the config's data.resolution).
    #[arg(long)]
    size: Option<usize>,
    /// The data generator's one-subject scenes named for the ceiling.
    #[arg(long, default_value_t = 64)]
    ceiling: usize,
    /// Folder for shapes.json and shapes.png.
    #[arg(long, default_value = "shapes")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct BenchSampleArgs {
    /// The pipeline (base, encoders, decoder, reference size) to measure.
    #[arg(long, default_value = "configs/tiny-cpu.toml")]
    config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Target side in pixels.
    #[arg(long, default_value_t = 512)]
    size: usize,
    #[arg(long, default_value_t = 28)]
    steps: usize,
    /// Reference counts, comma-separated.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    refs: Vec<usize>,
    /// Measured images per case (median reported), after one warm-up image.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Append each case as a JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The folder of samples: <index>.png (trainer sample --cases) or <index>-seed<S>.png.
    #[arg(long, required_unless_present = "heldout", conflicts_with = "heldout")]
    samples: Option<PathBuf>,
    /// The case list the samples were made from (official format).
    #[arg(long, required_unless_present = "heldout", conflicts_with = "heldout")]
    cases: Option<PathBuf>,
    /// Instead: measure correspondence accuracy, separation and identity on this held-out
    /// dataset (`datasets synth` writes <out>/heldout) with the base of --config and --lora.
    #[arg(long, requires = "config")]
    heldout: Option<String>,
    /// With --heldout: the run config (its base, encoders, sizes, loss blocks, measure
    /// settings of [validation]).
    #[arg(long)]
    config: Option<PathBuf>,
    /// With --heldout: override a config key by its dotted path.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// With --heldout: the LoRA to measure (path or URL; none: the base alone).
    #[arg(long)]
    lora: Option<String>,
    /// A CLIPModel checkpoint folder or URL (e.g. openai/clip-vit-base-patch32's files).
    #[arg(long)]
    clip: Option<String>,
    /// A DINO checkpoint folder or URL: a DINOv2 (facebook/dinov2-base's files, the network the
    /// paper's DINO score cites) or a DINO ViT (facebook/dino-vits16's).
    #[arg(long)]
    dino: Option<String>,
    /// Where to write the metrics (JSON).
    #[arg(long)]
    out: PathBuf,
    /// "cpu" or "cuda".
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
struct BenchStepArgs {
    #[arg(long)]
    config: PathBuf,
    /// Override a config key by its dotted path.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The case's name in the table.
    #[arg(long, default_value = "step")]
    label: String,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Measured steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Peak dense TFLOP/s of the device for MFU (989: H100/H200 SXM bf16).
    #[arg(long, default_value_t = 989.0)]
    peak_tflops: f64,
    /// Append the result as a JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print the table header first.
    #[arg(long)]
    header: bool,
    /// Time each phase of the step (device synchronised at every boundary) and print them.
    #[arg(long)]
    profile: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// A checkpoint folder (step-NNNNNNNN), a checkpoints folder or a run folder.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "diffusers")]
    format: trainer::export::Format,
    /// Export the EMA weights.
    #[arg(long)]
    ema: bool,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ExportDtype,
    /// Hub id of the base model for the card, e.g. black-forest-labs/FLUX.1-dev.
    #[arg(long, default_value = "")]
    base_model: String,
    /// License identifier in the card's metadata.
    #[arg(long, default_value = "other")]
    license: String,
    /// Upload the folder to this Hugging Face model repo (token from HF_TOKEN).
    #[arg(long, value_name = "REPO_ID")]
    push_to_hub: Option<String>,
    /// Create the Hub repo as private.
    #[arg(long)]
    private: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportDtype {
    F32,
    Bf16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    F64,
}

fn parse_axes(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>().map_err(|e| format!("`{x}`: {e}")))
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|_| "expected three comma-separated numbers".to_string())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal (a log file gets plain text), and never under NO_COLOR.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train(args) => return train_cmd(args),
        Command::Forward {
            weights,
            inputs,
            out,
            dtype,
            axes_dims,
            lora,
            rows_blocks,
            loss_config,
            ref_cache,
        } => {
            let dtype = match dtype {
                DtypeArg::F32 => DTypeName::F32,
                DtypeArg::Bf16 => DTypeName::Bf16,
                DtypeArg::F64 => DTypeName::F64,
            };
            let opts = trainer::forward::ForwardOptions {
                lora,
                axes: axes_dims,
                rows_blocks,
                loss_config,
                ref_cache,
                ..trainer::forward::ForwardOptions::new(&weights, &inputs, dtype.dtype())
            };
            trainer::forward::forward_cmd(&opts, &out).context("forward failed")?;
            println!("wrote {}", out.display());
        }
        Command::Bench { config, steps } => {
            print!(
                "{}",
                trainer::bench::report(&config, steps.max(1)).context("benchmark failed")?
            );
        }
        Command::Export(args) => export_cmd(args)?,
        Command::Sample(args) => sample_cmd(args)?,
        Command::BenchStep(args) => bench_step_cmd(args)?,
        Command::BenchSample(args) => bench_sample_cmd(args)?,
        Command::Eval(args) => eval_cmd(args)?,
        Command::PretrainBase(args) => return pretrain_cmd(args),
        Command::DenoiseProfile(args) => denoise_profile_cmd(args)?,
        Command::Shapes(args) => shapes_cmd(args)?,
        Command::Plot { run, out } => {
            let out = out.unwrap_or_else(|| run.join("metrics.png"));
            trainer::charts::plot_run(&run, &out).context("plotting failed")?;
            println!("wrote {}", out.display());
        }
        Command::BenchAttention { chunk } => {
            if chunk == 0 {
                anyhow::bail!("--chunk must be at least 1");
            }
            print!(
                "{}",
                trainer::bench_attention::report(chunk).context("attention benchmark failed")?
            );
        }
        Command::CheckDevice { config, set, json } => return check_device_cmd(&config, &set, json),
        Command::BenchRows { reps, device } => bench_rows_cmd(reps, device)?,
        Command::BenchAllreduce {
            ranks,
            sizes,
            iters,
        } => {
            if ranks.iter().any(|&r| r < 2) {
                anyhow::bail!("--ranks: every rank count must be at least 2");
            }
            print!(
                "{}",
                trainer::ddp::bench::report(&ranks, &sizes, iters)
                    .context("all-reduce benchmark failed")?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `trainer train`: prints the outcome; a run stopped by a signal exits with
/// `train.signal_exit_code`.
fn check_device_cmd(
    config: &std::path::Path,
    set: &[String],
    json: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config, set)?;
    let c = trainer::device_check::check(&cfg).context("device check failed")?;
    println!(
        "{}\n{}",
        trainer::device_check::DeviceCheck::HEADER,
        c.row()
    );
    if let Some(path) = json {
        append_json(&path, &c)?;
    }
    Ok(if c.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn bench_rows_cmd(reps: usize, device: trainer::config::DeviceName) -> anyhow::Result<()> {
    let device = trainer::run::open_device(device, 0)
        .context("--device: cannot open CUDA device 0 (build with --features cuda)")?;
    print!(
        "{}",
        trainer::bench_rows::report(reps.max(1), &device).context("rows benchmark failed")?
    );
    Ok(())
}

/// The run config `trainer sample` works from: `--config` (or the defaults, with `--weights`)
/// and the flags that override its keys.
fn sample_config(a: &SampleArgs) -> anyhow::Result<Config> {
    let mut set = a.set.clone();
    push_key(&mut set, "model.weights", a.weights.as_deref());
    push_key(&mut set, "data.encoders", a.encoders.as_deref());
    push_key(&mut set, "model.device", a.device.as_deref());
    if let Some(d) = a.dtype {
        let name = match d {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
            DtypeArg::F64 => "f64",
        };
        set.push(format!("model.dtype={name:?}"));
    }
    Ok(match &a.config {
        Some(path) => load_config(path, &set)?,
        None if a.weights.is_some() => {
            Config::from_toml("", std::path::Path::new("(defaults)"), &set)?
        }
        None => anyhow::bail!("pass --config (a run's config.toml) or --weights"),
    })
}

/// The images to make and where each goes; every case list is read, and its references
/// checked, before anything loads.
fn sample_jobs(
    a: &SampleArgs,
    cfg: &Config,
) -> anyhow::Result<Vec<(trainer::sample::SampleRequest, PathBuf)>> {
    if !a.negative_prompt.is_empty() && a.true_cfg == 1.0 {
        // diffusers only warns and drops it; a prompt the user wrote is never silently unused.
        anyhow::bail!(
            "--negative-prompt: used only by classifier-free guidance; add --true-cfg S with S > 1"
        );
    }
    let from_config = a.config.is_some();
    let side = a.size.unwrap_or(if from_config {
        cfg.data.resolution
    } else {
        512
    });
    let req = trainer::sample::SampleRequest {
        prompt: a.prompt.clone().unwrap_or_default(),
        refs: a
            .refs
            .iter()
            .map(|r| trainer::sample::local_copy(r))
            .collect::<trainer::error::Result<_>>()?,
        width: a.width.unwrap_or(side),
        height: a.height.unwrap_or(side),
        ref_size: if from_config {
            cfg.data.ref_resolution
        } else {
            512
        },
        steps: a.steps,
        guidance: a.guidance,
        true_cfg: a.true_cfg,
        negative_prompt: a.negative_prompt.clone(),
        seed: a.seed,
        ref_cache: !a.no_ref_cache,
        start: a
            .latents
            .as_deref()
            .map(|l| trainer::sample::read_start(&trainer::sample::local_copy(l)?))
            .transpose()?,
        init: a
            .image
            .as_deref()
            .map(|i| -> trainer::error::Result<_> {
                Ok(trainer::sample::InitImage {
                    path: trainer::sample::local_copy(i)?,
                    strength: a.strength,
                })
            })
            .transpose()?,
    };
    let cases = a
        .cases
        .as_deref()
        .map(trainer::sample::read_cases)
        .transpose()?;
    Ok(match (cases, &a.out_dir, &a.out) {
        (Some(cases), Some(dir), _) => {
            let mut jobs = Vec::with_capacity(cases.len());
            for c in cases {
                if let Some(r) = c.refs().into_iter().find(|r| !r.is_file()) {
                    anyhow::bail!(
                        "case {}: reference {} does not exist",
                        c.stem(),
                        r.display()
                    );
                }
                let mut r = req.clone();
                r.prompt = c.prompt.clone();
                r.refs = c.refs();
                jobs.push((r, dir.join(format!("{}.png", c.stem()))));
            }
            jobs
        }
        (None, _, Some(out)) => vec![(req, out.clone())],
        _ => anyhow::bail!("pass --prompt and --out, or --cases and --out-dir"),
    })
}

/// `trainer sample`.
fn sample_cmd(a: SampleArgs) -> anyhow::Result<()> {
    let cfg = sample_config(&a)?;
    let jobs = sample_jobs(&a, &cfg)?;
    let device = trainer::run::device_of(&cfg, 0)?;
    let lora = a
        .lora
        .as_deref()
        .map(trainer::sample::local_copy)
        .transpose()?;
    let mut sampler = trainer::sample::Sampler::load(&cfg, lora.as_deref(), &device)
        .context("loading the pipeline")?;
    for (r, path) in jobs {
        let out = sampler
            .sample(&r)
            .with_context(|| format!("sampling {}", path.display()))?;
        let (img, panel) = trainer::sample::write(&out, &path)?;
        println!("wrote {} and {}", img.display(), panel.display());
    }
    Ok(())
}

/// Appends `key=value` (a TOML string) to the `--set` list when a flag gave `value`: the flags
/// that stand for a config key.
fn push_key(set: &mut Vec<String>, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        set.push(format!("{key}={v:?}"));
    }
}

/// The config at `path` with `--set` and `--weights` applied, and its device: what the
/// commands that measure a base load.
fn base_config(
    path: &std::path::Path,
    set: &[String],
    weights: Option<&str>,
) -> anyhow::Result<(Config, candle_core::Device)> {
    let mut set = set.to_vec();
    push_key(&mut set, "model.weights", weights);
    let cfg = load_config(path, &set)?;
    let device = trainer::run::device_of(&cfg, 0)?;
    Ok((cfg, device))
}

fn shapes_cmd(a: ShapesArgs) -> anyhow::Result<()> {
    let (cfg, device) = base_config(&a.config, &a.set, a.weights.as_deref())?;
    let spec = trainer::shape_check::ShapeSpec {
        seeds: a.seeds,
        steps: a.steps,
        guidance: a.guidance.unwrap_or(cfg.conditioning.guidance as f32),
        true_cfg: a.true_cfg,
        size: a.size.unwrap_or(cfg.data.resolution),
        ceiling_scenes: a.ceiling,
    };
    let (report, sheet) =
        trainer::shape_check::run(&cfg, &spec, &device).context("naming the base's shapes")?;
    trainer::shape_check::write(&report, &sheet, &a.out)?;
    print!("{}", trainer::shape_check::table(&report));
    println!(
        "wrote {} and {}",
        a.out.join("shapes.json").display(),
        a.out.join("shapes.png").display()
    );
    Ok(())
}

/// The config at `path` with `--set` overrides, naming the file when it cannot be used.
fn load_config(path: &std::path::Path, set: &[String]) -> anyhow::Result<Config> {
    Config::load(path, set).with_context(|| format!("loading config {}", path.display()))
}

/// Appends `value` as one JSON line to `path`.
fn append_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    use std::io::Write as _;
    let line = serde_json::to_string(value)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn bench_sample_cmd(a: BenchSampleArgs) -> anyhow::Result<()> {
    let cfg = load_config(&a.config, &a.set)?;
    let device = trainer::run::device_of(&cfg, 0)?;
    let spec = trainer::bench_sample::BenchSampleSpec {
        size: a.size,
        steps: a.steps,
        refs: a.refs,
        reps: a.reps,
    };
    let rows = trainer::bench_sample::measure(&cfg, &spec, &device)
        .context("sampling benchmark failed")?;
    print!("{}", trainer::bench_sample::table(&rows));
    if let Some(path) = a.json {
        for r in &rows {
            append_json(&path, r)?;
        }
    }
    Ok(())
}

fn denoise_profile_cmd(a: DenoiseProfileArgs) -> anyhow::Result<()> {
    let (cfg, device) = base_config(&a.config, &a.set, a.weights.as_deref())?;
    let spec = trainer::denoise_profile::ProfileSpec {
        noise_levels: a.noise_levels,
        strengths: a.strengths,
        steps: a.steps,
        guidance: a.guidance.unwrap_or(cfg.conditioning.guidance as f32),
        seed: a.seed,
        sheet_rows: a.sheet_rows,
    };
    let (profile, sheet) = trainer::denoise_profile::run(&cfg, a.samples, &spec, &device)
        .context("profiling the base")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let json = a.out.join("profile.json");
    std::fs::write(&json, serde_json::to_string_pretty(&profile)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let png = a.out.join("profile.png");
    sheet
        .save(&png)
        .with_context(|| format!("writing {}", png.display()))?;
    print!("{}", trainer::denoise_profile::table(&profile));
    println!("wrote {} and {}", json.display(), png.display());
    Ok(())
}

fn pretrain_cmd(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let cfg = train_config(args)?;
    let exit_on_signal = cfg.train.signal_exit_code;
    let out = trainer::pretrain::pretrain_from_env(cfg).context("pretraining failed")?;
    Ok(RunEnd {
        verb: "pretrain",
        product: "base",
        path: &out.base_dir,
        rank: out.rank,
        start_step: out.start_step,
        max_steps: out.max_steps,
        steps: out.losses.len(),
        first_loss: out.losses.first().copied().unwrap_or(f64::NAN),
        last_loss: out.losses.last().copied().unwrap_or(f64::NAN),
        skipped: out.skipped,
        stopped_by_signal: out.stopped_by_signal,
    }
    .report(exit_on_signal))
}

/// How a run of `train` or `pretrain-base` ended, for its last line.
#[derive(Clone, Copy)]
struct RunEnd<'a> {
    /// "train" or "pretrain".
    verb: &'static str,
    /// What the run writes: "LoRA" or "base".
    product: &'static str,
    path: &'a Path,
    rank: usize,
    start_step: u64,
    max_steps: u64,
    /// Steps this process ran (0: the run was already at max_steps).
    steps: usize,
    first_loss: f64,
    last_loss: f64,
    skipped: u64,
    stopped_by_signal: bool,
}

impl RunEnd<'_> {
    /// Rank 0 says how the run ended; the exit code is `exit_on_signal`
    /// (train.signal_exit_code) when a signal stopped it, so a scheduler can requeue the job.
    fn report(&self, exit_on_signal: u8) -> ExitCode {
        let RunEnd {
            verb,
            product,
            path,
            rank,
            start_step,
            max_steps,
            steps,
            first_loss: first,
            last_loss: last,
            skipped,
            stopped_by_signal,
        } = *self;
        let path = path.display();
        if rank == 0 {
            if steps == 0 {
                println!(
                    "nothing to {verb}: the run is already at step {start_step} (to train further: raise train.max_steps, or start over with --no-resume --overwrite, or another run.dir); {product} written to {path}"
                );
            } else if stopped_by_signal {
                println!(
                    "stopped by a signal after step {} of {max_steps} ({steps} steps this time, loss {first:.4} -> {last:.4}, {skipped} skipped); checkpoint saved: started again, the run resumes there; {product} so far written to {path}",
                    start_step + steps as u64
                );
            } else {
                println!(
                    "{verb}ed {steps} steps (loss {first:.4} -> {last:.4}, {skipped} skipped); {product} written to {path}"
                );
            }
        }
        if stopped_by_signal {
            ExitCode::from(exit_on_signal)
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn eval_cmd(a: EvalArgs) -> anyhow::Result<()> {
    let device = match a.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0).context("opening CUDA device 0")?,
        other => anyhow::bail!("--device {other}: cpu or cuda"),
    };
    if let (Some(url), Some(config)) = (&a.heldout, &a.config) {
        let cfg = load_config(config, &a.set)?;
        let lora = a
            .lora
            .as_deref()
            .map(trainer::sample::local_copy)
            .transpose()?;
        let m = trainer::measures::eval_heldout(&cfg, url, lora.as_deref(), &device)
            .context("measuring on the held-out dataset failed")?;
        print!("{}", trainer::measures::table(&m));
        let text = serde_json::to_string_pretty(&m)?;
        std::fs::write(&a.out, text + "\n")
            .with_context(|| format!("writing {}", a.out.display()))?;
        println!("wrote {}", a.out.display());
        return Ok(());
    }
    let (Some(samples), Some(cases)) = (a.samples, a.cases) else {
        anyhow::bail!("give --samples and --cases, or --heldout with --config");
    };
    let opts = trainer::eval::EvalOptions {
        samples,
        cases,
        clip: a.clip,
        dino: a.dino,
    };
    let report = trainer::eval::evaluate(&opts, &device).context("evaluation failed")?;
    print!("{}", trainer::eval::table(&report));
    trainer::eval::write(&report, &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn bench_step_cmd(a: BenchStepArgs) -> anyhow::Result<()> {
    if a.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    let cfg = load_config(&a.config, &a.set)?;
    let r =
        trainer::bench_step::measure(&a.label, cfg, a.warmup, a.steps, a.peak_tflops, a.profile)
            .with_context(|| format!("benchmark case `{}` failed", a.label))?;
    if a.header {
        println!("{}", trainer::bench_step::StepBench::HEADER);
    }
    println!("{}", r.row());
    if a.profile {
        println!("\n{}", r.profile_table());
    }
    if let Some(path) = a.json {
        append_json(&path, &r)?;
    }
    Ok(())
}

/// The config of `train` or `pretrain-base`: the file, its --set overrides, and the resume
/// flags as checkpoint.* settings.
fn train_config(args: TrainArgs) -> anyhow::Result<Config> {
    let TrainArgs {
        config,
        mut set,
        resume,
        no_resume,
        overwrite,
    } = args;
    if let Some(dir) = resume {
        set.push(format!(
            "checkpoint.resume_from={:?}",
            dir.display().to_string()
        ));
    }
    if no_resume {
        set.push("checkpoint.resume=false".into());
    }
    if overwrite {
        set.push("checkpoint.overwrite=true".into());
    }
    load_config(&config, &set)
}

fn train_cmd(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let cfg = train_config(args)?;
    let exit_on_signal = cfg.train.signal_exit_code;
    let out = trainer::train::train_from_env(cfg).context("training failed")?;
    Ok(RunEnd {
        verb: "train",
        product: "LoRA",
        path: &out.lora_path,
        rank: out.rank,
        start_step: out.start_step,
        max_steps: out.max_steps,
        steps: out.losses.len(),
        first_loss: out.losses.first().map(|l| l.total).unwrap_or(f64::NAN),
        last_loss: out.losses.last().map(|l| l.total).unwrap_or(f64::NAN),
        skipped: out.skipped,
        stopped_by_signal: out.stopped_by_signal,
    }
    .report(exit_on_signal))
}

/// `trainer export`, then the optional Hub upload.
fn export_cmd(args: ExportArgs) -> anyhow::Result<()> {
    let opts = trainer::export::ExportOptions {
        format: args.format,
        ema: args.ema,
        dtype: match args.dtype {
            ExportDtype::F32 => candle_core::DType::F32,
            ExportDtype::Bf16 => candle_core::DType::BF16,
        },
        base_model: args.base_model,
        license: args.license,
    };
    let (checkpoint, out) = (&args.checkpoint, &args.out);
    let files = trainer::export::export(checkpoint, out, &opts)
        .with_context(|| format!("exporting {}", checkpoint.display()))?;
    for f in &files {
        println!("wrote {}", f.display());
    }
    if let Some(repo) = args.push_to_hub {
        let url = trainer::hub::push_folder(&repo, out, args.private)
            .with_context(|| format!("pushing {} to the Hub as {repo}", out.display()))?;
        println!("pushed to {url}");
    }
    Ok(())
}

fn main() -> ExitCode {
    trainer::alloc::keep_freed_memory();
    // Before any thread starts (it sets an environment variable): see kernels::cpu_threads.
    kernels::cpu_threads::settle();
    init_tracing();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("trainer: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
