//! The model runner: owns the device-side state of one model (weights,
//! workspace, KV cache) and turns a [`StepPlan`] into logits.

use std::sync::Arc;

use pagoda_backend::{Backend, KvLayout, Pool};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::host_kv_tier::HostKvTier;
use crate::kv_cache::KvCache;
use crate::model::{LlamaConfig, LlamaWeights, Workspace, WorkspaceDims, forward};
use crate::step_plan::StepPlan;

/// Device state of one loaded model.
pub struct ModelRunner<B: Backend> {
    backend: Arc<B>,
    pool: Pool,
    /// Hyper-parameters.
    pub config: LlamaConfig,
    weights: LlamaWeights,
    workspace: Workspace,
    kv: KvCache,
    /// Host page slots for swap-to-host preemption (none until
    /// [`ModelRunner::set_swap_slots`]).
    host_tier: HostKvTier,
    /// (max_logits_rows, vocab) host copy of the last step's logits.
    logits_host: Vec<f32>,
}

impl<B: Backend> std::fmt::Debug for ModelRunner<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRunner")
            .field("config", &self.config)
            .finish()
    }
}

impl<B: Backend> ModelRunner<B> {
    /// Uploads the weights and allocates the workspace and KV cache from `pool`.
    pub fn new(
        backend: Arc<B>,
        pool: Pool,
        gguf: &GgufFile,
        config: LlamaConfig,
        dims: WorkspaceDims,
        kv_layout: KvLayout,
    ) -> Result<Self> {
        if !backend.info().supports_kv(kv_layout.dtype) || !kv_layout.is_valid() {
            return Err(EngineError::InvalidInput(format!(
                "KV dtype {} is not supported by the {} backend for head_dim {}",
                kv_layout.dtype,
                backend.info().name,
                kv_layout.head_dim
            )));
        }
        let weights = LlamaWeights::load(gguf, &config, backend.as_ref(), &pool)?;
        let workspace = Workspace::new(&config, dims, &pool)?;
        let kv = KvCache::new(kv_layout, &pool)?;
        let logits_host = vec![0f32; dims.max_logits_rows * config.vocab_size];
        Ok(ModelRunner {
            backend,
            pool,
            config,
            weights,
            workspace,
            kv,
            host_tier: HostKvTier::default(),
            logits_host,
        })
    }

    /// Gives the runner `num_slots` host page slots for swapped-out pages
    /// (the scheduler's `SwapConfig::num_slots`).
    pub fn set_swap_slots(&mut self, num_slots: usize) -> Result<()> {
        self.host_tier = HostKvTier::new(&self.kv.layout, num_slots)?;
        Ok(())
    }

    /// Runs one step; returns (num_logits, vocab) logits, row `i` for token row `plan.logits_indices[i]`.
    pub fn execute(&mut self, plan: &StepPlan) -> Result<&[f32]> {
        let b = self.backend.as_ref();
        // Page copies in the plan's order: swap-out, copy-on-write, swap-in
        // (see `step_plan`). `forward` does the copy-on-write itself, so when
        // there is a swap-in it runs here first and `forward` gets none.
        self.host_tier.swap_out(b, &self.kv, &plan.swap_out)?;
        let without_copies;
        let plan = if plan.swap_in.is_empty() {
            plan
        } else {
            if !plan.copy_pages.is_empty() {
                for l in 0..self.kv.layout.num_layers {
                    b.copy_pages(self.kv.layer(l), &plan.copy_pages)?;
                }
            }
            self.host_tier.swap_in(b, &self.kv, &plan.swap_in)?;
            without_copies = StepPlan {
                copy_pages: Vec::new(),
                ..plan.clone()
            };
            &without_copies
        };
        if plan.num_tokens() == 0 {
            // Copies only (a sequence swapped itself out and nothing ran).
            return Ok(&self.logits_host[..0]);
        }
        forward(
            b,
            &self.config,
            &self.weights,
            &self.workspace,
            &self.kv,
            plan,
        )?;
        let len = plan.logits_indices.len() * self.config.vocab_size;
        let src = self.workspace.logits.buf().slice(0, len as u64 * 4)?;
        let dst = &mut self.logits_host[..len];
        b.download(src, bytemuck::cast_slice_mut(dst))?;
        Ok(&self.logits_host[..len])
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The pool everything lives in.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The KV layout.
    pub fn kv_layout(&self) -> KvLayout {
        self.kv.layout
    }

    /// The workspace dimensions.
    pub fn workspace_dims(&self) -> WorkspaceDims {
        self.workspace.dims
    }
}
