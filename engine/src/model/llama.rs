//! The Llama forward pass over one [`StepPlan`], on any backend.
//!
//! Per layer: RMSNorm → Q/K/V projections → RoPE (NORM mode) → KV write at
//! `slot_mapping` → paged attention through the block tables → output
//! projection + residual → RMSNorm → SwiGLU FFN + residual. Then the rows in
//! `logits_indices` are gathered, normed and projected to the vocabulary.

use pagoda_backend::{AttentionDims, Backend, BufRef, MatmulDims, RopeDims};

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::model::config::LlamaConfig;
use crate::model::weights::{LlamaWeights, Tensor};
use crate::model::workspace::Workspace;
use crate::step_plan::StepPlan;

fn f32s(b: BufRef, n: usize) -> Result<BufRef> {
    Ok(b.slice(0, n as u64 * 4)?)
}

fn upload_u32<B: Backend>(backend: &B, dst: BufRef, v: &[u32]) -> Result<()> {
    let dst = dst.slice(0, v.len() as u64 * 4)?;
    Ok(backend.upload(dst, bytemuck::cast_slice(v))?)
}

fn matmul<B: Backend>(b: &B, x: BufRef, w: &Tensor, out: BufRef, n: usize) -> Result<()> {
    let (k, m) = (w.shape[0], w.shape[1]);
    Ok(b.matmul(
        f32s(x, n * k)?,
        w.buf(),
        w.dtype,
        f32s(out, n * m)?,
        MatmulDims { n, k, m },
    )?)
}

/// Runs the model over `plan`; the logits of `plan.logits_indices` rows end
/// up in `ws.logits` as (num_logits, vocab) f32.
pub fn forward<B: Backend>(
    backend: &B,
    cfg: &LlamaConfig,
    w: &LlamaWeights,
    ws: &Workspace,
    kv: &KvCache,
    plan: &StepPlan,
) -> Result<()> {
    let n = plan.num_tokens();
    let s = plan.num_seqs();
    let nl = plan.logits_indices.len();
    let d = &ws.dims;
    if n > d.max_tokens
        || s > d.max_seqs
        || nl > d.max_logits_rows
        || plan.max_blocks_per_seq > d.max_blocks_per_seq
    {
        return Err(EngineError::InvalidInput(format!(
            "step of {n} tokens / {s} sequences / {nl} logits rows / {} blocks exceeds the workspace {d:?}",
            plan.max_blocks_per_seq
        )));
    }
    upload_u32(backend, ws.ids.buf(), &plan.input_ids)?;
    upload_u32(backend, ws.positions.buf(), &plan.positions)?;
    upload_u32(backend, ws.slots.buf(), &plan.slot_mapping)?;
    upload_u32(backend, ws.block_tables.buf(), &plan.block_tables)?;
    upload_u32(backend, ws.context_lens.buf(), &plan.context_lens)?;
    upload_u32(backend, ws.query_start_locs.buf(), &plan.query_start_locs)?;
    upload_u32(backend, ws.logits_indices.buf(), &plan.logits_indices)?;
    if !plan.copy_pages.is_empty() {
        for l in 0..cfg.num_layers {
            backend.copy_pages(kv.layer(l), &plan.copy_pages)?;
        }
    }

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
    let o = f32s(ws.o.buf(), n * hid)?;
    let gate = f32s(ws.gate.buf(), n * ffn)?;
    let up = f32s(ws.up.buf(), n * ffn)?;
    let act = f32s(ws.act.buf(), n * ffn)?;
    let ids = ws.ids.buf().slice(0, n as u64 * 4)?;
    let positions = ws.positions.buf().slice(0, n as u64 * 4)?;
    let slots = ws.slots.buf().slice(0, n as u64 * 4)?;
    let block_tables = ws
        .block_tables
        .buf()
        .slice(0, plan.block_tables.len() as u64 * 4)?;
    let context_lens = ws.context_lens.buf().slice(0, s as u64 * 4)?;
    let qsl = ws.query_start_locs.buf().slice(0, (s as u64 + 1) * 4)?;

    backend.embedding(w.tok_embd.buf(), w.tok_embd.dtype, ids, x, n, hid)?;
    let rope_q = RopeDims {
        num_tokens: n,
        num_heads: cfg.num_heads,
        head_dim: cfg.head_dim,
        rope_dim: cfg.rope_dim,
        freq_base: cfg.rope_freq_base,
    };
    let rope_k = RopeDims {
        num_heads: cfg.num_kv_heads,
        ..rope_q
    };
    let att = AttentionDims {
        num_tokens: n,
        num_seqs: s,
        num_heads: cfg.num_heads,
        max_blocks_per_seq: plan.max_blocks_per_seq,
        scale: 1.0 / (cfg.head_dim as f32).sqrt(),
    };
    for (l, lw) in w.layers.iter().enumerate() {
        backend.rms_norm(x, lw.attn_norm.buf(), h, n, hid, cfg.rms_eps)?;
        matmul(backend, h, &lw.wq, q, n)?;
        matmul(backend, h, &lw.wk, k, n)?;
        matmul(backend, h, &lw.wv, v, n)?;
        backend.rope(q, positions, rope_q)?;
        backend.rope(k, positions, rope_k)?;
        let layer = kv.layer(l);
        backend.write_kv(layer, k, v, slots, n)?;
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
        matmul(backend, attn, &lw.wo, o, n)?;
        backend.add_assign(x, o, n * hid)?;
        backend.rms_norm(x, lw.ffn_norm.buf(), h, n, hid, cfg.rms_eps)?;
        matmul(backend, h, &lw.w_gate, gate, n)?;
        matmul(backend, h, &lw.w_up, up, n)?;
        backend.silu_mul(gate, up, act, n * ffn)?;
        matmul(backend, act, &lw.w_down, o, n)?;
        backend.add_assign(x, o, n * hid)?;
    }
    let last = f32s(ws.last.buf(), nl * hid)?;
    let last_norm = f32s(ws.last_norm.buf(), nl * hid)?;
    let idx = ws.logits_indices.buf().slice(0, nl as u64 * 4)?;
    backend.gather_rows(x, idx, last, nl, hid)?;
    backend.rms_norm(last, w.output_norm.buf(), last_norm, nl, hid, cfg.rms_eps)?;
    matmul(backend, last_norm, w.output_head(), ws.logits.buf(), nl)?;
    Ok(())
}
