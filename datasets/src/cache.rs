//! The latent cache (`datasets precompute`): VAE latents and caption embeddings of every sample,
//! computed once, so training decodes no image and runs no encoder.
//!
//! A cache mirrors its dataset: the same shard files, row groups and rows in the same places, so
//! a rank's plan over the dataset's manifest reads the cache's row groups instead. `cache.json`
//! holds the fingerprint (encoders, resolutions, transform) and the sha256 of the dataset's
//! manifest; a trainer refuses a cache whose fingerprint or dataset differs. Tensors are stored
//! as raw little-endian bf16 with their shapes (design.md §2), with each row's sample id; the
//! mirrored layout and the pinned manifest hash tie every row to its dataset row. Rows that
//! could not be used at precompute time keep their problem, so the reader reports them as it
//! would have.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use arrow_array::{Array, ArrayRef, BinaryArray, ListArray, RecordBatch, StringArray, UInt32Array};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::digest::sha256_hex;
use crate::encode::{load_encoders, EncoderSpec, Encoders};
use crate::error::{DataError, Result, SampleProblem};
use crate::manifest::{Manifest, ShardInfo, MANIFEST};
use crate::store::Location;
use crate::transform::{decode_sample, TransformSpec};

pub const CACHE_INFO: &str = "cache.json";
/// The empty caption's embeddings (`txt` [L, context_dim], `pooled` [pooled_dim], bf16 like
/// every cached caption), which condition dropout feeds for a dropped caption.
pub const EMPTY_CAPTION: &str = "empty_caption.safetensors";
pub const CACHE_FORMAT: &str = "semalign-ms-cache";

/// What a cache was made with; a trainer uses a cache only when this matches its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheInfo {
    pub format: String,
    pub version: u32,
    /// [`fingerprint`] of the encoders and transforms.
    pub fingerprint: String,
    /// sha256 of the dataset's manifest.json bytes.
    pub data_manifest_sha256: String,
    pub created_by: String,
}

/// The fingerprint of (encoders, resolutions, transform) a cache is keyed by.
/// Pretrained encoders' files are fetched and hashed (once, see `model_files`).
pub fn fingerprint(encoders: &EncoderSpec, transform: &TransformSpec) -> Result<String> {
    let enc = encoders
        .fingerprint()
        .map_err(|e| DataError::input("encoders", e))?;
    let target = if transform.aspect_buckets {
        "aspect-buckets"
    } else {
        "cover-square"
    };
    Ok(format!(
        "{enc}|target {}px {target}|refs {}px mask-box-0.9|points v1",
        transform.resolution, transform.ref_resolution
    ))
}

/// A tensor as stored: bf16 values and a shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// One cached sample.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedSample {
    pub sample_id: String,
    /// Target latent [16, H/8, W/8].
    pub target: Stored,
    /// Per reference: latent [16, h/8, w/8].
    pub refs: Vec<Stored>,
    /// Per reference: (reference token, target token) pairs.
    pub pairs: Vec<Vec<(u32, u32)>>,
    /// Caption token embeddings [L, context_dim].
    pub txt: Stored,
    /// Pooled caption embedding [pooled_dim].
    pub pooled: Stored,
    /// Token grids (rows, cols) of the target and of the references.
    pub grid: (u32, u32),
    pub ref_grid: (u32, u32),
}

fn to_bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect()
}

fn from_bf16_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

fn u32_list_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::UInt32, false))
}

fn list_of(dt: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", dt, false)))
}

pub fn schema() -> SchemaRef {
    let shape = DataType::List(u32_list_field());
    Arc::new(Schema::new(vec![
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("problem", DataType::Utf8, true),
        Field::new("target", DataType::Binary, false),
        Field::new("target_shape", shape.clone(), false),
        Field::new("refs", list_of(DataType::Binary), false),
        Field::new("ref_shapes", list_of(shape.clone()), false),
        Field::new("pairs", list_of(DataType::List(u32_list_field())), false),
        Field::new("txt", DataType::Binary, false),
        Field::new("txt_shape", shape.clone(), false),
        Field::new("pooled", DataType::Binary, false),
        Field::new("pooled_shape", shape, false),
        Field::new("grids", DataType::List(u32_list_field()), false),
    ]))
}

