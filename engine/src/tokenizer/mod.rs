//! The tokenizer: GPT-2 style byte-level BPE built from a GGUF file's
//! `tokenizer.ggml.*` metadata, giving the same ids as llama.cpp
//! (`llama_tokenize` with `llm_tokenizer_bpe`) for the supported
//! pre-tokenizers.
//!
//! Encoding, in llama.cpp's order:
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
//! Decoding maps every id to bytes once, at construction
//! ([`Tokenizer::token_bytes`]): normal tokens are byte-level decoded,
//! control/user-defined/unknown tokens are their text, `<0xNN>` byte tokens
//! are that byte, and unused/undefined tokens are empty.
//!
//! Invariants: a `Tokenizer` is immutable after construction; nothing is
//! cached between calls; malformed metadata gives an
//! [`EngineError::Tokenizer`] or [`EngineError::Gguf`] naming the key, never a
//! panic.

mod bpe;
pub mod byte_level;
mod pretokenize;
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
    /// Tokenizer model type (`"gpt2"` is the one supported).
    pub const MODEL: &str = "tokenizer.ggml.model";
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

/// The plain parts a [`Tokenizer`] is built from (what the GGUF metadata
/// holds), for [`Tokenizer::new`].
#[derive(Clone, Debug, Default)]
pub struct TokenizerParts {
    /// Vocabulary strings, in byte-level form; the index is the id.
    pub tokens: Vec<String>,
    /// One type per token; empty means all [`TokenType::Normal`].
    pub token_types: Vec<TokenType>,
    /// Merges, `"left right"`; the index is the rank.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`; `None` means llama.cpp's `"default"` (with a
    /// warning on stderr).
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
    /// Prepend BOS when adding special tokens; `None` means the
    /// pre-tokenizer's default (true only for the Llama-3 family).
    pub add_bos: Option<bool>,
    /// Append EOS when adding special tokens.
    pub add_eos: bool,
}

impl TokenizerParts {
    /// Reads the parts from a GGUF file's `tokenizer.ggml.*` metadata
    /// (checked further by [`Tokenizer::new`]).
    ///
    /// Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE) is supported.
    pub fn from_gguf(gguf: &GgufFile) -> Result<TokenizerParts> {
        let model = gguf.get_str(keys::MODEL)?;
        if model != "gpt2" {
            return Err(err(format!(
                "metadata key `{}`: tokenizer model {model:?} is not supported \
                 (only \"gpt2\", byte-level BPE)",
                keys::MODEL
            )));
        }

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
        let merges = strings(keys::MERGES, gguf.get_array(keys::MERGES)?)?;

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
            tokens,
            token_types,
            merges,
            pre,
            bos_id: opt_id(gguf, keys::BOS_ID)?,
            eos_id: opt_id(gguf, keys::EOS_ID)?,
            eot_id: opt_id(gguf, keys::EOT_ID)?,
            eom_id: opt_id(gguf, keys::EOM_ID)?,
            unknown_id: opt_id(gguf, keys::UNKNOWN_ID)?,
            padding_id: opt_id(gguf, keys::PADDING_ID)?,
            add_bos: gguf.get_bool_opt(keys::ADD_BOS)?,
            add_eos: gguf.get_bool_opt(keys::ADD_EOS)?.unwrap_or(false),
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

/// A byte-level BPE tokenizer (see the module docs).
pub struct Tokenizer {
    tokens: Vec<String>,
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
    /// Sorted, deduplicated.
    eog: Vec<u32>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
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
    /// Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE) is supported.
    /// An unknown `tokenizer.ggml.pre` is an error, as in llama.cpp; a
    /// missing one means `"default"` (with a warning on stderr).
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
            mut tokens,
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
        } = parts;

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

        let pre_name = match pre {
            Some(p) => p,
            None => {
                eprintln!(
                    "warning: GGUF has no `{}`; using the \"default\" pre-tokenizer \
                     (generation quality may be degraded)",
                    keys::PRE
                );
                "default".to_owned()
            }
        };
        let pre_cfg = PreTokenizer::config(&pre_name).ok_or_else(|| {
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

        let add_bos = add_bos.unwrap_or(pre_cfg.default_add_bos);
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
                byte_level::decode_into(text, &mut piece_data);
            } else if attr & ATTR_BYTE != 0
                && let Some(b) = parse_byte_token(text)
            {
                piece_data.push(b);
            }
            piece_offsets.push(piece_data.len());
        }

        Ok(Tokenizer {
            tokens,
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
            eog,
        })
    }

    /// Tokenizes `text` without adding BOS/EOS. With `parse_special`, text
    /// equal to a control token (e.g. `<|im_start|>`) becomes that token;
    /// without it, such text is tokenized as plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(s, e) => self.encode_text(&text[s..e], &mut out),
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
    /// nothing). Control tokens are included as their text.
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
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

    /// The `tokenizer.ggml.pre` value in use.
    pub fn pre_tokenizer_name(&self) -> &str {
        &self.pre_name
    }

    /// The pre-tokenizer family in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre.kind
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
