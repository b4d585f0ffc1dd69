//! The tokenizer, built from a GGUF file's `tokenizer.ggml.*` metadata and
//! giving the same ids as llama.cpp's `llama_tokenize`: GPT-2 style
//! byte-level BPE (`tokenizer.ggml.model = "gpt2"`, `llm_tokenizer_bpe`) for
//! the supported pre-tokenizers, and SentencePiece (`"llama"`,
//! `llm_tokenizer_spm`, see `spm.rs`). The model type is chosen by
//! `tokenizer.ggml.model` ([`TokenizerModel`]); both share the interface.
//!
//! BPE encoding, in llama.cpp's order:
//! 1. **Special-token partition** (`tokenizer_st_partition`): the
//!    special tokens (types control, user-defined and unknown), longest text
//!    first, each cut out of the remaining raw text wherever it occurs. With
//!    `parse_special == false` control and unknown tokens are skipped
//!    (user-defined ones are still cut out, as in llama.cpp).
//! 2. **Pre-tokenization** of every raw fragment (`pretokenize.rs`).
//! 3. **Byte-level mapping** of each piece (`byte_level.rs`) and **BPE
//!    merges** within it (`bpe.rs`); each merged symbol is looked up by
//!    string.
//!
//! SPM encoding: the same special-token partition; then every raw fragment
//! gets a leading space when it starts the text or follows a special token
//! and the vocabulary asks for it (`tokenizer.ggml.add_space_prefix`,
//! default true), its spaces become "▁", and `spm.rs` merges it by score,
//! with `<0xNN>` byte tokens for characters not in the vocabulary.
//!
//! Decoding maps every id to bytes once, at construction
//! ([`Tokenizer::token_bytes`]): normal tokens are byte-level decoded,
//! control/user-defined/unknown tokens are their text, `<0xNN>` byte tokens
//! are that byte, and unused/undefined tokens are empty; SPM normal tokens
//! have "▁" turned back into spaces. [`Tokenizer::decode`] then drops one
//! leading space of the first piece when the tokenizer adds a space prefix,
//! as llama.cpp's `detokenize`, so that SPM text round-trips.
//!
//! Invariants: a `Tokenizer` is immutable after construction; nothing is
//! cached between calls; malformed metadata gives an
//! [`EngineError::Tokenizer`] or [`EngineError::Gguf`] naming the key, never a
//! panic.

mod bpe;
pub mod byte_level;
mod pretokenize;
mod spm;
mod stream;
mod unicode;
mod unicode_data;

use std::collections::HashMap;
use std::fmt;

pub use pretokenize::PreTokenizer;
pub use stream::StreamDecoder;

use crate::gguf::{GgufFile, Value};
use crate::{EngineError, Result};
use pretokenize::PreConfig;

/// The GGUF metadata keys the tokenizer reads.
pub mod keys {
    /// Tokenizer model type (`"gpt2"` or `"llama"`, see [`super::TokenizerModel`]).
    pub const MODEL: &str = "tokenizer.ggml.model";
    /// SPM token scores (f32 per token; merges prefer higher scores).
    pub const SCORES: &str = "tokenizer.ggml.scores";
    /// Whether SPM prepends a space to the text (default true).
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    /// Pre-tokenizer type (e.g. `"smollm"`).
    pub const PRE: &str = "tokenizer.ggml.pre";
    /// Vocabulary strings.
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    /// Token types (see [`super::TokenType`]).
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    /// BPE merges, `"left right"`, rank = index.
    pub const MERGES: &str = "tokenizer.ggml.merges";
    /// Beginning-of-sequence id.
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    /// End-of-sequence id.
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    /// End-of-turn id.
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    /// End-of-message id.
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    /// Unknown-token id.
    pub const UNKNOWN_ID: &str = "tokenizer.ggml.unknown_token_id";
    /// Padding id.
    pub const PADDING_ID: &str = "tokenizer.ggml.padding_token_id";
    /// Whether to prepend BOS when adding special tokens.
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    /// Whether to append EOS when adding special tokens.
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
}

