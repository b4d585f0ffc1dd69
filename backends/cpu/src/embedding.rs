//! Embedding lookup: one row of the table per token id, as f32.

use pagoda_backend::quant::dequantize_row;
use pagoda_backend::{BackendError, DType, Result};

/// table: (vocab, dim) in `dtype`; ids: (n); out: (n, dim) f32.
pub fn embedding(
    table: &[u8],
    dtype: DType,
    ids: &[u32],
    out: &mut [f32],
    dim: usize,
) -> Result<()> {
    let row_bytes = dtype
        .row_bytes(dim)
        .ok_or_else(|| BackendError::InvalidArgument {
            op: "embedding",
            detail: format!("dim {dim} is not a multiple of the {dtype} block size"),
        })?;
    let vocab = table.len() / row_bytes.max(1);
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab {
            return Err(BackendError::InvalidArgument {
                op: "embedding",
                detail: format!("token id {id} outside the vocabulary of {vocab}"),
            });
        }
        dequantize_row(
            dtype,
            &table[id * row_bytes..(id + 1) * row_bytes],
            &mut out[i * dim..(i + 1) * dim],
        )?;
    }
    Ok(())
}
