//! Model weights in device memory: one pool block (tag `weights`) per tensor.

use pagoda_backend::{Backend, Block, BufRef, DType, MemoryTag, Pool};

use crate::error::{EngineError, Result};
use crate::gguf::{GgufError, GgufFile, TensorInfo};
use crate::model::config::LlamaConfig;

/// A tensor in device memory.
#[derive(Debug)]
pub struct Tensor {
    /// The block holding the data.
    pub block: Block,
    /// Element type.
    pub dtype: DType,
    /// Shape, `ne0` (contiguous) first, as in GGUF.
    pub shape: Vec<usize>,
}

impl Tensor {
    /// The data's device range.
    pub fn buf(&self) -> BufRef {
        self.block.buf()
    }
}

/// Weights of one transformer block. Matrices are (out, in) row-major, i.e. GGUF shape [in, out].
#[derive(Debug)]
pub struct LayerWeights {
    /// (hidden) f32
    pub attn_norm: Tensor,
    /// (heads*head_dim, hidden)
    pub wq: Tensor,
    /// (kv_heads*head_dim, hidden)
    pub wk: Tensor,
    /// (kv_heads*head_dim, hidden)
    pub wv: Tensor,
    /// (hidden, heads*head_dim)
    pub wo: Tensor,
    /// (hidden) f32
    pub ffn_norm: Tensor,
    /// (ffn, hidden)
    pub w_gate: Tensor,
    /// (ffn, hidden)
    pub w_up: Tensor,
    /// (hidden, ffn)
    pub w_down: Tensor,
}

/// All weights of a Llama model.
#[derive(Debug)]
pub struct LlamaWeights {
    /// (vocab, hidden)
    pub tok_embd: Tensor,
    /// (hidden) f32
    pub output_norm: Tensor,
    /// (vocab, hidden); `None` when the output head is tied to `tok_embd`.
    pub output: Option<Tensor>,
    /// Transformer blocks.
    pub layers: Vec<LayerWeights>,
}

impl LlamaWeights {
    /// The output head: `output.weight`, or the tied embedding.
    pub fn output_head(&self) -> &Tensor {
        self.output.as_ref().unwrap_or(&self.tok_embd)
    }

    /// Names and expected GGUF shapes of every tensor the model needs, with
    /// whether it must be f32 (norms). `output.weight` is optional.
    pub fn expected(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>, bool)> {
        let (h, q, kv, f, v) = (
            cfg.hidden_dim,
            cfg.num_heads * cfg.head_dim,
            cfg.kv_dim(),
            cfg.ffn_dim,
            cfg.vocab_size,
        );
        let mut e = vec![
            ("token_embd.weight".to_string(), vec![h, v], false),
            ("output_norm.weight".to_string(), vec![h], true),
        ];
        for l in 0..cfg.num_layers {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            e.push((p("attn_norm"), vec![h], true));
            e.push((p("attn_q"), vec![h, q], false));
            e.push((p("attn_k"), vec![h, kv], false));
            e.push((p("attn_v"), vec![h, kv], false));
            e.push((p("attn_output"), vec![q, h], false));
            e.push((p("ffn_norm"), vec![h], true));
            e.push((p("ffn_gate"), vec![h, f], false));
            e.push((p("ffn_up"), vec![h, f], false));
            e.push((p("ffn_down"), vec![f, h], false));
        }
        e
    }

    /// Bytes the weights take in device memory (before loading; for the memory plan).
    pub fn planned_bytes(f: &GgufFile, cfg: &LlamaConfig) -> Result<u64> {
        let mut total = 0u64;
        for (name, shape, must_f32) in Self::expected(cfg) {
            total += check(f, &name, &shape, must_f32)?.bytes as u64;
        }
        if let Some(t) = f.tensor("output.weight") {
            total += check(f, "output.weight", &[cfg.hidden_dim, cfg.vocab_size], false)
                .map(|_| t.bytes as u64)?;
        }
        Ok(total)
    }

    /// Uploads every tensor into `pool` blocks tagged `weights`.
    pub fn load<B: Backend>(
        f: &GgufFile,
        cfg: &LlamaConfig,
        backend: &B,
        pool: &Pool,
    ) -> Result<LlamaWeights> {
        for (name, shape, must_f32) in Self::expected(cfg) {
            check(f, &name, &shape, must_f32)?;
        }
        let info = backend.info();
        let load = |name: &str| -> Result<Tensor> {
            let t = f.tensor(name).ok_or_else(|| missing(f, name))?;
            if !info.supports_weight(t.dtype) {
                return Err(EngineError::Backend(
                    pagoda_backend::BackendError::Unsupported {
                        op: "matmul",
                        dtype: format!("{} (tensor {name})", t.dtype),
                    },
                ));
            }
            let block = pool.alloc_labeled(t.bytes as u64, MemoryTag::Weights, name)?;
            backend.upload(block.buf(), f.tensor_data(t))?;
            Ok(Tensor {
                block,
                dtype: t.dtype,
                shape: t.shape.clone(),
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            layers.push(LayerWeights {
                attn_norm: load(&p("attn_norm"))?,
                wq: load(&p("attn_q"))?,
                wk: load(&p("attn_k"))?,
                wv: load(&p("attn_v"))?,
                wo: load(&p("attn_output"))?,
                ffn_norm: load(&p("ffn_norm"))?,
                w_gate: load(&p("ffn_gate"))?,
                w_up: load(&p("ffn_up"))?,
                w_down: load(&p("ffn_down"))?,
            });
        }
        let output = match f.tensor("output.weight") {
            Some(_) => {
                check(f, "output.weight", &[cfg.hidden_dim, cfg.vocab_size], false)?;
                Some(load("output.weight")?)
            }
            None => None,
        };
        Ok(LlamaWeights {
            tok_embd: load("token_embd.weight")?,
            output_norm: load("output_norm.weight")?,
            output,
            layers,
        })
    }
}

fn missing(f: &GgufFile, name: &str) -> EngineError {
    GgufError::Tensor {
        path: f.path().to_path_buf(),
        name: name.into(),
        what: "missing from the file".into(),
    }
    .into()
}

fn check<'a>(
    f: &'a GgufFile,
    name: &str,
    shape: &[usize],
    must_f32: bool,
) -> Result<&'a TensorInfo> {
    let t = f.tensor(name).ok_or_else(|| missing(f, name))?;
    let err = |what: String| -> EngineError {
        GgufError::Tensor {
            path: f.path().to_path_buf(),
            name: name.into(),
            what,
        }
        .into()
    };
    if t.shape != shape {
        return Err(err(format!("shape {:?}, expected {:?}", t.shape, shape)));
    }
    if must_f32 && t.dtype != DType::F32 {
        return Err(err(format!("type {}, expected f32", t.dtype)));
    }
    Ok(t)
}
