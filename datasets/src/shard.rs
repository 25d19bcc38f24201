//! Reads one row group of a shard with one range read of its byte span, verified against the
//! manifest's sha256, so memory stays bounded by a row group whatever the shard size. The
//! footer is read (and verified) once per shard.

use std::io::Cursor;
use std::sync::Arc;

use arrow_array::RecordBatch;
use bytes::Bytes;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaDataReader;
use parquet::file::reader::{ChunkReader, Length};

use crate::digest::sha256_hex;
use crate::error::{BoxError, DataError, Result};
use crate::manifest::{ShardInfo, Span};
use crate::store::Location;

/// A shard's decoded footer.
#[derive(Clone)]
pub struct ShardFooter {
    pub arrow: ArrowReaderMetadata,
}

/// Reads `span` of `file`; the second value says how its hash differs from the manifest's.
fn read_span_unverified(
    loc: &Location,
    file: &str,
    span: &Span,
    what: &str,
) -> Result<(Vec<u8>, Option<String>)> {
    let bytes = loc.get_range(file, span.offset..span.offset + span.length)?;
    let got = sha256_hex(&bytes);
    let mismatch = (got != span.sha256).then(|| {
        format!(
            "{}: {what} (bytes {}..{}) has sha256 {got}, the manifest says {}",
            loc.name(file),
            span.offset,
            span.offset + span.length,
            span.sha256
        )
    });
    Ok((bytes, mismatch))
}

/// Reads `span` of `file` and checks its hash.
fn read_span(loc: &Location, file: &str, span: &Span, what: &str) -> Result<Vec<u8>> {
    match read_span_unverified(loc, file, span, what)? {
        (bytes, None) => Ok(bytes),
        (_, Some(mismatch)) => Err(DataError::shard(loc.name(file), mismatch)),
    }
}

/// Reads and decodes the footer of `shard`.
pub fn read_footer(loc: &Location, shard: &ShardInfo) -> Result<ShardFooter> {
    let at = loc.name(&shard.file);
    let bytes = read_span(loc, &shard.file, &shard.footer, "footer")?;
    let n = bytes.len();
    if n < 8 || &bytes[n - 4..] != b"PAR1" {
        return Err(DataError::shard(&at, "not a Parquet file (no PAR1 magic)"));
    }
    let meta = ParquetMetaDataReader::decode_metadata(&bytes[..n - 8])
        .map_err(|e| DataError::shard(format!("{at} footer"), e))?;
    crate::parquet_meta::check_metadata(&meta, shard.bytes)
        .map_err(|e| DataError::shard(format!("{at} footer"), e))?;
    let arrow = ArrowReaderMetadata::try_new(Arc::new(meta), ArrowReaderOptions::new())
        .map_err(|e| DataError::shard(format!("{at} footer"), e))?;
    Ok(ShardFooter { arrow })
}

/// The bytes of one row group, placed at their offset in a file of `len` bytes.
struct SpanReader {
    len: u64,
    offset: u64,
    bytes: Bytes,
}

impl SpanReader {
    fn slice(&self, start: u64, length: u64) -> parquet::errors::Result<Bytes> {
        let end = start + length;
        if start < self.offset || end > self.offset + self.bytes.len() as u64 {
            return Err(ParquetError::General(format!(
                "read of bytes {start}..{end} outside the row group's span {}..{}",
                self.offset,
                self.offset + self.bytes.len() as u64
            )));
        }
        let s = (start - self.offset) as usize;
        Ok(self.bytes.slice(s..s + length as usize))
    }
}

