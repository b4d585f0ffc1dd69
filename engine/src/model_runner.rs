//! The model runner: owns the device-side state of one model (weights,
//! workspace, KV cache) and runs a [`StepPlan`] in four phases:
//!
//! 1. **prepare** — pack every per-step array into one host staging buffer
//!    (block tables at the workspace's fixed width; a decode step padded to
//!    its batch bucket, padded rows pointing at the KV null page), one
//!    [`Backend::upload`], then the page copies (copy-on-write);
//! 2. **forward** — device work only, over fixed buffers; on a backend with
//!    graphs a decode step's forward is captured once per padded batch size
//!    and replayed;
//! 3. **sample** — `argmax_rows` / `top_k_rows` on the device; full logits
//!    rows only for the rows that need them ([`RowNeed::Full`]);
//! 4. **read back** — ids / candidates / rows to the host. The read-back
//!    waits for the queue, so after it the engine gives back the KV units
//!    the step released ([`ModelRunner::flush_kv_releases`]).
//!
//! Nothing here allocates after construction: the staging buffer and the
//! host copies are sized for the largest step.

use std::collections::HashMap;
use std::sync::Arc;

use pagoda_backend::{Backend, GraphId, KvGeometry, Pool};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::host_kv_tier::HostKvTier;
use crate::kv_cache::KvCache;
use crate::model::{
    LlamaConfig, LlamaWeights, StepArgsLayout, StepShape, Workspace, WorkspaceDims, forward,
};
use crate::sequence::SeqId;
use crate::step_plan::StepPlan;

/// What the host needs of one logits row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowNeed {
    /// The argmax id (greedy).
    Argmax,
    /// The `k` best candidates (values and ids), for the host to finish sampling.
    TopK(usize),
    /// The whole row (logits, perplexity, repetition penalty, large or no top-k).
    Full,
}

/// What one step brought back, indexed by logits row.
#[derive(Debug)]
pub struct StepOutput {
    /// (num_logits) argmax ids; valid for rows that asked for [`RowNeed::Argmax`].
    pub argmax: Vec<u32>,
    /// Candidates per row in `topk_values` / `topk_ids` this step.
    pub top_k: usize,
    /// (num_logits, top_k) candidate logits, descending; valid for [`RowNeed::TopK`] rows.
    pub topk_values: Vec<f32>,
    /// (num_logits, top_k) candidate ids.
    pub topk_ids: Vec<u32>,
    /// (num_logits, vocab) logits; valid for [`RowNeed::Full`] rows.
    pub logits: Vec<f32>,
    /// Rows in this step.
    pub num_logits: usize,
    /// The padded shape the device ran.
    pub shape: StepShape,
}

impl StepOutput {
    /// Candidates `(values, ids)` of row `r`.
    pub fn candidates(&self, r: usize) -> (&[f32], &[u32]) {
        let k = self.top_k;
        (
            &self.topk_values[r * k..(r + 1) * k],
            &self.topk_ids[r * k..(r + 1) * k],
        )
    }

    /// The full logits of row `r` (valid when it asked for them).
    pub fn row(&self, r: usize, vocab: usize) -> &[f32] {
        &self.logits[r * vocab..(r + 1) * vocab]
    }
}

/// Device state of one loaded model.
pub struct ModelRunner<B: Backend> {
    backend: Arc<B>,
    pool: Pool,
    /// Hyper-parameters.
    pub config: LlamaConfig,
    weights: LlamaWeights,
    workspace: Workspace,
    kv: KvCache<B>,
    /// Padded decode batch sizes, ascending (empty: no padding).
    decode_buckets: Vec<usize>,
    /// The per-step arrays as packed for the one upload (max words).
    staging: Vec<u32>,
    /// One graph per padded decode batch size.
    graphs: HashMap<usize, GraphId>,
    out: StepOutput,
    /// Uploads made (one per step), for tests and telemetry.
    num_uploads: u64,
    /// Reused by [`Self::logits`].
    full_needs: Vec<RowNeed>,
    /// Host page slots for swap-to-host preemption (none until
    /// [`ModelRunner::set_swap_slots`]).
    host_tier: HostKvTier,
}

