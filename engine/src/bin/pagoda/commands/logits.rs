//! `pagoda logits`: a summary of the logits at the last prompt position.

use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use pagoda::engine::GenerationParams;
use pagoda::perplexity::log_sum_exp;
use pagoda::sampler::SamplingParams;
use pagoda::sequence::FinishReason;
use pagoda_backend::Backend;
use serde_json::json;

use crate::cli::{Common, MemoryArgs, PromptArgs};
use crate::setup::{ModelSource, build, engine_config, model_source, read_prompt};

/// Flags of `pagoda logits`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Print JSON (the only format).
    #[arg(long)]
    pub json: bool,
}

/// Runs `pagoda logits`.
pub fn exec(a: Args) -> Result<()> {
    let text = read_prompt(&a.prompt)?;
    if text.is_empty() {
        bail!("the prompt is empty");
    }
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    with_backend!(kind, a.common.threads, |b| run(&a, &source, &text, b))
}

fn run<B: Backend>(a: &Args, source: &ModelSource, text: &str, backend: Arc<B>) -> Result<()> {
    let cfg = engine_config(&a.memory, 1)?;
    let mut engine = build(source, backend, cfg)?;
    let toks = engine.tokenize(text);
    let params = GenerationParams {
        max_tokens: 1,
        sampling: SamplingParams::greedy(),
        want_first_logits: true,
        ..Default::default()
    };
    let c = engine
        .generate(vec![toks], params)?
        .pop()
        .ok_or_else(|| anyhow!("no result"))?;
    if let FinishReason::Error(e) = &c.finish_reason {
        bail!("{e}");
    }
    let last = c
        .first_logits
        .filter(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("no logits returned"))?;
    println!("{}", serde_json::to_string(&summary(&last))?);
    Ok(())
}

/// `{argmax, top20, logsumexp, logits_0_63}` of one logits row.
fn summary(logits: &[f32]) -> serde_json::Value {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let lse = log_sum_exp(logits);
    json!({
        "argmax": idx[0],
        "top20": idx.iter().take(20).map(|&i| json!([i, logits[i]])).collect::<Vec<_>>(),
        "logsumexp": lse,
        "logits_0_63": logits.iter().take(64).collect::<Vec<_>>(),
    })
}
