//! Export: a checkpoint to diffusers, PEFT and kohya files that load back to the same deltas,
//! continuing training from them, the model card, and the Hub upload against a local stub of
//! the Hub's HTTP API that checks every request.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use candle_core::DType;
use flux::lora_format::{self, LoraTensors};
use trainer::export::{export, ExportOptions, Format};
use trainer::run::Run;
use trainer::train::train;

use crate::common::tiny_config;

fn trained_run(dir: &Path) {
    let cfg = tiny_config(dir, &["train.max_steps=3", "optim.lr=1e-2"]);
    train(cfg).unwrap();
}

fn options(format: Format) -> ExportOptions {
    ExportOptions {
        format,
        ema: false,
        dtype: DType::F32,
        base_model: "black-forest-labs/FLUX.1-dev".into(),
        license: "other".into(),
    }
}

fn max_delta_diff(a: &LoraTensors, b: &LoraTensors) -> f32 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same modules"
    );
    a.iter()
        .map(|(m, x)| {
            (x.delta().unwrap() - b[m].delta().unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn every_export_format_loads_back_to_the_trained_deltas() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    trained_run(&run);
    let out = tmp.path().join("export");
    let files = export(&run, &out, &options(Format::All)).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "pytorch_lora_weights.safetensors",
        "adapter_model.safetensors",
        "tiny-cpu-kohya.safetensors",
        "adapter_config.json",
        "README.md",
    ] {
        assert!(names.contains(&want.to_string()), "{want} not in {names:?}");
    }
    let loaded = trainer::export::resolve_checkpoint(&run).unwrap();
    let cfg = trainer::config::Config::from_toml(&loaded.config_toml, &run, &[]).unwrap();
    let trained = trainer::export::adapters(&loaded, &cfg, false).unwrap();
    assert!(trained.values().any(|m| m
        .b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        > 0.0));
    for f in [
        "pytorch_lora_weights.safetensors",
        "adapter_model.safetensors",
        "tiny-cpu-kohya.safetensors",
    ] {
        let back = lora_format::load(&out.join(f)).unwrap();
        let d = max_delta_diff(&trained, &back);
        assert!(d < 1e-6, "{f}: deltas differ by {d}");
    }
    // The diffusers file: exact keys, shapes and scale folded into B (alpha = r).
    let map = candle_core::safetensors::load(
        out.join("pytorch_lora_weights.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let a = &map["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"];
    let b = &map["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[8usize, 64][..], &[64usize, 8][..]));
    let peft: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(peft["r"], 8);
    assert_eq!(peft["lora_alpha"], 8);
    assert_eq!(peft["peft_type"], "LORA");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model: black-forest-labs/FLUX.1-dev\n"),
        "{card}"
    );
    assert!(card.contains("| steps | 3 |"), "{card}");
    assert!(card.contains("license: other"), "{card}");
}

#[test]
fn two_exports_are_the_same_bytes_and_a_foreign_readme_is_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    trained_run(&run);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let files_a = export(&run, &a, &options(Format::All)).unwrap();
    export(&run, &b, &options(Format::All)).unwrap();
    for f in &files_a {
        let name = f.file_name().unwrap();
        assert!(
            std::fs::read(f).unwrap() == std::fs::read(b.join(name)).unwrap(),
            "{name:?} differs between two exports"
        );
    }
    // Exporting again over our own files is fine; somebody's README.md is refused, unchanged.
    export(&run, &a, &options(Format::All)).unwrap();
    let c = tmp.path().join("c");
    std::fs::create_dir_all(&c).unwrap();
    std::fs::write(c.join("README.md"), "# my project\n").unwrap();
    let e = export(&run, &c, &options(Format::All))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("README.md") && e.contains("another --out"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(c.join("README.md")).unwrap(),
        "# my project\n"
    );
}

#[test]
fn training_continues_from_an_exported_file_with_the_same_deltas() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    trained_run(&run);
    let out = tmp.path().join("export");
    export(&run, &out, &options(Format::All)).unwrap();
    let trained = lora_format::load(&out.join("pytorch_lora_weights.safetensors")).unwrap();
    for f in [
        "pytorch_lora_weights.safetensors",
        "tiny-cpu-kohya.safetensors",
    ] {
        // Another alpha than the trained run: B is rescaled so the delta is kept.
        let init = format!("lora.init_from={:?}", out.join(f).display().to_string());
        let cfg = tiny_config(&tmp.path().join("next"), &[&init, "lora.alpha=4.0"]);
        let next = Run::build(cfg).unwrap();
        let live = lora_format::from_live(&next.lora, None);
        let d = max_delta_diff(&trained, &live);
        assert!(d < 1e-6, "{f}: {d}");
    }
    // A rank that does not fit is refused naming the module and the rank.
    let init = format!(
        "lora.init_from={:?}",
        out.join("pytorch_lora_weights.safetensors")
            .display()
            .to_string()
    );
    let cfg = tiny_config(&tmp.path().join("bad"), &[&init, "lora.rank=4"]);
    let e = Run::build(cfg).err().unwrap().to_string();
    assert!(e.contains("x_embedder") && e.contains("LoRA rank 4"), "{e}");
}

#[test]
fn exporting_ema_of_a_run_without_ema_or_a_missing_checkpoint_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let cfg = tiny_config(&run, &["train.max_steps=1", "optim.ema_decay=0"]);
    train(cfg).unwrap();
    let mut o = options(Format::Diffusers);
    o.ema = true;
    let e = export(&run, &tmp.path().join("o"), &o)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("ema.safetensors") && e.contains("ema_decay"),
        "{e}"
    );
    let e = export(
        &tmp.path().join("nothing"),
        &tmp.path().join("o"),
        &options(Format::All),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("holds no checkpoint"), "{e}");
}

