//! `pagoda quantize IN OUT --type T`: a GGUF rewritten in another weight type, with
//! llama-quantize's per-tensor choices (`pagoda::quantize`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use pagoda::gguf::GgufFile;
use pagoda::quantize::{QuantMix, quantize};

/// Flags of `pagoda quantize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF file to read (F32/F16/BF16 or already quantized: then every matrix is
    /// dequantized and quantized again).
    pub input: PathBuf,
    /// The GGUF file to write (must differ from the input).
    pub output: PathBuf,
    /// Target: Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0 or Q4_1.
    #[arg(long = "type", value_parser = parse_mix)]
    pub mix: QuantMix,
    /// Threads quantizing one tensor's rows (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print a JSON report on stdout instead of the summary table.
    #[arg(long)]
    pub json: bool,
}

fn parse_mix(s: &str) -> Result<QuantMix, String> {
    QuantMix::from_name(s).ok_or_else(|| {
        format!(
            "unknown type `{s}` (known: {})",
            QuantMix::ALL.map(QuantMix::name).join(", ")
        )
    })
}

/// Runs `pagoda quantize`.
pub fn exec(a: Args) -> Result<()> {
    if a.input == a.output
        || std::fs::canonicalize(&a.input).ok() == std::fs::canonicalize(&a.output).ok()
            && a.output.exists()
    {
        bail!("the output {} is the input file", a.output.display());
    }
    let file = GgufFile::open(&a.input)?;
    let threads = match a.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let plan = pagoda::quantize::plan(&file, a.mix)?;
    let requantized = plan.requantized();
    if requantized > 0 {
        eprintln!(
            "note: {requantized} tensors are already quantized; they are dequantized and quantized again to {}, which adds error",
            a.mix.name()
        );
    }
    let bar = indicatif::ProgressBar::new(file.tensors.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = quantize(&file, a.mix, &a.output, threads, |i, _, t| {
        bar.set_position(i as u64);
        bar.set_message(t.name.clone());
    })
    .with_context(|| format!("quantizing {} to {}", a.input.display(), a.mix.name()))?;
    bar.finish_and_clear();
    let census = report.plan.census(&file);
    let fallbacks = report.plan.tensors.iter().filter(|t| t.fallback).count();
    if a.json {
        let types: serde_json::Map<String, serde_json::Value> = census
            .iter()
            .map(|(n, c)| (n.clone(), serde_json::json!(c)))
            .collect();
        let doc = serde_json::json!({
            "input": a.input.display().to_string(),
            "output": a.output.display().to_string(),
            "type": a.mix.name(),
            "tensors": report.plan.tensors.len(),
            "tensor_types": types,
            "requantized": requantized,
            "fallbacks": fallbacks,
            "bytes_in": report.bytes_in,
            "bytes_out": report.bytes_out,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "{} -> {} ({}): {} tensors, {:.1} MiB -> {:.1} MiB",
            a.input.display(),
            a.output.display(),
            a.mix.name(),
            report.plan.tensors.len(),
            mib(report.bytes_in),
            mib(report.bytes_out)
        );
        let list: Vec<String> = census.iter().map(|(n, c)| format!("{n} {c}")).collect();
        println!("  types: {}", list.join(", "));
        if fallbacks > 0 {
            println!(
                "  {fallbacks} tensor(s) fell back to a 32-element type (row width not a multiple of 256)"
            );
        }
    }
    Ok(())
}