/// A cached row: the sample, or the problem it had at precompute time.
pub type CacheRow = std::result::Result<CachedSample, (String, SampleProblem)>;

fn u32_lists(lists: &[Vec<u32>]) -> ListArray {
    let values = UInt32Array::from_iter_values(lists.iter().flatten().copied());
    ListArray::new(
        u32_list_field(),
        OffsetBuffer::from_lengths(lists.iter().map(Vec::len)),
        Arc::new(values),
        None,
    )
}

fn nested<T>(rows: &[Vec<T>], inner: ArrayRef, dt: DataType) -> ListArray {
    ListArray::new(
        Arc::new(Field::new("item", dt, false)),
        OffsetBuffer::from_lengths(rows.iter().map(Vec::len)),
        inner,
        None,
    )
}

fn dims(s: &Stored) -> Vec<u32> {
    s.shape.iter().map(|&d| d as u32).collect()
}

/// Cached rows as one record batch.
pub fn to_batch(rows: &[CacheRow]) -> std::result::Result<RecordBatch, arrow_schema::ArrowError> {
    let empty = Stored {
        shape: vec![0],
        values: vec![],
    };
    let get = |i: usize| rows[i].as_ref().ok();
    let n = rows.len();
    let ids = StringArray::from_iter_values(rows.iter().map(|r| match r {
        Ok(s) => s.sample_id.clone(),
        Err((id, _)) => id.clone(),
    }));
    let problems = rows
        .iter()
        .map(|r| match r {
            Ok(_) => Ok(None),
            Err((_, p)) => serde_json::to_string(&ProblemJson::from(p))
                .map(Some)
                .map_err(|e| arrow_schema::ArrowError::ExternalError(Box::new(e))),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let problems = StringArray::from_iter(problems);
    let stored = |f: &dyn Fn(&CachedSample) -> &Stored| -> (BinaryArray, ListArray) {
        let st: Vec<&Stored> = (0..n).map(|i| get(i).map_or(&empty, f)).collect();
        let bytes: Vec<Vec<u8>> = st.iter().map(|s| to_bf16_bytes(&s.values)).collect();
        let shapes: Vec<Vec<u32>> = st.iter().map(|s| dims(s)).collect();
        (
            BinaryArray::from_iter_values(bytes.iter().map(Vec::as_slice)),
            u32_lists(&shapes),
        )
    };
    let (target, target_shape) = stored(&|s| &s.target);
    let (txt, txt_shape) = stored(&|s| &s.txt);
    let (pooled, pooled_shape) = stored(&|s| &s.pooled);
    let ref_rows: Vec<Vec<&Stored>> = (0..n)
        .map(|i| get(i).map_or(vec![], |s| s.refs.iter().collect()))
        .collect();
    let ref_bytes: Vec<Vec<u8>> = ref_rows
        .iter()
        .flatten()
        .map(|s| to_bf16_bytes(&s.values))
        .collect();
    let refs = nested(
        &ref_rows,
        Arc::new(BinaryArray::from_iter_values(
            ref_bytes.iter().map(Vec::as_slice),
        )),
        DataType::Binary,
    );
    let ref_shape_lists: Vec<Vec<u32>> = ref_rows.iter().flatten().map(|s| dims(s)).collect();
    let ref_shapes = nested(
        &ref_rows,
        Arc::new(u32_lists(&ref_shape_lists)),
        DataType::List(u32_list_field()),
    );
    let pair_rows: Vec<Vec<Vec<u32>>> = (0..n)
        .map(|i| {
            get(i).map_or(vec![], |s| {
                s.pairs
                    .iter()
                    .map(|p| p.iter().flat_map(|&(a, b)| [a, b]).collect())
                    .collect()
            })
        })
        .collect();
    let flat_pairs: Vec<Vec<u32>> = pair_rows.iter().flatten().cloned().collect();
    let pairs = nested(
        &pair_rows,
        Arc::new(u32_lists(&flat_pairs)),
        DataType::List(u32_list_field()),
    );
    let grids: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            get(i).map_or(vec![0, 0, 0, 0], |s| {
                vec![s.grid.0, s.grid.1, s.ref_grid.0, s.ref_grid.1]
            })
        })
        .collect();
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(ids),
            Arc::new(problems),
            Arc::new(target),
            Arc::new(target_shape),
            Arc::new(refs),
            Arc::new(ref_shapes),
            Arc::new(pairs),
            Arc::new(txt),
            Arc::new(txt_shape),
            Arc::new(pooled),
            Arc::new(pooled_shape),
            Arc::new(u32_lists(&grids)),
        ],
    )
}

