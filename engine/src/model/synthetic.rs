//! A synthetic Llama model: a complete GGUF file with seeded random weights
//! and a tiny byte-level GPT-2 tokenizer, for tests and for runs that need a
//! model of a given shape but not its knowledge (`--dummy-weights`).
//!
//! ```no_run
//! use pagoda::model::synthetic::{SyntheticSpec, write_synthetic_gguf};
//!
//! write_synthetic_gguf(&SyntheticSpec::tiny(), "/tmp/tiny.gguf")?;
//! # Ok::<(), pagoda::EngineError>(())
//! ```
//!
//! The file holds everything [`crate::Engine`] needs:
//! - `llama.*` hyper-parameters from the [`SyntheticSpec`];
//! - every tensor [`crate::model::LlamaWeights::expected`] names (plus an
//!   untied `output.weight`), matrices in `weight_dtype`, norms in F32;
//! - a GPT-2 byte-level vocabulary: the 256 byte symbols (id = byte value),
//!   `<|endoftext|>` (256), `<|im_start|>` (257, BOS), `<|im_end|>` (258, EOS),
//!   then up to [`MERGES`]`.len()` merged tokens, then unused padding tokens
//!   up to `vocab_size`; pre-tokenizer `smollm`, no BOS added, a ChatML
//!   chat template.
//!
//! The same spec and seed always give the same bytes. Weights are uniform
//! with variance-preserving scales (`±1/sqrt(fan_in)` for projections), so
//! activations stay finite and logits are well spread.

use std::path::Path;

use pagoda_backend::DType;
use pagoda_backend::quant::quantize_row;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};
use crate::gguf::GgufWriter;
use crate::tokenizer::byte_level::byte_to_char;

/// Shape, weight type and seed of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// Transformer blocks.
    pub num_layers: usize,
    /// Embedding width.
    pub hidden_dim: usize,
    /// Query heads (`head_dim = hidden_dim / num_heads`).
    pub num_heads: usize,
    /// KV heads (must divide `num_heads`).
    pub num_kv_heads: usize,
    /// FFN inner width.
    pub ffn_dim: usize,
    /// Vocabulary size: at least [`MIN_VOCAB`].
    pub vocab_size: usize,
    /// Training context length.
    pub context_len: usize,
    /// Type of the matrices (F32, F16, BF16 or Q8_0); norms are always F32.
    pub weight_dtype: DType,
    /// Seed of the weights.
    pub seed: u64,
}

/// The 256 byte tokens plus the three control tokens.
pub const MIN_VOCAB: usize = 259;

/// Id of `<|endoftext|>`.
pub const ENDOFTEXT_ID: u32 = 256;
/// Id of `<|im_start|>` (the BOS token).
pub const IM_START_ID: u32 = 257;
/// Id of `<|im_end|>` (the EOS token).
pub const IM_END_ID: u32 = 258;

/// The merges, in rank order (byte-level form: `Ġ` is a space). Each
/// merged token follows the control tokens, in this order, while the
/// vocabulary has room.
pub const MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("h", "e"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("o", "n"),
    ("Ġ", "a"),
    ("r", "e"),
    ("e", "n"),
    ("Ġ", "s"),
    ("Ġt", "he"),
    ("o", "u"),
    ("i", "s"),
    ("a", "t"),
    ("Ġ", "w"),
    ("o", "r"),
    ("e", "s"),
    ("in", "g"),
    ("Ġ", "o"),
    ("Ġ", "c"),
    ("e", "d"),
    ("Ġ", "f"),
    ("Ġ", "b"),
    ("Ġ", "p"),
    ("a", "r"),
    ("Ġ", "m"),
    ("l", "l"),
    ("Ġ", "i"),
    ("Ġ", "h"),
    ("a", "l"),
    ("i", "t"),
    ("Ġo", "f"),
    ("Ġa", "n"),
    ("Ġan", "d"),
    ("Ġ", "d"),
    ("l", "e"),
    ("Ġt", "o"),
    ("Ġi", "n"),
    ("Ġ", "l"),
    ("s", "t"),
    ("Ġ", "n"),
];

/// ChatML, as SmolLM2 and Qwen use it.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const RMS_EPS: f32 = 1e-5;
const ROPE_FREQ_BASE: f32 = 10000.0;

