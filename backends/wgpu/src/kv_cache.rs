//! [`KvCacheOps`] on the device: `shaders/kv_cache.wgsl` (`write_kv`, `copy_pages`); the
//! fused `rope_write_kv` is `rope.wgsl` on q and k, then `write_kv` (bit-identical to the
//! unfused sequence).

use pagoda_backend::{BackendError, BufRef, DType, KvCacheOps, KvLayerRef, Result, RopeKvDims};

use crate::kernels::{Arg, MAX_BOUND_PIECES, Shader};
use crate::tensor_ops::{need, u32_of};
use crate::{WgpuBackend, dtype_code};

/// The layer's page table and pieces as dispatch arguments (bindings 7, 8 ..), and the
/// piece count the shader is specialised for; checks the row layout the shaders assume.
pub(crate) fn kv_args(
    op: &'static str,
    cache: &KvLayerRef<'_>,
    max_storage_buffers: u32,
) -> Result<(Vec<Arg>, u32)> {
    let l = &cache.layout;
    // Bindings 0 ..= 7 come first.
    let most = MAX_BOUND_PIECES.min((max_storage_buffers as usize).saturating_sub(8));
    if cache.pieces.is_empty() || cache.pieces.len() > most {
        return Err(BackendError::InvalidArgument {
            op,
            detail: format!(
                "{} arena pieces (this adapter's shaders bind 1 ..= {most})",
                cache.pieces.len()
            ),
        });
    }
    let row = l.row_bytes();
    let word_rows = l.dtype == DType::Q8_0 || row.is_multiple_of(4);
    if row == 0 || !word_rows || !l.head_dim.is_multiple_of(2) {
        return Err(BackendError::Unsupported {
            op,
            dtype: format!(
                "{} KV rows of head_dim {} (not whole words)",
                l.dtype, l.head_dim
            ),
        });
    }
    need(op, "page table", cache.page_table, (l.num_pages * 8) as u64)?;
    let mut args = vec![(7, cache.page_table)];
    for (i, p) in cache.pieces.iter().enumerate() {
        args.push((8 + i as u32, *p));
    }
    Ok((args, cache.pieces.len() as u32))
}

/// (page_size, kv_heads, head_dim, row_bytes, page_bytes, dtype) as kernel parameters.
pub(crate) fn kv_params(op: &'static str, cache: &KvLayerRef<'_>) -> Result<[u32; 6]> {
    let l = &cache.layout;
    if !matches!(l.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0) {
        return Err(BackendError::Unsupported {
            op,
            dtype: l.dtype.to_string(),
        });
    }
    Ok([
        u32_of(op, l.page_size)?,
        u32_of(op, l.num_kv_heads)?,
        u32_of(op, l.head_dim)?,
        u32_of(op, l.row_bytes())?,
        u32_of(op, l.page_bytes())?,
        dtype_code(op, l.dtype)?,
    ])
}

impl KvCacheOps for WgpuBackend {
    fn write_kv(
        &self,
        cache: KvLayerRef<'_>,
        k: BufRef,
        v: BufRef,
        slot_mapping: BufRef,
        num_tokens: usize,
    ) -> Result<()> {
        const OP: &str = "write_kv";
        if num_tokens == 0 {
            return Ok(());
        }
        let l = cache.layout;
        if !matches!(l.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0) {
            return Err(BackendError::Unsupported {
                op: OP,
                dtype: l.dtype.to_string(),
            });
        }
        let (mut args, pieces) = kv_args(OP, &cache, self.max_storage_buffers())?;
        let rows = (num_tokens * l.num_kv_heads * l.head_dim * 4) as u64;
        need(OP, "k", k, rows)?;
        need(OP, "v", v, rows)?;
        need(OP, "slot_mapping", slot_mapping, (num_tokens * 4) as u64)?;
        args.extend([(1, k), (2, v), (3, slot_mapping)]);
        let mut params = vec![u32_of(OP, num_tokens)?];
        params.extend(kv_params(OP, &cache)?);
        let words = num_tokens * 2 * l.num_kv_heads * (l.row_bytes() / 4 + 2);
        self.shared.dispatch(
            OP,
            Shader::KvCache(pieces),
            "write_kv",
            &args,
            &params,
            u32_of(OP, words.div_ceil(256))?,
        )
    }

    fn rope_write_kv(
        &self,
        q: BufRef,
        k: BufRef,
        v: BufRef,
        positions: BufRef,
        slot_mapping: BufRef,
        cache: KvLayerRef<'_>,
        dims: RopeKvDims,
    ) -> Result<()> {
        if dims.num_tokens == 0 {
            return Ok(());
        }
        self.rope_dispatch(q, positions, dims.rope(false))?;
        self.rope_dispatch(k, positions, dims.rope(true))?;
        self.write_kv(cache, k, v, slot_mapping, dims.num_tokens)
    }

    fn copy_pages(&self, cache: KvLayerRef<'_>, pairs: &[(u32, u32)]) -> Result<()> {
        const OP: &str = "copy_pages";
        if pairs.is_empty() {
            return Ok(());
        }
        let l = cache.layout;
        if let Some(&(s, d)) = pairs
            .iter()
            .find(|&&(s, d)| s as usize >= l.num_pages || d as usize >= l.num_pages)
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!("pair ({s}, {d}) outside {} pages", l.num_pages),
            });
        }
        let (mut args, pieces) = kv_args(OP, &cache, self.max_storage_buffers())?;
        // The pairs go to the device in a scratch buffer of their own.
        let flat: Vec<u32> = pairs.iter().flat_map(|&(s, d)| [s, d]).collect();
        let scratch = self.scratch(OP, bytemuck::cast_slice(&flat))?;
        args.push((3, scratch.buf));
        let words = pairs.len() * l.page_bytes() / 4;
        self.shared.dispatch(
            OP,
            Shader::KvCache(pieces),
            "copy_pages",
            &args,
            &[u32_of(OP, pairs.len())?, u32_of(OP, l.page_bytes())?],
            u32_of(OP, words.div_ceil(256))?,
        )
    }
}
