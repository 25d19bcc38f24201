//! `trainer sample`: images from a base, a LoRA, a prompt and reference images, the way the
//! official MOSAIC inference makes them (docs/design.md §11): references prepared on white at
//! 0.9 of their side and VAE-encoded (posterior mode), clean (t = 0, guidance 1) with the LoRA on
//! their tokens and the group mask; FLUX's flow-matching Euler sampler with the
//! resolution-shifted schedule (`flux::schedule`, equal to diffusers'); the VAE decoder.
//!
//! With the reference cache (the default, as the official inference's kv_cache) references
//! attend only to themselves and their keys and values are computed at the first step only;
//! without it they attend to every token at every step, exactly as in training.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand_distr::{Distribution, StandardNormal};

use crate::config::Config;
use crate::error::{Result, TrainerError};
use flux::embed::{grid_ids, pack_latents, reference_ids, text_ids, unpack_latents};
use flux::encoders::Pixels;
use flux::rng::{stream, Purpose};
use flux::schedule::FlowMatchSchedule;
use flux::{Flux, Lora, ModelInputs, RefInputs, RowBlocks};

/// The most references MOSAIC takes.
pub const MAX_REFS: usize = crate::config::MAX_REFS;

/// One image to make.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    pub prompt: String,
    pub refs: Vec<PathBuf>,
    /// Target width and height in pixels (multiples of 16).
    pub width: usize,
    pub height: usize,
    /// Reference side in pixels (a multiple of 16).
    pub ref_size: usize,
    pub steps: usize,
    pub guidance: f32,
    /// Classifier-free guidance on the prompt against `negative_prompt` (diffusers'
    /// `true_cfg_scale`); 1 runs no second forward.
    pub true_cfg: f32,
    /// The negative prompt of `true_cfg` ("" is the empty caption, the unconditional branch
    /// caption dropout trains).
    pub negative_prompt: String,
    pub seed: u64,
    /// Compute the references' keys and values once (`flux::ref_cache`); they then attend
    /// only to themselves.
    pub ref_cache: bool,
    /// Start latents [1, N, 64] (packed) instead of the seed's noise (tests, parity); with
    /// `init`, the noise mixed into the image.
    pub start: Option<Tensor>,
    /// Image-to-image: the picture sampling starts from.
    pub init: Option<InitImage>,
}

/// Image-to-image (diffusers' FluxImg2ImgPipeline): the image at `path`, resized to the
/// target's size and VAE-encoded (posterior mode), is noised to the sigma where the last
/// `strength` of the schedule begins, and only that tail is run. Strength 1 runs the whole
/// schedule from pure noise; small strengths change little.
#[derive(Debug, Clone)]
pub struct InitImage {
    pub path: PathBuf,
    /// In (0, 1]: the share of the schedule's steps that run.
    pub strength: f64,
}

