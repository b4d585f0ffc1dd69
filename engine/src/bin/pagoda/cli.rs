//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Pagoda: an LLM inference engine that shows where every byte goes.
#[derive(Debug, Parser)]
#[command(name = "pagoda", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The CPU reference backend.
    Cpu,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// GGUF model file (default: SmolLM2-135M-Instruct Q4_1, fetched on first use).
    #[arg(long, global = true)]
    pub model: Option<PathBuf>,
    /// Backend.
    #[arg(long, value_enum, default_value = "cpu", global = true)]
    pub backend: BackendKind,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0, global = true)]
    pub threads: usize,
}

/// Memory options of commands that build an engine.
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Context length per sequence (default: the model's, at most 4096).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Concurrent sequences.
    #[arg(long)]
    pub max_seqs: Option<usize>,
    /// KV cache dtype: f32, f16 or q8_0.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: String,
    /// Fraction of device memory (host RAM on the CPU) the engine may use.
    #[arg(long, conflicts_with = "memory_budget")]
    pub gpu_memory_utilization: Option<f64>,
    /// Absolute memory budget, e.g. 8GiB.
    #[arg(long)]
    pub memory_budget: Option<String>,
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

/// Sampling flags.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Greedy decoding (argmax).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "min_p"])]
    pub greedy: bool,
    /// Temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Top-k (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Top-p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Min-p.
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Repetition penalty (1 = off).
    #[arg(long)]
    pub repeat_penalty: Option<f32>,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it as it is produced.
    Generate {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        prompt: GenPrompt,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Stop when the text contains this string (repeatable).
        #[arg(long)]
        stop: Vec<String>,
        /// Run N copies of the prompt at once and report aggregate throughput.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Record StepStats and MemorySnapshots as JSON lines (docs/trace-schema.md).
        #[arg(long)]
        trace: Option<PathBuf>,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Print one JSON document instead of streaming text.
        #[arg(long)]
        json: bool,
    },
    /// Chat with the model using its chat template.
    Chat {
        #[command(flatten)]
        common: Common,
        /// One user turn, answered, then exit.
        #[arg(long)]
        message: Option<String>,
        /// System message.
        #[arg(long)]
        system: Option<String>,
        /// Tokens per answer at most.
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Print one JSON document (with --message).
        #[arg(long)]
        json: bool,
    },
    /// Print the token ids of a prompt as a JSON array.
    Tokenize {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        prompt: PromptArgs,
        /// Treat control-token text as plain text.
        #[arg(long)]
        no_parse_special: bool,
    },
    /// Summarise the logits at the last prompt position.
    Logits {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        prompt: PromptArgs,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Print JSON (the only format).
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a text file (llama-perplexity's method).
    Perplexity {
        #[command(flatten)]
        common: Common,
        /// The text.
        #[arg(long)]
        file: PathBuf,
        /// Chunk length in tokens.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// KV cache dtype.
        #[arg(long, default_value = "f32")]
        kv_dtype: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill and decode speed.
    Bench {
        #[command(flatten)]
        common: Common,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 64)]
        prompt_len: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 128)]
        gen_len: usize,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// KV cache dtype.
        #[arg(long, default_value = "f32")]
        kv_dtype: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compute the memory plan without loading weights.
    Plan {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Per-step token budget.
        #[arg(long, default_value_t = 512)]
        max_batched_tokens: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Prompt sources of `generate`.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct GenPrompt {
    /// Prompt text (special tokens such as <|im_start|> are parsed).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Read the prompt from this file (exact bytes).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// One prompt per line (with --parallel runs them all at once).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
}
