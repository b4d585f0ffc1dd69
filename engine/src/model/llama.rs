//! The Llama forward pass over one step shape, on any backend.
//!
//! Per layer, seven ops (the fused contract ops):
//! 1. RMSNorm + Q/K/V projections ([`pagoda_backend::TensorOps::rms_norm_matmul`]),
//! 2. RoPE (NORM mode) + KV write at `slot_mapping` ([`pagoda_backend::KvCacheOps::rope_write_kv`]),
//! 3. paged attention through the block tables,
//! 4. output projection accumulated into the residual stream,
//! 5. RMSNorm + gate/up projections,
//! 6. SiLU(gate)·up,
//! 7. down projection accumulated into the residual stream.
//!
//! Then the rows in `logits_indices` are gathered, normed and projected to
//! the vocabulary. The forward reads its per-step arrays from the packed
//! `step_args` buffer at offsets that depend only on the [`StepShape`], and
//! every other buffer is a fixed workspace slice: two steps of one shape
//! make the same calls with the same arguments (what a graph replays).

use pagoda_backend::{
    AttentionDims, Backend, BufRef, EmbeddingDims, MatmulDims, Projection, RopeKvDims,
};

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::config::LlamaConfig;
use crate::model::weights::{LlamaWeights, Tensor};
use crate::model::workspace::{StepArgsLayout, Workspace};

/// The shape of one step as the device sees it (padded rows included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepShape {
    /// Token rows.
    pub num_tokens: usize,
    /// Sequence rows (block-table rows).
    pub num_seqs: usize,
    /// Logits rows.
    pub num_logits: usize,
    /// Every row is one decoding token (`num_tokens == num_seqs == num_logits`).
    pub decode_only: bool,
}

fn f32s(b: BufRef, n: usize) -> Result<BufRef> {
    Ok(b.slice(0, n as u64 * 4)?)
}

fn words(b: BufRef, at: usize, n: usize) -> Result<BufRef> {
    Ok(b.slice(at as u64 * 4, n as u64 * 4)?)
}

/// Most projections (weight pieces) one fused norm + projections call takes.
const MAX_PROJECTIONS: usize = 8;

/// No projection (a placeholder in the fixed-size list).
const NO_PROJECTION: Projection = Projection {
    w: BufRef::EMPTY,
    dtype: pagoda_backend::DType::F32,
    m: 0,
    out: BufRef::EMPTY,
    out_stride: 0,
};

/// Appends one projection per row piece of `w`, each writing its columns of
/// `out` (n, m). Allocation-free: `list` is a fixed array.
fn push_projections(
    w: &Tensor,
    out: BufRef,
    n: usize,
    list: &mut [Projection; MAX_PROJECTIONS],
    used: &mut usize,
) -> Result<()> {
    let stride = w.shape[1];
    for p in &w.pieces {
        let len = MatmulDims {
            out_stride: stride,
            ..MatmulDims::new(n, w.cols(), p.rows)
        }
        .out_len();
        let slot = list.get_mut(*used).ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "a fused projection has more than {MAX_PROJECTIONS} weight pieces"
            ))
        })?;
        *slot = Projection {
            w: p.block.buf(),
            dtype: w.dtype,
            m: p.rows,
            out: out.slice(p.first_row as u64 * 4, len as u64 * 4)?,
            out_stride: stride,
        };
        *used += 1;
    }
    Ok(())
}

/// `out (n, m) [+]= x · wᵀ` over the weight's row pieces.
fn matmul<B: Backend>(
    b: &B,
    x: BufRef,
    w: &Tensor,
    out: BufRef,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    let (k, m) = (w.shape[0], w.shape[1]);
    let x = f32s(x, n * k)?;
    for p in &w.pieces {
        let dims = MatmulDims {
            out_stride: m,
            accumulate,
            ..MatmulDims::new(n, k, p.rows)
        };
        let o = out.slice(p.first_row as u64 * 4, dims.out_len() as u64 * 4)?;
        b.matmul(x, p.block.buf(), w.dtype, o, dims)?;
    }
    Ok(())
}

/// RMSNorm of `x` and the projections `ws` (each into its own output), in one call.
#[allow(clippy::too_many_arguments)]
fn norm_project<B: Backend>(
    b: &B,
    x: BufRef,
    norm: &Tensor,
    h: BufRef,
    n: usize,
    k: usize,
    eps: f32,
    outs: &[(&Tensor, BufRef)],
) -> Result<()> {
    let mut list = [NO_PROJECTION; MAX_PROJECTIONS];
    let mut used = 0;
    for (w, out) in outs {
        push_projections(w, *out, n, &mut list, &mut used)?;
    }
    Ok(b.rms_norm_matmul(x, norm.buf(), h, n, k, eps, &list[..used])?)
}