/// One entry of an official case list (`example_cases.json`): `image_paths` is one path or a
/// list.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Case {
    pub index: serde_json::Value,
    pub prompt: String,
    pub image_paths: OneOrMany,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl Case {
    /// The reference paths.
    pub fn refs(&self) -> Vec<PathBuf> {
        match &self.image_paths {
            OneOrMany::One(p) => vec![PathBuf::from(p)],
            OneOrMany::Many(v) => v.iter().map(PathBuf::from).collect(),
        }
    }

    /// The file name stem of its outputs: the index as written.
    pub fn stem(&self) -> String {
        match &self.index {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

/// A local file for `arg`, a path or an object-store URL (s3://, gs://, az://, http(s)://,
/// file://): the path itself, or a copy of the object in the model cache (fetched once, reused
/// while its size holds).
pub fn local_copy(arg: &str) -> Result<PathBuf> {
    let cache = datasets::model_files::cache_root();
    let (folder, name) = datasets::model_files::ModelFolder::open_file(arg, &cache)?;
    Ok(folder.file(&name)?)
}

/// Reads the official case list at `arg` (a path or URL), refusing a malformed one naming it.
/// Relative image paths start at the list's folder, as in the official `example_cases.json`;
/// images behind URLs are fetched to local copies, local ones are checked by the caller.
pub fn read_cases(arg: &str) -> Result<Vec<Case>> {
    let local = local_copy(arg)?;
    let text = std::fs::read_to_string(&local).map_err(|e| TrainerError::io(&local, e))?;
    let mut cases: Vec<Case> = serde_json::from_str(&text).map_err(|e| TrainerError::Parse {
        file: PathBuf::from(arg),
        reason: format!("not a list of {{\"index\", \"prompt\", \"image_paths\"}}: {e}"),
    })?;
    let base = arg.rsplit_once('/').map(|(dir, _)| dir);
    let place = |p: &str| -> Result<String> {
        let joined = match base {
            Some(dir) if !p.contains("://") && !Path::new(p).is_absolute() => format!("{dir}/{p}"),
            _ => p.to_string(),
        };
        if joined.contains("://") {
            Ok(local_copy(&joined)?.display().to_string())
        } else {
            Ok(joined)
        }
    };
    for c in &mut cases {
        c.image_paths = match &c.image_paths {
            OneOrMany::One(p) => OneOrMany::One(place(p)?),
            OneOrMany::Many(v) => {
                OneOrMany::Many(v.iter().map(|p| place(p)).collect::<Result<_>>()?)
            }
        };
    }
    Ok(cases)
}

/// Start latents from `path` (tensor `latents`, [1, N, 64]).
pub fn read_start(path: &Path) -> Result<Tensor> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| TrainerError::read(path, e))?;
    map.get("latents")
        .cloned()
        .ok_or_else(|| bad(path.display().to_string(), "has no tensor `latents`"))
}

/// What `trainer sample` writes: the image, and the references beside it.
pub struct Sampled {
    pub image: RgbImage,
    pub panel: RgbImage,
    /// The final latents, packed [1, N, 64], in f32.
    pub latents: Tensor,
    pub timings: SampleTimings,
    /// Bytes the reference cache held (0 without it or without references).
    pub ref_cache_bytes: usize,
}

/// Where the time of one image went (the device synchronised at each boundary).
#[derive(Debug, Clone, Copy, Default)]
pub struct SampleTimings {
    /// Reference images read, prepared and VAE-encoded; prompt encoded.
    pub encode: Duration,
    /// The denoising loop.
    pub denoise: Duration,
    /// The VAE decoder and the 8-bit image.
    pub decode: Duration,
}

impl SampleTimings {
    pub fn total(&self) -> Duration {
        self.encode + self.denoise + self.decode
    }
}

/// A loaded pipeline: base, LoRA, encoders and decoder.
pub struct Sampler {
    model: Flux,
    lora: Lora,
    encoders: flux::encoders::Encoders,
    decoder: flux::encoders::VaeDecoder,
    device: Device,
}

fn bad(name: impl Into<String>, reason: impl Into<String>) -> TrainerError {
    TrainerError::Input {
        name: name.into(),
        reason: reason.into(),
    }
}

impl Sampler {
    /// The pipeline of run config `cfg` (its `model.*` base and `data.*` encoders), with the
    /// LoRA in `lora` (this project's, diffusers, PEFT or kohya keys) if given.
    pub fn load(cfg: &Config, lora: Option<&Path>, device: &Device) -> Result<Self> {
        let (fc, weights) = crate::run::base_weights(cfg, device)?;
        let model = Flux::new(fc.clone(), &weights, RowBlocks::default())?;
        let lora = load_lora(&fc, lora, device)?;
        let (encoders, decoder) = crate::data::shards::encoders_and_decoder(cfg, &fc, device)?;
        Ok(Self {
            model,
            lora,
            encoders,
            decoder,
            device: device.clone(),
        })
    }

    /// The transformer's dtype.
    pub fn dtype(&self) -> DType {
        self.model.dtype()
    }

    /// Checks a request before any work: sizes, reference count, and every reference readable.
    fn prepared_refs(&self, req: &SampleRequest) -> Result<Vec<RgbImage>> {
        for (name, v) in [
            ("--width", req.width),
            ("--height", req.height),
            ("--ref-size", req.ref_size),
        ] {
            if v < 16 || v % 16 != 0 {
                return Err(bad(name, format!("{v}: must be a positive multiple of 16")));
            }
        }
        if req.refs.len() > MAX_REFS {
            return Err(bad(
                "--ref",
                format!(
                    "{} references: MOSAIC takes at most {MAX_REFS}",
                    req.refs.len()
                ),
            ));
        }
        if req.steps == 0 {
            return Err(bad("--steps", "must be at least 1"));
        }
        if let Some(init) = &req.init {
            let tokens = (req.width / 16) * (req.height / 16);
            img2img_schedule(&FlowMatchSchedule::flux(req.steps, tokens), init.strength)?;
        }
        req.refs
            .iter()
            .map(|p| load_reference(p, req.ref_size))
            .collect()
    }

    /// The references as model inputs: VAE latents packed into tokens, with their ids.
    fn ref_inputs(&self, refs: &[RgbImage]) -> Result<Option<RefInputs>> {
        reference_inputs(&self.encoders, refs, self.model.dtype(), &self.device)
    }

    /// The image at `path` as clean packed latents [1, N, 64] of a `width` x `height` target:
    /// resized to that size (Lanczos, as diffusers' image processor) and VAE-encoded.
    fn init_latents(&self, path: &Path, width: usize, height: usize) -> Result<Tensor> {
        let img = image::open(path)
            .map_err(|e| bad(path.display().to_string(), e.to_string()))?
            .to_rgb8();
        let img = if img.dimensions() == (width as u32, height as u32) {
            img
        } else {
            image::imageops::resize(
                &img,
                width as u32,
                height as u32,
                image::imageops::FilterType::Lanczos3,
            )
        };
        let z = self.encoders.encode_images(&[&pixels(&img)])?;
        Ok(pack_latents(&z.to_device(&self.device)?)?)
    }

    /// `img` as the pipeline sees a picture: VAE-encoded (posterior mode) and decoded.
    pub fn through_codec(&self, img: &RgbImage) -> Result<RgbImage> {
        let z = self.encoders.encode_images(&[&pixels(img)])?;
        to_rgb(&self.decoder.decode(&z)?)
    }

    /// Makes the image `req` asks for.
    pub fn sample(&mut self, req: &SampleRequest) -> Result<Sampled> {
        let t0 = Instant::now();
        let ref_images = self.prepared_refs(req)?;
        if !(req.true_cfg.is_finite() && req.true_cfg >= 1.0) {
            return Err(bad(
                "--true-cfg",
                format!("{}: must be a finite number >= 1", req.true_cfg),
            ));
        }
        let (txt, pooled) = self.encoders.encode_text(&[req.prompt.as_str()])?;
        let negative = (req.true_cfg != 1.0)
            .then(|| NegativePrompt::encode(&mut self.encoders, &req.negative_prompt, &self.device))
            .transpose()?;
        let cond = Conditioning {
            txt: txt.to_device(&self.device)?,
            pooled: pooled.to_device(&self.device)?,
            negative,
            refs: self.ref_inputs(&ref_images)?,
            ref_images,
        };
        let view = Renderer {
            model: &self.model,
            lora: self.lora.view(false),
            decoder: &self.decoder,
        };
        let init = match &req.init {
            Some(init) => Some(Img2Img {
                latents: self.init_latents(&init.path, req.width, req.height)?,
                strength: init.strength,
            }),
            None => None,
        };
        let mut out = view.render(&cond, &req.render(init))?;
        out.timings.encode += t0.elapsed() - out.timings.total();
        Ok(out)
    }
}

/// A prompt and its references, encoded: what an image needs besides its noise.
pub struct Conditioning {
    /// T5 embeddings [1, L, ctx] and CLIP pooled [1, pooled], on the model's device.
    pub txt: Tensor,
    pub pooled: Tensor,
    /// The negative prompt, encoded, when `RenderOptions::true_cfg` asks for it.
    pub negative: Option<NegativePrompt>,
    pub refs: Option<RefInputs>,
    /// The prepared reference images (for panels and grids).
    pub ref_images: Vec<RgbImage>,
}

/// A negative prompt's T5 embeddings [1, L, ctx] and CLIP pooled [1, pooled], on the model's
/// device.
#[derive(Debug, Clone)]
pub struct NegativePrompt {
    pub txt: Tensor,
    pub pooled: Tensor,
}

impl NegativePrompt {
    /// `text` through the pipeline's text encoders, on `device`.
    pub fn encode(
        encoders: &mut flux::encoders::Encoders,
        text: &str,
        device: &Device,
    ) -> Result<Self> {
        let (txt, pooled) = encoders.encode_text(&[text])?;
        Ok(Self {
            txt: txt.to_device(device)?,
            pooled: pooled.to_device(device)?,
        })
    }
}

/// How to render one image from a [`Conditioning`].
#[derive(Debug, Clone)]
pub struct RenderOptions {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    /// Classifier-free guidance scale on the prompt against `Conditioning::negative` (1: none).
    pub true_cfg: f32,
    pub seed: u64,
    pub ref_cache: bool,
    /// Start latents [1, N, 64] instead of the seed's noise; with `init`, the noise mixed
    /// into the image.
    pub start: Option<Tensor>,
    /// Image-to-image: the clean latents to start from and the strength.
    pub init: Option<Img2Img>,
}

/// The encoded start image of image-to-image sampling ([`InitImage`]).
#[derive(Debug, Clone)]
pub struct Img2Img {
    /// Clean latents, packed [1, N, 64].
    pub latents: Tensor,
    pub strength: f64,
}

impl SampleRequest {
    fn render(&self, init: Option<Img2Img>) -> RenderOptions {
        RenderOptions {
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            true_cfg: self.true_cfg,
            seed: self.seed,
            ref_cache: self.ref_cache,
            start: self.start.clone(),
            init,
        }
    }
}

/// The reference image at `path` prepared as the official inference prepares it (white
/// background, cropped to its content, 0.9 of a `side`-pixel square); an unreadable file is
/// named.
pub fn load_reference(path: &Path, side: usize) -> Result<RgbImage> {
    let img = image::open(path).map_err(|e| bad(path.display().to_string(), e.to_string()))?;
    Ok(flux::reference_image::prepare(
        &img,
        side as u32,
        flux::reference_image::OFFICIAL_SCALE,
    ))
}

/// The references `refs` as model inputs: VAE latents (posterior mode) packed into tokens,
/// with the official position ids, clean (t = 0, guidance 1).
pub fn reference_inputs(
    encoders: &flux::encoders::Encoders,
    refs: &[RgbImage],
    dtype: DType,
    device: &Device,
) -> Result<Option<RefInputs>> {
    if refs.is_empty() {
        return Ok(None);
    }
    let (mut latents, mut ids, mut lens) = (Vec::new(), Vec::new(), Vec::new());
    for (k, img) in refs.iter().enumerate() {
        let px = pixels(img);
        let z = encoders.encode_images(&[&px])?.to_device(device)?;
        let (rows, cols) = (z.dim(2)? / 2, z.dim(3)? / 2);
        latents.push(pack_latents(&z)?);
        ids.extend(reference_ids(rows, cols, k));
        lens.push(rows * cols);
    }
    Ok(Some(RefInputs {
        latents: Tensor::cat(&latents, 1)?.to_dtype(dtype)?,
        ids,
        lens,
        timestep: vec![0.0],
        guidance: vec![1.0],
    }))
}

/// A model, the LoRA to sample with and the decoder: what turns a [`Conditioning`] into an
/// image. Training's validation renders with the run's own model and (EMA) LoRA.
pub struct Renderer<'a> {
    pub model: &'a Flux,
    pub lora: flux::LoraView<'a>,
    pub decoder: &'a flux::encoders::VaeDecoder,
}

