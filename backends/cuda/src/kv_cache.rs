//! [`KvCacheOps`] on the device: `kernels/kv_cache.cu` (`write_kv`,
//! `copy_pages`) and `kernels/rope_write_kv.cu` (the fused RoPE + KV write, one launch).

use pagoda_backend::{BackendError, BufRef, DType, KvCacheOps, KvLayerRef, Result, RopeKvDims};

use crate::args::Args;
use crate::{CudaBackend, MAX_HEAD_DIM, SCRATCH_BYTES, dtype_code};

fn check_layout(op: &'static str, cache: &KvLayerRef<'_>) -> Result<()> {
    let l = cache.layout;
    let ok = l.is_valid()
        && l.head_dim <= MAX_HEAD_DIM
        && matches!(l.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0);
    if ok {
        Ok(())
    } else {
        Err(BackendError::InvalidArgument {
            op,
            detail: format!("unsupported KV layout {l:?}"),
        })
    }
}

impl KvCacheOps for CudaBackend {
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
        check_layout(OP, &cache)?;
        let l = cache.layout;
        let pieces = self.pieces(&cache, OP)?;
        let row = num_tokens * l.num_kv_heads * l.head_dim;
        let kp = self.ptr32(k, row, OP)?;
        let vp = self.ptr32(v, row, OP)?;
        let sp = self.ptr32(slot_mapping, num_tokens, OP)?;
        Args::new()
            .arg(pieces)
            .arg(cache.page_table.addr)
            .arg(kp)
            .arg(vp)
            .arg(sp)
            .arg(num_tokens as i32)
            .arg(l.num_kv_heads as i32)
            .arg(l.head_dim as i32)
            .arg(l.page_size as i32)
            .arg(l.num_pages as i32)
            .arg(dtype_code(OP, l.dtype)?)
            .launch(
                OP,
                self.func("write_kv")?,
                (num_tokens as u32, 2, l.num_kv_heads as u32),
                l.head_dim.div_ceil(32) as u32 * 32,
                0,
                self.stream(),
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
        const OP: &str = "rope_write_kv";
        let n = dims.num_tokens;
        if n == 0 {
            return Ok(());
        }
        check_layout(OP, &cache)?;
        let l = cache.layout;
        if dims.head_dim != l.head_dim
            || dims.num_kv_heads != l.num_kv_heads
            || dims.rope_dim > dims.head_dim
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!("{dims:?} does not match the KV layout {l:?}"),
            });
        }
        let pieces = self.pieces(&cache, OP)?;
        let qp = self.ptr32(q, n * dims.num_heads * l.head_dim, OP)?;
        let kp = self.ptr32(k, n * l.num_kv_heads * l.head_dim, OP)?;
        let vp = self.ptr32(v, n * l.num_kv_heads * l.head_dim, OP)?;
        let pp = self.ptr32(positions, n, OP)?;
        let sp = self.ptr32(slot_mapping, n, OP)?;
        Args::new()
            .arg(qp)
            .arg(kp)
            .arg(vp)
            .arg(pp)
            .arg(sp)
            .arg(pieces)
            .arg(cache.page_table.addr)
            .arg(n as i32)
            .arg(dims.num_heads as i32)
            .arg(l.num_kv_heads as i32)
            .arg(l.head_dim as i32)
            .arg(dims.rope_dim as i32)
            .arg(dims.freq_base)
            .arg(l.page_size as i32)
            .arg(l.num_pages as i32)
            .arg(dtype_code(OP, l.dtype)?)
            .launch(
                OP,
                self.func("rope_write_kv")?,
                (n as u32, 1, 1),
                256,
                0,
                self.stream(),
            )
    }

    fn copy_pages(&self, cache: KvLayerRef<'_>, pairs: &[(u32, u32)]) -> Result<()> {
        const OP: &str = "copy_pages";
        if pairs.is_empty() {
            return Ok(());
        }
        check_layout(OP, &cache)?;
        let l = cache.layout;
        if let Some(&(s, d)) = pairs
            .iter()
            .find(|&&(s, d)| s as usize >= l.num_pages || d as usize >= l.num_pages)
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!("page pair ({s}, {d}) outside {} pages", l.num_pages),
            });
        }
        let page_bytes = l.page_bytes() as u64;
        if !page_bytes.is_multiple_of(4) {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!("page of {page_bytes} bytes is not whole words"),
            });
        }
        let pieces = self.pieces(&cache, OP)?;
        // Pairs go through the scratch buffer, a chunk at a time (the stream
        // orders each upload after the kernel that read the previous chunk).
        // Pairs of one launch run at once: a pair whose destination is
        // another pair's source must see the copies before it done, as the
        // CPU's in-order loop does, so chained pairs go one launch each.
        let sources: std::collections::HashSet<u32> = pairs.iter().map(|&(s, _)| s).collect();
        let chained = pairs.iter().any(|&(_, d)| sources.contains(&d));
        let per_chunk = if chained {
            1
        } else {
            (SCRATCH_BYTES / 8) as usize
        };
        let _g = self.lock_scratch();
        // (per_chunk, 2) u32 little-endian, staged on the stack.
        let mut bytes = [0u8; SCRATCH_BYTES as usize];
        for chunk in pairs.chunks(per_chunk) {
            for (b, &(s, d)) in bytes.chunks_exact_mut(8).zip(chunk) {
                b[..4].copy_from_slice(&s.to_le_bytes());
                b[4..].copy_from_slice(&d.to_le_bytes());
            }
            let dev_pairs = self.to_scratch(&bytes[..8 * chunk.len()])?;
            Args::new()
                .arg(pieces)
                .arg(cache.page_table.addr)
                .arg(dev_pairs)
                .arg(chunk.len() as i32)
                .arg(page_bytes)
                .arg(l.num_pages as i32)
                .launch(
                    OP,
                    self.func("copy_pages")?,
                    (chunk.len() as u32, 1, 1),
                    256,
                    0,
                    self.stream(),
                )?;
        }
        Ok(())
    }
}
