//! The SemAlign-MS row (design.md §2) and its Arrow form.
//!
//! Columns: `sample_id` utf8, `caption` utf8, `target` binary (an encoded image), `refs`
//! list<struct<image binary, mask binary nullable, label utf8 nullable>> (1 to 6),
//! `correspondences` list<struct<ref uint8, points list<fixed_size_list<float32, 4>>>> with
//! points (ref_x, ref_y, tgt_x, tgt_y) normalised to [0, 1], and the optional `category` utf8,
//! `quality` struct of float32 scores and `source` utf8.
//!
//! Decoding is per row: a row that breaks the schema gives a [`SampleProblem`] naming the column,
//! and the other rows of the batch are unaffected. Nothing here panics on any input.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt8Type};
use arrow_array::{
    Array, ArrayRef, BinaryArray, FixedSizeListArray, Float32Array, ListArray, RecordBatch,
    StringArray, StructArray, UInt8Array,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};

use crate::error::SampleProblem;
use crate::tokens::Point4;

/// Most references a sample may have (the official code's limit).
pub const MAX_REFS: usize = 6;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawRef {
    /// Encoded image (PNG, JPEG or WebP).
    pub image: Vec<u8>,
    /// Optional 8-bit PNG mask of the subject (nonzero = subject).
    pub mask: Option<Vec<u8>>,
    pub label: Option<String>,
}

/// The correspondences of one reference.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawCorrespondence {
    /// Index of the reference in `refs`.
    pub reference: u8,
    /// (ref_x, ref_y, tgt_x, tgt_y), normalised.
    pub points: Vec<Point4>,
}

/// The quality scores the released Subjects200K data carries (any may be absent).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Quality {
    pub image_quality: Option<f32>,
    pub object_consistency: Option<f32>,
    pub composite_structure: Option<f32>,
}

/// One stored sample, images still encoded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawSample {
    pub sample_id: String,
    pub caption: String,
    pub target: Vec<u8>,
    pub refs: Vec<RawRef>,
    pub correspondences: Vec<RawCorrespondence>,
    pub category: Option<String>,
    pub quality: Option<Quality>,
    pub source: Option<String>,
}

const POINT_FIELDS: [&str; 4] = ["ref_x", "ref_y", "tgt_x", "tgt_y"];

impl RawSample {
    /// Checks what can be checked without decoding images: the reference count, and that every
    /// correspondence names an existing reference and lies in [0, 1].
    pub fn check(&self) -> Result<(), SampleProblem> {
        if self.sample_id.is_empty() {
            return Err(SampleProblem::Column {
                column: "sample_id".into(),
                reason: "empty".into(),
            });
        }
        if self.refs.is_empty() || self.refs.len() > MAX_REFS {
            return Err(SampleProblem::RefCount {
                count: self.refs.len(),
            });
        }
        for (index, c) in self.correspondences.iter().enumerate() {
            let reference = c.reference as usize;
            if reference >= self.refs.len() {
                return Err(SampleProblem::UnknownRef {
                    index,
                    reference,
                    refs: self.refs.len(),
                });
            }
            for (point, p) in c.points.iter().enumerate() {
                for (field, &value) in POINT_FIELDS.iter().zip(p) {
                    if !(0.0..=1.0).contains(&value) {
                        return Err(SampleProblem::PointOutOfRange {
                            reference,
                            point,
                            field,
                            value,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Every point of reference `k`, in the order stored.
    pub fn points_of(&self, k: usize) -> impl Iterator<Item = &Point4> {
        self.correspondences
            .iter()
            .filter(move |c| c.reference as usize == k)
            .flat_map(|c| c.points.iter())
    }
}

fn ref_fields() -> Fields {
    Fields::from(vec![
        Field::new("image", DataType::Binary, false),
        Field::new("mask", DataType::Binary, true),
        Field::new("label", DataType::Utf8, true),
    ])
}

fn point_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float32, false))
}

fn points_item_field() -> Arc<Field> {
    Arc::new(Field::new(
        "item",
        DataType::FixedSizeList(point_field(), 4),
        false,
    ))
}

fn corr_fields() -> Fields {
    Fields::from(vec![
        Field::new("ref", DataType::UInt8, false),
        Field::new("points", DataType::List(points_item_field()), false),
    ])
}

fn quality_fields() -> Fields {
    Fields::from(vec![
        Field::new("image_quality", DataType::Float32, true),
        Field::new("object_consistency", DataType::Float32, true),
        Field::new("composite_structure", DataType::Float32, true),
    ])
}

/// The shard schema.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("target", DataType::Binary, false),
        Field::new(
            "refs",
            DataType::List(Arc::new(Field::new(
                "item",
                DataType::Struct(ref_fields()),
                false,
            ))),
            false,
        ),
        Field::new(
            "correspondences",
            DataType::List(Arc::new(Field::new(
                "item",
                DataType::Struct(corr_fields()),
                false,
            ))),
            false,
        ),
        Field::new("category", DataType::Utf8, true),
        Field::new("quality", DataType::Struct(quality_fields()), true),
        Field::new("source", DataType::Utf8, true),
    ]))
}

