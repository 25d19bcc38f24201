//! FLUX.1's pretrained encoders, loaded from a pipeline folder in the diffusers layout, give
//! what the reference implementations give (diffusers' AutoencoderKL, transformers'
//! T5EncoderModel and CLIPTextModel and their tokenizers, as FluxPipeline calls them) on the
//! tiny random models ci/encoders_fixture.py writes; from BFL's ae.safetensors too, and from
//! an S3 URL. The fingerprint follows every file, and each broken input names its file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use datasets::encode::{load_encoders, EncoderSpec, EncoderWeights, Encoders, PretrainedSource};
use datasets::Location;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders")
}

struct Expected {
    pixels: Tensor,
    latents: Tensor,
    t5_ids: Vec<Vec<u32>>,
    t5: Tensor,
    clip_ids: Vec<Vec<u32>>,
    pooled: Tensor,
    captions: Vec<String>,
    t5_tokens: usize,
}

fn expected() -> Expected {
    let t = candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu)
        .unwrap();
    let ids = |k: &str| -> Vec<Vec<u32>> { t[k].to_dtype(DType::U32).unwrap().to_vec2().unwrap() };
    let caps: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("captions.json")).unwrap())
            .unwrap();
    Expected {
        pixels: t["pixels"].clone(),
        latents: t["latents"].clone(),
        t5_ids: ids("t5_ids"),
        t5: t["t5"].clone(),
        clip_ids: ids("clip_ids"),
        pooled: t["pooled"].clone(),
        captions: caps["captions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect(),
        t5_tokens: caps["t5_tokens"].as_u64().unwrap() as usize,
    }
}

