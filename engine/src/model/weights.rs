//! Model weights in device memory: pool blocks (tag `weights`), one per
//! tensor, or one per row piece for a tensor above the device's largest binding.

use pagoda_backend::{Backend, Block, BufRef, DType, MemoryTag, Pool};

use crate::error::{EngineError, Result};
use crate::gguf::{GgufError, GgufFile, TensorInfo};
use crate::model::config::LlamaConfig;

/// One row range of a weight tensor in its own buffer: tensors above the
/// device's largest binding are split into pieces of whole rows.
#[derive(Debug)]
pub struct WeightPiece {
    /// (rows, k) in the tensor's dtype, as the backend prepared it.
    pub block: Block,
    /// First row of the tensor held here.
    pub first_row: usize,
    /// Rows held here.
    pub rows: usize,
}

/// A weight tensor in device memory.
#[derive(Debug)]
pub struct Tensor {
    /// Row pieces in order (one unless the tensor exceeds a binding).
    pub pieces: Vec<WeightPiece>,
    /// Element type.
    pub dtype: DType,
    /// GGUF shape: `[k, rows]` for matrices (innermost first), `[dim]` for norms.
    pub shape: Vec<usize>,
}

impl Tensor {
    /// The whole tensor, for tensors of one piece (norms, and every tensor
    /// below the binding limit).
    pub fn buf(&self) -> BufRef {
        self.pieces.first().map_or(BufRef::EMPTY, |p| p.block.buf())
    }

    /// Elements per row (`shape[0]`).
    pub fn cols(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }
}

/// Rows per piece of a `(rows, cols)` tensor of `dtype` under a binding limit.
pub fn rows_per_piece(dtype: DType, rows: usize, cols: usize, max_binding_bytes: u64) -> usize {
    let row = dtype.row_bytes(cols).unwrap_or(1).max(1) as u64;
    ((max_binding_bytes / row) as usize).clamp(1, rows.max(1))
}

/// `(first_row, rows)` of each piece.
fn pieces_of(dtype: DType, shape: &[usize], max_binding_bytes: u64) -> Vec<(usize, usize)> {
    let cols = shape.first().copied().unwrap_or(0);
    let rows: usize = shape.iter().skip(1).product::<usize>().max(1);
    let per = rows_per_piece(dtype, rows, cols, max_binding_bytes);
    (0..rows.div_ceil(per))
        .map(|i| (i * per, per.min(rows - i * per)))
        .collect()
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

    /// The expected tensors plus `output.weight` when the file has one (untied head):
    /// (name, shape, must be f32).
    fn in_file(f: &GgufFile, cfg: &LlamaConfig) -> Vec<(String, Vec<usize>, bool)> {
        let mut names = Self::expected(cfg);
        if f.tensor("output.weight").is_some() {
            names.push((
                "output.weight".into(),
                vec![cfg.hidden_dim, cfg.vocab_size],
                false,
            ));
        }
        names
    }

    /// Bytes the weights will take on `backend` (after its weight
    /// preparation, over the tensors' pieces): the memory plan's figure.
    pub fn planned_bytes<B: Backend>(f: &GgufFile, cfg: &LlamaConfig, backend: &B) -> Result<u64> {
        let mut total = 0u64;
        for (name, shape, must_f32) in Self::in_file(f, cfg) {
            let (t, dtype) = check(f, &name, &shape, must_f32)?;
            if !backend.info().supports_weight(dtype) {
                return Err(unsupported(backend.info(), &name, dtype));
            }
            total += prepared_bytes(backend, &name, dtype, &t.shape)?;
        }
        Ok(total)
    }

    /// Uploads every tensor into `pool` blocks tagged `weights`.
    ///
    /// Every tensor is checked first (present, shape, a type the engine has
    /// and the backend supports), so a file with an unsupported tensor type
    /// is refused, naming the tensor and type, before anything is uploaded.
    pub fn load<B: Backend>(
        f: &GgufFile,
        cfg: &LlamaConfig,
        backend: &B,
        pool: &Pool,
    ) -> Result<LlamaWeights> {
        let info = backend.info();
        for (name, shape, must_f32) in Self::in_file(f, cfg) {
            let (_, dtype) = check(f, &name, &shape, must_f32)?;
            if !info.supports_weight(dtype) {
                return Err(unsupported(info, &name, dtype));
            }
        }
        let load = |name: &str| -> Result<Tensor> {
            let t = f.tensor(name).ok_or_else(|| missing(f, name))?;
            let dtype = t.require_dtype(f.path())?;
            let data = f.tensor_data(t);
            let cols = t.shape.first().copied().unwrap_or(0);
            let row_bytes = dtype.row_bytes(cols).unwrap_or(0);
            let mut pieces = Vec::new();
            for (first_row, rows) in pieces_of(dtype, &t.shape, info.max_binding_bytes) {
                let bytes = prepared_bytes(backend, name, dtype, &[cols, rows])?;
                let block = pool.alloc_labeled(bytes, MemoryTag::Weights, name)?;
                let src = &data[first_row * row_bytes..(first_row + rows) * row_bytes];
                backend.upload_weight(block.buf(), src, dtype, rows, cols)?;
                pieces.push(WeightPiece {
                    block,
                    first_row,
                    rows,
                });
            }
            Ok(Tensor {
                pieces,
                dtype,
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
            Some(_) => Some(load("output.weight")?),
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

/// Device bytes of a tensor after the backend prepares it, over its pieces.
fn prepared_bytes<B: Backend>(
    backend: &B,
    name: &str,
    dtype: DType,
    shape: &[usize],
) -> Result<u64> {
    let cols = shape.first().copied().unwrap_or(0);
    let mut total = 0u64;
    for (_, rows) in pieces_of(dtype, shape, backend.info().max_binding_bytes) {
        total += backend
            .prepared_weight_bytes(dtype, rows, cols)
            .ok_or_else(|| unsupported(backend.info(), name, dtype))?;
    }
    Ok(total)
}

/// The backend cannot multiply by (or hold) weights of `dtype`.
fn unsupported(info: &pagoda_backend::BackendInfo, name: &str, dtype: DType) -> EngineError {
    let list: Vec<String> = info
        .weight_dtypes
        .iter()
        .map(|d| d.name().to_ascii_uppercase())
        .collect();
    EngineError::Backend(pagoda_backend::BackendError::Unsupported {
        op: "matmul",
        dtype: format!(
            "{} (tensor `{name}`; the {} backend computes with {})",
            dtype.name().to_ascii_uppercase(),
            info.name,
            list.join(", ")
        ),
    })
}

fn missing(f: &GgufFile, name: &str) -> EngineError {
    GgufError::Tensor {
        path: f.path().to_path_buf(),
        name: name.into(),
        what: "missing from the file".into(),
    }
    .into()
}

/// Checks that tensor `name` is present with `shape` and a type the engine
/// has (f32 where `must_f32`), returning it and that type.
fn check<'a>(
    f: &'a GgufFile,
    name: &str,
    shape: &[usize],
    must_f32: bool,
) -> Result<(&'a TensorInfo, DType)> {
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
    let dtype = t.require_dtype(f.path())?;
    if must_f32 && dtype != DType::F32 {
        return Err(err(format!("type {dtype}, expected f32")));
    }
    Ok((t, dtype))
}

#[cfg(test)]
mod tests;
