//! Upload of an export folder to a Hugging Face model repo through the Hub's HTTP API (the
//! protocol `huggingface_hub` speaks): create the repo, ask which files go through LFS
//! (`preupload`), upload those with the LFS batch API, then one commit listing every file.
//!
//! The token comes from HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) and is only ever put in the
//! Authorization header: errors show URLs, status codes and the server's message, never headers.
//! HF_ENDPOINT overrides https://huggingface.co (mirrors, tests).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use reqwest::blocking::{RequestBuilder, Response};
use serde_json::{json, Value};

use crate::error::{Result, TrainerError};

fn hub_err(what: impl Into<String>) -> TrainerError {
    TrainerError::Input {
        name: "Hub upload".into(),
        reason: what.into(),
    }
}

/// Sends `req` to `url`; a failure says what went wrong without anything from our request
/// headers (the server's message is cut to 500 characters).
fn send(url: &str, req: RequestBuilder) -> Result<Response> {
    let resp = req.send().map_err(|e| {
        let kind = if e.is_connect() {
            "cannot connect"
        } else if e.is_timeout() {
            "timed out"
        } else {
            "request failed"
        };
        hub_err(format!("{url}: {kind}"))
    })?;
    let code = resp.status();
    if code.is_success() {
        return Ok(resp);
    }
    let body: String = resp.text().unwrap_or_default().chars().take(500).collect();
    Err(hub_err(format!("{url}: HTTP {}: {body}", code.as_u16())))
}

struct Client {
    http: reqwest::blocking::Client,
    endpoint: String,
    token: String,
}

impl Client {
    fn from_env() -> Result<Self> {
        let token = std::env::var("HF_TOKEN")
            .or_else(|_| std::env::var("HUGGING_FACE_HUB_TOKEN"))
            .ok()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| hub_err("set HF_TOKEN to a Hugging Face token with write access"))?;
        let endpoint = std::env::var("HF_ENDPOINT")
            .unwrap_or_else(|_| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| hub_err(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            http,
            endpoint,
            token: token.trim().to_string(),
        })
    }

    /// Whether `url` is on the Hub endpoint itself (same scheme, host and port): only there
    /// does the token go. LFS storage URLs the Hub hands out (pre-signed, often another host)
    /// get no Authorization header, as huggingface_hub does.
    fn is_hub(&self, url: &str) -> bool {
        match (
            reqwest::Url::parse(url),
            reqwest::Url::parse(&self.endpoint),
        ) {
            (Ok(a), Ok(b)) => a.origin() == b.origin(),
            _ => false,
        }
    }

    fn post_json(&self, url: &str, body: &Value, accept: Option<&str>) -> Result<Value> {
        let kind = accept.unwrap_or("application/json");
        let mut req = self.http.post(url);
        if self.is_hub(url) {
            req = req.bearer_auth(&self.token);
        }
        let mut req = req.header("Content-Type", kind).body(body.to_string());
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        let text = send(url, req)?
            .text()
            .map_err(|_| hub_err(format!("{url}: the answer could not be read")))?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// One file to upload.
struct Upload {
    path: String,
    local: PathBuf,
    size: u64,
    sha256: String,
}

fn files_of(folder: &Path) -> Result<Vec<Upload>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(folder).map_err(|e| TrainerError::io(folder, e))?;
    for e in entries.flatten() {
        let local = e.path();
        if !local.is_file() {
            continue;
        }
        let bytes = std::fs::read(&local).map_err(|e| TrainerError::io(&local, e))?;
        out.push(Upload {
            path: e.file_name().to_string_lossy().into_owned(),
            size: bytes.len() as u64,
            sha256: crate::checkpoint::sha256_hex(&bytes),
            local,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    if out.is_empty() {
        return Err(hub_err(format!("{} holds no files", folder.display())));
    }
    Ok(out)
}

/// Uploads every file of `folder` to model repo `repo_id` (created if needed) in one commit;
/// returns the repo's URL.
pub fn push_folder(repo_id: &str, folder: &Path, private: bool) -> Result<String> {
    let (org, name) = match repo_id.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => (Some(o), n),
        None if !repo_id.is_empty() => (None, repo_id),
        _ => {
            return Err(hub_err(format!(
                "`{repo_id}` is not a repo id (expected NAME or OWNER/NAME)"
            )))
        }
    };
    let c = Client::from_env()?;
    let files = files_of(folder)?;
    create_repo(&c, org, name, private)?;
    let lfs = lfs_files(&c, repo_id, &files)?;
    if !lfs.is_empty() {
        upload_lfs(&c, repo_id, &lfs)?;
    }
    commit(&c, repo_id, &files, &lfs)?;
    Ok(format!("{}/{repo_id}", c.endpoint))
}

/// Creates the model repo (HTTP 409: it exists already, which is fine).
fn create_repo(c: &Client, org: Option<&str>, name: &str, private: bool) -> Result<()> {
    let url = format!("{}/api/repos/create", c.endpoint);
    let mut body = json!({"name": name, "private": private, "type": "model"});
    if let Some(o) = org {
        body["organization"] = json!(o);
    }
    match c.post_json(&url, &body, None) {
        Ok(_) => {}
        Err(TrainerError::Input { reason, .. }) if reason.contains("HTTP 409") => {}
        Err(e) => return Err(e),
    }

    Ok(())
}

/// The files the Hub wants through LFS (it asks by path, from a sample of each).
fn lfs_files<'a>(c: &Client, repo_id: &str, files: &'a [Upload]) -> Result<Vec<&'a Upload>> {
    let url = format!("{}/api/models/{repo_id}/preupload/main", c.endpoint);
    let mut listing = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f.local).map_err(|e| TrainerError::io(&f.local, e))?;
        let sample = &bytes[..bytes.len().min(512)];
        listing.push(json!({
            "path": f.path,
            "size": f.size,
            "sample": base64::engine::general_purpose::STANDARD.encode(sample),
        }));
    }
    let modes = c.post_json(&url, &json!({ "files": listing }), None)?;
    Ok(files
        .iter()
        .filter(|f| {
            modes["files"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["path"] == json!(f.path) && m["uploadMode"] == json!("lfs"))
        })
        .collect())
}