impl Length for SpanReader {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for SpanReader {
    type T = Cursor<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let end = self.offset + self.bytes.len() as u64;
        Ok(Cursor::new(self.slice(start, end.saturating_sub(start))?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.slice(start, length as u64)
    }
}

/// Fetches row group `g` of `shard` with one range read. The second value, when set, says how
/// the bytes differ from the manifest's hash (the caller may still read sample ids from them
/// to name the rows it skips). Decoding is separate ([`decode_row_group`]).
pub fn fetch_row_group(
    loc: &Location,
    shard: &ShardInfo,
    g: usize,
) -> Result<(Vec<u8>, Option<String>)> {
    let info = shard.row_groups.get(g).ok_or_else(|| {
        DataError::shard(
            loc.name(&shard.file),
            format!(
                "no row group {g} (the manifest lists {})",
                shard.row_groups.len()
            ),
        )
    })?;
    read_span_unverified(loc, &shard.file, &info.span, &format!("row group {g}"))
}

/// Decodes fetched row group bytes into one record batch.
pub fn decode_row_group(
    at: &str,
    shard: &ShardInfo,
    footer: &ShardFooter,
    g: usize,
    bytes: Bytes,
) -> Result<RecordBatch> {
    decode_projected(at, shard, footer, g, bytes, None)
}

/// The sample ids of a row group whose other columns may be damaged: only the `sample_id`
/// column is decoded. None when that fails too.
pub fn decode_sample_ids(
    at: &str,
    shard: &ShardInfo,
    footer: &ShardFooter,
    g: usize,
    bytes: Bytes,
) -> Option<Vec<Option<String>>> {
    let idx = footer.arrow.schema().index_of("sample_id").ok()?;
    let mask = ProjectionMask::roots(
        footer.arrow.metadata().file_metadata().schema_descr(),
        [idx],
    );
    let batch = decode_projected(at, shard, footer, g, bytes, Some(mask)).ok()?;
    Some(crate::schema::sample_ids(&batch))
}

fn decode_projected(
    at: &str,
    shard: &ShardInfo,
    footer: &ShardFooter,
    g: usize,
    bytes: Bytes,
    projection: Option<ProjectionMask>,
) -> Result<RecordBatch> {
    let what = |e: BoxError| DataError::shard(format!("{at} row group {g}"), e);
    let info = shard
        .row_groups
        .get(g)
        .ok_or_else(|| what("not in the manifest".into()))?;
    if g >= footer.arrow.metadata().num_row_groups() {
        return Err(what("not in the footer".into()));
    }
    let reader = SpanReader {
        len: shard.bytes,
        offset: info.span.offset,
        bytes,
    };
    let mut builder =
        ParquetRecordBatchReaderBuilder::new_with_metadata(reader, footer.arrow.clone())
            .with_row_groups(vec![g])
            .with_batch_size(info.rows.max(1));
    if let Some(p) = projection {
        builder = builder.with_projection(p);
    }
    let rows = builder.build().map_err(|e| what(e.into()))?;
    let mut batches = Vec::new();
    for b in rows {
        batches.push(b.map_err(|e| what(e.into()))?);
    }
    let batch = match batches.len() {
        0 => return Err(what("no rows".into())),
        1 => batches.pop().ok_or_else(|| what("no rows".into()))?,
        _ => arrow_select_concat(&batches).map_err(what)?,
    };
    if batch.num_rows() != info.rows {
        return Err(what(
            format!("{} rows, the manifest says {}", batch.num_rows(), info.rows).into(),
        ));
    }
    Ok(batch)
}

fn arrow_select_concat(batches: &[RecordBatch]) -> std::result::Result<RecordBatch, BoxError> {
    let schema = batches[0].schema();
    Ok(arrow_select::concat::concat_batches(&schema, batches)?)
}

/// Decodes every row of a whole Parquet file in memory: each row is a sample (checked with
/// [`crate::RawSample::check`]) or the problem with it; an unreadable file is an error. With
/// `transform`, valid rows also go through image decoding and the transforms at 32 px. The
/// fuzz target drives this with arbitrary bytes.
pub fn decode_file_rows(
    bytes: &[u8],
    transform: bool,
) -> std::result::Result<Vec<std::result::Result<crate::RawSample, crate::SampleProblem>>, BoxError>
{
    // The parquet crate has asserts (and, with debug assertions, overflow checks) that hostile
    // bytes reach; as in the loader, such a panic is an error for this file. Only the parquet
    // part is guarded, so the fuzz target still finds panics in this crate's own decoding.
    let batches = std::panic::catch_unwind(|| parquet_batches(bytes))
        .unwrap_or_else(|_| Err("the Parquet decoder panicked on this file".into()))?;
    let spec = crate::TransformSpec {
        resolution: 32,
        ref_resolution: 32,
        aspect_buckets: false,
    };
    let mut out = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let decoded = crate::schema::decode_row(&batch, row).and_then(|s| {
                s.check()?;
                if transform {
                    crate::transform::decode_sample(&s, &spec)?;
                }
                Ok(s)
            });
            out.push(decoded);
        }
    }
    Ok(out)
}

/// Every record batch of a whole Parquet file in memory, metadata checked first.
fn parquet_batches(bytes: &[u8]) -> std::result::Result<Vec<RecordBatch>, BoxError> {
    let data = Bytes::copy_from_slice(bytes);
    let meta = ParquetMetaDataReader::new().parse_and_finish(&data)?;
    crate::parquet_meta::check_metadata(&meta, bytes.len() as u64)?;
    let arrow = ArrowReaderMetadata::try_new(Arc::new(meta), ArrowReaderOptions::new())?;
    ParquetRecordBatchReaderBuilder::new_with_metadata(data, arrow)
        .with_batch_size(64)
        .build()?
        .map(|b| b.map_err(BoxError::from))
        .collect()
}

/// The sample id of `row` where it could be read, else "?".
pub(crate) fn id_at(ids: &[Option<String>], row: usize) -> String {
    ids.get(row)
        .cloned()
        .flatten()
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded random damage to a small shard: decoding returns rows, problems or an error,
    /// and never panics (the fuzz target explores further).
    #[test]
    fn damaged_files_never_panic() {
        use rand::{Rng, SeedableRng};
        let opts = crate::synth::SynthOptions {
            samples: 4,
            size: 32,
            ref_size: 32,
            ..Default::default()
        };
        let rows: Vec<_> = (0..4).map(|i| crate::synth::sample(&opts, i)).collect();
        let clean = crate::writer::encode_shard(&rows, 2).unwrap();
        let ok = decode_file_rows(&clean, true).unwrap();
        assert_eq!(ok.len(), 4);
        assert!(ok.iter().all(|r| r.is_ok()));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..300 {
            let mut b = clean.clone();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            if rng.random_bool(0.2) {
                b.truncate(rng.random_range(0..b.len()));
            }
            let _ = decode_file_rows(&b, true);
        }
    }
}
