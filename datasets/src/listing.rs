//! `datasets write`: samples from the user's own files, listed in a JSONL file (one sample per
//! line) or as a folder with one sub-folder per sample holding `sample.json`. Each entry is
//!
//! ```json
//! {"sample_id": "dog-and-cat-001", "caption": "a dog and a cat on a sofa",
//!  "target": "images/001.jpg",
//!  "refs": [{"image": "refs/dog.png", "mask": "refs/dog.mask.png", "label": "dog"},
//!           {"image": "refs/cat.webp"}],
//!  "correspondences": [{"ref": 0, "points": [[0.41, 0.33, 0.22, 0.57]]}],
//!  "category": "animals"}
//! ```
//!
//! with paths relative to the listing (or the sample's folder) and points (ref_x, ref_y, tgt_x,
//! tgt_y) normalised to [0, 1]. Every problem names the file, the line and the field.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{DataError, Result};
use crate::schema::{RawCorrespondence, RawRef, RawSample};
use crate::tokens::Point4;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryRef {
    image: PathBuf,
    #[serde(default)]
    mask: Option<PathBuf>,
    #[serde(default)]
    label: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryCorrespondence {
    #[serde(rename = "ref")]
    reference: u8,
    points: Vec<Point4>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    sample_id: String,
    caption: String,
    target: PathBuf,
    refs: Vec<EntryRef>,
    #[serde(default)]
    correspondences: Vec<EntryCorrespondence>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

/// One listed sample, or the problem with its entry (named by file and line).
pub type Listed = std::result::Result<RawSample, DataError>;

fn read_file(base: &Path, rel: &Path, at: &str, field: &str) -> Result<Vec<u8>> {
    let path = base.join(rel);
    std::fs::read(&path)
        .map_err(|e| DataError::input(at, format!("{field} {}: {e}", path.display())))
}

fn check_image(bytes: &[u8], at: &str, field: &str) -> Result<()> {
    image::load_from_memory(bytes)
        .map(|_| ())
        .map_err(|e| DataError::input(at, format!("{field}: cannot decode image: {e}")))
}

fn load_entry(line: &str, base: &Path, at: &str) -> Listed {
    let e: Entry = serde_json::from_str(line).map_err(|e| DataError::input(at, e))?;
    let target = read_file(base, &e.target, at, "target")?;
    check_image(&target, at, "target")?;
    let mut refs = Vec::with_capacity(e.refs.len());
    for (k, r) in e.refs.iter().enumerate() {
        let image = read_file(base, &r.image, at, &format!("refs[{k}].image"))?;
        check_image(&image, at, &format!("refs[{k}].image"))?;
        let mask = match &r.mask {
            Some(m) => {
                let bytes = read_file(base, m, at, &format!("refs[{k}].mask"))?;
                check_image(&bytes, at, &format!("refs[{k}].mask"))?;
                Some(bytes)
            }
            None => None,
        };
        refs.push(RawRef {
            image,
            mask,
            label: r.label.clone(),
        });
    }
    let sample = RawSample {
        sample_id: e.sample_id,
        caption: e.caption,
        target,
        refs,
        correspondences: e
            .correspondences
            .into_iter()
            .map(|c| RawCorrespondence {
                reference: c.reference,
                points: c.points,
            })
            .collect(),
        category: e.category,
        quality: None,
        source: e.source,
    };
    sample.check().map_err(|problem| DataError::Sample {
        sample_id: sample.sample_id.clone(),
        at: at.to_string(),
        problem,
    })?;
    Ok(sample)
}

/// Reads the samples listed at `path` (a JSONL file, or a folder of sample folders), calling
/// `each` with every entry in order. Blank lines are ignored.
pub fn read_listing(path: &Path, mut each: impl FnMut(Listed) -> Result<()>) -> Result<()> {
    let meta =
        std::fs::metadata(path).map_err(|e| DataError::input(path.display().to_string(), e))?;
    if meta.is_dir() {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| DataError::input(path.display().to_string(), e))?
            .filter_map(|d| d.ok().map(|d| d.path()))
            .filter(|p| p.join("sample.json").is_file())
            .collect();
        dirs.sort();
        if dirs.is_empty() {
            return Err(DataError::input(
                path.display().to_string(),
                "no sub-folder holds a sample.json",
            ));
        }
        for dir in dirs {
            let file = dir.join("sample.json");
            let at = file.display().to_string();
            let text = std::fs::read_to_string(&file).map_err(|e| DataError::input(&at, e))?;
            each(load_entry(&text, &dir, &at))?;
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::input(path.display().to_string(), e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{} line {}", path.display(), i + 1);
        each(load_entry(line, base, &at))?;
    }
    Ok(())
}
