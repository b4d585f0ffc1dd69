//! The activation workspace: every buffer a step needs, allocated once for
//! the largest step and reused every step (no allocation on the hot path).

use pagoda_backend::{Block, MemoryTag, Pool};

use crate::error::Result;
use crate::model::config::LlamaConfig;

/// The largest step the workspace must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceDims {
    /// Tokens per step (the scheduler's token budget).
    pub max_tokens: usize,
    /// Sequences per step.
    pub max_seqs: usize,
    /// Width of a block-table row (`ceil(max_model_len / page_size)`).
    pub max_blocks_per_seq: usize,
    /// Rows of logits per step.
    pub max_logits_rows: usize,
}

/// Activation buffers, each a pool block tagged `activations`. Shapes are the maxima.
#[derive(Debug)]
pub struct Workspace {
    /// The dimensions this workspace was sized for.
    pub dims: WorkspaceDims,
    /// (T) u32
    pub ids: Block,
    /// (T) u32
    pub positions: Block,
    /// (T) u32
    pub slots: Block,
    /// (S, max_blocks_per_seq) u32
    pub block_tables: Block,
    /// (S) u32
    pub context_lens: Block,
    /// (S + 1) u32
    pub query_start_locs: Block,
    /// (L) u32
    pub logits_indices: Block,
    /// (T, hidden) f32 residual stream
    pub x: Block,
    /// (T, hidden) f32 normed input
    pub h: Block,
    /// (T, heads*head_dim) f32
    pub q: Block,
    /// (T, kv_heads*head_dim) f32
    pub k: Block,
    /// (T, kv_heads*head_dim) f32
    pub v: Block,
    /// (T, heads*head_dim) f32
    pub attn: Block,
    /// (T, hidden) f32 projection output
    pub o: Block,
    /// (T, ffn) f32
    pub gate: Block,
    /// (T, ffn) f32
    pub up: Block,
    /// (T, ffn) f32
    pub act: Block,
    /// (L, hidden) f32 gathered rows
    pub last: Block,
    /// (L, hidden) f32 normed gathered rows
    pub last_norm: Block,
    /// (L, vocab) f32
    pub logits: Block,
}

/// (name, bytes) of every workspace buffer, in allocation order.
fn sizes(cfg: &LlamaConfig, d: &WorkspaceDims) -> [(&'static str, u64); 20] {
    let (t, s, l) = (
        d.max_tokens as u64,
        d.max_seqs as u64,
        d.max_logits_rows as u64,
    );
    let f = 4u64;
    let hid = cfg.hidden_dim as u64;
    let qd = (cfg.num_heads * cfg.head_dim) as u64;
    let kvd = cfg.kv_dim() as u64;
    let ffn = cfg.ffn_dim as u64;
    [
        ("ids", t * 4),
        ("positions", t * 4),
        ("slots", t * 4),
        ("block_tables", s * d.max_blocks_per_seq as u64 * 4),
        ("context_lens", s * 4),
        ("query_start_locs", (s + 1) * 4),
        ("logits_indices", l * 4),
        ("x", t * hid * f),
        ("h", t * hid * f),
        ("q", t * qd * f),
        ("k", t * kvd * f),
        ("v", t * kvd * f),
        ("attn", t * qd * f),
        ("o", t * hid * f),
        ("gate", t * ffn * f),
        ("up", t * ffn * f),
        ("act", t * ffn * f),
        ("last", l * hid * f),
        ("last_norm", l * hid * f),
        ("logits", l * cfg.vocab_size as u64 * f),
    ]
}

impl Workspace {
    /// Bytes the workspace needs (for the memory plan), before pool rounding.
    pub fn planned_bytes(cfg: &LlamaConfig, dims: &WorkspaceDims) -> u64 {
        sizes(cfg, dims).iter().map(|(_, b)| b).sum()
    }

    /// Allocates every buffer from `pool`.
    pub fn new(cfg: &LlamaConfig, dims: WorkspaceDims, pool: &Pool) -> Result<Workspace> {
        let s = sizes(cfg, &dims);
        let mut blocks = Vec::with_capacity(s.len());
        for (name, bytes) in s {
            let label = format!("ws.{name}");
            blocks.push(pool.alloc_labeled(bytes, MemoryTag::Activations, &label)?);
        }
        let mut it = blocks.into_iter();
        let mut next = || {
            it.next()
                .ok_or_else(|| crate::error::EngineError::InvalidInput("workspace".into()))
        };
        Ok(Workspace {
            dims,
            ids: next()?,
            positions: next()?,
            slots: next()?,
            block_tables: next()?,
            context_lens: next()?,
            query_start_locs: next()?,
            logits_indices: next()?,
            x: next()?,
            h: next()?,
            q: next()?,
            k: next()?,
            v: next()?,
            attn: next()?,
            o: next()?,
            gate: next()?,
            up: next()?,
            act: next()?,
            last: next()?,
            last_norm: next()?,
            logits: next()?,
        })
    }
}
