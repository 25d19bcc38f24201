//! `trainer eval`: DreamBench's metrics of rendered samples against their case list.
//!
//! - CLIP-I: the cosine of the CLIP image embeddings of a sample and of each of its case's
//!   references (the images as given, not as prepared for the model), averaged over the
//!   references;
//! - CLIP-T: the cosine of the sample's CLIP image embedding and its prompt's text embedding;
//! - DINO: the cosine of the DINO ViT CLS features of the sample and of each reference,
//!   averaged over the references.
//!
//! A case's score is the mean over its samples (`<index>.png` from `trainer sample --cases`,
//! or `<index>-seed<S>.png` from validation), and the overall score the mean over cases (cases
//! without references count for CLIP-T only), as the paper reports DreamBench (its table shows
//! them x 100).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Serialize;

use crate::error::{Result, TrainerError};
use crate::sample::{read_cases, Case};
use flux::eval::{cosine, ClipFiles, ClipScorer, DinoFiles, DinoScorer};

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub samples: PathBuf,
    pub cases: PathBuf,
    /// A CLIPModel checkpoint folder (path or URL).
    pub clip: Option<String>,
    /// A DINO checkpoint folder, DINOv2 or DINO ViT (path or URL).
    pub dino: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseScores {
    pub index: serde_json::Value,
    pub prompt: String,
    pub samples: Vec<String>,
    pub references: usize,
    pub clip_i: Option<f64>,
    pub clip_t: Option<f64>,
    pub dino: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub clip_i: Option<f64>,
    pub clip_t: Option<f64>,
    pub dino: Option<f64>,
    pub cases: Vec<CaseScores>,
    pub clip_model: Option<String>,
    pub dino_model: Option<String>,
    pub averaging: &'static str,
}

