//! Where shards and checkpoints live: a local folder, or a prefix on an object store through
//! object_store:
//! `s3://bucket/prefix` (also S3-compatible servers: AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true),
//! `gs://bucket/prefix`, `az://container/prefix`, `http(s)://...` (WebDAV-style servers).
//! Credentials and endpoints come from the usual environment variables (AWS_*, GOOGLE_*,
//! AZURE_*), read by object_store's builders; transient errors are retried with backoff by
//! object_store's client and, for reads, once more here over a longer window so that a server
//! restart in the middle of an epoch costs time, not samples. `file://` URLs and plain paths are
//! local folders. All remote locations share one small I/O runtime.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{DataError, Result};

/// How long reads keep retrying transient errors (on top of object_store's own retries).
const READ_RETRY_WINDOW: Duration = Duration::from_secs(120);

/// A folder or an object-store prefix.
#[derive(Clone)]
pub enum Location {
    Local(PathBuf),
    Remote(Remote),
}

/// An object-store prefix with the runtime its blocking calls run on.
#[derive(Clone)]
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    rt: &'static tokio::runtime::Runtime,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn err(at: &str, why: impl Into<crate::error::BoxError>) -> DataError {
    DataError::store(at, why)
}

/// The runtime every remote location's blocking calls run on.
fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("object-store-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| err("object store", format!("cannot start an I/O runtime: {e}")))
}

impl Location {
    /// A folder path or a URL.
    pub fn parse(location: &str) -> Result<Self> {
        Self::parse_with_options(location, &[])
    }

