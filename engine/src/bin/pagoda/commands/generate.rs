//! `pagoda generate`: text from a prompt (or many at once), streamed.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use pagoda::engine::GenerationParams;
use pagoda::sequence::FinishReason;
use pagoda_backend::Backend;
use serde_json::json;

use crate::cli::{Common, MemoryArgs, SamplingArgs};
use crate::setup::{
    ModelSource, build, engine_config, model_source, read_prompt_parts, reason_str, sampling,
};

/// Flags of `pagoda generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub prompt: GenPrompt,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop when the text contains this string (repeatable; `\n`, `\t`, `\r`
    /// and `\\` are a newline, tab, carriage return and backslash).
    #[arg(long, value_parser = crate::cli::parse_escapes)]
    pub stop: Vec<String>,
    /// Sequences at once (the default of --max-seqs); with --prompt or
    /// --file, also the number of copies of the prompt run, with aggregate
    /// throughput reported.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Record StepStats and MemorySnapshots as JSON lines (docs/trace-schema.md).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Print one JSON document instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Prompt sources of `generate`.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct GenPrompt {
    /// Prompt text (special tokens such as <|im_start|> are parsed).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Read the prompt from this file (exact bytes).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// One prompt per line, one request each: --max-seqs (or --parallel) of
    /// them run at once, the rest wait and are admitted as others finish.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}

/// Runs `pagoda generate`.
pub fn exec(a: Args) -> Result<()> {
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let prompts: Vec<String> = match &a.prompt.prompts {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read prompts file {}", f.display()))?;
            let lines: Vec<String> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect();
            if lines.is_empty() {
                bail!("prompts file {} has no prompts", f.display());
            }
            lines
        }
        None => {
            let p = read_prompt_parts(a.prompt.prompt.as_deref(), a.prompt.file.as_deref())?;
            vec![p; a.parallel]
        }
    };
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("the prompt is empty");
    }
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    with_backend!(kind, a.common.threads, |b| run(&a, &source, prompts, b))
}

fn run<B: Backend>(
    a: &Args,
    source: &ModelSource,
    prompts: Vec<String>,
    backend: std::sync::Arc<B>,
) -> Result<()> {
    // Sized by the step limits, never by the number of requests: those
    // beyond --max-seqs wait.
    let cfg = engine_config(&a.memory, a.parallel)?;
    let mut engine = build(source, backend, cfg)?;
    let mut trace_rx = a
        .trace
        .as_ref()
        .map(|_| engine.telemetry().subscribe(1 << 16, true));
    let mut trace_file = match &a.trace {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create trace file {}", p.display()))?,
        )),
        None => None,
    };
    let params = GenerationParams {
        max_tokens: a.max_tokens,
        sampling: sampling(&a.sampling),
        stop: a.stop.clone(),
        ..GenerationParams::default()
    };
    let mut ids = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let toks = engine.tokenize(p);
        let mut params = params.clone();
        params.sampling.seed = params.sampling.seed.wrapping_add(i as u64);
        ids.push(engine.add_request(toks, params)?);
    }
    let stream = !a.json && ids.len() == 1;
    let t0 = Instant::now();
    let mut first_token_at = None;
    let mut stdout = std::io::stdout().lock();
    while engine.has_unfinished() {
        let events = engine.step()?;
        for ev in &events {
            if ev.token.is_some() && first_token_at.is_none() {
                first_token_at = Some(t0.elapsed());
            }
            if stream && !ev.text.is_empty() {
                write!(stdout, "{}", ev.text)?;
                stdout.flush()?;
            }
        }
        if let (Some(rx), Some(f)) = (trace_rx.as_mut(), trace_file.as_mut()) {
            for ev in rx.try_iter() {
                serde_json::to_writer(&mut *f, &ev)?;
                writeln!(f)?;
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    if let Some(f) = trace_file.as_mut() {
        f.flush()?;
    }
    let mut completions = Vec::new();
    for id in ids {
        completions.push(
            engine
                .take_completion(id)
                .ok_or_else(|| anyhow!("request {id:?} did not finish"))?,
        );
    }
    for c in &completions {
        if let FinishReason::Error(e) = &c.finish_reason {
            bail!("request {} failed: {e}", c.id.0);
        }
    }
    let total_gen: usize = completions.iter().map(|c| c.generated_tokens.len()).sum();
    let ttft = first_token_at.map_or(0.0, |d| d.as_secs_f64());
    let decode_time = (elapsed - ttft).max(1e-9);
    let decode_tokens = total_gen.saturating_sub(completions.len());
    let tps = total_gen as f64 / elapsed.max(1e-9);
    let stats = engine.scheduler().stats();
    if a.json {
        let seed = params.sampling.seed;
        let request = |c: &pagoda::engine::Completion, i: usize| {
            json!({
                "prompt_tokens": c.prompt_tokens,
                "generated_tokens": c.generated_tokens,
                "text": c.text,
                "stop_reason": reason_str(&c.finish_reason),
                "seed": seed.wrapping_add(i as u64),
            })
        };
        // One request: its fields at the top level. Several: each under
        // `requests` (and none of them repeated at the top).
        let mut doc = if completions.len() == 1 {
            request(&completions[0], 0)
        } else {
            json!({
                "requests": completions.iter().enumerate().map(|(i, c)| request(c, i)).collect::<Vec<_>>(),
                "num_requests": completions.len(),
                "aggregate_tokens_per_s": tps,
                "aggregate_decode_tokens_per_s": decode_tokens as f64 / decode_time,
                "preemptions": stats.num_preemptions,
                "prefix_cache_hit_tokens": stats.num_prefix_cache_hit_tokens,
                "seed": seed,
            })
        };
        doc["tokens_per_s"] = json!(tps);
        doc["memory"] = crate::setup::memory_json(&engine);
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        if !stream {
            for (i, c) in completions.iter().enumerate() {
                println!(
                    "--- request {i} ({}) ---\n{}",
                    reason_str(&c.finish_reason),
                    c.text
                );
            }
        } else {
            println!();
        }
        eprintln!(
            "pagoda: {} request(s), {total_gen} tokens in {elapsed:.2}s: {tps:.1} tokens/s overall, {:.1} decode tokens/s, first token after {:.0} ms, {} preemption(s)",
            completions.len(),
            decode_tokens as f64 / decode_time,
            ttft * 1000.0,
            stats.num_preemptions
        );
    }
    Ok(())
}