impl SyntheticSpec {
    /// A tiny model: 2 layers, width 64, 4 heads of 16 (2 KV heads), FFN 128,
    /// a vocabulary of 300, context 256, Q8_0 matrices, seed 0.
    pub fn tiny() -> SyntheticSpec {
        SyntheticSpec {
            num_layers: 2,
            hidden_dim: 64,
            num_heads: 4,
            num_kv_heads: 2,
            ffn_dim: 128,
            vocab_size: 300,
            context_len: 256,
            weight_dtype: DType::Q8_0,
            seed: 0,
        }
    }

    /// A named shape (`"tiny"`), for `--dummy-weights`.
    pub fn named(name: &str) -> Option<SyntheticSpec> {
        match name {
            "tiny" => Some(SyntheticSpec::tiny()),
            _ => None,
        }
    }

    /// Names [`SyntheticSpec::named`] knows.
    pub const NAMES: &'static [&'static str] = &["tiny"];

    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.hidden_dim / self.num_heads.max(1)
    }

    /// Checks that the shape makes a model this engine runs.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| {
            Err(EngineError::InvalidInput(format!(
                "synthetic model: {what}"
            )))
        };
        if self.num_layers == 0 || self.context_len < 2 {
            return bad("needs at least one layer and a context of at least 2".into());
        }
        if self.num_heads == 0 || !self.hidden_dim.is_multiple_of(self.num_heads) {
            return bad(format!(
                "{} heads do not divide width {}",
                self.num_heads, self.hidden_dim
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} KV heads do not divide {} heads",
                self.num_kv_heads, self.num_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} is odd (RoPE)", self.head_dim()));
        }
        if self.hidden_dim == 0 || self.ffn_dim == 0 {
            return bad("width and FFN width must be positive".into());
        }
        if self.vocab_size < MIN_VOCAB {
            return bad(format!(
                "vocabulary of {} is smaller than the {MIN_VOCAB} byte and control tokens",
                self.vocab_size
            ));
        }
        if u32::try_from(self.vocab_size).is_err()
            || u32::try_from(self.context_len).is_err()
            || u32::try_from(self.hidden_dim.max(self.ffn_dim)).is_err()
        {
            return bad("sizes must fit in u32".into());
        }
        if !matches!(
            self.weight_dtype,
            DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0
        ) {
            return bad(format!(
                "weights of type {} are not supported (f32, f16, bf16, q8_0)",
                self.weight_dtype
            ));
        }
        let bs = self.weight_dtype.block_size();
        for (what, k) in [("hidden_dim", self.hidden_dim), ("ffn_dim", self.ffn_dim)] {
            if !k.is_multiple_of(bs) {
                return bad(format!(
                    "{what} {k} is not a multiple of the {} block size {bs}",
                    self.weight_dtype
                ));
            }
        }
        Ok(())
    }
}

/// The vocabulary strings and GGUF token types (1 normal, 3 control, 5 unused).
fn vocabulary(vocab_size: usize) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    let mut types = vec![1i32; 256];
    for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(t.to_string());
        types.push(3);
    }
    let mut merges = Vec::new();
    for (l, r) in MERGES {
        if tokens.len() >= vocab_size {
            break;
        }
        tokens.push(format!("{l}{r}"));
        types.push(1);
        merges.push(format!("{l} {r}"));
    }
    while tokens.len() < vocab_size {
        tokens.push(format!("<|unused_{}|>", tokens.len()));
        types.push(5);
    }
    (tokens, types, merges)
}

/// `rows × cols` uniform values in `[-scale, scale]`.
fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..=scale)).collect()
}

/// Encodes `data` (rows of `row_len`) in `dtype`.
fn encode(dtype: DType, data: &[f32], row_len: usize) -> Result<Vec<u8>> {
    let row_bytes = dtype.row_bytes(row_len).ok_or_else(|| {
        EngineError::InvalidInput(format!(
            "synthetic model: rows of {row_len} are not a multiple of the {dtype} block size"
        ))
    })?;
    let rows = data.len() / row_len.max(1);
    let mut out = vec![0u8; rows * row_bytes];
    for (src, dst) in data
        .chunks_exact(row_len)
        .zip(out.chunks_exact_mut(row_bytes))
    {
        quantize_row(dtype, src, dst)?;
    }
    Ok(out)
}