    /// A folder path or a URL, with object_store configuration keys that override the
    /// environment (for example `("aws_endpoint", "http://127.0.0.1:9000")`,
    /// `("aws_allow_http", "true")`, `("google_service_account", ...)`).
    pub fn parse_with_options(location: &str, options: &[(&str, &str)]) -> Result<Self> {
        if let Some(p) = location.strip_prefix("file://") {
            return Ok(Self::Local(PathBuf::from(p)));
        }
        if !location.contains("://") {
            return Ok(Self::Local(PathBuf::from(location)));
        }
        let url =
            url::Url::parse(location).map_err(|e| err(location, format!("not a URL: {e}")))?;
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(location);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| err(location, e))?, *v);
                }
                Arc::new(b.build().map_err(|e| err(location, e))?)
            }
            "gs" => {
                let mut b =
                    object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(location);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| err(location, e))?, *v);
                }
                Arc::new(b.build().map_err(|e| err(location, e))?)
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let mut b =
                    object_store::azure::MicrosoftAzureBuilder::from_env().with_url(location);
                for (k, v) in options {
                    b = b.with_config(k.parse().map_err(|e| err(location, e))?, *v);
                }
                Arc::new(b.build().map_err(|e| err(location, e))?)
            }
            "http" | "https" => {
                let base = format!("{}://{}", url.scheme(), url.authority());
                // An http:// URL asks for plain HTTP, which object_store refuses unless told.
                let client =
                    object_store::ClientOptions::new().with_allow_http(url.scheme() == "http");
                Arc::new(
                    object_store::http::HttpBuilder::new()
                        .with_url(base)
                        .with_client_options(client)
                        .build()
                        .map_err(|e| err(location, e))?,
                )
            }
            other => {
                return Err(err(
                    location,
                    format!("unsupported scheme `{other}` (s3, gs, az, http(s), file or a path)"),
                ))
            }
        };
        let prefix = ObjPath::from(url.path().trim_matches('/'));
        Ok(Self::Remote(Remote {
            url: location.trim_end_matches('/').to_string(),
            store,
            prefix,
            rt: runtime()?,
        }))
    }

    pub fn local(path: &Path) -> Self {
        Self::Local(path.to_path_buf())
    }

    /// For messages: the folder or URL.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(p) => p.display().to_string(),
            Self::Remote(r) => r.url.clone(),
        }
    }

    /// The location of `rel` below this one, for messages.
    pub fn child(&self, rel: &str) -> PathBuf {
        match self {
            Self::Local(p) => p.join(rel),
            Self::Remote(r) => PathBuf::from(format!("{}/{rel}", r.url)),
        }
    }

    /// `rel` below this one as a string, for messages.
    pub fn name(&self, rel: &str) -> String {
        self.child(rel).display().to_string()
    }

    /// One object's bytes; None when it does not exist.
    pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Self::Local(p) => match std::fs::read(p.join(rel)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(err(&self.name(rel), e)),
            },
            Self::Remote(r) => r.get(rel),
        }
    }

    /// Bytes `range` of one object (which must exist and be long enough).
    pub fn get_range(&self, rel: &str, range: Range<u64>) -> Result<Vec<u8>> {
        match self {
            Self::Local(p) => {
                use std::io::{Read, Seek, SeekFrom};
                let path = p.join(rel);
                let read = || -> std::io::Result<Vec<u8>> {
                    let mut f = std::fs::File::open(&path)?;
                    f.seek(SeekFrom::Start(range.start))?;
                    let mut buf = vec![0u8; (range.end - range.start) as usize];
                    f.read_exact(&mut buf)?;
                    Ok(buf)
                };
                read().map_err(|e| err(&format!("{} bytes {range:?}", self.name(rel)), e))
            }
            Self::Remote(r) => r.get_range(rel, range),
        }
    }

    /// Size in bytes of one object.
    pub fn size(&self, rel: &str) -> Result<u64> {
        match self {
            Self::Local(p) => std::fs::metadata(p.join(rel))
                .map(|m| m.len())
                .map_err(|e| err(&self.name(rel), e)),
            Self::Remote(r) => r.size(rel),
        }
    }

    /// Size and a version tag of one object (its ETag, else its version, else its modification
    /// time; for a local file its modification time): a change of either means other bytes.
    pub fn version(&self, rel: &str) -> Result<(u64, String)> {
        match self {
            Self::Local(p) => {
                let m = std::fs::metadata(p.join(rel)).map_err(|e| err(&self.name(rel), e))?;
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                Ok((m.len(), format!("mtime-ns {t}")))
            }
            Self::Remote(r) => r.version(rel),
        }
    }

    /// Whether one object (a file, not a folder) exists.
    pub fn exists(&self, rel: &str) -> Result<bool> {
        match self {
            Self::Local(p) => Ok(p.join(rel).is_file()),
            Self::Remote(r) => r.exists(rel),
        }
    }

    /// Writes one object; a local write goes through a temporary file and a rename so that a
    /// reader never sees half an object.
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        match self {
            Self::Local(p) => {
                let path = p.join(rel);
                let write = || -> std::io::Result<()> {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    let tmp = path.with_extension("partial");
                    std::fs::write(&tmp, &bytes)?;
                    std::fs::rename(&tmp, &path)
                };
                write().map_err(|e| err(&self.name(rel), e))
            }
            Self::Remote(r) => r.put(rel, bytes),
        }
    }

    /// Deletes one object (a file); one that does not exist is not an error.
    pub fn delete(&self, rel: &str) -> Result<()> {
        match self {
            Self::Local(p) => match std::fs::remove_file(p.join(rel)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(err(&self.name(rel), e)),
            },
            Self::Remote(r) => r.delete(rel),
        }
    }

    /// Moves the folder (or every object below the prefix) `from` to `to`, both relative to
    /// this location. A folder is renamed at once; objects are copied, then deleted, so an
    /// interrupted move leaves every object in one place or the other, never lost.
    pub fn rename_dir(&self, from: &str, to: &str) -> Result<()> {
        match self {
            Self::Local(p) => {
                let dest = p.join(to);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| err(&self.name(to), e))?;
                }
                std::fs::rename(p.join(from), &dest).map_err(|e| err(&self.name(from), e))
            }
            Self::Remote(r) => r.rename_dir(from, to),
        }
    }
}

