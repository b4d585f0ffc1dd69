//! `pagoda perplexity`: perplexity of a text file (llama-perplexity's method).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use pagoda::engine::EngineConfig;
use pagoda::perplexity::perplexity_config;
use pagoda_backend::Backend;
use serde_json::json;

use crate::cli::Common;
use crate::setup::{ModelSource, build, kv_dtype, model_source};

/// Flags of `pagoda perplexity`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// The text.
    #[arg(long)]
    pub file: PathBuf,
    /// Chunk length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// KV cache dtype.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pagoda perplexity`.
pub fn exec(a: Args) -> Result<()> {
    if a.ctx < 4 {
        bail!("--ctx must be at least 4");
    }
    let bytes =
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|e| anyhow!("{} is not UTF-8: {e}", a.file.display()))?;
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    with_backend!(kind, a.common.threads, |b| run(&a, &source, &text, b))
}

fn run<B: Backend>(a: &Args, source: &ModelSource, text: &str, backend: Arc<B>) -> Result<()> {
    let cfg = EngineConfig {
        kv_dtype: kv_dtype(&a.kv_dtype)?,
        ..perplexity_config(a.ctx)
    };
    let mut engine = build(source, backend, cfg)?;
    let toks = engine.tokenize(text);
    let r = engine.perplexity(&toks, a.ctx)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(
                &json!({ "ppl": r.ppl, "n_chunks": r.n_chunks, "chunk_ppl": r.chunk_ppl })
            )?
        );
    } else {
        for (i, p) in r.chunk_ppl.iter().enumerate() {
            eprintln!("pagoda: chunk {} of {}: ppl {p:.4}", i + 1, r.n_chunks);
        }
        println!(
            "perplexity over {} chunks of {} tokens: {:.4}",
            r.n_chunks, a.ctx, r.ppl
        );
    }
    Ok(())
}