/// A sample problem as stored in the cache.
#[derive(Serialize, Deserialize)]
struct ProblemJson {
    kind: String,
    message: String,
}

impl From<&SampleProblem> for ProblemJson {
    fn from(p: &SampleProblem) -> Self {
        Self {
            kind: p.kind().to_string(),
            message: p.to_string(),
        }
    }
}

fn bad(column: &str, reason: impl Into<String>) -> SampleProblem {
    SampleProblem::Column {
        column: format!("cache.{column}"),
        reason: reason.into(),
    }
}

fn col<'a>(batch: &'a RecordBatch, name: &str) -> std::result::Result<&'a ArrayRef, SampleProblem> {
    batch
        .column_by_name(name)
        .ok_or_else(|| bad(name, "missing"))
}

fn u32s(a: &dyn Array, row: usize, name: &str) -> std::result::Result<Vec<u32>, SampleProblem> {
    let list = a
        .as_list_opt::<i32>()
        .ok_or_else(|| bad(name, "expected list<uint32>"))?;
    let v = list.value(row);
    let v = v
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| bad(name, "expected uint32"))?;
    Ok(v.values().to_vec())
}

fn stored_at(
    bytes: &[u8],
    shape: Vec<u32>,
    name: &str,
) -> std::result::Result<Stored, SampleProblem> {
    let shape: Vec<usize> = shape.into_iter().map(|d| d as usize).collect();
    let n: usize = shape.iter().product();
    if bytes.len() != 2 * n {
        return Err(bad(
            name,
            format!("{} bytes for shape {shape:?} (bf16)", bytes.len()),
        ));
    }
    Ok(Stored {
        shape,
        values: from_bf16_bytes(bytes),
    })
}

/// Decodes row `row` of a cache batch.
pub fn decode_row(batch: &RecordBatch, row: usize) -> CacheRow {
    let id = col(batch, "sample_id")
        .ok()
        .and_then(|c| c.as_string_opt::<i32>().map(|s| s.value(row).to_string()))
        .unwrap_or_else(|| "?".into());
    let decoded = (|| -> std::result::Result<CachedSample, SampleProblem> {
        if let Some(p) = batch
            .column_by_name("problem")
            .and_then(|c| c.as_string_opt::<i32>())
        {
            if !p.is_null(row) {
                let j: ProblemJson = serde_json::from_str(p.value(row))
                    .map_err(|e| bad("problem", e.to_string()))?;
                return Err(SampleProblem::Invalid {
                    what: format!("at precompute time ({})", j.kind),
                    reason: j.message,
                });
            }
        }
        let bin = |name: &str| -> std::result::Result<Vec<u8>, SampleProblem> {
            let c = col(batch, name)?
                .as_binary_opt::<i32>()
                .ok_or_else(|| bad(name, "expected binary"))?;
            Ok(c.value(row).to_vec())
        };
        let shape = |name: &str| u32s(col(batch, name)?.as_ref(), row, name);
        let target = stored_at(&bin("target")?, shape("target_shape")?, "target")?;
        let txt = stored_at(&bin("txt")?, shape("txt_shape")?, "txt")?;
        let pooled = stored_at(&bin("pooled")?, shape("pooled_shape")?, "pooled")?;
        let refs_list = col(batch, "refs")?
            .as_list_opt::<i32>()
            .ok_or_else(|| bad("refs", "expected list<binary>"))?;
        let ref_values = refs_list.value(row);
        let ref_bytes = ref_values
            .as_binary_opt::<i32>()
            .ok_or_else(|| bad("refs", "expected binary"))?;
        let shapes_list = col(batch, "ref_shapes")?
            .as_list_opt::<i32>()
            .ok_or_else(|| bad("ref_shapes", "expected list"))?;
        let shapes = shapes_list.value(row);
        let pairs_list = col(batch, "pairs")?
            .as_list_opt::<i32>()
            .ok_or_else(|| bad("pairs", "expected list"))?;
        let pairs = pairs_list.value(row);
        let k = ref_bytes.len();
        if shapes.len() != k || pairs.len() != k {
            return Err(bad("refs", "references, shapes and pairs differ in count"));
        }
        let mut refs = Vec::with_capacity(k);
        let mut all_pairs = Vec::with_capacity(k);
        for i in 0..k {
            refs.push(stored_at(
                ref_bytes.value(i),
                u32s(shapes.as_ref(), i, "ref_shapes")?,
                "refs",
            )?);
            let flat = u32s(pairs.as_ref(), i, "pairs")?;
            if flat.len() % 2 != 0 {
                return Err(bad("pairs", "odd number of token indices"));
            }
            all_pairs.push(flat.chunks(2).map(|c| (c[0], c[1])).collect());
        }
        let g = shape("grids")?;
        if g.len() != 4 {
            return Err(bad("grids", "expected 4 values"));
        }
        Ok(CachedSample {
            sample_id: id.clone(),
            target,
            refs,
            pairs: all_pairs,
            txt,
            pooled,
            grid: (g[0], g[1]),
            ref_grid: (g[2], g[3]),
        })
    })();
    decoded.map_err(|p| (id, p))
}