fn offsets(lengths: impl Iterator<Item = usize>) -> OffsetBuffer<i32> {
    OffsetBuffer::from_lengths(lengths)
}

/// Samples as one record batch of the shard schema.
pub fn to_batch(samples: &[RawSample]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let ids = StringArray::from_iter_values(samples.iter().map(|s| s.sample_id.as_str()));
    let captions = StringArray::from_iter_values(samples.iter().map(|s| s.caption.as_str()));
    let targets = BinaryArray::from_iter_values(samples.iter().map(|s| s.target.as_slice()));

    let all_refs: Vec<&RawRef> = samples.iter().flat_map(|s| &s.refs).collect();
    let ref_struct = StructArray::try_new(
        ref_fields(),
        vec![
            Arc::new(BinaryArray::from_iter_values(
                all_refs.iter().map(|r| r.image.as_slice()),
            )) as ArrayRef,
            Arc::new(BinaryArray::from_iter(
                all_refs.iter().map(|r| r.mask.as_deref()),
            )),
            Arc::new(StringArray::from_iter(
                all_refs.iter().map(|r| r.label.as_deref()),
            )),
        ],
        None,
    )?;
    let refs = ListArray::try_new(
        Arc::new(Field::new("item", DataType::Struct(ref_fields()), false)),
        offsets(samples.iter().map(|s| s.refs.len())),
        Arc::new(ref_struct),
        None,
    )?;

    let all_corr: Vec<&RawCorrespondence> =
        samples.iter().flat_map(|s| &s.correspondences).collect();
    let coords = Float32Array::from_iter_values(
        all_corr
            .iter()
            .flat_map(|c| c.points.iter().flat_map(|p| p.iter().copied())),
    );
    let fixed = FixedSizeListArray::try_new(point_field(), 4, Arc::new(coords), None)?;
    let points = ListArray::try_new(
        points_item_field(),
        offsets(all_corr.iter().map(|c| c.points.len())),
        Arc::new(fixed),
        None,
    )?;
    let corr_struct = StructArray::try_new(
        corr_fields(),
        vec![
            Arc::new(UInt8Array::from_iter_values(
                all_corr.iter().map(|c| c.reference),
            )) as ArrayRef,
            Arc::new(points),
        ],
        None,
    )?;
    let corrs = ListArray::try_new(
        Arc::new(Field::new("item", DataType::Struct(corr_fields()), false)),
        offsets(samples.iter().map(|s| s.correspondences.len())),
        Arc::new(corr_struct),
        None,
    )?;

    let category = StringArray::from_iter(samples.iter().map(|s| s.category.as_deref()));
    let source = StringArray::from_iter(samples.iter().map(|s| s.source.as_deref()));
    let q = |f: fn(&Quality) -> Option<f32>| -> ArrayRef {
        Arc::new(Float32Array::from_iter(
            samples.iter().map(|s| s.quality.as_ref().and_then(f)),
        ))
    };
    let quality = StructArray::try_new(
        quality_fields(),
        vec![
            q(|q| q.image_quality),
            q(|q| q.object_consistency),
            q(|q| q.composite_structure),
        ],
        Some(NullBuffer::from_iter(
            samples.iter().map(|s| s.quality.is_some()),
        )),
    )?;

    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(ids),
            Arc::new(captions),
            Arc::new(targets),
            Arc::new(refs),
            Arc::new(corrs),
            Arc::new(category),
            Arc::new(quality),
            Arc::new(source),
        ],
    )
}

