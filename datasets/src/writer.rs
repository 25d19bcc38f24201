//! Writes samples into Parquet shards plus `manifest.json` (design.md §2).
//!
//! Rows are checked before they are stored (reference count, correspondences naming existing
//! references and inside [0, 1], unique sample ids); a bad row is refused with its sample id and
//! nothing already written is touched. A shard is closed at `rows_per_shard` rows or
//! `shard_bytes` bytes of payload, whichever comes first, and is uploaded whole; the manifest is
//! written last, so a reader never sees a dataset whose shards are missing.

use crate::error::BoxError;
use std::collections::HashSet;

use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::ParquetMetaDataReader;
use parquet::file::properties::WriterProperties;

use crate::digest::sha256_hex;
use crate::error::{DataError, Result};
use crate::manifest::RowMeta;
use crate::manifest::{Manifest, RowGroupInfo, ShardInfo, Span, FORMAT, VERSION};
use crate::schema::{to_batch, RawSample};
use crate::store::Location;

#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Rows per Parquet row group (the unit a reader fetches).
    pub row_group_rows: usize,
    pub rows_per_shard: usize,
    /// Payload bytes (encoded images) after which a shard is closed.
    pub shard_bytes: usize,
    /// Recorded in the manifest.
    pub created_by: String,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            row_group_rows: 64,
            rows_per_shard: 4096,
            shard_bytes: 256 << 20,
            created_by: String::new(),
        }
    }
}

pub struct ShardWriter {
    loc: Location,
    opts: WriterOptions,
    pending: Vec<RawSample>,
    pending_bytes: usize,
    shards: Vec<ShardInfo>,
    ids: HashSet<String>,
}

fn span(bytes: &[u8], offset: u64, length: u64) -> Span {
    Span {
        offset,
        length,
        sha256: sha256_hex(&bytes[offset as usize..(offset + length) as usize]),
    }
}

fn payload(s: &RawSample) -> usize {
    s.target.len()
        + s.refs
            .iter()
            .map(|r| r.image.len() + r.mask.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

impl ShardWriter {
    pub fn new(loc: Location, opts: WriterOptions) -> Result<Self> {
        if opts.row_group_rows == 0 || opts.rows_per_shard == 0 {
            return Err(DataError::input(
                "writer options",
                "row_group_rows and rows_per_shard must be at least 1",
            ));
        }
        Ok(Self {
            loc,
            opts,
            pending: Vec::new(),
            pending_bytes: 0,
            shards: Vec::new(),
            ids: HashSet::new(),
        })
    }

    /// Adds one sample; a sample that breaks the format is refused naming its id and why.
    pub fn add(&mut self, sample: RawSample) -> Result<()> {
        let at = format!("row {}", self.rows_written() + self.pending.len());
        if let Err(problem) = sample.check() {
            return Err(DataError::Sample {
                sample_id: sample.sample_id,
                at,
                problem,
            });
        }
        if !self.ids.insert(sample.sample_id.clone()) {
            return Err(DataError::Sample {
                problem: crate::error::SampleProblem::Invalid {
                    what: "sample_id".into(),
                    reason: "appears twice in this dataset".into(),
                },
                sample_id: sample.sample_id,
                at,
            });
        }
        self.pending_bytes += payload(&sample);
        self.pending.push(sample);
        if self.pending.len() >= self.opts.rows_per_shard
            || self.pending_bytes >= self.opts.shard_bytes
        {
            self.flush()?;
        }
        Ok(())
    }

    fn rows_written(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let file = format!("shard-{:05}.parquet", self.shards.len());
        let at = self.loc.name(&file);
        let rows = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let bytes =
            encode_shard(&rows, self.opts.row_group_rows).map_err(|e| DataError::shard(&at, e))?;
        let meta: Vec<RowMeta> = rows.iter().map(RowMeta::of).collect();
        let info = describe_shard(&file, &bytes, &meta).map_err(|e| DataError::shard(&at, e))?;
        self.loc.put(&file, bytes)?;
        self.shards.push(info);
        Ok(())
    }

    /// Writes the last shard and then the manifest.
    pub fn finish(mut self) -> Result<Manifest> {
        self.flush()?;
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            total_rows: self.rows_written(),
            shards: self.shards,
            created_by: self.opts.created_by,
        };
        manifest.write(&self.loc)?;
        Ok(manifest)
    }
}

/// One Parquet file of `rows`, in row groups of `row_group_rows`. Images are stored as they come
/// (already compressed); dictionaries are off for the same reason.
pub fn encode_shard(
    rows: &[RawSample],
    row_group_rows: usize,
) -> std::result::Result<Vec<u8>, BoxError> {
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_compression(Compression::UNCOMPRESSED)
        .set_dictionary_enabled(false)
        .set_created_by(format!("mosaic datasets {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, crate::schema::schema(), Some(props))?;
    for chunk in rows.chunks(row_group_rows) {
        let batch = to_batch(chunk)?;
        writer.write(&batch)?;
        writer.flush()?;
    }
    writer.close()?;
    Ok(out)
}

/// The manifest entry of a shard file: spans and hashes of its footer and row groups, and what
/// `rows` say of each row (reference count, target size).
pub fn describe_shard(
    file: &str,
    bytes: &[u8],
    rows: &[RowMeta],
) -> std::result::Result<ShardInfo, BoxError> {
    let len = bytes.len() as u64;
    if len < 12 {
        return Err("too short to be Parquet".into());
    }
    let meta_len = u32::from_le_bytes(
        bytes[bytes.len() - 8..bytes.len() - 4]
            .try_into()
            .map_err(|_| "footer")?,
    ) as u64;
    let footer_start = len
        .checked_sub(8 + meta_len)
        .ok_or("footer length past the start of the file")?;
    let meta = ParquetMetaDataReader::new().parse_and_finish(&Bytes::copy_from_slice(bytes))?;
    crate::parquet_meta::check_metadata(&meta, len)?;
    let mut row_groups = Vec::new();
    let mut first_row = 0;
    for (g, rg) in meta.row_groups().iter().enumerate() {
        let (mut start, mut end) = (u64::MAX, 0u64);
        for c in rg.columns() {
            let (s, l) = c.byte_range();
            start = start.min(s);
            end = end.max(s + l);
        }
        let n = rg.num_rows() as usize;
        let meta = rows
            .get(first_row..first_row + n)
            .ok_or_else(|| format!("row group {g} ends past the {} rows written", rows.len()))?;
        first_row += n;
        row_groups.push(RowGroupInfo {
            rows: n,
            span: span(bytes, start, end - start),
            refs: meta
                .iter()
                .map(|m| char::from(b'0' + m.refs.min(9) as u8))
                .collect(),
            // Sizes are kept when some are known (unknown ones as [0, 0]); a group of rows with
            // none (mirroring a manifest from before aspect buckets) records none.
            targets: if meta.iter().any(|m| m.target.is_some()) {
                meta.iter().map(|m| m.target.unwrap_or([0, 0])).collect()
            } else {
                Vec::new()
            },
        });
    }
    Ok(ShardInfo {
        file: file.to_string(),
        rows: row_groups.iter().map(|g| g.rows).sum(),
        bytes: len,
        sha256: sha256_hex(bytes),
        footer: span(bytes, footer_start, len - footer_start),
        row_groups,
    })
}