/// Why a cache (or a precompute's progress) made for `made` = (fingerprint, sha256 of the
/// dataset's manifest) does not serve `now`, or `None` when it does: the one wording both the
/// reader and `precompute` give.
fn stale(made: (&str, &str), now: (&str, &str)) -> Option<String> {
    if made.0 != now.0 {
        Some(format!(
            "was made for other encoders or transforms:\n  made for: {}\n  now:      {}",
            made.0, now.0
        ))
    } else if made.1 != now.1 {
        Some("was made from another version of the dataset (its manifest changed since)".into())
    } else {
        None
    }
}

/// Reads `cache.json` below `cache` and checks it against the expected fingerprint and the
/// dataset at `data`; returns the cache's manifest.
pub fn open(cache: &Location, data: &Location, expected_fingerprint: &str) -> Result<Manifest> {
    let at = cache.name(CACHE_INFO);
    let bytes = cache.get(CACHE_INFO)?.ok_or_else(|| {
        DataError::input(&at, "not found (make the cache with `datasets precompute`)")
    })?;
    let info: CacheInfo = serde_json::from_slice(&bytes)
        .map_err(|e| DataError::input(&at, format!("not a cache description: {e}")))?;
    if info.format != CACHE_FORMAT {
        return Err(DataError::input(&at, format!("format `{}`", info.format)));
    }
    let data_manifest = data
        .get(MANIFEST)?
        .ok_or_else(|| DataError::manifest(data.name(MANIFEST), "not found"))?;
    let made = (
        info.fingerprint.as_str(),
        info.data_manifest_sha256.as_str(),
    );
    if let Some(why) = stale(made, (expected_fingerprint, &sha256_hex(&data_manifest))) {
        return Err(DataError::input(
            &at,
            format!(
                "{why}\nrun `datasets precompute` again with the run's settings, or train without the cache"
            ),
        ));
    }
    let cached = Manifest::load(cache)?;
    let data_m = Manifest::load(data)?;
    let layout = |m: &Manifest| -> Vec<(String, Vec<(usize, String)>)> {
        m.shards
            .iter()
            .map(|s| {
                (
                    s.file.clone(),
                    s.row_groups
                        .iter()
                        .map(|g| (g.rows, g.refs.clone()))
                        .collect(),
                )
            })
            .collect()
    };
    if layout(&cached) != layout(&data_m) {
        return Err(DataError::input(
            &at,
            "its shards and row groups do not mirror the dataset's; run `datasets precompute` again",
        ));
    }
    Ok(cached)
}

/// Options of `datasets precompute`.
#[derive(Debug, Clone)]
pub struct PrecomputeOptions {
    pub encoders: EncoderSpec,
    pub transform: TransformSpec,
    /// Where the encoders run (CPU in f32; a GPU in bf16).
    pub device: candle_core::Device,
    /// This process's part (r, w) of the work: the shards whose index is r modulo w. (0, 1)
    /// does everything; w processes (one per GPU) split it.
    pub part: (usize, usize),
    pub created_by: String,
}

