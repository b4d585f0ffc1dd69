//! [`AttentionOps`] on the device: `kernels/paged_attention.cu`.

use pagoda_backend::{
    AttentionDims, AttentionOps, BackendError, BufRef, DType, KvLayerRef, Result,
};

use crate::args::Args;
use crate::{CudaBackend, MAX_HEAD_DIM, dtype_code};

impl AttentionOps for CudaBackend {
    fn paged_attention(
        &self,
        q: BufRef,
        cache: KvLayerRef<'_>,
        positions: BufRef,
        block_tables: BufRef,
        context_lens: BufRef,
        query_start_locs: BufRef,
        out: BufRef,
        d: AttentionDims,
    ) -> Result<()> {
        const OP: &str = "paged_attention";
        if d.num_tokens == 0 {
            return Ok(());
        }
        let l = cache.layout;
        if l.head_dim > MAX_HEAD_DIM
            || l.num_kv_heads == 0
            || !d.num_heads.is_multiple_of(l.num_kv_heads)
            || !matches!(l.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q8_0)
            || !l.is_valid()
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!("unsupported heads {} over layout {l:?}", d.num_heads),
            });
        }
        let pieces = self.pieces(&cache, OP)?;
        let qn = d.num_tokens * d.num_heads * l.head_dim;
        let qp = self.ptr32(q, qn, OP)?;
        let pp = self.ptr32(positions, d.num_tokens, OP)?;
        let bp = self.ptr32(block_tables, d.num_seqs * d.max_blocks_per_seq, OP)?;
        let cp = self.ptr32(context_lens, d.num_seqs, OP)?;
        let sp = self.ptr32(query_start_locs, d.num_seqs + 1, OP)?;
        let op = self.ptr32(out, qn, OP)?;
        Args::new()
            .arg(qp)
            .arg(pieces)
            .arg(cache.page_table.addr)
            .arg(pp)
            .arg(bp)
            .arg(cp)
            .arg(sp)
            .arg(op)
            .arg(d.num_tokens as i32)
            .arg(d.num_seqs as i32)
            .arg(d.num_heads as i32)
            .arg(l.num_kv_heads as i32)
            .arg(l.head_dim as i32)
            .arg(l.page_size as i32)
            .arg(l.num_pages as i32)
            .arg(dtype_code(OP, l.dtype)?)
            .arg(d.max_blocks_per_seq as i32)
            .arg(d.scale)
            .launch(
                OP,
                self.func("paged_attention")?,
                (d.num_tokens as u32, d.num_heads as u32, 1),
                256,
                0,
                self.stream(),
            )
    }
}