pub fn spec(folder: &str, vae: Option<String>, cache: &Path) -> EncoderSpec {
    EncoderSpec {
        weights: EncoderWeights::Pretrained(PretrainedSource {
            folder: folder.into(),
            vae,
            cache: cache.to_path_buf(),
        }),
        text_tokens: expected().t5_tokens,
        context_dim: 32,
        pooled_dim: 16,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn pixels_of(t: &Tensor) -> Vec<datasets::Pixels> {
    let (b, _, h, w) = t.dims4().unwrap();
    (0..b)
        .map(|i| datasets::Pixels {
            height: h,
            width: w,
            data: t.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
        })
        .collect()
}

/// Everything the encoders produce matches the reference outputs.
pub fn check_against_reference(enc: &mut Encoders) {
    let e = expected();
    let captions: Vec<&str> = e.captions.iter().map(String::as_str).collect();
    let (t5_ids, clip_ids) = enc.token_ids(&captions).unwrap();
    assert_eq!(t5_ids.to_vec2::<u32>().unwrap(), e.t5_ids, "T5 token ids");
    assert_eq!(
        clip_ids.to_vec2::<u32>().unwrap(),
        e.clip_ids,
        "CLIP token ids"
    );
    let px = pixels_of(&e.pixels);
    let z = enc.encode_images(&px.iter().collect::<Vec<_>>()).unwrap();
    let (txt, pooled) = enc.encode_text(&captions).unwrap();
    let diffs = [
        ("latents", max_diff(&z, &e.latents)),
        ("T5 embeddings", max_diff(&txt, &e.t5)),
        ("CLIP pooled embeddings", max_diff(&pooled, &e.pooled)),
    ];
    eprintln!("largest differences from the reference: {diffs:?}");
    for (what, d) in diffs {
        assert!(d < 1e-4, "{what} differ by {d}");
    }
}

#[test]
fn pretrained_encoders_match_the_reference_implementations() {
    let cache = tempfile::tempdir().unwrap();
    let folder = fixture().display().to_string();
    let mut enc =
        load_encoders(&spec(&folder, None, cache.path()), DType::F32, &Device::Cpu).unwrap();
    check_against_reference(&mut enc);
    // Widths come from the configs.
    let src = PretrainedSource {
        folder,
        vae: None,
        cache: cache.path().to_path_buf(),
    };
    assert_eq!(datasets::encode::pretrained_widths(&src).unwrap(), (32, 16));
}

#[test]
fn bfl_ae_safetensors_gives_the_same_latents() {
    let cache = tempfile::tempdir().unwrap();
    let folder = fixture().display().to_string();
    let ae = fixture().join("bfl/ae.safetensors").display().to_string();
    let mut enc = load_encoders(
        &spec(&folder, Some(ae), cache.path()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    check_against_reference(&mut enc);

    // A pipeline folder with ae.safetensors at the top and no vae/ uses it.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), tmp.path());
    std::fs::remove_dir_all(tmp.path().join("vae")).unwrap();
    std::fs::copy(
        fixture().join("bfl/ae.safetensors"),
        tmp.path().join("ae.safetensors"),
    )
    .unwrap();
    let mut enc = load_encoders(
        &spec(&tmp.path().display().to_string(), None, cache.path()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    check_against_reference(&mut enc);
}

/// Replaces `from` (which must be there) by `to` in the text file at `path`.
fn replace_in(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn the_fingerprint_follows_every_file() {
    let cache = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), tmp.path());
    let folder = tmp.path().display().to_string();
    let s = spec(&folder, None, cache.path());
    let fp = s.fingerprint().unwrap();
    assert!(fp.starts_with("flux-pretrained-v1/vae-"), "{fp}");
    assert!(fp.ends_with(&format!("/tokens{}", s.text_tokens)), "{fp}");
    // Another copy of the same files, elsewhere: the same fingerprint.
    let same = spec(&fixture().display().to_string(), None, cache.path());
    assert_eq!(same.fingerprint().unwrap(), fp);
    let mut longer = s.clone();
    longer.text_tokens += 1;
    assert_ne!(longer.fingerprint().unwrap(), fp);

    let part = |fp: &str, name: &str| -> String {
        fp.split('/')
            .find(|p| p.starts_with(name))
            .unwrap()
            .to_string()
    };
    // One changed byte in a T5 shard changes T5's digest and nothing else.
    let shard = tmp
        .path()
        .join("text_encoder_2/model-00002-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let fp2 = s.fingerprint().unwrap();
    assert_ne!(part(&fp, "t5-"), part(&fp2, "t5-"));
    for other in ["vae-", "clip-", "tokenizers-"] {
        assert_eq!(part(&fp, other), part(&fp2, other), "{other}");
    }
    // A tokenizer setting too.
    replace_in(
        &tmp.path().join("tokenizer/tokenizer_config.json"),
        "\"model_max_length\": 16",
        "\"model_max_length\": 17",
    );
    let fp3 = s.fingerprint().unwrap();
    assert_ne!(part(&fp2, "tokenizers-"), part(&fp3, "tokenizers-"));
    // And the VAE file chosen.
    let bfl = spec(
        &folder,
        Some(fixture().join("bfl/ae.safetensors").display().to_string()),
        cache.path(),
    );
    assert_ne!(
        part(&bfl.fingerprint().unwrap(), "vae-"),
        part(&fp3, "vae-")
    );
}

fn load_err(folder: &Path, vae: Option<String>, pooled_dim: usize) -> String {
    let cache = tempfile::tempdir().unwrap();
    let mut s = spec(&folder.display().to_string(), vae, cache.path());
    s.pooled_dim = pooled_dim;
    match load_encoders(&s, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => flux::chain(&e),
    }
}

#[test]
fn broken_model_folders_name_the_file_at_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let fresh = || {
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&fixture(), &dir);
    };

    fresh();
    std::fs::remove_file(dir.join("text_encoder_2/config.json")).unwrap();
    let e = load_err(&dir, None, 16);
    assert!(
        e.contains("text_encoder_2/config.json") && e.contains("not found"),
        "{e}"
    );

    fresh();
    std::fs::remove_file(dir.join("tokenizer_2/tokenizer.json")).unwrap();
    let e = load_err(&dir, None, 16);
    assert!(
        e.contains("tokenizer_2/tokenizer.json") && e.contains("spiece.model"),
        "{e}"
    );

    fresh();
    std::fs::remove_file(dir.join("text_encoder_2/model-00001-of-00002.safetensors")).unwrap();
    let e = load_err(&dir, None, 16);
    assert!(e.contains("model-00001-of-00002.safetensors"), "{e}");

    fresh();
    std::fs::write(
        dir.join("text_encoder_2/model.safetensors.index.json"),
        r#"{"weight_map": {}}"#,
    )
    .unwrap();
    let e = load_err(&dir, None, 16);
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("lists no file"),
        "{e}"
    );

    fresh();
    replace_in(
        &dir.join("text_encoder_2/config.json"),
        "\"num_heads\": 4",
        "\"num_heads\": 0",
    );
    let e = load_err(&dir, None, 16);
    assert!(
        e.contains("text_encoder_2/config.json") && e.contains("num_heads"),
        "{e}"
    );

    fresh();
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let e = load_err(&dir, None, 16);
    assert!(
        e.contains("ae.safetensors") && e.contains("vae/config.json"),
        "{e}"
    );

    fresh();
    let w = dir.join("text_encoder/model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir, None, 16);
    assert!(e.contains("text_encoder/model.safetensors"), "{e}");

    fresh();
    let e = load_err(&dir, None, 768);
    assert!(
        e.contains("text_encoder/config.json")
            && e.contains("CLIP is 16 wide")
            && e.contains("768"),
        "{e}"
    );

    fresh();
    replace_in(
        &dir.join("vae/config.json"),
        "\"use_quant_conv\": false",
        "\"use_quant_conv\": true",
    );
    let e = load_err(&dir, None, 16);
    assert!(
        e.contains("vae/config.json") && e.contains("quant_conv"),
        "{e}"
    );

    fresh();
    std::fs::write(
        dir.join("tokenizer/merges.txt"),
        "#version: 0.2\nnot a merge line at all\n",
    )
    .unwrap();
    let e = load_err(&dir, None, 16);
    assert!(e.contains("tokenizer/vocab.json"), "{e}");

    fresh();
    let e = load_err(
        &dir,
        Some(dir.join("no/ae.safetensors").display().to_string()),
        16,
    );
    assert!(e.contains("no"), "{e}");
    let e = load_err(
        &dir,
        Some(
            dir.join("text_encoder/model.safetensors")
                .display()
                .to_string(),
        ),
        16,
    );
    assert!(e.contains("no `encoder.*` tensor"), "{e}");
    let e = load_err(
        &dir,
        Some(
            dir.join("text_encoder_2/model-00001-of-00002.safetensors")
                .display()
                .to_string(),
        ),
        16,
    );
    assert!(
        e.contains("not a FLUX VAE: no tensor `encoder.conv_in.weight`"),
        "{e}"
    );

    let e = load_err(&tmp.path().join("missing"), None, 16);
    assert!(e.contains("missing") && e.contains("no such folder"), "{e}");
}

#[test]
fn pretrained_encoders_load_from_s3_and_download_once() {
    let Some(url) = crate::common::server_url("MOSAIC_TEST_S3_URL", "ci/s3.sh", "encoders") else {
        return;
    };
    let remote = Location::parse(&url).unwrap();
    fn upload(remote: &Location, dir: &Path, rel: &str) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = format!("{rel}{}", e.file_name().to_string_lossy());
            if e.file_type().unwrap().is_dir() {
                upload(remote, &e.path(), &format!("{name}/"));
            } else {
                remote.put(&name, std::fs::read(e.path()).unwrap()).unwrap();
            }
        }
    }
    upload(&remote, &fixture(), "");
    let cache = tempfile::tempdir().unwrap();
    let s = spec(&url, None, cache.path());
    let mut enc = load_encoders(&s, DType::F32, &Device::Cpu).unwrap();
    check_against_reference(&mut enc);
    let local = spec(&fixture().display().to_string(), None, cache.path());
    assert_eq!(s.fingerprint().unwrap(), local.fingerprint().unwrap());

    // The copies are reused: a second load does not rewrite them.
    let downloaded: Vec<PathBuf> = walk(&cache.path().join("models"));
    assert!(downloaded
        .iter()
        .any(|p| p.ends_with("text_encoder_2/model-00001-of-00002.safetensors")));
    let times = |ps: &[PathBuf]| -> Vec<std::time::SystemTime> {
        ps.iter()
            .map(|p| std::fs::metadata(p).unwrap().modified().unwrap())
            .collect()
    };
    let before = times(&downloaded);
    std::thread::sleep(std::time::Duration::from_millis(20));
    load_encoders(&s, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(times(&downloaded), before);
    assert!(!walk(cache.path())
        .iter()
        .any(|p| p.to_string_lossy().contains(".download-")));

    // The VAE as a single remote file.
    let ae = format!("{url}/bfl/ae.safetensors");
    let mut enc = load_encoders(
        &spec(&url, Some(ae), cache.path()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    check_against_reference(&mut enc);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// The VAE decoder (candle-transformers' FLUX decoder with diffusers names mapped, up blocks
/// reversed) decodes as diffusers' AutoencoderKL does after FluxPipeline's z / scale + shift
/// (fixture from ci/vae_decode_fixture.py).
#[test]
fn the_vae_decoder_matches_diffusers_autoencoder_kl() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae_decoder");
    let tmp = tempfile::tempdir().unwrap();
    let folder = datasets::model_files::ModelFolder::open(
        &dir.join("vae").display().to_string(),
        tmp.path(),
    )
    .unwrap();
    let dec = flux::encoders::pretrained::vae_decoder(&folder, DType::F32, &Device::Cpu).unwrap();
    let t = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let got = dec.decode(&t["latents"]).unwrap();
    assert_eq!(got.dims(), t["images"].dims());
    let err = (&got - &t["images"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err <= 1e-4, "max abs error {err}");
}
