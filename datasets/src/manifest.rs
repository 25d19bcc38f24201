//! `manifest.json`: the list of shards of a dataset with their sizes, hashes and row groups.
//!
//! Beyond design.md §2 (format version, shard files with rows, bytes and sha256, total rows),
//! each shard lists its footer and row groups as byte spans with their own sha256 and the
//! reference count of every row. Readers then plan an epoch from the manifest alone, fetch one
//! row group with one range read, and verify it without reading the whole shard.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::schema::RawSample;
use crate::store::Location;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "semalign-ms";
pub const VERSION: u32 = 1;

/// A byte span of a shard file and the sha256 of those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowGroupInfo {
    pub rows: usize,
    #[serde(flatten)]
    pub span: Span,
    /// One digit per row: its number of references (1 to 6 in a valid row; 0, or 7 to 9 for
    /// "9 or more", mark rows a reader will skip and report).
    pub refs: String,
    /// Per row, the target image's [width, height] in pixels ([0, 0] where it could not be
    /// read), which aspect buckets plan by; empty in manifests written before them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<[u32; 2]>,
}

impl RowGroupInfo {
    /// What the manifest says of each row.
    pub fn row_meta(&self) -> Vec<RowMeta> {
        self.refs
            .bytes()
            .enumerate()
            .map(|(i, k)| RowMeta {
                refs: (k - b'0') as usize,
                target: self.targets.get(i).copied(),
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub rows: usize,
    pub bytes: u64,
    pub sha256: String,
    /// The Parquet footer (metadata, its length and the magic).
    pub footer: Span,
    pub row_groups: Vec<RowGroupInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub total_rows: usize,
    pub shards: Vec<ShardInfo>,
    /// Free-form description of how the data were made (command, seed, source).
    #[serde(default)]
    pub created_by: String,
}

impl Manifest {
    /// Reads and checks `manifest.json` below `loc`.
    pub fn load(loc: &Location) -> Result<Self> {
        let at = loc.name(MANIFEST);
        let bytes = loc.get(MANIFEST)?.ok_or_else(|| {
            DataError::manifest(&at, "not found (is this a dataset written by `datasets`?)")
        })?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| DataError::manifest(&at, format!("not a valid manifest: {e}")))?;
        m.validate()
            .map_err(|reason| DataError::manifest(&at, reason))?;
        Ok(m)
    }

    /// The consistency checks a reader relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format `{}`, expected `{FORMAT}`", self.format));
        }
        if self.version != VERSION {
            return Err(format!(
                "version {}, this build reads version {VERSION}",
                self.version
            ));
        }
        let mut total = 0;
        for s in &self.shards {
            let rows: usize = s.row_groups.iter().map(|g| g.rows).sum();
            if rows != s.rows {
                return Err(format!(
                    "shard {}: row groups hold {rows} rows, the shard says {}",
                    s.file, s.rows
                ));
            }
            for (i, g) in s.row_groups.iter().enumerate() {
                if g.refs.len() != g.rows || !g.refs.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "shard {} row group {i}: `refs` must hold one digit per row ({} rows)",
                        s.file, g.rows
                    ));
                }
                if !g.targets.is_empty() && g.targets.len() != g.rows {
                    return Err(format!(
                        "shard {} row group {i}: `targets` must hold one size per row ({} rows)",
                        s.file, g.rows
                    ));
                }
                if g.span.offset + g.span.length > s.bytes {
                    return Err(format!(
                        "shard {} row group {i}: span ends past the file's {} bytes",
                        s.file, s.bytes
                    ));
                }
            }
            if s.footer.offset + s.footer.length != s.bytes || s.footer.length < 8 {
                return Err(format!(
                    "shard {}: footer span does not end the file",
                    s.file
                ));
            }
            total += s.rows;
        }
        if total != self.total_rows {
            return Err(format!(
                "shards hold {total} rows, total_rows says {}",
                self.total_rows
            ));
        }
        Ok(())
    }

    pub fn write(&self, loc: &Location) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| DataError::manifest(loc.name(MANIFEST), e))?;
        loc.put(MANIFEST, bytes)
    }

    /// Number of samples with 1..=6 references (index 0 is 1 reference); rows with another
    /// count are not included.
    pub fn ref_histogram(&self) -> [usize; 6] {
        let mut h = [0; 6];
        for g in self.shards.iter().flat_map(|s| &s.row_groups) {
            for b in g.refs.bytes() {
                if (b'1'..=b'6').contains(&b) {
                    h[(b - b'1') as usize] += 1;
                }
            }
        }
        h
    }
}

/// What the manifest records of one row: its reference count and its target's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMeta {
    pub refs: usize,
    /// [width, height]; [0, 0] for a target whose header cannot be read, None when unknown.
    pub target: Option<[u32; 2]>,
}

impl RowMeta {
    pub fn of(s: &RawSample) -> Self {
        Self {
            refs: s.refs.len(),
            target: Some(crate::transform::image_size(&s.target).unwrap_or([0, 0])),
        }
    }
}