fn column_problem(column: &str, reason: impl Into<String>) -> SampleProblem {
    SampleProblem::Column {
        column: column.to_string(),
        reason: reason.into(),
    }
}

/// A string cell of a utf8 or large-utf8 column; None when null.
fn string_at(a: &dyn Array, row: usize, column: &str) -> Result<Option<String>, SampleProblem> {
    if a.is_null(row) {
        return Ok(None);
    }
    match a.data_type() {
        DataType::Utf8 => Ok(Some(a.as_string::<i32>().value(row).to_string())),
        DataType::LargeUtf8 => Ok(Some(a.as_string::<i64>().value(row).to_string())),
        DataType::Utf8View => Ok(Some(a.as_string_view().value(row).to_string())),
        other => Err(column_problem(
            column,
            format!("type {other}, expected utf8"),
        )),
    }
}

/// A binary cell of a binary or large-binary column; None when null.
fn binary_at(a: &dyn Array, row: usize, column: &str) -> Result<Option<Vec<u8>>, SampleProblem> {
    if a.is_null(row) {
        return Ok(None);
    }
    match a.data_type() {
        DataType::Binary => Ok(Some(a.as_binary::<i32>().value(row).to_vec())),
        DataType::LargeBinary => Ok(Some(a.as_binary::<i64>().value(row).to_vec())),
        DataType::BinaryView => Ok(Some(a.as_binary_view().value(row).to_vec())),
        other => Err(column_problem(
            column,
            format!("type {other}, expected binary"),
        )),
    }
}

fn required<T>(v: Option<T>, column: &str) -> Result<T, SampleProblem> {
    v.ok_or_else(|| column_problem(column, "null"))
}

/// The list cell at `row` as (child array, range of child rows).
fn list_at<'a>(
    a: &'a dyn Array,
    row: usize,
    column: &str,
) -> Result<(&'a ArrayRef, std::ops::Range<usize>), SampleProblem> {
    let list = a
        .as_list_opt::<i32>()
        .ok_or_else(|| column_problem(column, format!("type {}, expected list", a.data_type())))?;
    if list.is_null(row) {
        return Err(column_problem(column, "null"));
    }
    let o = list.value_offsets();
    let (start, end) = (o[row] as usize, o[row + 1] as usize);
    Ok((list.values(), start..end))
}

fn struct_child<'a>(
    s: &'a StructArray,
    name: &str,
    column: &str,
) -> Result<&'a ArrayRef, SampleProblem> {
    s.column_by_name(name)
        .ok_or_else(|| column_problem(column, format!("struct has no field `{name}`")))
}

fn as_struct<'a>(a: &'a ArrayRef, column: &str) -> Result<&'a StructArray, SampleProblem> {
    a.as_struct_opt()
        .ok_or_else(|| column_problem(column, format!("type {}, expected struct", a.data_type())))
}

fn decode_refs(col: &dyn Array, row: usize) -> Result<Vec<RawRef>, SampleProblem> {
    let (values, range) = list_at(col, row, "refs")?;
    let s = as_struct(values, "refs")?;
    let image = struct_child(s, "image", "refs")?;
    let mask = s.column_by_name("mask");
    let label = s.column_by_name("label");
    range
        .map(|i| {
            Ok(RawRef {
                image: required(binary_at(image.as_ref(), i, "refs.image")?, "refs.image")?,
                mask: match mask {
                    Some(m) => binary_at(m.as_ref(), i, "refs.mask")?,
                    None => None,
                },
                label: match label {
                    Some(l) => string_at(l.as_ref(), i, "refs.label")?,
                    None => None,
                },
            })
        })
        .collect()
}

