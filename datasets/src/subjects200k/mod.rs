//! `datasets import-subjects200k`: the released SemAlign-MS-Subjects200K layout into shards.
//!
//! Input (as the official loader reads it): Subjects200K Parquet files whose `image` holds a
//! two-panel picture (target crop box (8, 8, 520, 520), reference (528, 8, 1040, 520)),
//! `collection`, `quality_assessment` {compositeStructure, objectConsistency, imageQuality} and
//! `description` {item, category, description_0, ...}; `mask/{uid}.png` (the subject's mask in the
//! target) and `coord/{dift,geoaware}/{uid}_ref0.pt`, int64 [4096, 2]: for target patch n of a
//! 64 x 64 grid, (y, x) of the matching reference patch. Rows are kept as the official filter
//! does (collection `collection_2`, all three scores >= 5, configurable); a correspondence is
//! kept where both matchers agree and the target mask is on (a missing mask counts as all on, a
//! missing coordinate file gives a sample without correspondences, as in the official loader).
//! Which pairs: [`mapping`] (`--mapping official` at the run's resolution, the default, or
//! `grid64`). They go to the shards as token centres, normalised, so the trainer's token
//! mapping at that resolution gives back exactly those pairs.
//!
//! The uid naming the mask and coordinate files is sha256(f"{item}_{description_0}_{h8}") with
//! h8 from the sha256 of the target crop *as Pillow encodes it to PNG*. Another PNG encoder
//! gives other bytes, so the uid computed here matches the release only when the encoders
//! agree; `--uids FILE` (JSONL `{"file", "row", "uid"}`, made once with Pillow, see
//! docs/data.md) gives the exact ones. The report counts rows whose files were not found.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch, StructArray};
use arrow_schema::DataType;
use image::GenericImageView;
use serde::Serialize;

use crate::digest::sha256_hex;
use crate::error::{DataError, Result};
use crate::schema::{Quality, RawCorrespondence, RawRef, RawSample};
use crate::writer::ShardWriter;
pub use mapping::{official_pairs, Mapping, TargetMask};

pub mod mapping;

const PAD: u32 = 8;
const PANEL: u32 = 512;
const GRID: usize = mapping::COORD_GRID;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub parquet: Vec<PathBuf>,
    pub mask_dir: PathBuf,
    pub coord_dir: PathBuf,
    pub collection: String,
    pub min_quality: f64,
    /// (parquet file name, row) -> uid, from `--uids`.
    pub uids: Option<HashMap<(String, usize), String>>,
    /// Which pairs to write.
    pub mapping: Mapping,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub rows: usize,
    pub filtered_collection: usize,
    pub filtered_quality: usize,
    pub kept: usize,
    pub with_mask: usize,
    pub with_coords: usize,
    pub points: usize,
    /// Rows that could not be imported: "file row N: reason".
    pub skipped: Vec<String>,
}

/// Reads a `--uids` JSONL file.
pub fn read_uids(path: &Path) -> Result<HashMap<(String, usize), String>> {
    #[derive(serde::Deserialize)]
    struct Line {
        file: String,
        row: usize,
        uid: String,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::input(path.display().to_string(), e))?;
    let mut out = HashMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let l: Line = serde_json::from_str(line)
            .map_err(|e| DataError::input(format!("{} line {}", path.display(), i + 1), e))?;
        out.insert((l.file, l.row), l.uid);
    }
    Ok(out)
}