/// What one `precompute` call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrecomputeReport {
    /// Samples encoded by this call.
    pub cached: usize,
    /// Samples kept with their problem by this call.
    pub bad: usize,
    /// Shards of this part a previous (interrupted) call had finished, not encoded again.
    pub reused_shards: usize,
    /// Every part is done and the cache's manifest and cache.json are written.
    pub complete: bool,
}

/// The progress of one part: the shards it has finished, for resuming and for assembling the
/// manifest when every part is done.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct PartProgress {
    fingerprint: String,
    data_manifest_sha256: String,
    /// Finished shards, by their index in the dataset's manifest.
    shards: BTreeMap<usize, ShardInfo>,
    done: bool,
}

fn part_file(r: usize, w: usize) -> String {
    format!("precompute/part-{r:04}-of-{w:04}.json")
}

fn load_part(out: &Location, rel: &str) -> Result<Option<PartProgress>> {
    match out.get(rel)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DataError::input(out.name(rel), format!("not a progress file: {e}"))),
    }
}

/// Writes the cache of the dataset at `data` to `out`, or this process's part of it (see
/// [`PrecomputeOptions::part`]). Finished shards are recorded as they are written, so a call
/// that was interrupted resumes after the last whole shard; the part that finishes last writes
/// the manifest and `cache.json`, after which the cache can be read.
pub fn precompute(
    data: &Location,
    out: &Location,
    opts: &PrecomputeOptions,
) -> Result<PrecomputeReport> {
    let (r, w) = opts.part;
    if w == 0 || r >= w {
        return Err(DataError::input(
            "--part",
            format!("{r}/{w}: expected R/W with 0 <= R < W"),
        ));
    }
    let manifest_bytes = data
        .get(MANIFEST)?
        .ok_or_else(|| DataError::manifest(data.name(MANIFEST), "not found"))?;
    let manifest = Manifest::load(data)?;
    let fingerprint = fingerprint(&opts.encoders, &opts.transform)?;
    opts.encoders
        .check_widths()
        .map_err(|e| DataError::input("encoders", e))?;
    let data_sha = sha256_hex(&manifest_bytes);
    let progress_rel = part_file(r, w);
    let mut progress = match load_part(out, &progress_rel)? {
        Some(p) => {
            // Finished or not: a cache made before the encoders changed (a new pixel codec
            // scale, other widths) meets this on the README's command line.
            let made = (p.fingerprint.as_str(), p.data_manifest_sha256.as_str());
            if let Some(why) = stale(made, (&fingerprint, &data_sha)) {
                return Err(DataError::input(
                    out.name(&progress_rel),
                    format!(
                        "this folder's precompute {why}\nuse another --out or delete this folder"
                    ),
                ));
            }
            p
        }
        None => PartProgress {
            fingerprint: fingerprint.clone(),
            data_manifest_sha256: data_sha.clone(),
            ..Default::default()
        },
    };
    let mut report = PrecomputeReport::default();
    let mine: Vec<usize> = (0..manifest.shards.len()).filter(|i| i % w == r).collect();
    let mut enc = None;
    for &i in &mine {
        let shard = &manifest.shards[i];
        if let Some(done) = progress.shards.get(&i) {
            // A finished shard is whole (puts are atomic); its size tells it is still there.
            if out.exists(&done.file)? && out.size(&done.file)? == done.bytes {
                report.reused_shards += 1;
                continue;
            }
        }
        if enc.is_none() {
            enc = Some(load_encoders_on(&opts.encoders, &opts.device)?);
        }
        let Some(enc) = enc.as_mut() else {
            continue;
        };
        let info = precompute_shard(data, out, shard, enc, &opts.transform, &mut report)?;
        progress.shards.insert(i, info);
        put_json(out, &progress_rel, &progress)?;
    }
    progress.done = true;
    put_json(out, &progress_rel, &progress)?;

    // The last part to finish assembles the manifest (two finishing at once write the same).
    let mut shards = Vec::with_capacity(manifest.shards.len());
    for i in 0..manifest.shards.len() {
        let part = match load_part(out, &part_file(i % w, w))? {
            Some(p) if p.done && p.fingerprint == fingerprint => p,
            _ => return Ok(report),
        };
        match part.shards.get(&i) {
            Some(info) => shards.push(info.clone()),
            None => return Ok(report),
        }
    }
    Manifest {
        shards,
        created_by: opts.created_by.clone(),
        ..manifest
    }
    .write(out)?;
    let enc = match enc.as_mut() {
        Some(enc) => enc,
        None => enc.insert(load_encoders_on(&opts.encoders, &opts.device)?),
    };
    write_empty_caption(out, enc)?;
    let info = CacheInfo {
        format: CACHE_FORMAT.into(),
        version: 1,
        fingerprint,
        data_manifest_sha256: data_sha,
        created_by: opts.created_by.clone(),
    };
    put_json(out, CACHE_INFO, &info)?;
    report.complete = true;
    Ok(report)
}

