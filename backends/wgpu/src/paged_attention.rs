//! [`AttentionOps`] on the device: `shaders/paged_attention.wgsl`.

use pagoda_backend::{AttentionDims, AttentionOps, BackendError, BufRef, KvLayerRef, Result};

use crate::WgpuBackend;
use crate::kernels::Shader;
use crate::kv_cache::{kv_args, kv_params};
use crate::tensor_ops::{need, u32_of};

/// Largest head_dim the shader holds (`q_s`, two output elements an invocation).
const MAX_HEAD_DIM: usize = 128;
/// Most query heads per KV head (the shader's per-invocation state; the CPU's limit too).
const MAX_GROUP: usize = 8;

impl AttentionOps for WgpuBackend {
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
        if d.num_tokens == 0 || d.num_heads == 0 {
            return Ok(());
        }
        let l = cache.layout;
        if l.head_dim > MAX_HEAD_DIM
            || l.num_kv_heads == 0
            || !d.num_heads.is_multiple_of(l.num_kv_heads)
            || d.num_heads / l.num_kv_heads > MAX_GROUP
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!(
                    "head_dim {} (at most {MAX_HEAD_DIM}), {} heads over {} KV heads \
                     (at most {MAX_GROUP} a KV head)",
                    l.head_dim, d.num_heads, l.num_kv_heads
                ),
            });
        }
        if d.num_seqs == 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: "tokens but no sequences".into(),
            });
        }
        let (mut args, pieces) = kv_args(OP, &cache, self.max_storage_buffers())?;
        let rows = (d.num_tokens * d.num_heads * l.head_dim * 4) as u64;
        need(OP, "q", q, rows)?;
        need(OP, "out", out, rows)?;
        need(OP, "positions", positions, (d.num_tokens * 4) as u64)?;
        need(
            OP,
            "block_tables",
            block_tables,
            (d.num_seqs * d.max_blocks_per_seq * 4) as u64,
        )?;
        need(OP, "context_lens", context_lens, (d.num_seqs * 4) as u64)?;
        need(
            OP,
            "query_start_locs",
            query_start_locs,
            ((d.num_seqs + 1) * 4) as u64,
        )?;
        args.extend([
            (1, q),
            (2, out),
            (3, positions),
            (4, block_tables),
            (5, context_lens),
            (6, query_start_locs),
        ]);
        let mut params = vec![
            u32_of(OP, d.num_tokens)?,
            u32_of(OP, d.num_seqs)?,
            u32_of(OP, d.num_heads)?,
            u32_of(OP, d.max_blocks_per_seq)?,
            d.scale.to_bits(),
        ];
        let kv = kv_params(OP, &cache)?;
        // The dtype code (kv_params' last word) is also the pipeline's KV_DT.
        let dtype = kv[5];
        params.extend(kv);
        let group = u32_of(OP, d.num_heads / l.num_kv_heads)?;
        self.shared.dispatch(
            OP,
            Shader::PagedAttention(pieces, u32_of(OP, l.head_dim)?, group, dtype),
            "paged_attention",
            &args,
            &params,
            u32_of(OP, d.num_tokens * l.num_kv_heads)?,
        )
    }
}
