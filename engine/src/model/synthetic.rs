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
//!
//! Generation is counter-based: each value of tensor `t` is a function of
//! `(seed, t, position)` alone (splitmix64 of a per-tensor key plus a
//! counter), so tensors are generated in parallel, in any order, straight
//! into the file's buffer ([`synthetic_gguf_file`]: one allocation of the
//! file's size, nothing on disk). Float matrices draw two 24-bit uniforms
//! per splitmix64 call; block-quantized ones draw their quants directly (8
//! random bytes per call) under a fixed scale, so a 7B Q4_0 shape's 6.7 G
//! weights take a few seconds.
//!
//! Named shapes ([`SyntheticSpec::named`]): `tiny`, `smollm2-135m` (the
//! default model's dimensions, tied embeddings) and `llama2-7b`.

use std::path::Path;
use std::sync::Mutex;

use pagoda_backend::DType;
use pagoda_backend::quant::quantize_row;

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, GgufWriter};
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
    /// Type of the matrices (F32, F16, BF16, Q8_0, Q4_0 or Q4_1); norms are always F32.
    pub weight_dtype: DType,
    /// Seed of the weights.
    pub seed: u64,
    /// Whether the output head is the token embedding (no `output.weight`),
    /// as in SmolLM2.
    pub tie_embeddings: bool,
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
            tie_embeddings: false,
        }
    }

    /// Llama 2 7B's shape: 32 layers, width 4096, 32 heads (and 32 KV heads)
    /// of 128, FFN 11008, vocabulary 32000, context 4096, untied output;
    /// Q4_0 matrices.
    pub fn llama2_7b() -> SyntheticSpec {
        SyntheticSpec {
            num_layers: 32,
            hidden_dim: 4096,
            num_heads: 32,
            num_kv_heads: 32,
            ffn_dim: 11008,
            vocab_size: 32000,
            context_len: 4096,
            weight_dtype: DType::Q4_0,
            seed: 0,
            tie_embeddings: false,
        }
    }

    /// The default model's shape (SmolLM2-135M, from its GGUF metadata): 30
    /// layers, width 576, 9 heads of 64 with 3 KV heads, FFN 1536,
    /// vocabulary 49152, context 8192, output tied to the embedding; Q4_1
    /// matrices (the real file keeps its embedding in Q8_0).
    pub fn smollm2_135m() -> SyntheticSpec {
        SyntheticSpec {
            num_layers: 30,
            hidden_dim: 576,
            num_heads: 9,
            num_kv_heads: 3,
            ffn_dim: 1536,
            vocab_size: 49152,
            context_len: 8192,
            weight_dtype: DType::Q4_1,
            seed: 0,
            tie_embeddings: true,
        }
    }

    /// A named shape, for `--dummy-weights`: one of [`SyntheticSpec::NAMES`].
    pub fn named(name: &str) -> Option<SyntheticSpec> {
        match name {
            "tiny" => Some(SyntheticSpec::tiny()),
            "smollm2-135m" => Some(SyntheticSpec::smollm2_135m()),
            "llama2-7b" => Some(SyntheticSpec::llama2_7b()),
            _ => None,
        }
    }

    /// Names [`SyntheticSpec::named`] knows.
    pub const NAMES: &'static [&'static str] = &["tiny", "smollm2-135m", "llama2-7b"];

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
        if !DType::WEIGHT_TYPES.contains(&self.weight_dtype) {
            return bad(format!(
                "weights of type {} are not supported ({})",
                self.weight_dtype,
                DType::WEIGHT_TYPES.map(DType::name).join(", ")
            ));
        }
        let bs = self.weight_dtype.block_size();
        for (what, k) in [("hidden_dim", self.hidden_dim), ("ffn_dim", self.ffn_dim)] {
            if !k.is_multiple_of(bs) {
                let advice = if bs == 256 {
                    " (K-quant rows are whole 256-element super-blocks: use a 256-wide shape \
                     such as llama2-7b, or q5_0 / q5_1 / q8_0, llama.cpp's fall-backs)"
                } else {
                    ""
                };
                return bad(format!(
                    "{what} {k} is not a multiple of the {} block size {bs}{advice}",
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

/// How one tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Uniform in `±gain / sqrt(k)`, rows of `k` (fan-in).
    Matrix { k: usize, gain: f32 },
    /// `1 + uniform(±0.1)` (an RMSNorm weight), F32.
    Norm,
}

/// One tensor of the synthetic model.
#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    /// GGUF shape, `ne0` first.
    shape: Vec<usize>,
    dtype: DType,
    init: Init,
}

impl TensorSpec {
    fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n / self.dtype.block_size() * self.dtype.block_bytes()
    }
}

impl SyntheticSpec {
    /// Every tensor, in file order: embedding, output head (unless tied),
    /// each layer's projections, then the norms.
    fn tensor_specs(&self) -> Vec<TensorSpec> {
        let (h, f, v) = (self.hidden_dim, self.ffn_dim, self.vocab_size);
        let hd = self.head_dim();
        let (q, kv) = (self.num_heads * hd, self.num_kv_heads * hd);
        let dt = self.weight_dtype;
        let mut out = Vec::new();
        // A matrix of GGUF shape [k, m]: m rows of k, scaled for fan-in k.
        let mut matrix = |name: String, k: usize, m: usize, gain: f32| {
            out.push(TensorSpec {
                name,
                shape: vec![k, m],
                dtype: dt,
                init: Init::Matrix { k, gain },
            })
        };
        matrix("token_embd.weight".into(), h, v, (h as f32).sqrt());
        if !self.tie_embeddings {
            matrix("output.weight".into(), h, v, 2.0);
        }
        for l in 0..self.num_layers {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            matrix(p("attn_q"), h, q, 1.0);
            matrix(p("attn_k"), h, kv, 1.0);
            matrix(p("attn_v"), h, kv, 1.0);
            matrix(p("attn_output"), q, h, 1.0);
            matrix(p("ffn_gate"), h, f, 1.0);
            matrix(p("ffn_up"), h, f, 1.0);
            matrix(p("ffn_down"), f, h, 1.0);
        }
        let mut norm = |name: String| {
            out.push(TensorSpec {
                name,
                shape: vec![h],
                dtype: DType::F32,
                init: Init::Norm,
            })
        };
        norm("output_norm.weight".into());
        for l in 0..self.num_layers {
            norm(format!("blk.{l}.attn_norm.weight"));
            norm(format!("blk.{l}.ffn_norm.weight"));
        }
        out
    }

    /// Bytes the weights take (what [`crate::model::LlamaWeights::planned_bytes`]
    /// reports for the generated file), computed from the shape alone.
    pub fn weights_bytes(&self) -> u64 {
        self.tensor_specs().iter().map(|t| t.bytes() as u64).sum()
    }

    /// Size of the generated GGUF file in bytes (header, weights, padding).
    pub fn file_bytes(&self) -> Result<u64> {
        Ok(self.writer(true)?.file_bytes())
    }

    /// A GGUF with this model's metadata (hyper-parameters, tokenizer, chat
    /// template) and no tensors: enough to plan and to tokenize without
    /// generating a weight.
    pub fn header_file(&self) -> Result<GgufFile> {
        self.validate()?;
        let mut w = GgufWriter::new();
        self.put_metadata(&mut w);
        Ok(GgufFile::from_bytes("<synthetic header>", w.to_bytes()?)?)
    }

    fn put_metadata(&self, w: &mut GgufWriter) {
        let u32_of = |x: usize| x as u32; // Sizes were checked to fit in validate().
        let (tokens, types, merges) = vocabulary(self.vocab_size);
        w.metadata("general.architecture", "llama")
            .metadata("general.name", "pagoda-synthetic")
            .metadata("general.file_type", 0u32)
            .metadata("llama.block_count", u32_of(self.num_layers))
            .metadata("llama.context_length", u32_of(self.context_len))
            .metadata("llama.embedding_length", u32_of(self.hidden_dim))
            .metadata("llama.feed_forward_length", u32_of(self.ffn_dim))
            .metadata("llama.attention.head_count", u32_of(self.num_heads))
            .metadata("llama.attention.head_count_kv", u32_of(self.num_kv_heads))
            .metadata("llama.attention.layer_norm_rms_epsilon", RMS_EPS)
            .metadata("llama.rope.freq_base", ROPE_FREQ_BASE)
            .metadata("llama.rope.dimension_count", u32_of(self.head_dim()))
            .metadata("llama.vocab_size", u32_of(self.vocab_size))
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
    }

    /// The writer with every tensor: generated now (`deferred = false`), or
    /// deferred to be generated into the file's buffer.
    fn writer(&self, deferred: bool) -> Result<GgufWriter> {
        self.validate()?;
        let mut w = GgufWriter::new();
        self.put_metadata(&mut w);
        for (i, t) in self.tensor_specs().iter().enumerate() {
            if deferred {
                w.tensor_deferred(t.name.clone(), &t.shape, t.dtype);
            } else {
                let mut bytes = vec![0u8; t.bytes()];
                fill_tensor(self.seed, i, t, &mut bytes)?;
                w.tensor(t.name.clone(), &t.shape, t.dtype, bytes);
            }
        }
        Ok(w)
    }
}

/// splitmix64's output function of `x` (Steele, Lea and Flood 2014).
#[inline]
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes `dst.len()` uniform values in `[-scale, scale)`: elements
/// `first, first + 1, ..` (`first` even) of the stream `key`; each pair
/// `(2p, 2p + 1)` comes from one splitmix64 of `key + p`.
fn uniform_into(key: u64, first: usize, scale: f32, dst: &mut [f32]) {
    debug_assert!(first.is_multiple_of(2), "streams are read in pairs");
    const UNIT: f32 = 1.0 / (1u32 << 23) as f32; // 24 bits to [0, 2)
    let base = (first / 2) as u64;
    for (p, pair) in dst.chunks_mut(2).enumerate() {
        let r = splitmix64(key.wrapping_add(base + p as u64));
        for (half, out) in pair.iter_mut().enumerate() {
            let bits = (r >> (8 + 32 * half)) as u32 & 0x00FF_FFFF;
            *out = (bits as f32 * UNIT - 1.0) * scale;
        }
    }
}

/// Writes random blocks of a quantized type straight (no float pass, so a
/// 7B shape takes seconds): block `b`'s quants come from splitmix64 of
/// `key + 4b + c`, its scales are fixed so values span `±scale` on a
/// uniform grid (Q8_0: `d = scale / 127`, quants any i8; Q4_0: `d = scale / 8`;
/// Q4_1: `d = 2 scale / 15`, `m = -scale`; Q5_0 / Q5_1 likewise over 5 bits;
/// the K-quants with every sub-block scale (and min) 32).
fn quantized_blocks_into(key: u64, dtype: DType, scale: f32, dst: &mut [u8]) {
    let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
    // Every sub-block scale and min of a Q4_K / Q5_K block 32 (kquant::scale_min_k4's
    // packing: low 6 bits in bytes 0..8, the top 2 of sub-blocks 4..8 in bytes 0..8's top bits).
    let k4_scales = [0xA0u8, 0xA0, 0xA0, 0xA0, 0xA0, 0xA0, 0xA0, 0xA0, 0, 0, 0, 0];
    // The fixed fields of a block, as (offset, bytes) in ascending order; every other byte
    // is random.
    let fixed: Vec<(usize, Vec<u8>)> = match dtype {
        DType::Q8_0 => vec![(0, f16(scale / 127.0).to_vec())],
        DType::Q4_0 => vec![(0, f16(scale / 8.0).to_vec())],
        DType::Q4_1 => vec![(0, [f16(2.0 * scale / 15.0), f16(-scale)].concat())],
        DType::Q5_0 => vec![(0, f16(scale / 16.0).to_vec())],
        DType::Q5_1 => vec![(0, [f16(2.0 * scale / 31.0), f16(-scale)].concat())],
        DType::Q4_K => vec![(
            0,
            [
                &f16(2.0 * scale / (15.0 * 32.0))[..],
                &f16(scale / 32.0),
                &k4_scales,
            ]
            .concat(),
        )],
        DType::Q5_K => vec![(
            0,
            [
                &f16(2.0 * scale / (31.0 * 32.0))[..],
                &f16(scale / 32.0),
                &k4_scales,
            ]
            .concat(),
        )],
        DType::Q6_K => vec![(192, [vec![32u8; 16], f16(scale / 1024.0).to_vec()].concat())],
        _ => {
            debug_assert!(false, "{dtype} is not a block type");
            return;
        }
    };
    for (b, block) in dst.chunks_exact_mut(dtype.block_bytes()).enumerate() {
        // The random stretches between the fixed fields, each filled from its own start.
        let mut at = 0;
        let mut c = 0u64;
        for (off, bytes) in fixed.iter().chain([(block.len(), Vec::new())].iter()) {
            for chunk in block[at..*off].chunks_mut(8) {
                let r = splitmix64(key.wrapping_add(4 * b as u64 + c)).to_le_bytes();
                chunk.copy_from_slice(&r[..chunk.len()]);
                c += 1;
            }
            block[*off..*off + bytes.len()].copy_from_slice(bytes);
            at = off + bytes.len();
        }
    }
}

/// Generates tensor `index` (described by `t`) of the model seeded `seed`
/// into `dst` (its bytes in `t.dtype`), row by row.
fn fill_tensor(seed: u64, index: usize, t: &TensorSpec, dst: &mut [u8]) -> Result<()> {
    let key = splitmix64(seed ^ splitmix64(index as u64 + 1));
    match t.init {
        Init::Norm => {
            let mut v = vec![0f32; t.shape[0]];
            uniform_into(key, 0, 0.1, &mut v);
            for (x, out) in v.iter().zip(dst.chunks_exact_mut(4)) {
                out.copy_from_slice(&(1.0 + x).to_le_bytes());
            }
        }
        Init::Matrix { k, gain } if t.dtype.is_quantized() => {
            quantized_blocks_into(key, t.dtype, gain / (k as f32).sqrt(), dst);
        }
        Init::Matrix { k, gain } => {
            let row_bytes = t.dtype.row_bytes(k).ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "synthetic model: rows of {k} are not a multiple of the {} block size",
                    t.dtype
                ))
            })?;
            let scale = gain / (k as f32).sqrt();
            // Rows start at even elements when k is even (always: k is a
            // multiple of 32 or a width divisible by an even head_dim).
            let mut row = vec![0f32; k];
            for (r, out) in dst.chunks_exact_mut(row_bytes).enumerate() {
                uniform_into(key, r * k.next_multiple_of(2), scale, &mut row);
                quantize_row(t.dtype, &row, out)?;
            }
        }
    }
    Ok(())
}

