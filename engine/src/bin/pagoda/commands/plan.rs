//! `pagoda plan`: the memory plan, computed without loading (or generating)
//! a single weight.

use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use pagoda::plan::{Budget, PlanRequest, plan, table};
use pagoda_backend::Backend;
use serde_json::json;

use crate::cli::{Common, MemoryArgs};
use crate::setup::{ModelSource, budget, kv_dtype, model_source, planning_memory};

/// Flags of `pagoda plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Per-step token budget.
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pagoda plan`.
pub fn exec(a: Args) -> Result<()> {
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    with_backend!(kind, a.common.threads, |b| run(&a, &source, b))
}

fn run<B: Backend>(a: &Args, source: &ModelSource, backend: Arc<B>) -> Result<()> {
    let m = &a.memory;
    let (cfg, weights) = source.shape()?;
    let budget = budget(&m.budget)?;
    let req = PlanRequest {
        ctx: Some(m.ctx.unwrap_or(cfg.context_len)),
        max_seqs: match (budget, m.max_seqs) {
            (Budget::Bytes(_), None) => None,
            (_, s) => Some(s.unwrap_or(8)),
        },
        kv_dtype: kv_dtype(&m.kv_dtype)?,
        page_size: 16,
        max_num_batched_tokens: a.max_batched_tokens,
        max_logits_rows: m.max_seqs.unwrap_or(8),
        budget,
    };
    if let Some(c) = m.ctx
        && c > cfg.context_len
    {
        bail!(
            "--ctx {c} is longer than the model's training context {}",
            cfg.context_len
        );
    }
    let device = planning_memory(source, backend.as_ref())?;
    match plan(&cfg, weights, &req, device, backend.info()) {
        Ok(p) => {
            if a.json {
                let mut doc = serde_json::to_value(&p)?;
                doc["fits"] = json!(true);
                println!("{}", serde_json::to_string(&doc)?);
            } else {
                println!(
                    "memory plan for {} on {} ({}):\n{}",
                    source.name(),
                    p.backend,
                    backend.info().device,
                    table(&p)
                );
            }
            Ok(())
        }
        Err(e) => {
            if a.json {
                let mut doc = serde_json::to_value(&*e.plan)?;
                doc["fits"] = json!(false);
                doc["error"] = json!(e.message);
                println!("{}", serde_json::to_string(&doc)?);
            }
            Err(anyhow!(e.message))
        }
    }
}
