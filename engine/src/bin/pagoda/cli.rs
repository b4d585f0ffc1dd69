//! Command-line arguments: the `pagoda` command, its subcommands and the
//! flag groups they share. Each subcommand's own flags live beside its code in
//! `commands/<name>.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use pagoda::sampler::SamplingParams;

use crate::backend::{BackendArg, BackendParser};
use crate::commands::{
    bench, chat, compare, devices, generate, logits, perplexity, plan, quantize, serve, tokenize,
};

/// Pagoda: an LLM inference engine that shows where every byte goes.
#[derive(Debug, Parser)]
#[command(name = "pagoda", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// wgpu adapter: a case-insensitive substring of its name as `pagoda devices` prints it.
    #[arg(long, global = true, value_name = "NAME")]
    pub adapter: Option<String>,
}

/// Options every command that loads a model takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// GGUF model file (default: SmolLM2-135M-Instruct Q4_1, fetched on first use).
    #[arg(long, global = true, conflicts_with = "dummy_weights")]
    pub model: Option<PathBuf>,
    /// Instead of a file, a model of this named shape with seeded random
    /// weights built in memory (llama2-7b, smollm2-135m, tiny).
    #[arg(long, global = true, value_name = "NAME")]
    pub dummy_weights: Option<String>,
    /// Weight type of the dummy model's matrices: q4_0, q4_1, q8_0, q5_0, q5_1,
    /// q4_k, q5_k, q6_k (256-wide rows: llama2-7b), f16, bf16 or f32 (default: the
    /// shape's own, q4_0 for llama2-7b, q4_1 for smollm2-135m).
    #[arg(long, global = true, requires = "dummy_weights")]
    pub dummy_dtype: Option<String>,
    /// Backend (only those compiled into this binary are listed).
    #[arg(long, value_parser = BackendParser, default_value = "cpu", global = true)]
    pub backend: BackendArg,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0, global = true)]
    pub threads: usize,
}

/// How much device memory the engine may use.
#[derive(Debug, Clone, Args)]
pub struct BudgetArgs {
    /// Fraction of device memory (host RAM on the CPU) the engine may use.
    #[arg(long, conflicts_with = "memory_budget")]
    pub gpu_memory_utilization: Option<f64>,
    /// Absolute memory budget, e.g. 8GiB.
    #[arg(long)]
    pub memory_budget: Option<String>,
}

/// Memory options of commands that build an engine.
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Context length per sequence (default: the model's, at most 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Sequences decoded at once; more requests wait and are admitted as
    /// others finish (default: generate's --parallel, 1 elsewhere; with
    /// --memory-budget, as many as the budget holds).
    #[arg(long)]
    pub max_seqs: Option<usize>,
    /// Tokens per step at most (chunked prefill); sizes the activations.
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: usize,
    /// KV cache dtype: f32, f16 or q8_0.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: String,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Host memory for swapped-out KV pages, e.g. 4GiB (0 = preempted
    /// sequences are recomputed).
    #[arg(long)]
    pub swap_space: Option<String>,
}

/// Where the prompt comes from.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct PromptArgs {
    /// Prompt text (special tokens such as <|im_start|> are parsed).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Read the prompt from this file (exact bytes, nothing trimmed or added).
    #[arg(long)]
    pub file: Option<PathBuf>,
}

/// Sampling flags. The defaults shown are `SamplingParams::default()`'s
/// (llama.cpp's); `--greedy` ignores them.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Greedy decoding (argmax).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "min_p"])]
    pub greedy: bool,
    /// Temperature, >= 0 (0 = greedy).
    #[arg(long, allow_negative_numbers = true, value_parser = in_range(|t| t >= 0.0, ">= 0"),
          default_value_t = SamplingParams::default().temperature)]
    pub temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    pub top_k: usize,
    /// Top-p, in (0, 1] (1 = off).
    #[arg(long, allow_negative_numbers = true, value_parser = in_range(|p| p > 0.0 && p <= 1.0, "in (0, 1]"),
          default_value_t = SamplingParams::default().top_p)]
    pub top_p: f32,
    /// Min-p, in [0, 1] (0 = off).
    #[arg(long, allow_negative_numbers = true, value_parser = in_range(|p| (0.0..=1.0).contains(&p), "in [0, 1]"),
          default_value_t = SamplingParams::default().min_p)]
    pub min_p: f32,
    /// Repetition penalty, > 0 (1 = off).
    #[arg(long, allow_negative_numbers = true, value_parser = in_range(|p| p > 0.0, "> 0"),
          default_value_t = SamplingParams::default().repeat_penalty)]
    pub repeat_penalty: f32,
    /// RNG seed [default: a fresh one each run, printed on stderr as
    /// `pagoda: seed N` and in --json as "seed"].
    #[arg(long)]
    pub seed: Option<u64>,
}

/// A parser of a finite `f32` for which `ok` holds (`range` says which).
/// Negative numbers are parsed as values (with `allow_negative_numbers`), so
/// `--temperature -1` gets this range message, not "unexpected argument".
fn in_range(
    ok: fn(f32) -> bool,
    range: &'static str,
) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
    move |s| {
        let v: f32 = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a number"))?;
        if v.is_finite() && ok(v) {
            Ok(v)
        } else {
            Err(format!("must be {range}, got {s}"))
        }
    }
}

/// Parses a `--stop` string: `\n`, `\r`, `\t` and `\\` stand for a newline,
/// a carriage return, a tab and a backslash (so `--stop "\n\n"` stops at a
/// blank line); any other backslash sequence is refused.
pub fn parse_escapes(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some(o) => {
                return Err(format!(
                    "unknown escape `\\{o}` (known: \\n, \\r, \\t, and \\\\ for a backslash)"
                ));
            }
            None => return Err("a lone `\\` at the end (write \\\\ for a backslash)".into()),
        }
    }
    if out.is_empty() {
        return Err("a stop string cannot be empty".into());
    }
    Ok(out)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it as it is produced.
    Generate(generate::Args),
    /// Chat with the model using its chat template.
    Chat(chat::Args),
    /// Print the token ids of a prompt as a JSON array.
    Tokenize(tokenize::Args),
    /// Summarise the logits at the last prompt position.
    Logits(logits::Args),
    /// Perplexity of a text file (llama-perplexity's method).
    Perplexity(perplexity::Args),
    /// Measure prefill and decode speed at one or more batch sizes.
    Bench(bench::Args),
    /// Compute the memory plan without loading weights.
    Plan(plan::Args),
    /// List every backend and the devices each finds.
    Devices(devices::Args),
    /// Run the same prompts on several backends: logits and KL against the CPU, greedy
    /// agreement, speed and memory.
    Compare(compare::Args),
    /// Write a GGUF in another weight type (llama-quantize's mixes, no importance matrix).
    Quantize(quantize::Args),
    /// Serve the model over an OpenAI-compatible HTTP API, with Prometheus
    /// metrics and a telemetry stream.
    Serve(serve::Args),
}