/// Builds the synthetic model's GGUF in memory.
pub fn synthetic_gguf(spec: &SyntheticSpec) -> Result<GgufWriter> {
    spec.validate()?;
    let (h, f, v) = (spec.hidden_dim, spec.ffn_dim, spec.vocab_size);
    let hd = spec.head_dim();
    let (q, kv) = (spec.num_heads * hd, spec.num_kv_heads * hd);
    let u32_of = |x: usize| x as u32; // Sizes were checked to fit in validate().
    let (tokens, types, merges) = vocabulary(v);

    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama")
        .metadata("general.name", "pagoda-synthetic")
        .metadata("general.file_type", 0u32)
        .metadata("llama.block_count", u32_of(spec.num_layers))
        .metadata("llama.context_length", u32_of(spec.context_len))
        .metadata("llama.embedding_length", u32_of(h))
        .metadata("llama.feed_forward_length", u32_of(f))
        .metadata("llama.attention.head_count", u32_of(spec.num_heads))
        .metadata("llama.attention.head_count_kv", u32_of(spec.num_kv_heads))
        .metadata("llama.attention.layer_norm_rms_epsilon", RMS_EPS)
        .metadata("llama.rope.freq_base", ROPE_FREQ_BASE)
        .metadata("llama.rope.dimension_count", u32_of(hd))
        .metadata("llama.vocab_size", u32_of(v))
        .metadata("tokenizer.ggml.model", "gpt2")
        .metadata("tokenizer.ggml.pre", "smollm")
        .metadata("tokenizer.ggml.tokens", tokens)
        .metadata("tokenizer.ggml.token_type", types)
        .metadata("tokenizer.ggml.merges", merges)
        .metadata("tokenizer.ggml.bos_token_id", IM_START_ID)
        .metadata("tokenizer.ggml.eos_token_id", IM_END_ID)
        .metadata("tokenizer.ggml.padding_token_id", IM_END_ID)
        .metadata("tokenizer.ggml.add_bos_token", false)
        .metadata("tokenizer.chat_template", CHAT_TEMPLATE);

    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let dt = spec.weight_dtype;
    // A matrix of GGUF shape [k, m]: m rows of k, scaled for fan-in k.
    let mut matrix = |w: &mut GgufWriter, name: String, k: usize, m: usize, gain: f32| {
        let data = uniform(&mut rng, k * m, gain / (k as f32).sqrt());
        encode(dt, &data, k).map(|bytes| {
            w.tensor(name, &[k, m], dt, bytes);
        })
    };
    matrix(&mut w, "token_embd.weight".into(), h, v, (h as f32).sqrt())?;
    matrix(&mut w, "output.weight".into(), h, v, 2.0)?;
    for l in 0..spec.num_layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        matrix(&mut w, p("attn_q"), h, q, 1.0)?;
        matrix(&mut w, p("attn_k"), h, kv, 1.0)?;
        matrix(&mut w, p("attn_v"), h, kv, 1.0)?;
        matrix(&mut w, p("attn_output"), q, h, 1.0)?;
        matrix(&mut w, p("ffn_gate"), h, f, 1.0)?;
        matrix(&mut w, p("ffn_up"), h, f, 1.0)?;
        matrix(&mut w, p("ffn_down"), f, h, 1.0)?;
    }
    let mut norm = |w: &mut GgufWriter, name: String| {
        let data: Vec<f32> = uniform(&mut rng, h, 0.1).iter().map(|x| 1.0 + x).collect();
        w.tensor(
            name,
            &[h],
            DType::F32,
            bytemuck::cast_slice::<f32, u8>(&data),
        );
    };
    norm(&mut w, "output_norm.weight".into());
    for l in 0..spec.num_layers {
        norm(&mut w, format!("blk.{l}.attn_norm.weight"));
        norm(&mut w, format!("blk.{l}.ffn_norm.weight"));
    }
    Ok(w)
}

/// Writes the synthetic model described by `spec` to `path` (created or
/// truncated). Fails on a shape the engine could not run.
pub fn write_synthetic_gguf(spec: &SyntheticSpec, path: impl AsRef<Path>) -> Result<()> {
    Ok(synthetic_gguf(spec)?.write_to(path)?)
}

#[cfg(test)]
mod tests;