/// The encoders of `spec` on `device`: f32 on the CPU, bf16 on a GPU.
fn load_encoders_on(spec: &EncoderSpec, device: &candle_core::Device) -> Result<Encoders> {
    let dtype = if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    };
    load_encoders(spec, dtype, device).map_err(|e| DataError::input("encoders", e))
}

/// Encodes the empty caption "" and writes [`EMPTY_CAPTION`].
fn write_empty_caption(out: &Location, enc: &mut Encoders) -> Result<()> {
    let at = out.name(EMPTY_CAPTION);
    let fail = |e: &dyn std::fmt::Display| DataError::input(&at, e.to_string());
    let (txt, pooled) = enc.encode_text(&[""]).map_err(|e| fail(&flux::chain(&e)))?;
    let bf16 = |t: candle_core::Tensor| {
        t.get(0)
            .and_then(|t| t.to_dtype(candle_core::DType::BF16))
            .map_err(|e| fail(&e))
    };
    let (txt, pooled) = (bf16(txt)?, bf16(pooled)?);
    let bytes = safetensors::tensor::serialize([("txt", &txt), ("pooled", &pooled)], None)
        .map_err(|e| fail(&e))?;
    out.put(EMPTY_CAPTION, bytes)
}

/// The empty caption's embeddings of the cache at `cache` as f32 (txt, pooled); None for a
/// cache made before they were stored.
pub fn read_empty_caption(cache: &Location) -> Result<Option<(Stored, Stored)>> {
    let Some(bytes) = cache.get(EMPTY_CAPTION)? else {
        return Ok(None);
    };
    let at = cache.name(EMPTY_CAPTION);
    let map = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .map_err(|e| DataError::input(&at, e))?;
    let get = |name: &str| -> Result<Stored> {
        let t = map
            .get(name)
            .ok_or_else(|| DataError::input(&at, format!("has no tensor `{name}`")))?;
        let values = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| DataError::input(&at, format!("tensor `{name}`: {e}")))?;
        Ok(Stored {
            shape: t.dims().to_vec(),
            values,
        })
    };
    Ok(Some((get("txt")?, get("pooled")?)))
}

fn put_json<T: Serialize>(out: &Location, rel: &str, value: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| DataError::input(out.name(rel), e))?;
    out.put(rel, json)
}

/// Encodes one shard of the dataset into the same-named cache shard; returns its manifest
/// entry.
fn precompute_shard(
    data: &Location,
    out: &Location,
    shard: &ShardInfo,
    enc: &mut Encoders,
    transform: &TransformSpec,
    report: &mut PrecomputeReport,
) -> Result<ShardInfo> {
    let at = data.name(&shard.file);
    let footer = crate::shard::read_footer(data, shard)?;
    let mut bytes = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        &mut bytes,
        schema(),
        Some(
            parquet::file::properties::WriterProperties::builder()
                .set_max_row_group_row_count(Some(usize::MAX))
                .set_dictionary_enabled(false)
                .build(),
        ),
    )
    .map_err(|e| DataError::shard(&at, e))?;
    let mut counts = Vec::with_capacity(shard.rows);
    for (g, info) in shard.row_groups.iter().enumerate() {
        let (raw, mismatch) = crate::shard::fetch_row_group(data, shard, g)?;
        if let Some(m) = mismatch {
            return Err(DataError::shard(&at, m));
        }
        let batch = crate::shard::decode_row_group(&at, shard, &footer, g, raw.into())?;
        let ids = crate::schema::sample_ids(&batch);
        let mut rows = Vec::with_capacity(info.rows);
        for row in 0..info.rows {
            let id = crate::shard::id_at(&ids, row);
            let r = crate::schema::decode_row(&batch, row)
                .and_then(|s| {
                    s.check()?;
                    decode_sample(&s, transform)
                })
                .and_then(|d| encode_one(enc, &d));
            match &r {
                Ok(_) => report.cached += 1,
                Err(_) => report.bad += 1,
            }
            rows.push(r.map_err(|p| (id, p)));
        }
        counts.extend(info.row_meta());
        let cb = to_batch(&rows).map_err(|e| DataError::shard(&at, e))?;
        writer.write(&cb).map_err(|e| DataError::shard(&at, e))?;
        writer.flush().map_err(|e| DataError::shard(&at, e))?;
    }
    writer.close().map_err(|e| DataError::shard(&at, e))?;
    let info = crate::writer::describe_shard(&shard.file, &bytes, &counts)
        .map_err(|e| DataError::shard(out.name(&shard.file), e))?;
    out.put(&shard.file, bytes)?;
    Ok(info)
}