/// A token's type, as stored in `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 1: ordinary text token.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: control token (`<|im_start|>`, `<|endoftext|>`, ...).
    Control,
    /// 4: user-defined token (always matched as a whole in text).
    UserDefined,
    /// 5: unused slot.
    Unused,
    /// 6: byte token (`<0xNN>`).
    Byte,
    /// 0 or any other value.
    Undefined,
}

impl TokenType {
    /// The type for a GGUF `token_type` value.
    pub fn from_gguf(v: i64) -> TokenType {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    /// llama.cpp's attribute bits for this type.
    fn attr(self) -> u8 {
        match self {
            TokenType::Normal => ATTR_NORMAL,
            TokenType::Unknown => ATTR_UNKNOWN,
            TokenType::Control => ATTR_CONTROL,
            TokenType::UserDefined => ATTR_USER_DEFINED,
            TokenType::Unused => ATTR_UNUSED,
            TokenType::Byte => ATTR_BYTE,
            TokenType::Undefined => 0,
        }
    }
}

// llama.cpp's `llama_token_attr` bits (the subset used here).
const ATTR_UNKNOWN: u8 = 1 << 0;
const ATTR_UNUSED: u8 = 1 << 1;
const ATTR_NORMAL: u8 = 1 << 2;
const ATTR_CONTROL: u8 = 1 << 3;
const ATTR_USER_DEFINED: u8 = 1 << 4;
const ATTR_BYTE: u8 = 1 << 5;

/// Token texts llama.cpp takes as end-of-turn when no
/// `tokenizer.ggml.eot_token_id` is given (`llama_vocab::impl::load`).
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Token texts llama.cpp puts in the end-of-generation set.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "</s>",
];

/// The tokenizer algorithm, from `tokenizer.ggml.model`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenizerModel {
    /// `"gpt2"`: byte-level BPE with merges and a pre-tokenizer.
    #[default]
    Bpe,
    /// `"llama"`: SentencePiece, merges by token score, byte fallback.
    Spm,
}

impl TokenizerModel {
    /// The model for a `tokenizer.ggml.model` value, if supported.
    pub fn from_gguf_name(name: &str) -> Option<TokenizerModel> {
        match name {
            "gpt2" => Some(TokenizerModel::Bpe),
            "llama" => Some(TokenizerModel::Spm),
            _ => None,
        }
    }

    /// The `tokenizer.ggml.model` value.
    pub fn gguf_name(self) -> &'static str {
        match self {
            TokenizerModel::Bpe => "gpt2",
            TokenizerModel::Spm => "llama",
        }
    }
}

/// The plain parts a [`Tokenizer`] is built from (what the GGUF metadata
/// holds), for [`Tokenizer::new`].
#[derive(Clone, Debug, Default)]
pub struct TokenizerParts {
    /// The algorithm.
    pub model: TokenizerModel,
    /// Vocabulary strings (byte-level form for BPE, "▁" for spaces in
    /// SPM); the index is the id.
    pub tokens: Vec<String>,
    /// SPM scores, one per token; empty means all 0 (unused by BPE).
    pub scores: Vec<f32>,
    /// One type per token; empty means all [`TokenType::Normal`].
    pub token_types: Vec<TokenType>,
    /// Merges, `"left right"`; the index is the rank (BPE only).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`; `None` means llama.cpp's `"default"` (with a
    /// warning on stderr for BPE; SPM has no pre-tokenizer and ignores it).
    pub pre: Option<String>,
    /// Beginning-of-sequence id.
    pub bos_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_id: Option<u32>,
    /// End-of-turn id; `None` looks for a known end-of-turn text.
    pub eot_id: Option<u32>,
    /// End-of-message id; `None` looks for `<|eom_id|>`.
    pub eom_id: Option<u32>,
    /// Unknown-token id.
    pub unknown_id: Option<u32>,
    /// Padding id.
    pub padding_id: Option<u32>,
    /// Prepend BOS when adding special tokens; `None` means the default:
    /// true for SPM, the pre-tokenizer's for BPE (true only for the Llama-3
    /// family).
    pub add_bos: Option<bool>,
    /// Append EOS when adding special tokens.
    pub add_eos: bool,
    /// SPM: prepend a space to text that starts the input or follows a
    /// special token; `None` means true. Ignored by BPE.
    pub add_space_prefix: Option<bool>,
}