fn str_field(s: &StructArray, name: &str, row: usize) -> Option<String> {
    let c = s.column_by_name(name)?;
    if c.is_null(row) {
        return None;
    }
    match c.data_type() {
        DataType::Utf8 => Some(c.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Some(c.as_string::<i64>().value(row).to_string()),
        _ => None,
    }
}

fn number(c: &dyn Array, row: usize) -> Option<f64> {
    if c.is_null(row) {
        return None;
    }
    Some(match c.data_type() {
        DataType::Int64 => c.as_primitive::<Int64Type>().value(row) as f64,
        DataType::Int32 => c.as_primitive::<Int32Type>().value(row) as f64,
        DataType::Float64 => c.as_primitive::<Float64Type>().value(row),
        DataType::Float32 => c.as_primitive::<Float32Type>().value(row) as f64,
        _ => return None,
    })
}

fn image_bytes(c: &dyn Array, row: usize) -> Option<Vec<u8>> {
    if c.is_null(row) {
        return None;
    }
    match c.data_type() {
        DataType::Struct(_) => {
            let s = c.as_struct();
            let b = s.column_by_name("bytes")?;
            if b.is_null(row) {
                return None;
            }
            match b.data_type() {
                DataType::Binary => Some(b.as_binary::<i32>().value(row).to_vec()),
                DataType::LargeBinary => Some(b.as_binary::<i64>().value(row).to_vec()),
                _ => None,
            }
        }
        DataType::Binary => Some(c.as_binary::<i32>().value(row).to_vec()),
        DataType::LargeBinary => Some(c.as_binary::<i64>().value(row).to_vec()),
        _ => None,
    }
}

/// The [4096, 2] (y, x) coordinates of a .pt file, checked to lie on the 64 x 64 grid.
fn read_coords(path: &Path) -> std::result::Result<Vec<(i64, i64)>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = crate::pt::read_tensor(&bytes, &path.display().to_string())?;
    if t.dims() != [GRID * GRID, 2] {
        return Err(format!(
            "{}: shape {:?}, expected [4096, 2]",
            path.display(),
            t.dims()
        ));
    }
    let v = t
        .to_dtype(candle_core::DType::I64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<i64>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let pairs: Vec<(i64, i64)> = v.chunks_exact(2).map(|c| (c[0], c[1])).collect();
    if let Some((n, p)) = pairs
        .iter()
        .enumerate()
        .find(|(_, (y, x))| !(0..GRID as i64).contains(y) || !(0..GRID as i64).contains(x))
    {
        return Err(format!(
            "{}: row {n} holds {p:?}, outside the 64 x 64 grid",
            path.display()
        ));
    }
    Ok(pairs)
}

/// The target mask, or None when the file is missing.
fn read_mask(path: &Path) -> std::result::Result<Option<TargetMask>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    TargetMask::decode(&bytes)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn png(img: &image::DynamicImage) -> Vec<u8> {
    crate::transform::png(&img.to_rgb8())
}

struct Row {
    item: String,
    caption: String,
    category: Option<String>,
    quality: Quality,
    image: Vec<u8>,
}

fn read_row(batch: &RecordBatch, row: usize) -> std::result::Result<Row, String> {
    let desc = batch
        .column_by_name("description")
        .and_then(|c| c.as_struct_opt())
        .ok_or("no struct column `description`")?;
    let item = str_field(desc, "item", row).ok_or("description.item is missing")?;
    let caption =
        str_field(desc, "description_0", row).ok_or("description.description_0 is missing")?;
    let q = batch
        .column_by_name("quality_assessment")
        .and_then(|c| c.as_struct_opt());
    let score = |name: &str| {
        q.filter(|q| !q.is_null(row))
            .and_then(|q| q.column_by_name(name))
            .and_then(|c| number(c.as_ref(), row))
    };
    let image = batch
        .column_by_name("image")
        .and_then(|c| image_bytes(c.as_ref(), row))
        .ok_or("image bytes are missing")?;
    Ok(Row {
        item,
        caption,
        category: str_field(desc, "category", row),
        quality: Quality {
            composite_structure: score("compositeStructure").map(|v| v as f32),
            object_consistency: score("objectConsistency").map(|v| v as f32),
            image_quality: score("imageQuality").map(|v| v as f32),
        },
        image,
    })
}

/// Imports every kept row of `opts.parquet` into `writer`.
pub fn import(opts: &ImportOptions, writer: &mut ShardWriter) -> Result<ImportReport> {
    let mut report = ImportReport::default();
    for file in &opts.parquet {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let bytes =
            std::fs::read(file).map_err(|e| DataError::input(file.display().to_string(), e))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            bytes::Bytes::from(bytes),
        )
        .and_then(|b| b.build())
        .map_err(|e| DataError::input(file.display().to_string(), e))?;
        let mut global = 0usize;
        for batch in reader {
            let batch = batch.map_err(|e| DataError::input(file.display().to_string(), e))?;
            for row in 0..batch.num_rows() {
                let index = global + row;
                report.rows += 1;
                let at = format!("{} row {index}", file.display());
                let collection = batch
                    .column_by_name("collection")
                    .filter(|c| !c.is_null(row))
                    .and_then(|c| c.as_string_opt::<i32>().map(|s| s.value(row).to_string()));
                if collection.as_deref() != Some(opts.collection.as_str()) {
                    report.filtered_collection += 1;
                    continue;
                }
                let r = match read_row(&batch, row) {
                    Ok(r) => r,
                    Err(e) => {
                        report.skipped.push(format!("{at}: {e}"));
                        continue;
                    }
                };
                let q = r.quality;
                let scores = [q.composite_structure, q.object_consistency, q.image_quality];
                if !scores
                    .iter()
                    .all(|s| s.is_some_and(|s| s as f64 >= opts.min_quality))
                {
                    report.filtered_quality += 1;
                    continue;
                }
                match import_row(opts, &name, index, r, &at, &mut report) {
                    Ok(sample) => match writer.add(sample) {
                        Ok(()) => report.kept += 1,
                        Err(e) => report.skipped.push(format!("{at}: {}", e.message())),
                    },
                    Err(e) => report.skipped.push(format!("{at}: {e}")),
                }
            }
            global += batch.num_rows();
        }
    }
    Ok(report)
}