/// Builds the synthetic model's GGUF, weights included, as a writer (to
/// write a file or extend in tests). Same bytes as [`synthetic_gguf_file`].
pub fn synthetic_gguf(spec: &SyntheticSpec) -> Result<GgufWriter> {
    spec.writer(false)
}

/// Generates the synthetic model straight into one buffer of the file's
/// size, on every core (tensors handed out largest first), and opens it: a
/// model of any named shape, nothing on disk. Pass it to
/// [`crate::EngineBuilder::gguf`].
pub fn synthetic_gguf_file(spec: &SyntheticSpec) -> Result<GgufFile> {
    let w = spec.writer(true)?;
    let specs = spec.tensor_specs();
    let seed = spec.seed;
    let bytes = w.to_shared_bytes(|slices: Vec<&mut [u8]>| -> Result<()> {
        // Smallest first, so `pop` hands out the largest tensor left.
        let mut jobs: Vec<(usize, &mut [u8])> = slices.into_iter().enumerate().collect();
        jobs.sort_by_key(|(_, s)| s.len());
        let queue = Mutex::new(jobs);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let work = || -> Result<()> {
            loop {
                let job = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((index, dst)) = job else {
                    return Ok(());
                };
                fill_tensor(seed, index, &specs[index], dst)?;
            }
        };
        std::thread::scope(|s| {
            let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
            let mut result = work();
            for h in handles {
                let r = h.join().unwrap_or_else(|_| {
                    Err(EngineError::InvalidInput(
                        "synthetic model: a generator thread panicked".into(),
                    ))
                });
                result = result.and(r);
            }
            result
        })
    })?;
    Ok(GgufFile::from_bytes(
        format!(
            "<synthetic {}x{} {}>",
            spec.num_layers, spec.hidden_dim, spec.weight_dtype
        ),
        bytes,
    )?)
}

/// Writes the synthetic model described by `spec` to `path` (created or
/// truncated). Fails on a shape the engine could not run.
pub fn write_synthetic_gguf(spec: &SyntheticSpec, path: impl AsRef<Path>) -> Result<()> {
    Ok(synthetic_gguf(spec)?.write_to(path)?)
}

#[cfg(test)]
mod tests;