/// The samples of `case` in `dir`: `<stem>.png` and `<stem>-seed<S>.png`, sorted.
fn samples_of(case: &Case, names: &[String], dir: &Path) -> Result<Vec<PathBuf>> {
    let stem = case.stem();
    let seeded = format!("{stem}-seed");
    let mut found: Vec<PathBuf> = names
        .iter()
        .filter(|n| {
            n.strip_suffix(".png").is_some_and(|s| {
                s == stem
                    || s.strip_prefix(&seeded)
                        .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .map(|n| dir.join(n))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(TrainerError::Input {
            name: dir.display().to_string(),
            reason: format!("no sample of case {stem} ({stem}.png or {stem}-seed<S>.png)"),
        });
    }
    Ok(found)
}

fn open(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path)
        .map_err(|e| TrainerError::Input {
            name: path.display().to_string(),
            reason: e.to_string(),
        })?
        .to_rgb8())
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Mean cosine of `sample` with each of `refs`.
fn mean_cosine(sample: &Tensor, refs: &[Tensor]) -> Result<Option<f64>> {
    let v = refs
        .iter()
        .map(|r| cosine(sample, r))
        .collect::<flux::encoders::Result<Vec<_>>>()?;
    Ok(mean(&v))
}

/// The models given.
struct Judges {
    clip: Option<ClipScorer>,
    dino: Option<DinoScorer>,
}

impl Judges {
    fn load(opts: &EvalOptions, device: &Device) -> Result<Self> {
        let cache = datasets::model_files::cache_root();
        let folder = |url: &str| datasets::model_files::ModelFolder::open(url, &cache);
        Ok(Self {
            clip: match &opts.clip {
                Some(u) => Some(ClipScorer::load(
                    &ClipFiles::from_folder(&folder(u)?)?,
                    device,
                )?),
                None => None,
            },
            dino: match &opts.dino {
                Some(u) => Some(DinoScorer::load(
                    &DinoFiles::from_folder(&folder(u)?)?,
                    device,
                )?),
                None => None,
            },
        })
    }

    /// The scores of case `c` from its `samples`.
    fn score(&self, c: &Case, samples: &[PathBuf]) -> Result<CaseScores> {
        let refs: Vec<RgbImage> = c.refs().iter().map(|p| open(p)).collect::<Result<_>>()?;
        let embed_refs = |f: &dyn Fn(&RgbImage) -> flux::encoders::Result<Tensor>| {
            refs.iter()
                .map(f)
                .collect::<flux::encoders::Result<Vec<_>>>()
        };
        let clip_refs = match &self.clip {
            Some(m) => embed_refs(&|r| m.image(r))?,
            None => Vec::new(),
        };
        let dino_refs = match &self.dino {
            Some(m) => embed_refs(&|r| m.image(r))?,
            None => Vec::new(),
        };
        let text = self.clip.as_ref().map(|m| m.text(&c.prompt)).transpose()?;
        let (mut ci, mut ct, mut di) = (Vec::new(), Vec::new(), Vec::new());
        for s in samples {
            let img = open(s)?;
            if let (Some(m), Some(t)) = (&self.clip, &text) {
                let e = m.image(&img)?;
                ci.extend(mean_cosine(&e, &clip_refs)?);
                ct.push(cosine(&e, t)?);
            }
            if let Some(m) = &self.dino {
                di.extend(mean_cosine(&m.image(&img)?, &dino_refs)?);
            }
        }
        Ok(CaseScores {
            index: c.index.clone(),
            prompt: c.prompt.clone(),
            samples: samples.iter().map(|p| p.display().to_string()).collect(),
            references: refs.len(),
            clip_i: mean(&ci),
            clip_t: mean(&ct),
            dino: mean(&di),
        })
    }
}

/// Every case's samples, and every reference checked, before any model loads.
fn find_samples(opts: &EvalOptions, cases: &[Case]) -> Result<Vec<Vec<PathBuf>>> {
    let names: Vec<String> = std::fs::read_dir(&opts.samples)
        .map_err(|e| TrainerError::io(&opts.samples, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    cases
        .iter()
        .map(|c| {
            if let Some(r) = c.refs().into_iter().find(|r| !r.is_file()) {
                return Err(TrainerError::Input {
                    name: opts.cases.display().to_string(),
                    reason: format!(
                        "case {}: reference {} does not exist",
                        c.stem(),
                        r.display()
                    ),
                });
            }
            samples_of(c, &names, &opts.samples)
        })
        .collect()
}

/// Scores every case of `opts.cases` with the models given (at least one).
pub fn evaluate(opts: &EvalOptions, device: &Device) -> Result<EvalReport> {
    if opts.clip.is_none() && opts.dino.is_none() {
        return Err(TrainerError::Input {
            name: "--clip / --dino".into(),
            reason: "give at least one model".into(),
        });
    }
    let cases = read_cases(&opts.cases.display().to_string())?;
    let samples = find_samples(opts, &cases)?;
    let judges = Judges::load(opts, device)?;
    let scored = cases
        .iter()
        .zip(&samples)
        .map(|(c, s)| judges.score(c, s))
        .collect::<Result<Vec<_>>>()?;
    let overall =
        |f: fn(&CaseScores) -> Option<f64>| mean(&scored.iter().filter_map(f).collect::<Vec<_>>());
    Ok(EvalReport {
        clip_i: overall(|c| c.clip_i),
        clip_t: overall(|c| c.clip_t),
        dino: overall(|c| c.dino),
        cases: scored,
        clip_model: opts.clip.clone(),
        dino_model: opts.dino.clone(),
        averaging: "per case: the mean over its samples of the mean over its references; overall: the mean over cases",
    })
}

/// The markdown table: one row per case and the overall row, scores x 100 as the paper.
pub fn table(r: &EvalReport) -> String {
    let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{:.2}", 100.0 * x));
    let mut out = String::from(
        "| case | samples | refs | CLIP-I | CLIP-T | DINO |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for c in &r.cases {
        let index = match &c.index {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        out.push_str(&format!(
            "| {index} | {} | {} | {} | {} | {} |\n",
            c.samples.len(),
            c.references,
            f(c.clip_i),
            f(c.clip_t),
            f(c.dino)
        ));
    }
    out.push_str(&format!(
        "| **all ({} cases)** | | | **{}** | **{}** | **{}** |\n",
        r.cases.len(),
        f(r.clip_i),
        f(r.clip_t),
        f(r.dino)
    ));
    out
}

/// Writes the report as JSON to `out`.
pub fn write(r: &EvalReport, out: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(r).map_err(|e| TrainerError::Serialize {
        what: "the metrics",
        source: Box::new(e),
    })?;
    std::fs::write(out, text).map_err(|e| TrainerError::io(out, e))
}
