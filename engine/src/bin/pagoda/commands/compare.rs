//! `pagoda compare --backends cpu,wgpu[,cuda]`: the same prompts on several backends,
//! measured against the CPU (the reference).
//!
//! Per prompt, the CPU generates `--max-tokens` greedy tokens. Every backend then runs the
//! prompt followed by those tokens as one teacher-forced prefill with every position's
//! logits, and at each of the `--max-tokens` steps its logits row is compared with the
//! CPU's: max |Δlogit| over the vocabulary, KL(CPU ‖ backend) of the softmaxes (f64), and
//! whether its argmax is the CPU's token (greedy agreement). Speed is wall time of a greedy
//! run of the same length (prefill tokens/s from a one-token run, decode tokens/s from the
//! rest); memory is the pool's peak plus the KV committed at its peak.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use pagoda::engine::GenerationParams;
use pagoda::sampler::SamplingParams;
use pagoda::sequence::FinishReason;
use pagoda_backend::Backend;
use serde_json::{Value, json};

use crate::backend::{BackendArg, BackendKind, BackendParser};
use crate::cli::{Common, MemoryArgs};
use crate::setup::{ModelSource, build, engine_config, model_source};

/// The prompts used without `--prompts`.
const DEFAULT_PROMPTS: [&str; 3] = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
];

/// Flags of `pagoda compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Backends to compare, comma-separated (the CPU is the reference and always runs).
    #[arg(long, value_delimiter = ',', value_parser = BackendParser, default_value = "cpu")]
    pub backends: Vec<BackendArg>,
    /// A file of prompts, one per line (default: three built-in prompts).
    #[arg(long)]
    pub prompts: Option<std::path::PathBuf>,
    /// Greedy tokens per prompt (the steps compared).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// What one backend produced for all prompts.
struct Run {
    /// Per prompt: `max_tokens` logits rows of the teacher-forced run.
    rows: Vec<Vec<Vec<f32>>>,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    peak_bytes: u64,
    device: String,
}

/// Runs `pagoda compare`.
pub fn exec(a: Args) -> Result<()> {
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let prompts: Vec<String> = match &a.prompts {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| anyhow!("{}: {e}", p.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    if prompts.is_empty() {
        bail!("no prompts (the file has no non-empty line)");
    }
    let mut kinds = vec![BackendKind::Cpu];
    for b in &a.backends {
        let k = b.kind()?;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    let source = model_source(&a.common)?;
    // The reference: the CPU's greedy tokens for every prompt.
    let tokens: Vec<(Vec<u32>, Vec<u32>)> = {
        let cpu = Arc::new(pagoda_cpu::CpuBackend::new(a.common.threads)?);
        let mut engine = build(&source, cpu, config(&a, 0)?)?;
        let mut v = Vec::new();
        for p in &prompts {
            let toks = engine.tokenize(p);
            if toks.is_empty() {
                bail!("prompt {p:?} has no tokens");
            }
            let c = engine
                .generate(vec![toks.clone()], greedy(a.max_tokens))?
                .pop()
                .ok_or_else(|| anyhow!("no result"))?;
            if let FinishReason::Error(e) = &c.finish_reason {
                bail!("{e}");
            }
            v.push((toks, c.generated_tokens));
        }
        v
    };
    let longest = tokens
        .iter()
        .map(|(p, g)| p.len() + g.len())
        .max()
        .unwrap_or(1);
    let mut runs = Vec::new();
    for kind in &kinds {
        let r = with_backend!(*kind, a.common.threads, |b| run(
            &a, &source, &tokens, longest, b
        ));
        runs.push((kind.name(), r));
    }
    let reference = match &runs[0].1 {
        Ok(r) => r.rows.clone(),
        Err(e) => bail!("the CPU reference failed: {e:#}"),
    };
    let docs: Vec<Value> = runs
        .iter()
        .map(|(name, r)| match r {
            Ok(r) => summary(name, r, &reference, &tokens),
            Err(e) => json!({"backend": name, "error": format!("{e:#}")}),
        })
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&json!({
                "model": source.name(),
                "prompts": prompts.len(),
                "steps_per_prompt": a.max_tokens,
                "reference": "cpu",
                "backends": docs,
            }))?
        );
    } else {
        print_table(&docs);
    }
    if docs.iter().any(|d| d.get("error").is_some()) {
        bail!("a backend failed (see above)");
    }
    Ok(())
}

fn greedy(n: usize) -> GenerationParams {
    GenerationParams {
        max_tokens: n,
        sampling: SamplingParams::greedy(),
        ignore_eog: true,
        ..Default::default()
    }
}

/// Engine settings: one sequence, all its positions' logits (`logits_rows` of them).
fn config(a: &Args, logits_rows: usize) -> Result<pagoda::EngineConfig> {
    let mut cfg = engine_config(&a.memory, 1)?;
    if logits_rows > 0 {
        // All-position logits need a row for every token a step may hold.
        let rows = cfg.max_num_batched_tokens.max(logits_rows);
        cfg.max_logits_rows = rows;
        cfg.max_num_batched_tokens = rows;
        cfg.enable_prefix_caching = false;
    }
    Ok(cfg)
}