/// One request as the stub saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: Option<String>,
    body: Vec<u8>,
}

/// A stand-in for the Hub's HTTP API: answers create, preupload (safetensors via LFS), the LFS
/// batch (upload to the stub itself, or with `storage` to that base URL, with a verify action)
/// and commit, recording every request.
fn hub_stub_with(storage: Option<String>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (log, base2) = (
        seen.clone(),
        storage.clone().unwrap_or_else(|| base.clone()),
    );
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() || line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let reply = if path == "/api/repos/create" {
                r#"{"url":"stub"}"#.to_string()
            } else if path.ends_with("/preupload/main") {
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let files: Vec<serde_json::Value> = req["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| {
                        let p = f["path"].as_str().unwrap();
                        let mode = if p.ends_with(".safetensors") {
                            "lfs"
                        } else {
                            "regular"
                        };
                        serde_json::json!({"path": p, "uploadMode": mode})
                    })
                    .collect();
                serde_json::json!({ "files": files }).to_string()
            } else if path.ends_with(".git/info/lfs/objects/batch") {
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let objects: Vec<serde_json::Value> = req["objects"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| {
                        let oid = o["oid"].as_str().unwrap();
                        let mut actions = serde_json::json!({
                            "upload": {"href": format!("{base2}/lfs-upload/{oid}"),
                                       "header": {"x-stub": "1"}}});
                        if storage.is_some() {
                            actions["verify"] =
                                serde_json::json!({"href": format!("{base2}/lfs-verify/{oid}")});
                        }
                        serde_json::json!({"oid": o["oid"], "size": o["size"], "actions": actions})
                    })
                    .collect();
                serde_json::json!({ "objects": objects }).to_string()
            } else {
                r#"{"commitUrl":"stub"}"#.to_string()
            };
            log.lock().unwrap().push(Seen {
                method,
                path,
                auth: headers.get("authorization").cloned(),
                body,
            });
            let mut s = stream;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                reply.len(),
                reply
            );
        }
    });
    (base, seen)
}

fn hub_stub() -> (String, Arc<Mutex<Vec<Seen>>>) {
    hub_stub_with(None)
}

/// The export pushed to the Hub at `endpoint` with `token`.
fn push(run: &Path, out: &Path, endpoint: &str, token: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["export", "--checkpoint"])
        .arg(run)
        .arg("--out")
        .arg(out)
        .args(["--format", "all", "--push-to-hub", "someone/mosaic-test"])
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", token)
        .output()
        .unwrap()
}