fn stored(t: &candle_core::Tensor) -> std::result::Result<Stored, SampleProblem> {
    let flat = t
        .flatten_all()
        .and_then(|f| f.to_vec1::<f32>())
        .map_err(|e| SampleProblem::Invalid {
            what: "encoder output".into(),
            reason: e.to_string(),
        })?;
    Ok(Stored {
        shape: t.dims().to_vec(),
        values: flat,
    })
}

/// Encodes one decoded sample.
pub fn encode_one(
    enc: &mut Encoders,
    d: &crate::transform::Decoded,
) -> std::result::Result<CachedSample, SampleProblem> {
    let fail = |e: crate::encode::EncodeError| SampleProblem::Invalid {
        what: "encoders".into(),
        reason: flux::chain(&e),
    };
    let pick = |t: candle_core::Tensor| {
        t.get(0).map_err(|e| SampleProblem::Invalid {
            what: "encoder output".into(),
            reason: e.to_string(),
        })
    };
    let target = stored(&pick(enc.encode_images(&[&d.target]).map_err(fail)?)?)?;
    let mut refs = Vec::with_capacity(d.refs.len());
    for r in &d.refs {
        refs.push(stored(&pick(
            enc.encode_images(&[&r.pixels]).map_err(fail)?,
        )?)?);
    }
    let (txt, pooled) = enc.encode_text(&[d.caption.as_str()]).map_err(fail)?;
    let ref_grid = d
        .refs
        .first()
        .map_or((0, 0), |r| (r.grid.rows as u32, r.grid.cols as u32));
    Ok(CachedSample {
        sample_id: d.sample_id.clone(),
        target,
        refs,
        pairs: d
            .refs
            .iter()
            .map(|r| r.pairs.iter().map(|p| (p.ref_token, p.tgt_token)).collect())
            .collect(),
        txt: stored(&pick(txt)?)?,
        pooled: stored(&pick(pooled)?)?,
        grid: (d.grid.rows as u32, d.grid.cols as u32),
        ref_grid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_rows_round_trip_with_bf16_values() {
        let s = CachedSample {
            sample_id: "a".into(),
            target: Stored {
                shape: vec![2, 2],
                values: vec![1.0, -2.5, 0.125, 3.0],
            },
            refs: vec![Stored {
                shape: vec![1, 3],
                values: vec![0.5, 0.25, -1.0],
            }],
            pairs: vec![vec![(1, 2), (3, 4)]],
            txt: Stored {
                shape: vec![1, 2],
                values: vec![7.0, 8.0],
            },
            pooled: Stored {
                shape: vec![2],
                values: vec![0.0, 1.0],
            },
            grid: (4, 4),
            ref_grid: (2, 2),
        };
        let problem = SampleProblem::RefCount { count: 7 };
        let rows = vec![Ok(s.clone()), Err(("b".to_string(), problem))];
        let batch = to_batch(&rows).unwrap();
        assert_eq!(decode_row(&batch, 0), Ok(s));
        let (id, p) = decode_row(&batch, 1).unwrap_err();
        assert_eq!(id, "b");
        assert!(p.to_string().contains("7 references"), "{p}");
    }
}