/// Uploads the LFS objects the batch API says are not stored yet, and verifies them.
fn upload_lfs(c: &Client, repo_id: &str, lfs: &[&Upload]) -> Result<()> {
    let url = format!("{}/{repo_id}.git/info/lfs/objects/batch", c.endpoint);
    let objects: Vec<Value> = lfs
        .iter()
        .map(|f| json!({"oid": f.sha256, "size": f.size}))
        .collect();
    let batch = c.post_json(
        &url,
        &json!({
            "operation": "upload",
            "transfers": ["basic"],
            "objects": objects,
            "hash_algo": "sha256",
            "ref": {"name": "main"},
        }),
        Some("application/vnd.git-lfs+json"),
    )?;
    for obj in batch["objects"].as_array().into_iter().flatten() {
        if let Some(err) = obj.get("error") {
            return Err(hub_err(format!("LFS refused object {}: {err}", obj["oid"])));
        }
        let Some(upload) = obj["actions"].get("upload") else {
            continue; // already on the Hub
        };
        let f = lfs
            .iter()
            .find(|f| obj["oid"] == json!(f.sha256))
            .ok_or_else(|| hub_err("LFS batch answered for an object we did not send"))?;
        let href = upload["href"]
            .as_str()
            .ok_or_else(|| hub_err("LFS upload action without href"))?;
        let mut req = c.http.put(href);
        for (k, v) in upload["header"].as_object().into_iter().flatten() {
            if let Some(v) = v.as_str() {
                req = req.header(k.as_str(), v);
            }
        }
        let bytes = std::fs::read(&f.local).map_err(|e| TrainerError::io(&f.local, e))?;
        send(&format!("LFS upload of {}", f.path), req.body(bytes))?;
        if let Some(verify) = obj["actions"].get("verify") {
            let href = verify["href"]
                .as_str()
                .ok_or_else(|| hub_err("LFS verify action without href"))?;
            c.post_json(
                href,
                &json!({"oid": f.sha256, "size": f.size}),
                Some("application/vnd.git-lfs+json"),
            )?;
        }
    }
    Ok(())
}

/// One commit with every file: LFS pointers for LFS files, base64 content for the rest.
fn commit(c: &Client, repo_id: &str, files: &[Upload], lfs: &[&Upload]) -> Result<()> {
    let mut lines = vec![json!({"key": "header", "value": {
        "summary": "Upload MOSAIC LoRA (mosaic-rs export)", "description": ""}})];
    for f in files {
        if lfs.iter().any(|l| l.path == f.path) {
            lines.push(json!({"key": "lfsFile", "value": {
                "path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.size}}));
        } else {
            let bytes = std::fs::read(&f.local).map_err(|e| TrainerError::io(&f.local, e))?;
            lines.push(json!({"key": "file", "value": {
                "path": f.path,
                "encoding": "base64",
                "content": base64::engine::general_purpose::STANDARD.encode(&bytes)}}));
        }
    }
    let ndjson: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let url = format!("{}/api/models/{repo_id}/commit/main", c.endpoint);
    let req = c
        .http
        .post(&url)
        .bearer_auth(&c.token)
        .header("Content-Type", "application/x-ndjson")
        .body(ndjson);
    send(&url, req)?;
    Ok(())
}
