//! Embedding lookup: one row of the table per token id, as f32.

use pagoda_backend::quant::dequantize_row;
use pagoda_backend::{BackendError, DType, EmbeddingDims, Result};

/// table: (num_rows, dim) in `dtype`, rows `first_row ..` of the whole
/// table; ids: (n); out: (n, dim) f32. Ids outside this piece are skipped.
pub fn embedding(
    table: &[u8],
    dtype: DType,
    ids: &[u32],
    out: &mut [f32],
    d: EmbeddingDims,
) -> Result<()> {
    let dim = d.dim;
    let row_bytes = dtype
        .row_bytes(dim)
        .ok_or_else(|| BackendError::InvalidArgument {
            op: "embedding",
            detail: format!("dim {dim} is not a multiple of the {dtype} block size"),
        })?;
    if table.len() < d.num_rows * row_bytes {
        return Err(BackendError::InvalidArgument {
            op: "embedding",
            detail: format!(
                "a table piece of {} bytes for {} rows",
                table.len(),
                d.num_rows
            ),
        });
    }
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= d.vocab {
            return Err(BackendError::InvalidArgument {
                op: "embedding",
                detail: format!("token id {id} outside the vocabulary of {}", d.vocab),
            });
        }
        if id < d.first_row || id >= d.first_row + d.num_rows {
            continue;
        }
        let r = id - d.first_row;
        dequantize_row(
            dtype,
            &table[r * row_bytes..(r + 1) * row_bytes],
            &mut out[i * dim..(i + 1) * dim],
        )?;
    }
    Ok(())
}