/// Runs the model over a step of `shape` whose arguments are in `ws.step_args`
/// (packed by [`StepArgsLayout`]); the logits of the `num_logits` rows end up
/// in `ws.logits` as (num_logits, vocab) f32.
pub fn forward<B: Backend>(
    backend: &B,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    ws: &Workspace,
    kv: &KvCache<B>,
    shape: StepShape,
) -> Result<()> {
    let (n, s, nl) = (shape.num_tokens, shape.num_seqs, shape.num_logits);
    let d = &ws.dims;
    if n > d.max_tokens || s > d.max_seqs || nl > d.max_logits_rows {
        return Err(EngineError::InvalidInput(format!(
            "step of {n} tokens / {s} sequences / {nl} logits rows exceeds the workspace {d:?}"
        )));
    }
    let width = d.max_blocks_per_seq;
    let lay = StepArgsLayout::new(n, s, nl, width);
    let args = ws.step_args.buf();
    let ids = words(args, lay.ids, n)?;
    let positions = words(args, lay.positions, n)?;
    let slots = words(args, lay.slots, n)?;
    let block_tables = words(args, lay.block_tables, s * width)?;
    let context_lens = words(args, lay.context_lens, s)?;
    let qsl = words(args, lay.query_start_locs, s + 1)?;
    let idx = words(args, lay.logits_indices, nl)?;

    let (hid, qd, kvd, ffn) = (
        cfg.hidden_dim,
        cfg.num_heads * cfg.head_dim,
        cfg.kv_dim(),
        cfg.ffn_dim,
    );
    let x = f32s(ws.x.buf(), n * hid)?;
    let h = f32s(ws.h.buf(), n * hid)?;
    let q = f32s(ws.q.buf(), n * qd)?;
    let k = f32s(ws.k.buf(), n * kvd)?;
    let v = f32s(ws.v.buf(), n * kvd)?;
    let attn = f32s(ws.attn.buf(), n * qd)?;
    let gate = f32s(ws.gate.buf(), n * ffn)?;
    let up = f32s(ws.up.buf(), n * ffn)?;
    let act = f32s(ws.act.buf(), n * ffn)?;

    for p in &w.tok_embd.pieces {
        let dims = EmbeddingDims {
            n,
            dim: hid,
            vocab: cfg.vocab_size,
            first_row: p.first_row,
            num_rows: p.rows,
        };
        backend.embedding(p.block.buf(), w.tok_embd.dtype, ids, x, dims)?;
    }
    let rope = RopeKvDims {
        num_tokens: n,
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        rope_dim: cfg.rope_dim,
        freq_base: cfg.rope_freq_base,
    };
    let att = AttentionDims {
        num_tokens: n,
        num_seqs: s,
        num_heads: cfg.num_heads,
        max_blocks_per_seq: width,
        scale: 1.0 / (cfg.head_dim as f32).sqrt(),
    };
    let eps = cfg.rms_eps;
    for (l, lw) in w.layers.iter().enumerate() {
        let layer = kv.layer(l);
        norm_project(
            backend,
            x,
            &lw.attn_norm,
            h,
            n,
            hid,
            eps,
            &[(&lw.wq, q), (&lw.wk, k), (&lw.wv, v)],
        )?;
        backend.rope_write_kv(q, k, v, positions, slots, layer, rope)?;
        backend.paged_attention(
            q,
            layer,
            positions,
            block_tables,
            context_lens,
            qsl,
            attn,
            att,
        )?;
        matmul(backend, attn, &lw.wo, x, n, true)?;
        norm_project(
            backend,
            x,
            &lw.ffn_norm,
            h,
            n,
            hid,
            eps,
            &[(&lw.w_gate, gate), (&lw.w_up, up)],
        )?;
        backend.silu_mul(gate, up, act, n * ffn)?;
        matmul(backend, act, &lw.w_down, x, n, true)?;
    }
    let last = f32s(ws.last.buf(), nl * hid)?;
    let last_norm = f32s(ws.last_norm.buf(), nl * hid)?;
    backend.gather_rows(x, idx, last, nl, hid)?;
    backend.rms_norm(last, w.output_norm.buf(), last_norm, nl, hid, eps)?;
    let logits = f32s(ws.logits.buf(), nl * cfg.vocab_size)?;
    matmul(backend, last_norm, w.output_head(), logits, nl, false)?;
    Ok(())
}