fn run<B: Backend>(
    a: &Args,
    source: &ModelSource,
    tokens: &[(Vec<u32>, Vec<u32>)],
    longest: usize,
    backend: Arc<B>,
) -> Result<Run> {
    let device = backend.info().device.clone();
    let mut engine = build(source, backend, config(a, longest)?)?;
    let mut rows = Vec::new();
    let (mut prefill_tok, mut prefill_s, mut decode_tok, mut decode_s) =
        (0usize, 0f64, 0usize, 0f64);
    let vocab = engine.model_config().vocab_size;
    for (prompt, generated) in tokens {
        // Teacher-forced: prompt + the CPU's tokens but the last, every position's logits.
        let mut forced = prompt.clone();
        forced.extend_from_slice(&generated[..generated.len().saturating_sub(1)]);
        let params = GenerationParams {
            max_tokens: 1,
            want_all_logits: true,
            ..greedy(1)
        };
        let c = engine
            .generate(vec![forced.clone()], params)?
            .pop()
            .ok_or_else(|| anyhow!("no result"))?;
        if let FinishReason::Error(e) = &c.finish_reason {
            bail!("{e}");
        }
        let all = c
            .prompt_logits
            .ok_or_else(|| anyhow!("the engine returned no prompt logits"))?;
        let first = prompt.len() - 1;
        rows.push(
            (first..forced.len())
                .map(|p| all[p * vocab..(p + 1) * vocab].to_vec())
                .collect(),
        );
        // Speed: a one-token run (prefill), then the whole greedy run.
        let t0 = Instant::now();
        engine.generate(vec![prompt.clone()], greedy(1))?;
        let t_prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        engine.generate(vec![prompt.clone()], greedy(generated.len()))?;
        let t_all = t1.elapsed().as_secs_f64();
        prefill_tok += prompt.len();
        prefill_s += t_prefill;
        decode_tok += generated.len().saturating_sub(1);
        decode_s += (t_all - t_prefill).max(1e-9);
    }
    let stats = engine.runner().pool().stats();
    let kv = engine.runner().kv_cache().stats();
    Ok(Run {
        rows,
        prefill_tokens_per_s: prefill_tok as f64 / prefill_s.max(1e-9),
        decode_tokens_per_s: decode_tok as f64 / decode_s.max(1e-9),
        peak_bytes: stats.peak_allocated_bytes + kv.peak_committed_bytes,
        device,
    })
}

/// log-softmax of a row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn summary(
    name: &str,
    r: &Run,
    reference: &[Vec<Vec<f32>>],
    tokens: &[(Vec<u32>, Vec<u32>)],
) -> Value {
    let (mut max_abs, mut max_kl, mut sum_kl, mut steps, mut agree) =
        (0f64, 0f64, 0f64, 0usize, 0usize);
    for ((rows, refs), (_, generated)) in r.rows.iter().zip(reference).zip(tokens) {
        for ((row, rf), &tok) in rows.iter().zip(refs).zip(generated) {
            for (a, b) in row.iter().zip(rf) {
                max_abs = max_abs.max((*a as f64 - *b as f64).abs());
            }
            let (p, q) = (log_softmax(rf), log_softmax(row));
            let kl: f64 = p
                .iter()
                .zip(&q)
                .map(|(lp, lq)| lp.exp() * (lp - lq))
                .sum::<f64>()
                .max(0.0);
            max_kl = max_kl.max(kl);
            sum_kl += kl;
            steps += 1;
            if argmax(row) == tok {
                agree += 1;
            }
        }
    }
    json!({
        "backend": name,
        "device": r.device,
        "steps": steps,
        "max_abs_logit_diff": max_abs,
        "max_kl": max_kl,
        "mean_kl": sum_kl / steps.max(1) as f64,
        "greedy_agreement": agree as f64 / steps.max(1) as f64,
        "prefill_tokens_per_s": r.prefill_tokens_per_s,
        "decode_tokens_per_s": r.decode_tokens_per_s,
        "peak_memory_bytes": r.peak_bytes,
    })
}

fn print_table(docs: &[Value]) {
    println!(
        "{:<6} {:>12} {:>10} {:>10} {:>9} {:>11} {:>11} {:>11}  device",
        "backend", "max|Δlogit|", "max KL", "mean KL", "agree", "pp tok/s", "tg tok/s", "peak MiB"
    );
    for d in docs {
        if let Some(e) = d.get("error") {
            println!(
                "{:<6} error: {}",
                d["backend"].as_str().unwrap_or("?"),
                e.as_str().unwrap_or("?")
            );
            continue;
        }
        let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<6} {:>12.3e} {:>10.2e} {:>10.2e} {:>8.1}% {:>11.1} {:>11.1} {:>11.1}  {}",
            d["backend"].as_str().unwrap_or("?"),
            f("max_abs_logit_diff"),
            f("max_kl"),
            f("mean_kl"),
            100.0 * f("greedy_agreement"),
            f("prefill_tokens_per_s"),
            f("decode_tokens_per_s"),
            f("peak_memory_bytes") / (1u64 << 20) as f64,
            d["device"].as_str().unwrap_or("?"),
        );
    }
}
