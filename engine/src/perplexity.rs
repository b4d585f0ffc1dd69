//! Perplexity the way llama-perplexity computes it: chunks of `ctx` tokens,
//! each from a fresh context, scoring the second half of each chunk.

use pagoda_backend::Backend;
use serde::Serialize;

use crate::engine::{Engine, EngineConfig, GenerationParams};
use crate::error::{EngineError, Result};
use crate::sampler::SamplingParams;

/// `log Σ exp(row)`, in f64.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// The result of [`Engine::perplexity`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerplexityReport {
    /// `exp(mean NLL)` over all scored tokens.
    pub ppl: f64,
    /// Chunks scored.
    pub n_chunks: usize,
    /// Perplexity of each chunk.
    pub chunk_ppl: Vec<f64>,
    /// Tokens scored in all.
    pub n_scored: usize,
}

/// An engine configuration that can score chunks of `ctx` tokens, up to 4 at once.
pub fn perplexity_config(ctx: usize) -> EngineConfig {
    EngineConfig {
        ctx: Some(ctx + 1),
        max_seqs: Some(4),
        max_num_batched_tokens: ctx,
        max_logits_rows: ctx,
        enable_prefix_caching: false,
        ..EngineConfig::default()
    }
}

impl<B: Backend> Engine<B> {
    /// Perplexity of `tokens` in chunks of `ctx` (the tail shorter than a chunk
    /// is not used). Chunk `c` is `tokens[c*ctx .. (c+1)*ctx]`; the logits at
    /// positions `ctx/2 .. ctx-1` score the tokens after them. Chunks run 4 at
    /// a time as separate sequences. Build the engine with [`perplexity_config`].
    pub fn perplexity(&mut self, tokens: &[u32], ctx: usize) -> Result<PerplexityReport> {
        if ctx < 4 {
            return Err(EngineError::InvalidInput(format!(
                "perplexity context {ctx} is too short (at least 4)"
            )));
        }
        let n_chunks = tokens.len() / ctx;
        if n_chunks == 0 {
            return Err(EngineError::InvalidInput(format!(
                "the text has {} tokens, fewer than one chunk of {ctx}",
                tokens.len()
            )));
        }
        let vocab = self.model_config().vocab_size;
        let params = GenerationParams {
            max_tokens: 1,
            sampling: SamplingParams::greedy(),
            want_all_logits: true,
            ..Default::default()
        };
        let chunks: Vec<Vec<u32>> = (0..n_chunks)
            .map(|c| tokens[c * ctx..(c + 1) * ctx].to_vec())
            .collect();
        let first = ctx / 2;
        let (mut chunk_ppl, mut total_nll, mut n_scored) = (Vec::new(), 0f64, 0usize);
        for group in chunks.chunks(4) {
            for (c, chunk) in self
                .generate(group.to_vec(), params.clone())?
                .iter()
                .zip(group)
            {
                let logits = c
                    .prompt_logits
                    .as_ref()
                    .ok_or_else(|| EngineError::InvalidInput("no prompt logits returned".into()))?;
                let mut nll = 0f64;
                for pos in first..ctx - 1 {
                    let row = &logits[pos * vocab..(pos + 1) * vocab];
                    nll += log_sum_exp(row) - row[chunk[pos + 1] as usize] as f64;
                }
                let n = ctx - 1 - first;
                chunk_ppl.push((nll / n as f64).exp());
                total_nll += nll;
                n_scored += n;
            }
        }
        Ok(PerplexityReport {
            ppl: (total_nll / n_scored as f64).exp(),
            n_chunks,
            chunk_ppl,
            n_scored,
        })
    }
}
