//! `pagoda bench`: prefill and decode speed at one or more batch sizes, as
//! the host sees it (wall clock, tokens delivered to the host).
//!
//! For each batch size `B` of `--batch`, each repetition:
//! 1. adds `B` requests of `--prompt-len` distinct pseudo-random tokens
//!    (greedy, end-of-generation ignored, so lengths are exact);
//! 2. **prefill**: steps until every sequence has its first token. With the
//!    default `--ubatch` (largest `B` × prompt length) that is one step over
//!    all `B × prompt_len` tokens;
//! 3. **decode**: `--gen-len` more steps, each one token for every sequence;
//!    each step's wall time is recorded.
//!
//! Reported per batch size: prefill tokens/s (`B × prompt_len / prefill
//! time`), total decode tokens/s over all sequences (`B × gen_len / decode
//! time`), mean / p50 / p99 wall time of one decode step, the pool's peak
//! and reserved bytes, and what ran (backend, device, model, weight and KV
//! dtypes, threads, commit, date). Rates are medians over `--reps` runs after
//! `--warmup` runs; step times pool every run.
//!
//! Shapes of other tools: llama-bench pp512 is `--batch 1 --prompt-len 512
//! --gen-len 0`, its tg128 (from an empty context) `--batch 1 --prompt-len 1
//! --gen-len 128`; llama-batched-bench's is `--batch 8,32,... --prompt-len
//! 128 --gen-len 128`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use pagoda::engine::{Engine, EngineConfig, GenerationParams};
use pagoda::plan::human;
use pagoda::sampler::SamplingParams;
use pagoda::sequence::FinishReason;
use pagoda_backend::Backend;
use serde_json::{Value, json};

use crate::cli::{BudgetArgs, Common};
use crate::setup::{ModelSource, budget, build, kv_dtype, model_source};

/// The commit this binary was built from (`unknown` without git).
pub const COMMIT: &str = env!("PAGODA_GIT_COMMIT");

/// Flags of `pagoda bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Batch sizes, comma-separated: B sequences prefilled, then decoded, together.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Decode steps after the prefill (0 = prefill only).
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Measured repetitions per batch size (rates are their median).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Unmeasured runs before them, per batch size.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Token rows per step (default: largest batch × prompt length, so every
    /// prefill is one step).
    #[arg(long)]
    pub ubatch: Option<usize>,
    /// KV cache dtype: f32, f16 or q8_0.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: String,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// Print one JSON document: an array with one object per batch size.
    #[arg(long)]
    pub json: bool,
}

/// Runs `pagoda bench`.
pub fn exec(a: Args) -> Result<()> {
    if a.prompt_len == 0 || a.reps == 0 {
        bail!("--prompt-len and --reps must be at least 1");
    }
    if a.batch.is_empty() || a.batch.contains(&0) {
        bail!("--batch sizes must be at least 1 (e.g. --batch 1,8,32)");
    }
    if a.ubatch == Some(0) {
        bail!("--ubatch must be at least 1");
    }
    let kind = a.common.backend.kind()?;
    let source = model_source(&a.common)?;
    with_backend!(kind, a.common.threads, |b| run(&a, &source, b))
}

/// One measured run at one batch size.
struct RunStats {
    prefill_s: f64,
    decode_s: f64,
    decode_tokens: usize,
    /// Wall time of each decode step.
    step_s: Vec<f64>,
}

