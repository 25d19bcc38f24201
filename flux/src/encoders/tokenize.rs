//! Caption tokenizers: the byte-level one of the tiny random encoders, and Hugging Face
//! tokenizers loaded from `tokenizer.json` or, for CLIP, from the `vocab.json` + `merges.txt`
//! pair that FLUX.1-dev's `tokenizer/` folder ships (built as transformers' CLIP converter
//! does). Both pad and truncate to a fixed length, as FluxPipeline calls them
//! (`padding="max_length"`, `truncation=True`).

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, NormalizerWrapper, PaddingDirection, PaddingParams, PaddingStrategy,
    PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use super::{EncodeError, Result};

/// transformers' CLIP pre-tokenization pattern (CLIPConverter).
const CLIP_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub(crate) enum TextTokenizer {
    /// Byte b -> b + offset, `eos` appended, padded with 0 (ByT5-like; tiny encoders).
    Bytes { offset: u32, eos: u32 },
    /// A Hugging Face tokenizer set to pad and truncate to `len`.
    Hf {
        tokenizer: Box<Tokenizer>,
        len: usize,
    },
}

/// Special tokens named in `tokenizer_config.json` / `special_tokens_map.json` (a string or an
/// object with `content`).
#[derive(Debug, Default, Clone)]
pub(crate) struct SpecialTokens {
    pub pad: Option<String>,
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
}

impl SpecialTokens {
    /// Reads the special tokens from the JSON texts given (later ones fill what earlier ones
    /// leave out).
    pub fn from_json(texts: &[(String, String)]) -> Result<Self> {
        let mut out = Self::default();
        for (at, text) in texts {
            let v: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| EncodeError::file(at, format!("not JSON: {e}")))?;
            let get = |k: &str| -> Option<String> {
                match v.get(k)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    o => o.get("content")?.as_str().map(str::to_string),
                }
            };
            out.pad = out.pad.or_else(|| get("pad_token"));
            out.bos = out.bos.or_else(|| get("bos_token"));
            out.eos = out.eos.or_else(|| get("eos_token"));
            out.unk = out.unk.or_else(|| get("unk_token"));
        }
        Ok(out)
    }
}

fn fixed_length(
    mut tokenizer: Tokenizer,
    len: usize,
    pad: &str,
    at: &str,
) -> Result<TextTokenizer> {
    let pad_id = tokenizer.token_to_id(pad).ok_or_else(|| {
        EncodeError::file(
            at,
            format!("the pad token `{pad}` is not in the vocabulary"),
        )
    })?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| EncodeError::file(at, e))?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(len),
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token: pad.to_string(),
    }));
    Ok(TextTokenizer::Hf {
        tokenizer: Box::new(tokenizer),
        len,
    })
}

impl TextTokenizer {
    /// A `tokenizer.json`, padded with `pad` to `len` tokens.
    pub fn from_json(path: &Path, len: usize, pad: &str) -> Result<Self> {
        let at = path.display().to_string();
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| EncodeError::file(&at, format!("not a tokenizer.json: {e}")))?;
        fixed_length(tokenizer, len, pad, &at)
    }

    /// CLIP's BPE from `vocab.json` and `merges.txt`, as transformers converts it: NFC,
    /// whitespace runs to one space, lowercase; CLIP's split, then byte-level; words end in
    /// `</w>`; `bos ... eos` around every caption.
    pub fn clip_from_vocab(
        vocab: &Path,
        merges: &Path,
        len: usize,
        special: &SpecialTokens,
    ) -> Result<Self> {
        let at = vocab.display().to_string();
        let bos = special.bos.as_deref().unwrap_or("<|startoftext|>");
        let eos = special.eos.as_deref().unwrap_or("<|endoftext|>");
        let unk = special.unk.as_deref().unwrap_or(eos);
        let pad = special.pad.as_deref().unwrap_or(eos);
        let (Some(v), Some(m)) = (vocab.to_str(), merges.to_str()) else {
            return Err(EncodeError::file(&at, "the path is not UTF-8"));
        };
        let model = BPE::from_file(v, m)
            .end_of_word_suffix("</w>".into())
            .continuing_subword_prefix(String::new())
            .unk_token(unk.into())
            .fuse_unk(false)
            .build()
            .map_err(|e| {
                EncodeError::file(
                    format!("{at} + {}", merges.display()),
                    format!("not a BPE vocabulary and merges pair: {e}"),
                )
            })?;
        let mut tokenizer = Tokenizer::new(model);
        let bad = |e: tokenizers::Error| EncodeError::Spec(format!("CLIP tokenizer: {e}"));
        let normalizer = tokenizers::normalizers::Sequence::new(vec![
            NormalizerWrapper::from(NFC),
            NormalizerWrapper::from(
                Replace::new(
                    tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                    " ",
                )
                .map_err(bad)?,
            ),
            NormalizerWrapper::from(Lowercase),
        ]);
        tokenizer.with_normalizer(Some(normalizer)).map_err(bad)?;
        let pre = PreSequence::new(vec![
            PreTokenizerWrapper::from(
                Split::new(
                    SplitPattern::Regex(CLIP_SPLIT.into()),
                    SplitDelimiterBehavior::Removed,
                    true,
                )
                .map_err(bad)?,
            ),
            PreTokenizerWrapper::from(ByteLevel::new(false, true, true)),
        ]);
        tokenizer.with_pre_tokenizer(Some(pre));
        let id = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                EncodeError::file(
                    &at,
                    format!("the special token `{t}` is not in the vocabulary"),
                )
            })
        };
        let (bos_id, eos_id) = (id(bos)?, id(eos)?);
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos.into(), eos_id), (bos.into(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        tokenizer
            .add_special_tokens([
                AddedToken::from(bos.to_string(), true),
                AddedToken::from(eos.to_string(), true),
            ])
            .map_err(bad)?;
        fixed_length(tokenizer, len, pad, &at)
    }

    /// Ids [captions.len() * len], each caption padded or truncated to `len`.
    pub fn ids(&self, captions: &[&str], len: usize) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(captions.len() * len);
        match self {
            Self::Bytes { offset, eos } => {
                for c in captions {
                    let mut row: Vec<u32> =
                        c.bytes().map(|b| b as u32 + offset).take(len - 1).collect();
                    row.push(*eos);
                    row.resize(len, 0);
                    ids.extend(row);
                }
            }
            Self::Hf {
                tokenizer,
                len: fixed,
            } => {
                if *fixed != len {
                    return Err(EncodeError::Spec(format!(
                        "tokenizer set to {fixed} tokens, asked for {len}"
                    )));
                }
                let encodings = tokenizer
                    .encode_batch(captions.to_vec(), true)
                    .map_err(|e| EncodeError::Spec(format!("tokenizing captions: {e}")))?;
                for (e, c) in encodings.iter().zip(captions) {
                    if e.get_ids().len() != len {
                        return Err(EncodeError::Spec(format!(
                            "caption {c:?} gave {} tokens, not {len}",
                            e.get_ids().len()
                        )));
                    }
                    ids.extend_from_slice(e.get_ids());
                }
            }
        }
        Ok(ids)
    }
}
