//! [`AttentionOps`] on the device: `kernels/paged_attention.cu`.

use pagoda_backend::{
    AttentionDims, AttentionOps, BackendError, BufRef, DType, KvLayerRef, Result,
};

use crate::args::Args;
use crate::{ATTN_COUNTER_BYTES, ATTN_PARTIAL_BYTES, CudaBackend, MAX_HEAD_DIM, dtype_code};

/// Token-heads below which a launch splits keys (one wave of the H200's 132 SMs).
const SPLIT_BELOW_BLOCKS: usize = 132;
/// Keys of a chunk (`kernels/paged_attention.cu`'s `PA_CHUNK`): a split launch runs one
/// chunk a block.
const CHUNK_KEYS: usize = 128;

/// Query tokens of a `paged_attention_prefill` tile (`PP_Q`).
const PREFILL_TILE: usize = 8;

/// Whether a launch takes the prefill tiles: sequences average two query tokens or more,
/// head_dim <= 128, K/V rows of at most 512 bytes, and the tiles give every SM 8 blocks or
/// more (one long sequence alone walks its keys faster a query a block: pp512 on the H200,
/// notes/gpu-runs.md). `PAGODA_CUDA_PREFILL_TILES=0|1` decides instead of the block count.
/// Both kernels give the same bits.
fn uses_prefill_tiles(
    tokens: usize,
    seqs: usize,
    heads: usize,
    head_dim: usize,
    row_bytes: usize,
    sms: usize,
) -> bool {
    if !(tokens >= 2 * seqs.max(1) && head_dim <= 128 && row_bytes <= 512) {
        return false;
    }
    match std::env::var("PAGODA_CUDA_PREFILL_TILES").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => tokens.div_ceil(PREFILL_TILE) * heads >= 8 * sms,
    }
}

/// Grid z of a launch: 1 when tokens x heads fill the device (or the partials would not
/// fit), else one block per chunk a sequence can have (`max_keys`). Either gives the same
/// bits (the kernel merges chunks in the same order both ways).
fn splits_for(blocks: usize, max_keys: usize, head_dim: usize) -> usize {
    let chunks = max_keys.div_ceil(CHUNK_KEYS).max(1);
    let bytes = (blocks * chunks * (head_dim + 2) * 4) as u64;
    if blocks == 0
        || blocks >= SPLIT_BELOW_BLOCKS
        || chunks == 1
        || bytes > ATTN_PARTIAL_BYTES
        || (blocks * 4) as u64 > ATTN_COUNTER_BYTES
    {
        1
    } else {
        chunks
    }
}

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
        let code = dtype_code(OP, l.dtype)?;
        // The arguments both kernels start with.
        let shared = || {
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
                .arg(code)
                .arg(d.max_blocks_per_seq as i32)
                .arg(d.scale)
        };
        let row_bytes = l.dtype.row_bytes(l.head_dim).unwrap_or(usize::MAX);
        if uses_prefill_tiles(
            d.num_tokens,
            d.num_seqs,
            d.num_heads,
            l.head_dim,
            row_bytes,
            self.sm_count() as usize,
        ) {
            return shared().launch(
                OP,
                self.func("paged_attention_prefill")?,
                (
                    d.num_tokens.div_ceil(PREFILL_TILE) as u32,
                    d.num_heads as u32,
                    1,
                ),
                256,
                0,
                self.stream(),
            );
        }
        let splits = splits_for(
            d.num_tokens * d.num_heads,
            d.max_blocks_per_seq * l.page_size,
            l.head_dim,
        );
        // The partials and counters are shared: held until the launch is enqueued.
        let _g = (splits > 1).then(|| self.lock_scratch());
        let (partial, counters) = if splits > 1 {
            (self.attn_partials(), self.attn_counters())
        } else {
            (0, 0)
        };
        shared()
            .arg(partial)
            .arg(counters)
            .arg(splits as i32)
            .launch(
                OP,
                self.func("paged_attention")?,
                (d.num_tokens as u32, d.num_heads as u32, splits as u32),
                256,
                0,
                self.stream(),
            )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_tiles_for_many_query_tiles_only() {
        // pp512: one sequence of 512 tokens, 9 heads: 576 tile blocks < 8 x 132.
        assert!(!uses_prefill_tiles(512, 1, 9, 64, 128, 132));
        // 16 prompts of 128 tokens: 2,304 tile blocks.
        assert!(uses_prefill_tiles(2048, 16, 9, 64, 128, 132));
        // decode (one token a sequence), wide heads, wide rows: never.
        assert!(!uses_prefill_tiles(64, 64, 9, 64, 128, 132));
        assert!(!uses_prefill_tiles(4096, 2, 32, 256, 512, 132));
        assert!(!uses_prefill_tiles(4096, 2, 32, 128, 1024, 132));
    }

    #[test]
    fn splits_only_for_short_batches_and_fit_the_partials() {
        assert_eq!(splits_for(128 * 9, 4096, 64), 1);
        assert_eq!(splits_for(9, 4096, 64), 32);
        assert_eq!(splits_for(9, 129, 64), 2);
        assert_eq!(splits_for(9, 128, 64), 1);
        assert_eq!(splits_for(32, 4096, 128), 32);
        assert_eq!(splits_for(100, 1 << 20, 256), 1);
        for (blocks, hd) in [(1, 256), (9, 64), (100, 256), (131, 256)] {
            for keys in [1, 200, 4096, 100_000] {
                let s = splits_for(blocks, keys, hd);
                assert!(s == 1 || (blocks * s * (hd + 2) * 4) as u64 <= ATTN_PARTIAL_BYTES);
            }
        }
    }
}