/// Runs `op` until it succeeds, fails with an error that retrying cannot fix, or the retry
/// window is spent; waits double from 200 ms up to 5 s between tries.
fn with_retries<T>(
    what: &str,
    mut op: impl FnMut() -> std::result::Result<T, object_store::Error>,
) -> std::result::Result<T, object_store::Error> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(200);
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(
                e @ (object_store::Error::NotFound { .. }
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            ) => return Err(e),
            Err(e) if start.elapsed() + wait > READ_RETRY_WINDOW => return Err(e),
            Err(e) => {
                tracing::warn!("{what}: {e}; retrying in {wait:?}");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Remote {
    fn path(&self, rel: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes one object (object stores make each put atomic).
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(rel);
        self.rt
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| err(&format!("{}/{rel}", self.url), e))
    }

    /// One object's bytes; None when it does not exist.
    pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(rel);
        let at = format!("{}/{rel}", self.url);
        let got = with_retries(&at, || {
            self.rt.block_on(async {
                match self.store.get(&path).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
        });
        got.map(|b| b.map(|b| b.to_vec())).map_err(|e| err(&at, e))
    }

    /// Bytes `range` of one object.
    pub fn get_range(&self, rel: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let path = self.path(rel);
        let at = format!("{}/{rel}", self.url);
        let got = with_retries(&at, || {
            self.rt.block_on(async {
                let opts = GetOptions {
                    range: Some(GetRange::Bounded(range.clone())),
                    ..Default::default()
                };
                self.store.get_opts(&path, opts).await?.bytes().await
            })
        });
        let bytes = got.map_err(|e| err(&format!("{at} bytes {range:?}"), e))?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(err(
                &at,
                format!("bytes {range:?}: got {} bytes", bytes.len()),
            ));
        }
        Ok(bytes.to_vec())
    }

    /// Size in bytes of one object.
    pub fn size(&self, rel: &str) -> Result<u64> {
        let path = self.path(rel);
        let at = format!("{}/{rel}", self.url);
        with_retries(&at, || self.rt.block_on(self.store.head(&path)))
            .map(|m| m.size)
            .map_err(|e| err(&at, e))
    }

    /// See [`Location::version`].
    pub fn version(&self, rel: &str) -> Result<(u64, String)> {
        let path = self.path(rel);
        let at = format!("{}/{rel}", self.url);
        let m = with_retries(&at, || self.rt.block_on(self.store.head(&path)))
            .map_err(|e| err(&at, e))?;
        let tag = match (m.e_tag, m.version) {
            (Some(e), _) => format!("etag {e}"),
            (None, Some(v)) => format!("version {v}"),
            (None, None) => format!("modified {}", m.last_modified.to_rfc3339()),
        };
        Ok((m.size, tag))
    }

    /// Whether one object exists.
    pub fn exists(&self, rel: &str) -> Result<bool> {
        let path = self.path(rel);
        let at = format!("{}/{rel}", self.url);
        match with_retries(&at, || self.rt.block_on(self.store.head(&path))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(err(&at, e)),
        }
    }

    /// Names of the "folders" directly below the prefix.
    pub fn list_dirs(&self) -> Result<Vec<String>> {
        let listing = self
            .rt
            .block_on(self.store.list_with_delimiter(Some(&self.prefix)))
            .map_err(|e| err(&self.url, e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Names (relative to this prefix) of the objects below `rel`.
    pub fn list_prefix(&self, rel: &str) -> Result<Vec<String>> {
        use futures::TryStreamExt;
        let prefix = self.path(rel);
        let n = self.prefix.parts().count();
        let objects: Vec<_> = self
            .rt
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .map_err(|e| err(&format!("{}/{rel}", self.url), e))?;
        Ok(objects
            .iter()
            .map(|o| {
                o.location
                    .parts()
                    .skip(n)
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect())
    }

    /// Deletes one object; a missing one is not an error.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path(rel);
        match self.rt.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(err(&format!("{}/{rel}", self.url), e)),
        }
    }

    /// Copies every object below `from` to the same place below `to`, then deletes the
    /// originals.
    pub fn rename_dir(&self, from: &str, to: &str) -> Result<()> {
        use futures::TryStreamExt;
        let (src, dest) = (self.path(from), self.path(to));
        let n = src.parts().count();
        self.rt
            .block_on(async {
                let objects: Vec<_> = self.store.list(Some(&src)).try_collect().await?;
                for o in &objects {
                    let mut target = dest.clone();
                    for part in o.location.parts().skip(n) {
                        target = target.join(part);
                    }
                    self.store.copy(&o.location, &target).await?;
                }
                for o in objects {
                    self.store.delete(&o.location).await?;
                }
                Ok::<_, object_store::Error>(())
            })
            .map_err(|e| err(&format!("{}/{from}", self.url), e))
    }

    /// Deletes every object below `rel`.
    pub fn delete_dir(&self, rel: &str) -> Result<()> {
        use futures::TryStreamExt;
        let prefix = self.path(rel);
        self.rt
            .block_on(async {
                let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
                for o in objects {
                    self.store.delete(&o.location).await?;
                }
                Ok::<_, object_store::Error>(())
            })
            .map_err(|e| err(&format!("{}/{rel}", self.url), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_urls_are_told_apart() {
        assert!(matches!(
            Location::parse("runs/x/checkpoints").unwrap(),
            Location::Local(_)
        ));
        match Location::parse("file:///tmp/ck").unwrap() {
            Location::Local(p) => assert_eq!(p, PathBuf::from("/tmp/ck")),
            _ => panic!("file:// is local"),
        }
        let e = Location::parse("ftp://host/x").err().unwrap().message();
        assert!(e.contains("unsupported scheme `ftp`"), "{e}");
    }
}