fn decode_correspondences(
    col: &dyn Array,
    row: usize,
) -> Result<Vec<RawCorrespondence>, SampleProblem> {
    const C: &str = "correspondences";
    let (values, range) = list_at(col, row, C)?;
    let s = as_struct(values, C)?;
    let refs = struct_child(s, "ref", C)?
        .as_primitive_opt::<UInt8Type>()
        .ok_or_else(|| column_problem("correspondences.ref", "expected uint8"))?;
    let points = struct_child(s, "points", C)?;
    let mut out = Vec::with_capacity(range.len());
    for i in range {
        if refs.is_null(i) {
            return Err(column_problem("correspondences.ref", "null"));
        }
        let (fixed, prange) = list_at(points.as_ref(), i, "correspondences.points")?;
        let fixed = fixed.as_fixed_size_list_opt().ok_or_else(|| {
            column_problem(
                "correspondences.points",
                format!(
                    "type {}, expected fixed_size_list<float32, 4>",
                    fixed.data_type()
                ),
            )
        })?;
        if fixed.value_length() != 4 {
            return Err(column_problem(
                "correspondences.points",
                format!("{} values per point, expected 4", fixed.value_length()),
            ));
        }
        let coords = fixed
            .values()
            .as_primitive_opt::<Float32Type>()
            .ok_or_else(|| column_problem("correspondences.points", "expected float32"))?;
        let mut pts = Vec::with_capacity(prange.len());
        for p in prange {
            if fixed.is_null(p) {
                return Err(column_problem("correspondences.points", "null point"));
            }
            let base = p * 4;
            if base + 4 > coords.len() {
                return Err(column_problem("correspondences.points", "truncated"));
            }
            pts.push([
                coords.value(base),
                coords.value(base + 1),
                coords.value(base + 2),
                coords.value(base + 3),
            ]);
        }
        out.push(RawCorrespondence {
            reference: refs.value(i),
            points: pts,
        });
    }
    Ok(out)
}

fn decode_quality(col: &dyn Array, row: usize) -> Result<Option<Quality>, SampleProblem> {
    if col.is_null(row) {
        return Ok(None);
    }
    let Some(s) = col.as_struct_opt() else {
        return Err(column_problem("quality", "expected a struct of float32"));
    };
    let score = |name: &str| -> Option<f32> {
        let c = s.column_by_name(name)?;
        let c = c.as_primitive_opt::<Float32Type>()?;
        (!c.is_null(row)).then(|| c.value(row))
    };
    Ok(Some(Quality {
        image_quality: score("image_quality"),
        object_consistency: score("object_consistency"),
        composite_structure: score("composite_structure"),
    }))
}

/// The sample id of each row, where it can be read (for naming rows whose decoding fails).
pub fn sample_ids(batch: &RecordBatch) -> Vec<Option<String>> {
    let col = batch.column_by_name("sample_id");
    (0..batch.num_rows())
        .map(|row| col.and_then(|c| string_at(c.as_ref(), row, "sample_id").ok().flatten()))
        .collect()
}

/// Decodes row `row` of a batch (images stay encoded); validity is checked by
/// [`RawSample::check`], not here.
pub fn decode_row(batch: &RecordBatch, row: usize) -> Result<RawSample, SampleProblem> {
    if row >= batch.num_rows() {
        return Err(column_problem(
            "sample_id",
            format!("row {row} of a batch of {}", batch.num_rows()),
        ));
    }
    let col = |name: &str| -> Result<&ArrayRef, SampleProblem> {
        batch
            .column_by_name(name)
            .ok_or_else(|| column_problem(name, "missing"))
    };
    let optional = |name: &str| -> Result<Option<String>, SampleProblem> {
        match batch.column_by_name(name) {
            Some(c) => string_at(c.as_ref(), row, name),
            None => Ok(None),
        }
    };
    Ok(RawSample {
        sample_id: required(
            string_at(col("sample_id")?.as_ref(), row, "sample_id")?,
            "sample_id",
        )?,
        caption: required(
            string_at(col("caption")?.as_ref(), row, "caption")?,
            "caption",
        )?,
        target: required(binary_at(col("target")?.as_ref(), row, "target")?, "target")?,
        refs: decode_refs(col("refs")?.as_ref(), row)?,
        correspondences: decode_correspondences(col("correspondences")?.as_ref(), row)?,
        category: optional("category")?,
        quality: match batch.column_by_name("quality") {
            Some(c) => decode_quality(c.as_ref(), row)?,
            None => None,
        },
        source: optional("source")?,
    })
}