fn run<B: Backend>(a: &Args, source: &ModelSource, backend: Arc<B>) -> Result<()> {
    let max_batch = a.batch.iter().copied().max().unwrap_or(1);
    let ubatch = a.ubatch.unwrap_or(max_batch * a.prompt_len).max(max_batch);
    let cfg = EngineConfig {
        ctx: Some((a.prompt_len + a.gen_len + 1).next_multiple_of(16)),
        max_seqs: Some(max_batch),
        max_num_batched_tokens: ubatch,
        max_logits_rows: max_batch,
        kv_dtype: kv_dtype(&a.kv_dtype)?,
        enable_prefix_caching: false,
        budget: budget(&a.budget)?,
        ..EngineConfig::default()
    };
    let weight_dtype = source.weight_dtype()?;
    let mut engine = build(source, backend, cfg)?;
    let info = engine.runner().backend().info().clone();
    let threads = match a.common.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let date = rfc3339_utc(SystemTime::now());
    let bar = indicatif::ProgressBar::new((a.batch.len() * (a.reps + a.warmup)) as u64);
    let mut docs = Vec::new();
    for &b in &a.batch {
        let mut runs = Vec::new();
        for rep in 0..a.warmup + a.reps {
            let r = run_once(&mut engine, a, b)?;
            if rep >= a.warmup {
                runs.push(r);
            }
            bar.inc(1);
        }
        let stats = engine.runner().pool().stats();
        let kv = engine.runner().kv_cache().stats();
        let prefill_tokens = b * a.prompt_len;
        let mut pp: Vec<f64> = runs
            .iter()
            .map(|r| prefill_tokens as f64 / r.prefill_s.max(1e-12))
            .collect();
        let decoding = a.gen_len > 0;
        let mut tg: Vec<f64> = runs
            .iter()
            .map(|r| r.decode_tokens as f64 / r.decode_s.max(1e-12))
            .collect();
        let mut steps: Vec<f64> = runs.iter().flat_map(|r| r.step_s.iter().copied()).collect();
        steps.sort_by(f64::total_cmp);
        let ms = |v: Option<f64>| v.map(|s| s * 1e3);
        let mean = (!steps.is_empty()).then(|| steps.iter().sum::<f64>() / steps.len() as f64);
        docs.push(json!({
            "backend": info.name,
            "device": info.device,
            "threads": threads,
            "model": source.name(),
            "model_source": source.kind(),
            "weight_dtype": weight_dtype.name(),
            "kv_dtype": engine.memory_plan().kv_dtype,
            "commit": COMMIT,
            "date": date,
            "batch": b,
            "prompt_len": a.prompt_len,
            "gen_len": a.gen_len,
            "reps": a.reps,
            "warmup": a.warmup,
            "ubatch": ubatch,
            "prefill_tokens": prefill_tokens,
            "prefill_s": median(&mut runs.iter().map(|r| r.prefill_s).collect::<Vec<_>>()),
            "prefill_tokens_per_s": median(&mut pp),
            "prefill_runs_tokens_per_s": pp,
            "decode_tokens": runs.first().map_or(0, |r| r.decode_tokens),
            "decode_s": decoding.then(|| median(&mut runs.iter().map(|r| r.decode_s).collect::<Vec<_>>())),
            "decode_tokens_per_s": decoding.then(|| median(&mut tg)),
            "decode_runs_tokens_per_s": if decoding { json!(tg) } else { json!([]) },
            "decode_step_ms_mean": ms(mean),
            "decode_step_ms_p50": ms(percentile(&steps, 50.0)),
            "decode_step_ms_p99": ms(percentile(&steps, 99.0)),
            "peak_pool_allocated_bytes": stats.peak_allocated_bytes,
            "pool_reserved_bytes": stats.reserved_bytes,
            "kv_reserved_bytes": kv.reserved_bytes,
            "kv_peak_committed_bytes": kv.peak_committed_bytes,
            // Pool segments (never shrunk during a bench) + the most KV committed at once.
            "peak_device_bytes": stats.reserved_bytes + kv.peak_committed_bytes,
            "plan_total_bytes": engine.memory_plan().total_bytes,
            "preemptions": engine.scheduler().stats().num_preemptions,
        }));
    }
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&docs)?);
    } else {
        print_table(&docs);
    }
    Ok(())
}