fn import_row(
    opts: &ImportOptions,
    file: &str,
    index: usize,
    r: Row,
    at: &str,
    report: &mut ImportReport,
) -> std::result::Result<RawSample, String> {
    let img = image::load_from_memory(&r.image).map_err(|e| format!("image: {e}"))?;
    let (w, h) = img.dimensions();
    if w < 2 * PANEL + 4 * PAD || h < PANEL + 2 * PAD {
        return Err(format!(
            "image is {w}x{h}, smaller than two 512 px panels with padding"
        ));
    }
    let target = img.crop_imm(PAD, PAD, PANEL, PANEL);
    let reference = img.crop_imm(PANEL + 2 * PAD, PAD, PANEL, PANEL);
    let target_png = png(&target);
    let uid = match &opts.uids {
        Some(map) => map
            .get(&(file.to_string(), index))
            .cloned()
            .ok_or_else(|| format!("no uid for ({file}, {index}) in --uids"))?,
        None => {
            let h8 = &sha256_hex(&target_png)[..8];
            sha256_hex(format!("{}_{}_{h8}", r.item, r.caption).as_bytes())
        }
    };
    let mask = read_mask(&opts.mask_dir.join(format!("{uid}.png")))?;
    report.with_mask += usize::from(mask.is_some());
    let dift = opts.coord_dir.join("dift").join(format!("{uid}_ref0.pt"));
    let geo = opts
        .coord_dir
        .join("geoaware")
        .join(format!("{uid}_ref0.pt"));
    let mut points = Vec::new();
    if dift.exists() && geo.exists() {
        report.with_coords += 1;
        let (a, b) = (read_coords(&dift)?, read_coords(&geo)?);
        let (tgt_size, ref_size) = opts.mapping.sizes();
        let (g, r) = (tgt_size / 16, ref_size / 16);
        let centre = |v: u32, side: usize| (v as f32 + 0.5) / side as f32;
        for (ref_token, tgt_token) in official_pairs(&a, &b, mask.as_ref(), tgt_size, ref_size) {
            let (ry, rx) = (ref_token / r as u32, ref_token % r as u32);
            let (ty, tx) = (tgt_token / g as u32, tgt_token % g as u32);
            points.push([centre(rx, r), centre(ry, r), centre(tx, g), centre(ty, g)]);
        }
        report.points += points.len();
    }
    Ok(RawSample {
        sample_id: uid,
        caption: r.caption,
        target: target_png,
        refs: vec![RawRef {
            image: png(&reference),
            mask: None,
            label: Some(r.item),
        }],
        correspondences: vec![RawCorrespondence {
            reference: 0,
            points,
        }],
        category: r.category,
        quality: Some(r.quality),
        source: Some(format!("Subjects200K {at}")),
    })
}