impl<B: Backend> std::fmt::Debug for ModelRunner<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRunner")
            .field("config", &self.config)
            .finish()
    }
}

impl<B: Backend> ModelRunner<B> {
    /// Uploads the weights and allocates the workspace and KV cache from
    /// `pool`. `decode_buckets`: the padded decode batch sizes (empty for
    /// none; each at most `dims.max_seqs`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: Arc<B>,
        pool: Pool,
        gguf: &GgufFile,
        config: LlamaConfig,
        dims: WorkspaceDims,
        kv_geometry: KvGeometry,
        decode_buckets: Vec<usize>,
        faults: pagoda_backend::FaultInjector,
    ) -> Result<Self> {
        let kv_layout = kv_geometry.layout;
        if !backend.info().supports_kv(kv_layout.dtype) || !kv_layout.is_valid() {
            return Err(EngineError::InvalidInput(format!(
                "KV dtype {} is not supported by the {} backend for head_dim {}",
                kv_layout.dtype,
                backend.info().name,
                kv_layout.head_dim
            )));
        }
        let mut decode_buckets: Vec<usize> = decode_buckets
            .into_iter()
            .filter(|&b| b >= 1 && b <= dims.max_seqs)
            .collect();
        decode_buckets.sort_unstable();
        decode_buckets.dedup();
        let weights = LlamaWeights::load(gguf, &config, backend.as_ref(), &pool)?;
        let workspace = Workspace::new(&config, dims, &pool)?;
        let kv = KvCache::new(kv_geometry, backend.clone(), &pool, faults)?;
        let words = StepArgsLayout::new(
            dims.max_tokens,
            dims.max_seqs,
            dims.max_logits_rows,
            dims.max_blocks_per_seq,
        )
        .words;
        let l = dims.max_logits_rows;
        let k = dims.max_top_k;
        let out = StepOutput {
            argmax: vec![0; l],
            top_k: 0,
            topk_values: vec![0.0; l * k],
            topk_ids: vec![0; l * k],
            logits: vec![0.0; l * config.vocab_size],
            num_logits: 0,
            shape: StepShape {
                num_tokens: 0,
                num_seqs: 0,
                num_logits: 0,
                decode_only: false,
            },
        };
        Ok(ModelRunner {
            backend,
            pool,
            config,
            weights,
            workspace,
            kv,
            graphs: HashMap::with_capacity(decode_buckets.len()),
            decode_buckets,
            staging: vec![0; words],
            out,
            num_uploads: 0,
            full_needs: Vec::with_capacity(dims.max_logits_rows),
            host_tier: HostKvTier::default(),
        })
    }

    /// Gives the runner `num_slots` host page slots for swapped-out pages
    /// (the scheduler's `SwapConfig::num_slots`).
    pub fn set_swap_slots(&mut self, num_slots: usize) -> Result<()> {
        self.host_tier = HostKvTier::new(self.backend.as_ref(), &self.kv.layout, num_slots)?;
        Ok(())
    }

    /// The padded shape of `plan`.
    fn shape_of(&self, plan: &StepPlan) -> StepShape {
        let (n, s, l) = (
            plan.num_tokens(),
            plan.num_seqs(),
            plan.logits_indices.len(),
        );
        let decode_only = plan.is_decode_only();
        if decode_only && let Some(&p) = self.decode_buckets.iter().find(|&&b| b >= s) {
            return StepShape {
                num_tokens: p,
                num_seqs: p,
                num_logits: p,
                decode_only,
            };
        }
        StepShape {
            num_tokens: n,
            num_seqs: s,
            num_logits: l,
            decode_only,
        }
    }

    /// Packs `plan` at `shape` into the staging buffer and uploads it once;
    /// enqueues the page copies.
    fn prepare(&mut self, plan: &StepPlan, shape: StepShape) -> Result<()> {
        let width = self.workspace.dims.max_blocks_per_seq;
        let (n, s, l) = (
            plan.num_tokens(),
            plan.num_seqs(),
            plan.logits_indices.len(),
        );
        if plan.max_blocks_per_seq > width {
            return Err(EngineError::InvalidInput(format!(
                "a sequence of the step needs {} pages; block tables hold {width}",
                plan.max_blocks_per_seq
            )));
        }
        let (pn, ps, pl) = (shape.num_tokens, shape.num_seqs, shape.num_logits);
        let d = &self.workspace.dims;
        if pn > d.max_tokens || ps > d.max_seqs || pl > d.max_logits_rows {
            return Err(EngineError::InvalidInput(format!(
                "step of {pn} tokens / {ps} sequences / {pl} logits rows exceeds the workspace {d:?}"
            )));
        }
        let lay = StepArgsLayout::new(pn, ps, pl, width);
        let layout = self.kv.layout;
        let (null_page, null_slot) = (layout.null_page(), layout.null_slot());
        let w = &mut self.staging[..lay.words];
        let pad = |dst: &mut [u32], src: &[u32], fill: u32| {
            dst[..src.len()].copy_from_slice(src);
            dst[src.len()..].fill(fill);
        };
        pad(&mut w[lay.ids..lay.ids + pn], &plan.input_ids, 0);
        pad(
            &mut w[lay.positions..lay.positions + pn],
            &plan.positions,
            0,
        );
        pad(
            &mut w[lay.slots..lay.slots + pn],
            &plan.slot_mapping,
            null_slot,
        );
        let bt = &mut w[lay.block_tables..lay.block_tables + ps * width];
        bt.fill(null_page);
        let pw = plan.max_blocks_per_seq;
        for i in 0..s {
            // Only the pages a sequence owns; the rest of the row is the null page.
            let pages = (plan.context_lens[i] as usize).div_ceil(layout.page_size);
            bt[i * width..i * width + pages]
                .copy_from_slice(&plan.block_tables[i * pw..i * pw + pages]);
        }
        pad(
            &mut w[lay.context_lens..lay.context_lens + ps],
            &plan.context_lens,
            1,
        );
        let qsl = &mut w[lay.query_start_locs..lay.query_start_locs + ps + 1];
        qsl[..s + 1].copy_from_slice(&plan.query_start_locs);
        for (j, q) in qsl.iter_mut().enumerate().skip(s + 1) {
            *q = (n + (j - s)) as u32;
        }
        let li = &mut w[lay.logits_indices..lay.logits_indices + pl];
        li[..l].copy_from_slice(&plan.logits_indices);
        for (j, x) in li.iter_mut().enumerate().skip(l) {
            // Padded logits rows read the padded token rows (decode: row j).
            *x = (n + (j - l)).min(pn.saturating_sub(1)) as u32;
        }
        let bytes = bytemuck::cast_slice(&self.staging[..lay.words]);
        let dst = self
            .workspace
            .step_args
            .buf()
            .slice(0, bytes.len() as u64)?;
        self.backend.upload(dst, bytes)?;
        self.num_uploads += 1;
        self.copy_pages(plan)
    }

    /// The step's page copies, in the plan's order (see [`StepPlan`]):
    /// swap-out to host slots, copy-on-write, swap-in from host slots.
    fn copy_pages(&mut self, plan: &StepPlan) -> Result<()> {
        let b = self.backend.as_ref();
        self.host_tier.swap_out(b, &self.kv, &plan.swap_out)?;
        if !plan.copy_pages.is_empty() {
            for layer in 0..self.config.num_layers {
                b.copy_pages(self.kv.layer(layer), &plan.copy_pages)?;
            }
        }
        self.host_tier.swap_in(b, &self.kv, &plan.swap_in)?;
        Ok(())
    }

    /// Device work of one step of `shape` (graph replay where the backend has graphs).
    fn forward(&mut self, shape: StepShape) -> Result<()> {
        let b = self.backend.as_ref();
        let run = |r: &Self| forward(b, &r.config, &r.weights, &r.workspace, &r.kv, shape);
        match b.graphs() {
            Some(g) if shape.decode_only => {
                let id = match self.graphs.get(&shape.num_seqs) {
                    Some(&id) => id,
                    None => {
                        g.begin_capture()?;
                        let captured = run(self);
                        let id = g.end_capture()?;
                        captured?;
                        self.graphs.insert(shape.num_seqs, id);
                        id
                    }
                };
                g.replay(id)?;
                Ok(())
            }
            _ => run(self),
        }
    }

    /// Samples on the device and reads back what `needs` (one per logits row) asks for.
    fn sample(&mut self, needs: &[RowNeed]) -> Result<()> {
        let b = self.backend.as_ref();
        let vocab = self.config.vocab_size;
        let rows = needs.len();
        let ws = &self.workspace;
        let logits = ws.logits.buf().slice(0, (rows * vocab) as u64 * 4)?;
        if needs.contains(&RowNeed::Argmax) {
            let ids = ws.sample_ids.buf().slice(0, rows as u64 * 4)?;
            b.argmax_rows(logits, ids, rows, vocab)?;
            b.download(ids, bytemuck::cast_slice_mut(&mut self.out.argmax[..rows]))?;
        }
        let k = needs
            .iter()
            .filter_map(|n| match n {
                RowNeed::TopK(k) => Some(*k),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        self.out.top_k = k;
        if k > 0 {
            if k > self.max_top_k() {
                return Err(EngineError::InvalidInput(format!(
                    "top-k {k} above the device limit {}",
                    self.max_top_k()
                )));
            }
            let vals = ws.topk_values.buf().slice(0, (rows * k) as u64 * 4)?;
            let ids = ws.topk_ids.buf().slice(0, (rows * k) as u64 * 4)?;
            b.top_k_rows(logits, vals, ids, rows, vocab, k)?;
            b.download(
                vals,
                bytemuck::cast_slice_mut(&mut self.out.topk_values[..rows * k]),
            )?;
            b.download(
                ids,
                bytemuck::cast_slice_mut(&mut self.out.topk_ids[..rows * k]),
            )?;
        }
        let mut r = 0;
        while r < rows {
            if needs[r] != RowNeed::Full {
                r += 1;
                continue;
            }
            // One download per run of consecutive full rows.
            let mut e = r;
            while e < rows && needs[e] == RowNeed::Full {
                e += 1;
            }
            let src = logits.slice((r * vocab) as u64 * 4, ((e - r) * vocab) as u64 * 4)?;
            b.download(
                src,
                bytemuck::cast_slice_mut(&mut self.out.logits[r * vocab..e * vocab]),
            )?;
            r = e;
        }
        Ok(())
    }

    /// Largest `k` the device top-k serves here.
    pub fn max_top_k(&self) -> usize {
        self.backend
            .info()
            .max_top_k
            .min(self.workspace.dims.max_top_k)
            .min(self.config.vocab_size)
    }

    /// Runs one step: prepare → forward → sample → read back. `needs` has
    /// one entry per `plan.logits_indices` row.
    pub fn execute(&mut self, plan: &StepPlan, needs: &[RowNeed]) -> Result<&StepOutput> {
        if needs.len() != plan.logits_indices.len() {
            return Err(EngineError::InvalidInput(format!(
                "{} sampling needs for {} logits rows",
                needs.len(),
                plan.logits_indices.len()
            )));
        }
        if plan.num_tokens() == 0 {
            // Copies only (a sequence swapped itself out and nothing ran).
            self.copy_pages(plan)?;
            self.backend.synchronize()?;
            self.out.num_logits = 0;
            return Ok(&self.out);
        }
        let shape = self.shape_of(plan);
        self.prepare(plan, shape)?;
        self.forward(shape)?;
        self.sample(needs)?;
        if needs.is_empty() {
            self.backend.synchronize()?;
        }
        self.out.num_logits = needs.len();
        self.out.shape = shape;
        Ok(&self.out)
    }

    /// Captures the decode graph of every padded batch size, largest first,
    /// before any request: each is a decode step whose rows all point at the
    /// null page (harmless writes and reads), so the first requests find
    /// their graphs ready and graph memory is measured before serving.
    /// Returns the graphs captured (0 on a backend without graphs).
    pub fn capture_decode_graphs(&mut self) -> Result<usize> {
        if self.backend.graphs().is_none() {
            return Ok(0);
        }
        let (page, slot) = (self.kv.layout.null_page(), self.kv.layout.null_slot());
        let buckets: Vec<usize> = self.decode_buckets.iter().rev().copied().collect();
        let mut captured = 0;
        for b in buckets {
            if self.graphs.contains_key(&b) {
                continue;
            }
            let rows = b as u32;
            let plan = StepPlan {
                input_ids: vec![0; b],
                positions: vec![0; b],
                slot_mapping: vec![slot; b],
                block_tables: vec![page; b],
                max_blocks_per_seq: 1,
                context_lens: vec![1; b],
                query_start_locs: (0..=rows).collect(),
                seq_ids: (0..b as u64).map(SeqId).collect(),
                logits_indices: (0..rows).collect(),
                sample_rows: (0..rows).map(Some).collect(),
                copy_pages: vec![],
                swap_out: vec![],
                swap_in: vec![],
                num_prefill_tokens: 0,
                num_decode_tokens: b,
            };
            self.execute(&plan, &vec![RowNeed::Argmax; b])?;
            captured += 1;
        }
        Ok(captured)
    }

    /// Runs one step and returns every logits row in full: (num_logits,
    /// vocab) f32, row `i` for token row `plan.logits_indices[i]`.
    pub fn logits(&mut self, plan: &StepPlan) -> Result<&[f32]> {
        self.full_needs.clear();
        self.full_needs
            .resize(plan.logits_indices.len(), RowNeed::Full);
        let needs = std::mem::take(&mut self.full_needs);
        let r = self.execute(plan, &needs).map(|_| ());
        self.full_needs = needs;
        r?;
        let len = plan.logits_indices.len() * self.config.vocab_size;
        Ok(&self.out.logits[..len])
    }

    /// Gives KV units released since the last step back to the device. Call
    /// only after the last step's read-back (no queued work may touch them).
    pub fn flush_kv_releases(&mut self) {
        self.kv.flush_releases();
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The pool everything lives in.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The KV layout (null page included).
    pub fn kv_layout(&self) -> pagoda_backend::KvLayout {
        self.kv.layout
    }

    /// The KV cache.
    pub fn kv_cache(&self) -> &KvCache<B> {
        &self.kv
    }

    /// The workspace dimensions.
    pub fn workspace_dims(&self) -> WorkspaceDims {
        self.workspace.dims
    }

    /// Uploads made so far (one per step).
    pub fn num_uploads(&self) -> u64 {
        self.num_uploads
    }

    /// Graphs captured so far.
    pub fn num_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// The padded decode batch sizes that have a captured graph, ascending.
    pub fn graph_batch_sizes(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.graphs.keys().map(|&n| n as u32).collect();
        v.sort_unstable();
        v
    }

    /// The padded decode batch sizes.
    pub fn decode_buckets(&self) -> &[usize] {
        &self.decode_buckets
    }
}

impl<B: Backend> Drop for ModelRunner<B> {
    /// Releases this runner's graphs: they replay on its workspace, which goes away with it.
    fn drop(&mut self) {
        if let Some(g) = self.backend.graphs() {
            for (_, id) in self.graphs.drain() {
                let _ = g.release(id);
            }
        }
    }
}
