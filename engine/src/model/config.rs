//! Llama hyper-parameters, read from GGUF metadata.

use crate::gguf::{GgufError, GgufFile};

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture` (only `llama` is supported).
    pub architecture: String,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Embedding width.
    pub hidden_dim: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads (GQA).
    pub num_kv_heads: usize,
    /// Elements per head (`hidden_dim / num_heads`).
    pub head_dim: usize,
    /// FFN inner width.
    pub ffn_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE frequency base.
    pub rope_freq_base: f32,
    /// Leading elements of each head that rotate.
    pub rope_dim: usize,
    /// Training context length.
    pub context_len: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

/// Architectures this engine runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

impl LlamaConfig {
    /// Reads and checks the hyper-parameters.
    pub fn from_gguf(f: &GgufFile) -> Result<LlamaConfig, GgufError> {
        let arch = f.get_str("general.architecture")?.to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(GgufError::Key {
                path: f.path().to_path_buf(),
                key: "general.architecture".into(),
                what: format!(
                    "unsupported architecture `{arch}` (supported: {})",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            });
        }
        let k = |name: &str| format!("{arch}.{name}");
        let usize_of = |key: String| -> Result<usize, GgufError> { Ok(f.get_u64(&key)? as usize) };
        let num_layers = usize_of(k("block_count"))?;
        let hidden_dim = usize_of(k("embedding_length"))?;
        let num_heads = usize_of(k("attention.head_count"))?;
        let num_kv_heads = match f.get(&k("attention.head_count_kv")) {
            Some(_) => usize_of(k("attention.head_count_kv"))?,
            None => num_heads,
        };
        let ffn_dim = usize_of(k("feed_forward_length"))?;
        let rms_eps = f.get_f64(&k("attention.layer_norm_rms_epsilon"))? as f32;
        let rope_freq_base = match f.get(&k("rope.freq_base")) {
            Some(_) => f.get_f64(&k("rope.freq_base"))? as f32,
            None => 10000.0,
        };
        let context_len = usize_of(k("context_length"))?;
        let bad = |key: String, what: String| GgufError::Key {
            path: f.path().to_path_buf(),
            key,
            what,
        };
        if num_heads == 0 || hidden_dim % num_heads != 0 {
            return Err(bad(
                k("attention.head_count"),
                format!("{num_heads} heads do not divide width {hidden_dim}"),
            ));
        }
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(bad(
                k("attention.head_count_kv"),
                format!("{num_kv_heads} KV heads do not divide {num_heads} heads"),
            ));
        }
        let head_dim = hidden_dim / num_heads;
        let rope_dim = match f.get(&k("rope.dimension_count")) {
            Some(_) => usize_of(k("rope.dimension_count"))?,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(bad(
                k("rope.dimension_count"),
                format!("{rope_dim} is odd or larger than head_dim {head_dim}"),
            ));
        }
        if num_layers == 0 || context_len == 0 {
            return Err(bad(
                k("block_count"),
                "model has no layers or no context".into(),
            ));
        }
        let vocab_size = match f.get(&k("vocab_size")) {
            Some(_) => usize_of(k("vocab_size"))?,
            None => f.get_array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(LlamaConfig {
            architecture: arch,
            num_layers,
            hidden_dim,
            num_heads,
            num_kv_heads,
            head_dim,
            ffn_dim,
            rms_eps,
            rope_freq_base,
            rope_dim,
            context_len,
            vocab_size,
        })
    }

    /// Width of the K (or V) projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}
