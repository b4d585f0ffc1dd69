//! Causal, ragged, GQA attention over the paged KV cache.
//!
//! One task is one (query token, KV head): the K and V rows of that head are
//! decoded once and used by every query head of its group. Keys are visited in
//! position order `0 ..= pos`, whatever pages hold them, in chunks of
//! [`CHUNK`] with an online softmax, so results depend only on the data, not
//! on page ids or batch composition. No heap allocation: all scratch is on the stack.

use pagoda_backend::quant::dequantize_row;
use pagoda_backend::{BackendError, KvLayout, Result};

/// Largest head dimension supported.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest number of query heads per KV head.
pub const MAX_GROUP: usize = 8;
/// Keys scored between two softmax rescales.
pub const CHUNK: usize = 32;

/// Arguments of one attention call, as host slices.
pub struct AttentionArgs<'a> {
    /// (num_tokens, num_heads, head_dim)
    pub q: &'a [f32],
    /// One layer arena.
    pub cache: &'a [u8],
    /// The cache layout.
    pub layout: &'a KvLayout,
    /// (num_tokens)
    pub positions: &'a [u32],
    /// (num_seqs, max_blocks_per_seq)
    pub block_tables: &'a [u32],
    /// (num_seqs)
    pub context_lens: &'a [u32],
    /// (num_seqs + 1)
    pub query_start_locs: &'a [u32],
    /// Query heads.
    pub num_heads: usize,
    /// Width of a block-table row.
    pub max_blocks_per_seq: usize,
    /// Softmax scale.
    pub scale: f32,
}

impl AttentionArgs<'_> {
    /// Checks shapes and that every position a query may read is covered by
    /// its block table and its context length.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| {
            Err(BackendError::InvalidArgument {
                op: "paged_attention",
                detail,
            })
        };
        let l = self.layout;
        if l.head_dim > MAX_HEAD_DIM || l.num_kv_heads == 0 || self.num_heads % l.num_kv_heads != 0
        {
            return bad(format!(
                "unsupported heads {} / kv heads {} / head_dim {}",
                self.num_heads, l.num_kv_heads, l.head_dim
            ));
        }
        if self.num_heads / l.num_kv_heads > MAX_GROUP {
            return bad(format!("GQA group larger than {MAX_GROUP}"));
        }
        let num_seqs = self.context_lens.len();
        if self.query_start_locs.len() != num_seqs + 1
            || self.block_tables.len() != num_seqs * self.max_blocks_per_seq
        {
            return bad("query_start_locs / block_tables do not match context_lens".into());
        }
        for s in 0..num_seqs {
            let (a, b) = (
                self.query_start_locs[s] as usize,
                self.query_start_locs[s + 1] as usize,
            );
            let ctx = self.context_lens[s] as usize;
            if a > b
                || b > self.positions.len()
                || ctx.div_ceil(l.page_size) > self.max_blocks_per_seq
            {
                return bad(format!(
                    "sequence {s}: bad query range {a}..{b} or context {ctx}"
                ));
            }
            for t in a..b {
                if self.positions[t] as usize >= ctx {
                    return bad(format!(
                        "token {t} at position {} beyond context length {ctx}",
                        self.positions[t]
                    ));
                }
            }
            for &p in &self.block_tables[s * self.max_blocks_per_seq..][..ctx.div_ceil(l.page_size)]
            {
                if p as usize >= l.num_pages {
                    return bad(format!(
                        "sequence {s}: page {p} outside {} pages",
                        l.num_pages
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Computes the output rows of (token `t` in sequence `s`, KV head `kvh`):
/// out: (group, head_dim) for query heads `kvh*group .. (kvh+1)*group`.
pub fn attend(args: &AttentionArgs<'_>, s: usize, t: usize, kvh: usize, out: &mut [f32]) {
    let l = args.layout;
    let hd = l.head_dim;
    let group = args.num_heads / l.num_kv_heads;
    let row = l.row_bytes();
    let table = &args.block_tables[s * args.max_blocks_per_seq..(s + 1) * args.max_blocks_per_seq];
    let n_keys = args.positions[t] as usize + 1;

    let mut m = [f32::NEG_INFINITY; MAX_GROUP];
    let mut denom = [0f32; MAX_GROUP];
    let mut acc = [[0f32; MAX_HEAD_DIM]; MAX_GROUP];
    let mut scores = [[0f32; CHUNK]; MAX_GROUP];
    let mut krow = [0f32; MAX_HEAD_DIM];
    let q = |g: usize| {
        let h = kvh * group + g;
        &args.q[(t * args.num_heads + h) * hd..(t * args.num_heads + h + 1) * hd]
    };

    let mut c0 = 0;
    while c0 < n_keys {
        let cn = CHUNK.min(n_keys - c0);
        for i in 0..cn {
            let p = c0 + i;
            let off = l.row_offset(table[p / l.page_size] as usize, 0, p % l.page_size, kvh);
            // Shapes were validated; a decode error cannot happen for a valid layout.
            let _ = dequantize_row(l.dtype, &args.cache[off..off + row], &mut krow[..hd]);
            for g in 0..group {
                let qg = q(g);
                let mut dot = 0f32;
                for d in 0..hd {
                    dot = qg[d].mul_add(krow[d], dot);
                }
                scores[g][i] = dot * args.scale;
            }
        }
        for g in 0..group {
            let cmax = scores[g][..cn]
                .iter()
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let new_m = m[g].max(cmax);
            let corr = (m[g] - new_m).exp();
            denom[g] *= corr;
            for a in acc[g][..hd].iter_mut() {
                *a *= corr;
            }
            for sc in scores[g][..cn].iter_mut() {
                *sc = (*sc - new_m).exp();
                denom[g] += *sc;
            }
            m[g] = new_m;
        }
        for i in 0..cn {
            let p = c0 + i;
            let off = l.row_offset(table[p / l.page_size] as usize, 1, p % l.page_size, kvh);
            let _ = dequantize_row(l.dtype, &args.cache[off..off + row], &mut krow[..hd]);
            for g in 0..group {
                let w = scores[g][i];
                for d in 0..hd {
                    acc[g][d] = w.mul_add(krow[d], acc[g][d]);
                }
            }
        }
        c0 += cn;
    }
    for g in 0..group {
        let inv = 1.0 / denom[g];
        for d in 0..hd {
            out[g * hd + d] = acc[g][d] * inv;
        }
    }
}