impl Renderer<'_> {
    /// One image: the seed's noise (its own stream, `Purpose::Sample`), the denoising loop,
    /// the decoder.
    pub fn render(&self, cond: &Conditioning, opts: &RenderOptions) -> Result<Sampled> {
        let device = self.model.device().clone();
        let dtype = self.model.dtype();
        for (name, v) in [("--width", opts.width), ("--height", opts.height)] {
            if v < 16 || v % 16 != 0 {
                return Err(bad(name, format!("{v}: must be a positive multiple of 16")));
            }
        }
        let (h, w) = (opts.height / 8, opts.width / 8);
        let (rows, cols) = (h / 2, w / 2);
        let n = rows * cols;
        let (schedule, start) = start_of(opts, n, &device)?;
        let inputs = ModelInputs {
            img: start.to_dtype(dtype)?,
            img_ids: grid_ids(rows, cols, 0),
            txt_ids: text_ids(cond.txt.dim(1)?),
            txt: cond.txt.to_dtype(dtype)?,
            pooled: cond.pooled.to_dtype(dtype)?,
            timestep: vec![],
            guidance: vec![],
            refs: cond.refs.clone(),
            isolate_refs: true,
            row_queries: None,
        };
        let prompt_guidance = prompt_guidance(cond, opts)?;
        device.synchronize()?;
        let t1 = Instant::now();
        let denoised = flux::sample::denoise_guided(
            self.model,
            self.lora,
            inputs,
            &schedule,
            opts.guidance,
            opts.ref_cache,
            prompt_guidance.as_ref(),
        )?;
        device.synchronize()?;
        let t2 = Instant::now();
        let latents = denoised.latents.to_dtype(DType::F32)?;
        let z = unpack_latents(&latents, h, w)?;
        let image = to_rgb(&self.decoder.decode(&z)?)?;
        let timings = SampleTimings {
            encode: Duration::ZERO,
            denoise: t2 - t1,
            decode: t2.elapsed(),
        };
        let panel = panel(&cond.ref_images, &image);
        Ok(Sampled {
            image,
            panel,
            latents,
            timings,
            ref_cache_bytes: denoised.ref_cache_bytes,
        })
    }
}

