//! Where checkpoints live: a local folder, or a prefix on an object store through object_store:
//! `s3://bucket/prefix` (also S3-compatible servers: AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true),
//! `gs://bucket/prefix`, `az://container/prefix`, `http(s)://...` (WebDAV-style servers).
//! Credentials and endpoints come from the usual environment variables (AWS_*, GOOGLE_*,
//! AZURE_*), read by object_store's builders; transient errors are retried with backoff by
//! object_store's client. `file://` URLs and plain paths are local folders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Result, TrainerError};

/// A checkpoint root.
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
    rt: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn err(at: &str, reason: impl std::fmt::Display) -> TrainerError {
    TrainerError::Checkpoint {
        path: PathBuf::from(at),
        reason: reason.to_string(),
    }
}

impl Location {
    /// A folder path or a URL.
    pub fn parse(location: &str) -> Result<Self> {
        if let Some(p) = location.strip_prefix("file://") {
            return Ok(Self::Local(PathBuf::from(p)));
        }
        if !location.contains("://") {
            return Ok(Self::Local(PathBuf::from(location)));
        }
        let url =
            url::Url::parse(location).map_err(|e| err(location, format!("not a URL: {e}")))?;
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "s3" | "s3a" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(location)
                    .build()
                    .map_err(|e| err(location, e))?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(location)
                    .build()
                    .map_err(|e| err(location, e))?,
            ),
            "az" | "azure" | "abfs" | "abfss" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(location)
                    .build()
                    .map_err(|e| err(location, e))?,
            ),
            "http" | "https" => {
                let base = format!("{}://{}", url.scheme(), url.authority());
                Arc::new(
                    object_store::http::HttpBuilder::new()
                        .with_url(base)
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
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| err(location, format!("cannot start an I/O runtime: {e}")))?;
        Ok(Self::Remote(Remote {
            url: location.trim_end_matches('/').to_string(),
            store,
            prefix,
            rt: Arc::new(rt),
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
        let got = self.rt.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map(|b| b.map(|b| b.to_vec()))
            .map_err(|e| err(&format!("{}/{rel}", self.url), e))
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
        let e = Location::parse("ftp://host/x").err().unwrap().to_string();
        assert!(e.contains("unsupported scheme `ftp`"), "{e}");
    }
}