/// The number of references of each row, read from the list offsets alone (no image bytes).
pub fn ref_counts(batch: &RecordBatch) -> Vec<Option<usize>> {
    let Some(list) = batch
        .column_by_name("refs")
        .and_then(|c| c.as_list_opt::<i32>())
    else {
        return vec![None; batch.num_rows()];
    };
    (0..batch.num_rows())
        .map(|row| (!list.is_null(row)).then(|| list.value_length(row) as usize))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(id: &str, refs: usize) -> RawSample {
        RawSample {
            sample_id: id.to_string(),
            caption: format!("caption of {id}"),
            target: vec![1, 2, 3],
            refs: (0..refs)
                .map(|k| RawRef {
                    image: vec![k as u8; 4],
                    mask: (k % 2 == 0).then(|| vec![9, 9]),
                    label: (k == 0).then(|| "dog".to_string()),
                })
                .collect(),
            correspondences: (0..refs)
                .map(|k| RawCorrespondence {
                    reference: k as u8,
                    points: vec![[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1.0]],
                })
                .collect(),
            category: Some("animals".into()),
            quality: (refs == 2).then_some(Quality {
                image_quality: Some(5.0),
                object_consistency: None,
                composite_structure: Some(4.0),
            }),
            source: None,
        }
    }

    #[test]
    fn rows_round_trip_through_arrow() {
        let samples: Vec<_> = (1..=6).map(|k| sample(&format!("s{k}"), k)).collect();
        let batch = to_batch(&samples).unwrap();
        assert_eq!(batch.schema(), schema());
        for (row, s) in samples.iter().enumerate() {
            assert_eq!(&decode_row(&batch, row).unwrap(), s);
        }
        assert_eq!(ref_counts(&batch), (1..=6).map(Some).collect::<Vec<_>>());
    }

    #[test]
    fn check_names_each_problem() {
        let mut s = sample("a", 2);
        assert_eq!(s.check(), Ok(()));
        s.correspondences[1].points[1][2] = 1.5;
        assert_eq!(
            s.check(),
            Err(SampleProblem::PointOutOfRange {
                reference: 1,
                point: 1,
                field: "tgt_x",
                value: 1.5
            })
        );
        let mut s = sample("a", 2);
        s.correspondences[0].reference = 2;
        assert!(matches!(
            s.check(),
            Err(SampleProblem::UnknownRef { reference: 2, .. })
        ));
        assert_eq!(
            sample("a", 0).check(),
            Err(SampleProblem::RefCount { count: 0 })
        );
        let mut s = sample("a", 6);
        s.refs.push(RawRef::default());
        assert_eq!(s.check(), Err(SampleProblem::RefCount { count: 7 }));
        let mut s = sample("a", 1);
        s.correspondences[0].points[0][0] = f32::NAN;
        assert!(s.check().unwrap_err().to_string().contains("ref_x"));
    }

    #[test]
    fn a_missing_column_is_named() {
        let batch = to_batch(&[sample("a", 1)]).unwrap();
        let batch = batch.project(&[0, 1, 3, 4]).unwrap();
        let err = decode_row(&batch, 0).unwrap_err();
        assert_eq!(err, column_problem("target", "missing"));
        assert_eq!(sample_ids(&batch), vec![Some("a".to_string())]);
    }
}