/// The schedule `opts` runs on `n` target tokens and the latents it starts from: the seed's
/// noise (or `opts.start`), mixed into the start image's latents for img2img.
fn start_of(
    opts: &RenderOptions,
    n: usize,
    device: &Device,
) -> Result<(FlowMatchSchedule, Tensor)> {
    let noise = match &opts.start {
        Some(t) if t.dims() == [1, n, 64] => t.to_device(device)?,
        Some(t) => {
            return Err(bad(
                "--latents",
                format!(
                    "{:?}, expected [1, {n}, 64] for {}x{} px",
                    t.dims(),
                    opts.width,
                    opts.height
                ),
            ))
        }
        None => {
            let mut rng = stream(opts.seed, Purpose::Sample, &[0]);
            let v: Vec<f32> = (0..n * 64)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Tensor::from_vec(v, (1, n, 64), device)?
        }
    };
    let full = FlowMatchSchedule::flux(opts.steps, n);
    Ok(match &opts.init {
        None => (full, noise),
        Some(init) if init.latents.dims() != [1, n, 64] => {
            return Err(bad(
                "--image",
                format!(
                    "latents {:?}, expected [1, {n}, 64] for {}x{} px",
                    init.latents.dims(),
                    opts.width,
                    opts.height
                ),
            ))
        }
        Some(init) => {
            let tail = img2img_schedule(&full, init.strength)?;
            let x0 = init.latents.to_device(device)?;
            let start = tail.start_latents(&x0, &noise)?;
            (tail, start)
        }
    })
}