impl TokenizerParts {
    /// Reads the parts from a GGUF file's `tokenizer.ggml.*` metadata
    /// (checked further by [`Tokenizer::new`]).
    ///
    /// `tokenizer.ggml.model` must be `"gpt2"` (byte-level BPE) or
    /// `"llama"` (SentencePiece). For SPM, absent BOS/EOS/unknown ids
    /// default to 1/2/0, as in llama.cpp.
    pub fn from_gguf(gguf: &GgufFile) -> Result<TokenizerParts> {
        let name = gguf.get_str(keys::MODEL)?;
        let model = TokenizerModel::from_gguf_name(name).ok_or_else(|| {
            err(format!(
                "metadata key `{}`: tokenizer model {name:?} is not supported \
                 (supported: \"gpt2\", byte-level BPE; \"llama\", SentencePiece)",
                keys::MODEL
            ))
        })?;
        let spm = model == TokenizerModel::Spm;

        let strings = |key: &str, arr: &[Value]| -> Result<Vec<String>> {
            arr.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        err(format!(
                            "metadata key `{key}`: element {i} is a {}, expected a string",
                            v.type_name()
                        ))
                    })
                })
                .collect()
        };
        let tokens = strings(keys::TOKENS, gguf.get_array(keys::TOKENS)?)?;
        let merges = if spm {
            Vec::new()
        } else {
            strings(keys::MERGES, gguf.get_array(keys::MERGES)?)?
        };
        let scores = match (spm, gguf.get(keys::SCORES)) {
            (false, _) | (true, None) => Vec::new(),
            (true, Some(v)) => {
                let arr = v.as_array().ok_or_else(|| {
                    err(format!(
                        "metadata key `{}`: expected an array, found {}",
                        keys::SCORES,
                        v.type_name()
                    ))
                })?;
                arr.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_f64().map(|x| x as f32).ok_or_else(|| {
                            err(format!(
                                "metadata key `{}`: element {i} is a {}, expected a number",
                                keys::SCORES,
                                v.type_name()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        // llama.cpp's SPM defaults for ids the file does not set.
        let id_or = |key: &str, default: u32| -> Result<Option<u32>> {
            match (spm, gguf.get(key)) {
                (true, None) => Ok(Some(default)),
                _ => opt_id(gguf, key),
            }
        };

        let token_types = match gguf.get(keys::TOKEN_TYPE) {
            None => Vec::new(),
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| {
                    err(format!(
                        "metadata key `{}`: expected an array, found {}",
                        keys::TOKEN_TYPE,
                        v.type_name()
                    ))
                })?;
                arr.iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_i64().map(TokenType::from_gguf).ok_or_else(|| {
                            err(format!(
                                "metadata key `{}`: element {i} is a {}, expected an integer",
                                keys::TOKEN_TYPE,
                                v.type_name()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };

        let pre = match gguf.get(keys::PRE) {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| {
                        err(format!(
                            "metadata key `{}`: expected a string, found {}",
                            keys::PRE,
                            v.type_name()
                        ))
                    })?
                    .to_owned(),
            ),
        };

        Ok(TokenizerParts {
            model,
            tokens,
            scores,
            token_types,
            merges,
            pre,
            bos_id: id_or(keys::BOS_ID, 1)?,
            eos_id: id_or(keys::EOS_ID, 2)?,
            eot_id: opt_id(gguf, keys::EOT_ID)?,
            eom_id: opt_id(gguf, keys::EOM_ID)?,
            unknown_id: id_or(keys::UNKNOWN_ID, 0)?,
            padding_id: opt_id(gguf, keys::PADDING_ID)?,
            add_bos: gguf.get_bool_opt(keys::ADD_BOS)?,
            add_eos: gguf.get_bool_opt(keys::ADD_EOS)?.unwrap_or(false),
            add_space_prefix: if spm {
                gguf.get_bool_opt(keys::ADD_SPACE_PREFIX)?
            } else {
                None
            },
        })
    }
}

/// One piece of the special-token partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment {
    /// Raw text: a byte range of the input.
    Text(usize, usize),
    /// A special token.
    Token(u32),
}

/// A BPE or SPM tokenizer (see the module docs).
pub struct Tokenizer {
    model: TokenizerModel,
    tokens: Vec<String>,
    /// SPM scores, one per token (all 0 when the file has none; empty for BPE).
    scores: Vec<f32>,
    types: Vec<TokenType>,
    attrs: Vec<u8>,
    token_to_id: HashMap<String, u32>,
    /// Decoded bytes of all tokens; token `i` is
    /// `piece_data[piece_offsets[i]..piece_offsets[i + 1]]`.
    piece_data: Vec<u8>,
    piece_offsets: Vec<usize>,
    merges: bpe::Merges,
    pre_name: String,
    pre: PreConfig,
    /// Special tokens in partition order: longest text first, then by id.
    specials: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unknown: Option<u32>,
    padding: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// SPM only: prepend a space (always false for BPE).
    add_space_prefix: bool,
    /// Sorted, deduplicated.
    eog: Vec<u32>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model)
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("pre", &self.pre_name)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn err(msg: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(msg.into())
}

/// An optional token-id key: absent or a negative integer means none.
fn opt_id(gguf: &GgufFile, key: &str) -> Result<Option<u32>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => match (v.as_u64(), v.as_i64()) {
            (Some(id), _) => u32::try_from(id)
                .map(Some)
                .map_err(|_| err(format!("metadata key `{key}`: token id {id} is too large"))),
            (None, Some(neg)) if neg < 0 => Ok(None),
            _ => Err(err(format!(
                "metadata key `{key}`: expected a token id, found {}",
                v.type_name()
            ))),
        },
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// `tokenizer.ggml.model` is `"gpt2"` (byte-level BPE) or `"llama"`
    /// (SentencePiece). For BPE an unknown `tokenizer.ggml.pre` is an error,
    /// as in llama.cpp; a missing one means `"default"` (with a warning on
    /// stderr). The file may hold no tensors (a vocab-only GGUF).
    /// Errors name the file as well as the key.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
        let path = gguf.path().display().to_string();
        let with_path = |e: EngineError| match e {
            EngineError::Tokenizer(m) => EngineError::Tokenizer(format!("{path}: {m}")),
            other => other,
        };
        Tokenizer::new(TokenizerParts::from_gguf(gguf).map_err(with_path)?).map_err(with_path)
    }

    /// Builds the tokenizer from plain parts (what [`Tokenizer::from_gguf`]
    /// reads), checking them the same way.
    pub fn new(parts: TokenizerParts) -> Result<Tokenizer> {
        let TokenizerParts {
            model,
            mut tokens,
            scores,
            token_types,
            merges,
            pre,
            bos_id,
            eos_id,
            eot_id,
            eom_id,
            unknown_id,
            padding_id,
            add_bos,
            add_eos,
            add_space_prefix,
        } = parts;
        let spm = model == TokenizerModel::Spm;

        let n = tokens.len();
        if n == 0 {
            return Err(err(format!(
                "metadata key `{}`: empty vocabulary",
                keys::TOKENS
            )));
        }
        if u32::try_from(n).is_err() {
            return Err(err(format!(
                "metadata key `{}`: {n} tokens is too many",
                keys::TOKENS
            )));
        }
        let types = if token_types.is_empty() {
            vec![TokenType::Normal; n]
        } else if token_types.len() < n {
            return Err(err(format!(
                "metadata key `{}`: {} types for {n} tokens",
                keys::TOKEN_TYPE,
                token_types.len()
            )));
        } else {
            token_types[..n].to_vec()
        };

        // llama.cpp renames empty tokens so that every text is non-empty.
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter_mut().enumerate() {
            if t.is_empty() {
                *t = format!("[EMPTY_{i}]");
            }
            // `n` fits in u32 (checked above).
            if let Some(prev) = token_to_id.insert(t.clone(), i as u32) {
                return Err(err(format!(
                    "metadata key `{}`: duplicate token {t:?} (ids {prev} and {i})",
                    keys::TOKENS
                )));
            }
        }

        let scores = if !spm {
            Vec::new()
        } else if scores.is_empty() {
            vec![0.0; n]
        } else if scores.len() < n {
            return Err(err(format!(
                "metadata key `{}`: {} scores for {n} tokens",
                keys::SCORES,
                scores.len()
            )));
        } else {
            scores[..n].to_vec()
        };

        let pre_name = match pre {
            Some(p) => p,
            // SPM has no pre-tokenizer: llama.cpp uses "default" silently.
            None if spm => "default".to_owned(),
            None => {
                eprintln!(
                    "warning: GGUF has no `{}`; using the \"default\" pre-tokenizer \
                     (generation quality may be degraded)",
                    keys::PRE
                );
                "default".to_owned()
            }
        };
        // SPM ignores the pre-tokenizer (llama.cpp sets it to "default").
        let pre_lookup = if spm { "default" } else { pre_name.as_str() };
        let pre_cfg = PreTokenizer::config(pre_lookup).ok_or_else(|| {
            let names: Vec<&str> = PreTokenizer::supported_names().collect();
            err(format!(
                "metadata key `{}`: unknown pre-tokenizer type {pre_name:?} (supported: {})",
                keys::PRE,
                names.join(", ")
            ))
        })?;

        let check = |key: &str, id: Option<u32>| -> Result<Option<u32>> {
            match id {
                Some(id) if id as usize >= n => Err(err(format!(
                    "metadata key `{key}`: token id {id} is outside the vocabulary of {n}"
                ))),
                other => Ok(other),
            }
        };
        let bos = check(keys::BOS_ID, bos_id)?;
        let eos = check(keys::EOS_ID, eos_id)?;
        let mut eot = check(keys::EOT_ID, eot_id)?;
        let mut eom = check(keys::EOM_ID, eom_id)?;
        let unknown = check(keys::UNKNOWN_ID, unknown_id)?;
        let padding = check(keys::PADDING_ID, padding_id)?;

        let add_bos = add_bos.unwrap_or(spm || pre_cfg.default_add_bos);
        if add_bos && bos.is_none() {
            return Err(err(format!(
                "metadata key `{}` is true, but `{}` is not set",
                keys::ADD_BOS,
                keys::BOS_ID
            )));
        }
        if add_eos && eos.is_none() {
            return Err(err(format!(
                "metadata key `{}` is true, but `{}` is not set",
                keys::ADD_EOS,
                keys::EOS_ID
            )));
        }

        let mut attrs: Vec<u8> = types.iter().map(|t| t.attr()).collect();
        let id_of = |text: &str| token_to_id.get(text).copied();

        // Special tokens found by text, as llama.cpp: they become control
        // tokens if they were not.
        if eot.is_none() {
            eot = EOT_TEXTS.iter().filter_map(|t| id_of(t)).min();
            if let Some(id) = eot {
                attrs[id as usize] |= ATTR_CONTROL;
            }
        }
        if eom.is_none() {
            eom = id_of("<|eom_id|>");
            if let Some(id) = eom {
                attrs[id as usize] |= ATTR_CONTROL;
            }
        }
        let mut eog: Vec<u32> = EOG_TEXTS.iter().filter_map(|t| id_of(t)).collect();
        for &id in &eog {
            attrs[id as usize] |= ATTR_CONTROL;
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();

        // Special-token cache: longest text first; the sort is stable, so
        // equal lengths keep id order.
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| attrs[i as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));

        let mut piece_data = Vec::with_capacity(n * 6);
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0);
        for (text, &attr) in tokens.iter().zip(&attrs) {
            if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
                piece_data.extend_from_slice(text.as_bytes());
            } else if attr & ATTR_NORMAL != 0 {
                if spm {
                    piece_data.extend_from_slice(spm::unescape_whitespace(text).as_bytes());
                } else {
                    byte_level::decode_into(text, &mut piece_data);
                }
            } else if attr & ATTR_BYTE != 0
                && let Some(b) = parse_byte_token(text)
            {
                piece_data.push(b);
            }
            piece_offsets.push(piece_data.len());
        }

        Ok(Tokenizer {
            model,
            tokens,
            scores,
            types,
            attrs,
            token_to_id,
            piece_data,
            piece_offsets,
            merges: bpe::Merges::new(&merges),
            pre_name,
            pre: pre_cfg,
            specials,
            bos,
            eos,
            eot,
            eom,
            unknown,
            padding,
            add_bos,
            add_eos,
            add_space_prefix: spm && add_space_prefix.unwrap_or(true),
            eog,
        })
    }

    /// Tokenizes `text` without adding BOS/EOS. With `parse_special`, text
    /// equal to a control token (e.g. `<|im_start|>`) becomes that token;
    /// without it, such text is tokenized as plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        // SPM: a fragment at the start or after a special token gets the
        // space prefix (llama.cpp's `is_prev_special`).
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(s, e) => {
                    match self.model {
                        TokenizerModel::Bpe => self.encode_text(&text[s..e], &mut out),
                        TokenizerModel::Spm => self.encode_spm(&text[s..e], prev_special, &mut out),
                    }
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Tokenizes prompt text the way the engine does: control-token text is
    /// parsed, BOS is prepended only when the model asks ([`Tokenizer::add_bos`]),
    /// no EOS is added.
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        ids.extend(self.encode(text, true));
        ids
    }

    /// Tokenizes like `llama_tokenize(text, add_special, parse_special)`:
    /// with `add_special`, BOS is prepended if [`Tokenizer::add_bos`] and
    /// EOS appended if [`Tokenizer::add_eos`].
    pub fn encode_with_special(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        out.extend(self.encode(text, parse_special));
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// llama.cpp's `tokenizer_st_partition`.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(0, text.len())];
        for &id in &self.specials {
            if !parse_special && self.attrs[id as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            // Tokens are never empty (empty ones were renamed).
            if needle.is_empty() || !text.contains(needle) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                let Fragment::Text(mut s, e) = frag else {
                    next.push(frag);
                    continue;
                };
                while let Some(off) = text[s..e].find(needle) {
                    let m = s + off;
                    if m > s {
                        next.push(Fragment::Text(s, m));
                    }
                    next.push(Fragment::Token(id));
                    s = m + needle.len();
                }
                if s < e {
                    next.push(Fragment::Text(s, e));
                }
            }
            frags = next;
        }
        frags
    }

    /// Pre-tokenizes and BPE-encodes one raw fragment.
    fn encode_text(&self, text: &str, out: &mut Vec<u32>) {
        let mut word = String::new();
        for range in self.pre.kind.split(text) {
            word.clear();
            byte_level::encode_into(text[range].as_bytes(), &mut word);
            if self.pre.ignore_merges
                && let Some(&id) = self.token_to_id.get(word.as_str())
            {
                out.push(id);
                continue;
            }
            for sym in self.merges.apply(&word) {
                let s = &word[sym];
                match self.token_to_id.get(s) {
                    Some(&id) => out.push(id),
                    // As llama.cpp: fall back to single-byte tokens (only
                    // ASCII bytes can be found this way).
                    None => {
                        for b in s.bytes() {
                            let one = [b];
                            if let Ok(c) = std::str::from_utf8(&one) {
                                out.extend(self.token_to_id.get(c).copied());
                            }
                        }
                    }
                }
            }
        }
    }

    /// SPM-encodes one raw fragment (llama.cpp's `LLAMA_VOCAB_TYPE_SPM`
    /// branch of `tokenize`).
    fn encode_spm(&self, text: &str, prev_special: bool, out: &mut Vec<u32>) {
        let mut escaped = String::with_capacity(text.len() + 8);
        if self.add_space_prefix && prev_special {
            escaped.push('\u{2581}');
        }
        spm::escape_whitespace(text, &mut escaped);
        spm::encode(self, &escaped, out);
    }

    /// The bytes token `id` decodes to (empty for an id outside the
    /// vocabulary, and for unused/undefined tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.piece_offsets.get(i), self.piece_offsets.get(i + 1)) {
            (Some(&s), Some(&e)) => &self.piece_data[s..e],
            _ => &[],
        }
    }

    /// The concatenated bytes of `ids` (ids outside the vocabulary add
    /// nothing). Control tokens are included as their text. When the
    /// tokenizer adds a space prefix (SPM), one leading space of the first
    /// piece is dropped, as llama.cpp's `detokenize`, so that
    /// `decode(encode(t)) == t`; [`Tokenizer::token_bytes`] and
    /// [`StreamDecoder`] keep every space.
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_bytes(id);
            let piece = match piece {
                [b' ', rest @ ..] if i == 0 && self.add_space_prefix => rest,
                _ => piece,
            };
            out.extend_from_slice(piece);
        }
        out
    }

    /// [`Tokenizer::decode`] as a string (invalid UTF-8 becomes U+FFFD).
    pub fn decode_lossy(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode(ids)).into_owned()
    }

    /// A fresh [`StreamDecoder`].
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new()
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of the token whose vocabulary string is `text`.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The vocabulary string of `id` (byte-level form for normal tokens).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The type of `id`, as stored in the file.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether `id` is a control token (including end-of-generation tokens
    /// that the file typed as normal, as llama.cpp treats them).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|&a| a & ATTR_CONTROL != 0)
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn id (from metadata, or found by text).
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }

    /// End-of-message id (from metadata, or `<|eom_id|>`).
    pub fn eom_id(&self) -> Option<u32> {
        self.eom
    }

    /// Unknown-token id.
    pub fn unknown_id(&self) -> Option<u32> {
        self.unknown
    }

    /// Padding id.
    pub fn padding_id(&self) -> Option<u32> {
        self.padding
    }

    /// The end-of-generation ids, sorted: EOS, EOT, EOM and the tokens with
    /// a known end-of-turn text, as llama.cpp's `special_eog_ids`.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether the model wants BOS prepended (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether the model wants EOS appended (`tokenizer.ggml.add_eos_token`).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The algorithm (`tokenizer.ggml.model`).
    pub fn model(&self) -> TokenizerModel {
        self.model
    }

    /// Whether SPM prepends a space (`tokenizer.ggml.add_space_prefix`;
    /// always false for BPE).
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// The SPM score of `id` (0 for BPE and for ids outside the vocabulary).
    pub fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// The `tokenizer.ggml.pre` value in use.
    pub fn pre_tokenizer_name(&self) -> &str {
        &self.pre_name
    }

    /// The pre-tokenizer family in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre.kind
    }
}

impl spm::SpmVocab for Tokenizer {
    fn id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    fn score(&self, id: u32) -> f32 {
        Tokenizer::score(self, id)
    }

    /// `<0xNN>`, else the one-byte text, else the unknown token (where
    /// llama.cpp would throw).
    fn byte_token(&self, byte: u8) -> Option<u32> {
        let hex = format!("<0x{byte:02X}>");
        self.token_to_id
            .get(&hex)
            .copied()
            .or_else(|| {
                let one = [byte];
                std::str::from_utf8(&one)
                    .ok()
                    .and_then(|c| self.token_to_id.get(c).copied())
            })
            .or(self.unknown)
    }
}

/// `<0xNN>` → `NN`.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests;
