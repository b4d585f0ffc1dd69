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
    /// Candidates per row the device's top-k returns at most (`min(vocab, BackendInfo::max_top_k)`).
    pub max_top_k: usize,
}

impl WorkspaceDims {
    /// u32 words of the packed per-step arguments for a step of `n` tokens,
    /// `s` sequences and `l` logits rows (see [`StepArgsLayout`]).
    pub fn step_args_words(&self, n: usize, s: usize, l: usize) -> usize {
        StepArgsLayout::new(n, s, l, self.max_blocks_per_seq).words
    }
}

/// Where each per-step array sits in the one `step_args` buffer (u32 word
/// offsets), for a step shape. The same shape always gives the same
/// offsets, so a padded decode step's kernel arguments are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepArgsLayout {
    /// (n) token ids.
    pub ids: usize,
    /// (n) positions.
    pub positions: usize,
    /// (n) slots.
    pub slots: usize,
    /// (s, width) block tables.
    pub block_tables: usize,
    /// (s) context lengths.
    pub context_lens: usize,
    /// (s + 1) query starts.
    pub query_start_locs: usize,
    /// (l) logits rows.
    pub logits_indices: usize,
    /// Total words.
    pub words: usize,
}

impl StepArgsLayout {
    /// The layout for `n` tokens, `s` sequences, `l` logits rows and block tables `width` wide.
    pub const fn new(n: usize, s: usize, l: usize, width: usize) -> Self {
        let ids = 0;
        let positions = ids + n;
        let slots = positions + n;
        let block_tables = slots + n;
        let context_lens = block_tables + s * width;
        let query_start_locs = context_lens + s;
        let logits_indices = query_start_locs + s + 1;
        StepArgsLayout {
            ids,
            positions,
            slots,
            block_tables,
            context_lens,
            query_start_locs,
            logits_indices,
            words: logits_indices + l,
        }
    }
}

/// Activation buffers, each a pool block tagged `activations`. Shapes are the maxima.
#[derive(Debug)]
pub struct Workspace {
    /// The dimensions this workspace was sized for.
    pub dims: WorkspaceDims,
    /// All per-step host arrays packed as u32 words ([`StepArgsLayout`]),
    /// uploaded once per step: (3T + S·W + 2S + 1 + L) u32.
    pub step_args: Block,
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
    /// (L) u32 argmax of each logits row
    pub sample_ids: Block,
    /// (L, K) f32 top-k candidate logits
    pub topk_values: Block,
    /// (L, K) u32 top-k candidate ids
    pub topk_ids: Block,
}

/// (name, bytes) of every workspace buffer, in allocation order.
fn sizes(cfg: &LlamaConfig, d: &WorkspaceDims) -> [(&'static str, u64); 17] {
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
        (
            "step_args",
            StepArgsLayout::new(t as usize, s as usize, l as usize, d.max_blocks_per_seq).words
                as u64
                * 4,
        ),
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
        ("sample_ids", l * 4),
        ("topk_values", l * d.max_top_k as u64 * f),
        ("topk_ids", l * d.max_top_k as u64 * 4),
    ]
}

impl Workspace {
    /// Bytes the workspace needs (for the memory plan), before pool rounding.
    pub fn planned_bytes(cfg: &LlamaConfig, dims: &WorkspaceDims) -> u64 {
        sizes(cfg, dims)
            .iter()
            .fold(0u64, |acc, (_, b)| acc.saturating_add(*b))
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
            step_args: next()?,
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
            sample_ids: next()?,
            topk_values: next()?,
            topk_ids: next()?,
        })
    }
}