/// The tail of `full` image-to-image at `strength` runs, a bad strength named as the flag.
pub(crate) fn img2img_schedule(
    full: &FlowMatchSchedule,
    strength: f64,
) -> Result<FlowMatchSchedule> {
    full.img2img(strength).map_err(|e| match e {
        flux::FluxError::Input { reason, .. } => bad("--strength", reason),
        other => other.into(),
    })
}

/// The classifier-free guidance `opts.true_cfg` asks for, against `cond`'s negative prompt.
fn prompt_guidance(
    cond: &Conditioning,
    opts: &RenderOptions,
) -> Result<Option<flux::sample::PromptGuidance>> {
    if opts.true_cfg == 1.0 {
        return Ok(None);
    }
    let neg = cond.negative.as_ref().ok_or_else(|| {
        bad(
            "true_cfg",
            format!(
                "{} asks for a negative prompt and none was encoded",
                opts.true_cfg
            ),
        )
    })?;
    Ok(Some(flux::sample::PromptGuidance {
        txt: neg.txt.clone(),
        pooled: neg.pooled.clone(),
        scale: opts.true_cfg,
    }))
}

/// An RGB image as the encoders take it: [3, H, W] in [-1, 1].
fn pixels(img: &RgbImage) -> Pixels {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            data[c * w * h + y as usize * w + x as usize] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Pixels {
        height: h,
        width: w,
        data,
    }
}