/// One repetition at batch size `b`.
fn run_once<B: Backend>(engine: &mut Engine<B>, a: &Args, b: usize) -> Result<RunStats> {
    let vocab = engine.model_config().vocab_size as u64;
    let params = GenerationParams {
        max_tokens: a.gen_len + 1,
        sampling: SamplingParams::greedy(),
        ignore_eog: true,
        ..Default::default()
    };
    let mut ids = Vec::with_capacity(b);
    for s in 0..b as u64 {
        ids.push(engine.add_request(prompt(s, a.prompt_len, vocab), params.clone())?);
    }
    // Prefill: until every sequence has its first token.
    let t0 = Instant::now();
    let mut started = HashSet::new();
    while started.len() < b && engine.has_unfinished() {
        started.extend(
            engine
                .step()?
                .iter()
                .filter(|e| e.token.is_some())
                .map(|e| e.id),
        );
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut step_s = Vec::with_capacity(a.gen_len);
    let mut decode_tokens = 0;
    while engine.has_unfinished() {
        let t = Instant::now();
        let events = engine.step()?;
        step_s.push(t.elapsed().as_secs_f64());
        decode_tokens += events.iter().filter(|e| e.token.is_some()).count();
    }
    for id in ids {
        let c = engine
            .take_completion(id)
            .ok_or_else(|| anyhow!("bench request {id:?} did not finish"))?;
        if let FinishReason::Error(e) = &c.finish_reason {
            bail!("bench request failed: {e}");
        }
        if c.generated_tokens.len() != a.gen_len + 1 {
            bail!(
                "bench request generated {} tokens, expected {}",
                c.generated_tokens.len(),
                a.gen_len + 1
            );
        }
    }
    Ok(RunStats {
        prefill_s,
        decode_s: step_s.iter().sum(),
        decode_tokens,
        step_s,
    })
}

/// Sequence `s`'s prompt: `len` pseudo-random ordinary tokens (ids >= 17
/// skip the usual control tokens), distinct per sequence so no prefix is shared.
fn prompt(s: u64, len: usize, vocab: u64) -> Vec<u32> {
    let span = vocab.saturating_sub(17).max(1);
    (0..len as u64)
        .map(|i| {
            let h = (i + 1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(s.wrapping_mul(0xD1B5_4A32_D192_ED03));
            (17 + (h >> 32) % span).min(vocab - 1) as u32
        })
        .collect()
}

/// Median (upper middle for an even count); 0 when empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `t` as RFC 3339 in UTC, whole seconds (`2026-12-01T21:29:32Z`).
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn print_table(docs: &[Value]) {
    let Some(first) = docs.first() else {
        return;
    };
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    println!(
        "model {} ({}, {})  backend {} on {}  kv {}  pp {} / tg {} per sequence  commit {}  {}",
        s(&first["model"]),
        s(&first["model_source"]),
        s(&first["weight_dtype"]),
        s(&first["backend"]),
        s(&first["device"]),
        s(&first["kv_dtype"]),
        first["prompt_len"],
        first["gen_len"],
        &s(&first["commit"])[..s(&first["commit"]).len().min(12)],
        s(&first["date"]),
    );
    println!(
        "{:>6} {:>12} {:>14} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "batch", "pp tok/s", "tg tok/s", "step ms", "p50 ms", "p99 ms", "peak pool", "reserved"
    );
    let f = |v: &Value, prec: usize| match v.as_f64() {
        Some(x) => format!("{x:.prec$}"),
        None => "-".into(),
    };
    for d in docs {
        println!(
            "{:>6} {:>12} {:>14} {:>10} {:>10} {:>10} {:>12} {:>12}",
            d["batch"].as_u64().unwrap_or(0),
            f(&d["prefill_tokens_per_s"], 1),
            f(&d["decode_tokens_per_s"], 1),
            f(&d["decode_step_ms_mean"], 2),
            f(&d["decode_step_ms_p50"], 2),
            f(&d["decode_step_ms_p99"], 2),
            human(d["peak_pool_allocated_bytes"].as_u64().unwrap_or(0)),
            human(d["pool_reserved_bytes"].as_u64().unwrap_or(0)),
        );
    }
    println!(
        "(tg tok/s: total over all sequences; step ms: host wall time of one decode step; median of {} reps)",
        first["reps"]
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        let at = |s| rfc3339_utc(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_798_839_000), "2027-01-01T21:30:00Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn prompts_are_in_range_and_distinct_per_sequence() {
        let (a, b) = (prompt(0, 64, 300), prompt(1, 64, 300));
        assert!(a.iter().chain(&b).all(|&t| (17..300).contains(&t)));
        assert_ne!(a, b);
        assert_eq!(a, prompt(0, 64, 300));
    }
}