#[test]
fn the_token_never_goes_to_a_storage_host_the_hub_hands_out() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    trained_run(&run);
    // Storage on another host (the same machine under another name and port).
    let (storage, stored) = hub_stub();
    let storage = storage.replace("127.0.0.1", "localhost");
    let (endpoint, hub) = hub_stub_with(Some(storage));
    let token = "hf_stub_secret_foreign";
    let out = push(&run, &tmp.path().join("export"), &endpoint, token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = stored.lock().unwrap().clone();
    assert!(
        stored.iter().any(|s| s.path.starts_with("/lfs-upload/"))
            && stored.iter().any(|s| s.path.starts_with("/lfs-verify/")),
        "{stored:?}"
    );
    for s in &stored {
        assert_eq!(
            s.auth, None,
            "the token went to the storage host: {}",
            s.path
        );
    }
    for s in hub.lock().unwrap().iter() {
        assert_eq!(s.auth.as_deref(), Some(format!("Bearer {token}").as_str()));
    }
}

#[test]
fn push_to_hub_uploads_every_file_with_the_token_and_never_prints_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    trained_run(&run);
    let (endpoint, seen) = hub_stub();
    let token = "hf_stub_secret_0123456789";
    let out = tmp.path().join("export");
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["export", "--checkpoint"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args(["--format", "all", "--push-to-hub", "someone/mosaic-test"])
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_TOKEN", token)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains(token) && !stderr.contains(token),
        "the token leaked"
    );
    let seen = seen.lock().unwrap().clone();
    let paths: Vec<String> = seen
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(paths[0], "POST /api/repos/create");
    assert_eq!(
        paths[1],
        "POST /api/models/someone/mosaic-test/preupload/main"
    );
    assert_eq!(
        paths[2],
        "POST /someone/mosaic-test.git/info/lfs/objects/batch"
    );
    assert_eq!(
        paths.last().unwrap(),
        "POST /api/models/someone/mosaic-test/commit/main"
    );
    for s in &seen {
        if s.path.starts_with("/lfs-upload/") {
            assert_eq!(s.auth, None, "the token must not go to the storage URL");
        } else {
            assert_eq!(
                s.auth.as_deref(),
                Some(format!("Bearer {token}").as_str()),
                "{}",
                s.path
            );
        }
    }
    // Each LFS upload carries the bytes of the file whose sha256 it names.
    let uploads: Vec<&Seen> = seen.iter().filter(|s| s.method == "PUT").collect();
    assert_eq!(uploads.len(), 3, "three safetensors files through LFS");
    for u in &uploads {
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(&u.body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(u.path.ends_with(&sha), "{} carries other bytes", u.path);
    }
    // The commit lists every file: LFS pointers for the weights, contents for the rest.
    let commit = String::from_utf8(seen.last().unwrap().body.clone()).unwrap();
    let lines: Vec<serde_json::Value> = commit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["key"], "header");
    let mut committed: Vec<(String, String)> = lines[1..]
        .iter()
        .map(|l| {
            (
                l["key"].as_str().unwrap().to_string(),
                l["value"]["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    committed.sort();
    assert_eq!(
        committed,
        vec![
            ("file".into(), "README.md".into()),
            ("file".into(), "adapter_config.json".into()),
            ("lfsFile".into(), "adapter_model.safetensors".into()),
            ("lfsFile".into(), "pytorch_lora_weights.safetensors".into()),
            ("lfsFile".into(), "tiny-cpu-kohya.safetensors".into()),
        ]
    );
}

#[test]
fn push_without_a_token_is_refused_after_the_export_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    trained_run(&run);
    let out = tmp.path().join("export");
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(["export", "--checkpoint"])
        .arg(&run)
        .arg("--out")
        .arg(&out)
        .args(["--push-to-hub", "someone/x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("HF_TOKEN"), "{stderr}");
    assert!(
        out.join("pytorch_lora_weights.safetensors").exists(),
        "nothing written is lost"
    );
}