/// The LoRA file at `path` (diffusers/PEFT/kohya keys) for a model of `fc`, or none (the base
/// alone) without a path.
pub fn load_lora(fc: &flux::FluxConfig, path: Option<&Path>, device: &Device) -> Result<Lora> {
    Ok(match path {
        Some(path) => {
            let file = flux::lora_format::load(path)?;
            flux::lora::from_adapters(fc, &file, path, DType::F32, device)?
        }
        None => Lora::new(
            fc,
            &flux::lora::LoraSpec {
                targets: Vec::new(),
                ..Default::default()
            },
            0,
            DType::F32,
            device,
        )?,
    })
}

/// A decoded image [1, 3, H, W] in [-1, 1] as 8-bit RGB (clamped, rounded).
pub(crate) fn to_rgb(x: &Tensor) -> Result<RgbImage> {
    let (_, _, h, w) = x.dims4()?;
    let v: Vec<f32> = x.get(0)?.flatten_all()?.to_vec1()?;
    let mut img = RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x_ in 0..w {
            let px = |c: usize| {
                let s = (v[c * h * w + y * w + x_] + 1.0) * 127.5;
                s.round().clamp(0.0, 255.0) as u8
            };
            img.put_pixel(x_ as u32, y as u32, image::Rgb([px(0), px(1), px(2)]));
        }
    }
    Ok(img)
}

/// The references, resized to the image's height, then the image, side by side.
fn panel(refs: &[RgbImage], image: &RgbImage) -> RgbImage {
    let h = image.height();
    let resized: Vec<RgbImage> = refs
        .iter()
        .map(|r| image::imageops::resize(r, h, h, image::imageops::FilterType::Lanczos3))
        .collect();
    let width = h * resized.len() as u32 + image.width();
    let mut out = RgbImage::from_pixel(width, h, image::Rgb([255, 255, 255]));
    for (i, r) in resized.iter().enumerate() {
        image::imageops::overlay(&mut out, r, (i as u32 * h) as i64, 0);
    }
    image::imageops::overlay(&mut out, image, (resized.len() as u32 * h) as i64, 0);
    out
}

/// Writes `s` as `out` (PNG) and its panel beside it (`<out stem>.panel.png`); returns both
/// paths.
pub fn write(s: &Sampled, out: &Path) -> Result<(PathBuf, PathBuf)> {
    let panel_path = out.with_extension("panel.png");
    for (img, path) in [(&s.image, out), (&s.panel, panel_path.as_path())] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        }
        img.save_with_format(path, image::ImageFormat::Png)
            .map_err(|e| TrainerError::read(path, e))?;
    }
    Ok((out.to_path_buf(), panel_path))
}
