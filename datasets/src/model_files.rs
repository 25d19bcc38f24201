//! Model files (encoder weights, configs, tokenizers) in a folder at a local path or an object
//! store URL, handed out as local files that candle can memory-map. Remote objects are
//! downloaded once into a cache folder (to a temporary name, then renamed, so a copy that is
//! there is whole) and reused while the object keeps its size. File digests are memoised by
//! (path, size, modification time) so that a 10 GB T5 is hashed once, not at every start.
//!
//! The cache folder is `$MOSAIC_CACHE_DIR`, else `$XDG_CACHE_HOME/mosaic`, else
//! `~/.cache/mosaic`: models go to `models/`, digests to `sha256/`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};
use crate::store::Location;

/// Bytes fetched per range request while downloading.
const DOWNLOAD_CHUNK: u64 = 64 << 20;

/// A download lock not refreshed for this long belongs to a process that died.
const STALE_LOCK: Duration = Duration::from_secs(300);

/// The cache folder (see the module docs).
pub fn cache_root() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = var("MOSAIC_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("mosaic");
    }
    var("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("mosaic"))
        .unwrap_or_else(|| std::env::temp_dir().join("mosaic-cache"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` with `.suffix` appended (not replacing its extension: `model.safetensors` and
/// `model.safetensors.index.json` keep distinct names).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// Which object a downloaded copy holds, kept next to it (`<file>.source.json`): a copy is
/// reused only while the object keeps its size and version tag (so weights replaced by others
/// of the same size are downloaded again).
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Source {
    url: String,
    size: u64,
    tag: String,
}

impl Source {
    fn is_copied_to(&self, dest: &Path) -> bool {
        let recorded = std::fs::read(with_suffix(dest, "source.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Source>(&b).ok());
        recorded.as_ref() == Some(self)
            && std::fs::metadata(dest).map(|m| m.len()).ok() == Some(self.size)
    }
}

/// A folder of model files.
pub struct ModelFolder {
    loc: Location,
    /// Where remote files are copied (None for a local folder).
    download_to: Option<PathBuf>,
}

impl ModelFolder {
    /// The folder at `url` (a path or an object store URL); remote files are copied below
    /// `cache` (normally [`cache_root`]).
    pub fn open(url: &str, cache: &Path) -> Result<Self> {
        let loc = Location::parse(url)?;
        let download_to = match &loc {
            Location::Local(p) => {
                if !p.is_dir() {
                    return Err(DataError::input(
                        p.display().to_string(),
                        "no such folder (expected a model folder)",
                    ));
                }
                None
            }
            Location::Remote(r) => {
                let key = hex(&Sha256::digest(r.url().as_bytes()))[..16].to_string();
                Some(cache.join("models").join(key))
            }
        };
        Ok(Self { loc, download_to })
    }

    /// A single file's folder: `path` names a file, this is its parent and the file's name.
    pub fn open_file(url: &str, cache: &Path) -> Result<(Self, String)> {
        let (dir, name) = match url.rsplit_once('/') {
            None => (".", url),
            Some(("", name)) => ("/", name),
            Some((dir, name))
                if !name.is_empty() && !dir.ends_with(':') && !dir.ends_with(":/") =>
            {
                (dir, name)
            }
            Some(_) => return Err(DataError::input(url, "does not name a file")),
        };
        Ok((Self::open(dir, cache)?, name.to_string()))
    }

    pub fn describe(&self) -> String {
        self.loc.describe()
    }

    /// `rel` below this folder, for messages.
    pub fn name(&self, rel: &str) -> String {
        self.loc.name(rel)
    }

    pub fn exists(&self, rel: &str) -> Result<bool> {
        self.loc.exists(rel)
    }

    /// A small file's text (configs, tokenizer files).
    pub fn read_text(&self, rel: &str) -> Result<String> {
        let bytes = self
            .loc
            .get(rel)?
            .ok_or_else(|| DataError::input(self.name(rel), "not found"))?;
        String::from_utf8(bytes).map_err(|e| DataError::input(self.name(rel), e))
    }

    /// A local path holding `rel`, downloading it first when the folder is remote.
    pub fn file(&self, rel: &str) -> Result<PathBuf> {
        let Some(dir) = &self.download_to else {
            let path = self.loc.child(rel);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(DataError::input(path.display().to_string(), "not found"))
            };
        };
        let (size, tag) = self.loc.version(rel)?;
        let want = Source {
            url: self.name(rel),
            size,
            tag,
        };
        let dest = dir.join(rel);
        if want.is_copied_to(&dest) {
            return Ok(dest);
        }
        let at = dest.display().to_string();
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DataError::store(&at, e))?;
        }
        // Ranks on one node (or several nodes sharing the cache folder) fetch the same files at
        // once: the first to create the lock file downloads, the others wait for its copy. A
        // download refreshes the lock's time at every chunk; a lock left unrefreshed for
        // STALE_LOCK by a process that died is taken over.
        let lock = with_suffix(&dest, "download-lock");
        loop {
            if want.is_copied_to(&dest) {
                return Ok(dest);
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(_) => {
                    let done = self.download(rel, size, &dest, &lock).and_then(|()| {
                        let json = serde_json::to_vec(&want).unwrap_or_default();
                        std::fs::write(with_suffix(&dest, "source.json"), json)
                            .map_err(|e| DataError::store(&at, e))
                    });
                    let _ = std::fs::remove_file(&lock);
                    return done.map(|()| dest);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let idle = std::fs::metadata(&lock)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if idle.is_some_and(|d| d > STALE_LOCK) {
                        tracing::warn!("taking over the stale download lock {}", lock.display());
                        let _ = std::fs::remove_file(&lock);
                    } else {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                Err(e) => return Err(DataError::store(lock.display().to_string(), e)),
            }
        }
    }

    /// Copies `rel` (of `size` bytes) to `dest` through a temporary file, touching `lock`
    /// after every chunk.
    fn download(&self, rel: &str, size: u64, dest: &Path, lock: &Path) -> Result<()> {
        static COPIES: AtomicU64 = AtomicU64::new(0);
        let at = dest.display().to_string();
        let tmp = with_suffix(
            dest,
            &format!(
                "download-{}-{}",
                std::process::id(),
                COPIES.fetch_add(1, Ordering::Relaxed)
            ),
        );
        tracing::info!("downloading {} ({size} bytes) to {at}", self.name(rel));
        let copy = || -> Result<()> {
            let mut out = std::fs::File::create(&tmp).map_err(|e| DataError::store(&at, e))?;
            let mut start = 0;
            while start < size {
                let end = (start + DOWNLOAD_CHUNK).min(size);
                let bytes = self.loc.get_range(rel, start..end)?;
                out.write_all(&bytes)
                    .map_err(|e| DataError::store(&at, e))?;
                if let Ok(l) = std::fs::File::options().write(true).open(lock) {
                    let _ = l.set_modified(SystemTime::now());
                }
                start = end;
            }
            out.sync_all().map_err(|e| DataError::store(&at, e))?;
            std::fs::rename(&tmp, dest).map_err(|e| DataError::store(&at, e))
        };
        let done = copy();
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Memo {
    path: String,
    size: u64,
    modified_ns: u128,
    sha256: String,
}

/// sha256 (lowercase hex) of a local file, memoised below `cache` (normally [`cache_root`]) by
/// path, size and modification time.
pub fn file_sha256(path: &Path, cache: &Path) -> Result<String> {
    let at = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| DataError::input(&at, e))?;
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let canonical = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let memo_file = cache.join("sha256").join(format!(
        "{}.json",
        &hex(&Sha256::digest(canonical.as_bytes()))[..32]
    ));
    if let Ok(text) = std::fs::read_to_string(&memo_file) {
        if let Ok(m) = serde_json::from_str::<Memo>(&text) {
            if m.path == canonical && m.size == meta.len() && m.modified_ns == modified_ns {
                return Ok(m.sha256);
            }
        }
    }
    let mut file = std::fs::File::open(path).map_err(|e| DataError::input(&at, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| DataError::input(&at, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let sha256 = hex(&hasher.finalize());
    let memo = Memo {
        path: canonical,
        size: meta.len(),
        modified_ns,
        sha256: sha256.clone(),
    };
    // The memo only saves time: failing to write it is worth a warning, not an error.
    let tmp = memo_file.with_extension(format!("json.{}", std::process::id()));
    let written = memo_file
        .parent()
        .map(std::fs::create_dir_all)
        .unwrap_or(Ok(()))
        .and_then(|()| std::fs::write(&tmp, serde_json::to_vec(&memo).unwrap_or_default()))
        .and_then(|()| std::fs::rename(&tmp, &memo_file));
    if let Err(e) = written {
        tracing::warn!(
            "cannot memoise the digest of {at} in {}: {e}",
            memo_file.display()
        );
    }
    Ok(sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_memoised_and_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let f = dir.path().join("w.bin");
        std::fs::write(&f, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(file_sha256(&f, &cache).unwrap(), want);
        assert_eq!(std::fs::read_dir(cache.join("sha256")).unwrap().count(), 1);
        assert_eq!(file_sha256(&f, &cache).unwrap(), want);
        std::fs::write(&f, b"abcd").unwrap();
        assert_ne!(
            file_sha256(&f, &cache).unwrap(),
            want,
            "a new size is hashed again"
        );
        let e = file_sha256(&dir.path().join("missing"), &cache).unwrap_err();
        assert!(e.message().contains("missing"), "{}", e.message());
    }

    #[test]
    fn local_folders_hand_out_their_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vae")).unwrap();
        std::fs::write(dir.path().join("vae/config.json"), "{}").unwrap();
        let f = ModelFolder::open(&dir.path().display().to_string(), dir.path()).unwrap();
        assert!(f.exists("vae/config.json").unwrap());
        assert!(!f.exists("vae").unwrap(), "a folder is not a file");
        assert_eq!(f.read_text("vae/config.json").unwrap(), "{}");
        assert_eq!(
            f.file("vae/config.json").unwrap(),
            dir.path().join("vae/config.json")
        );
        let e = f.file("text_encoder/config.json").unwrap_err().message();
        assert!(
            e.contains("text_encoder/config.json") && e.contains("not found"),
            "{e}"
        );
        let e = ModelFolder::open("/no/such/models", dir.path())
            .err()
            .unwrap();
        assert!(e.message().contains("/no/such/models"), "{}", e.message());
        let (parent, name) = ModelFolder::open_file(
            &dir.path().join("vae/config.json").display().to_string(),
            dir.path(),
        )
        .unwrap();
        assert_eq!(name, "config.json");
        assert!(parent.exists("config.json").unwrap());
    }
}
