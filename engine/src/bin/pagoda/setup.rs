//! Helpers every command shares: where the model comes from, engine settings
//! from flags, building an engine, prompts and sampling flags.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use pagoda::engine::{Engine, EngineConfig};
use pagoda::gguf::GgufFile;
use pagoda::model::synthetic::{SyntheticSpec, synthetic_gguf_file};
use pagoda::model::{LlamaConfig, LlamaWeights};
use pagoda::plan::{Budget, MemoryPlan, human, parse_bytes};
use pagoda::sampler::SamplingParams;
use pagoda::sequence::FinishReason;
use pagoda_backend::{Backend, DType, DeviceMemory, MemoryTag};

use crate::cli::{BudgetArgs, Common, MemoryArgs, PromptArgs, SamplingArgs};

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A GGUF file on disk.
    File(PathBuf),
    /// `--dummy-weights NAME`: a named shape with seeded random weights, built in memory.
    Dummy {
        /// The shape's name.
        name: String,
        /// The shape, with `--dummy-dtype` applied.
        spec: SyntheticSpec,
    },
}

impl ModelSource {
    /// The model as `--model`/`--dummy-weights` name it: a path, or the dummy
    /// shape's name.
    pub fn name(&self) -> String {
        match self {
            ModelSource::File(p) => p.display().to_string(),
            ModelSource::Dummy { name, .. } => name.clone(),
        }
    }

    /// `file` or `dummy`.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelSource::File(_) => "file",
            ModelSource::Dummy { .. } => "dummy",
        }
    }

    /// The GGUF header: metadata (hyper-parameters, tokenizer) and tensor
    /// infos. Cheap: a memory map of the file, or for a dummy model a file
    /// with the metadata only (no weights are generated).
    pub fn header(&self) -> Result<GgufFile> {
        Ok(match self {
            ModelSource::File(p) => GgufFile::open(p)?,
            ModelSource::Dummy { spec, .. } => spec.header_file()?,
        })
    }

    /// The hyper-parameters and the exact bytes the weights will take on `backend`.
    pub fn shape<B: Backend>(&self, backend: &B) -> Result<(LlamaConfig, u64)> {
        let f = self.header()?;
        let cfg = LlamaConfig::from_gguf(&f)?;
        let bytes = match self {
            ModelSource::File(_) => LlamaWeights::planned_bytes(&f, &cfg, backend)?,
            // The generated file holds GGUF blocks; a backend that repacks
            // weights would differ here, and `build` re-plans with the file.
            ModelSource::Dummy { spec, .. } => spec.weights_bytes(),
        };
        Ok((cfg, bytes))
    }

    /// The matrices' weight type (that of `blk.0.attn_q.weight`).
    pub fn weight_dtype(&self) -> Result<DType> {
        match self {
            ModelSource::Dummy { spec, .. } => Ok(spec.weight_dtype),
            ModelSource::File(_) => {
                let f = self.header()?;
                let t = f
                    .tensor("blk.0.attn_q.weight")
                    .ok_or_else(|| anyhow!("{}: no tensor blk.0.attn_q.weight", self.name()))?;
                Ok(t.require_dtype(f.path())?)
            }
        }
    }
}

/// The model `--model` / `--dummy-weights` name (default: the default model,
/// fetched on first use).
pub fn model_source(common: &Common) -> Result<ModelSource> {
    if let Some(name) = &common.dummy_weights {
        let spec = SyntheticSpec::named(name).ok_or_else(|| {
            anyhow!(
                "unknown dummy model `{name}` (known: {})",
                SyntheticSpec::NAMES.join(", ")
            )
        })?;
        let dtype = match common.dummy_dtype.as_deref() {
            None => spec.weight_dtype,
            Some(text) => match DType::from_name(text) {
                Some(d) if DType::WEIGHT_TYPES.contains(&d) => d,
                _ => bail!(
                    "unknown --dummy-dtype `{text}` (expected one of {})",
                    DType::WEIGHT_TYPES.map(DType::name).join(", ")
                ),
            },
        };
        let spec = SyntheticSpec {
            weight_dtype: dtype,
            ..spec
        };
        spec.validate()?;
        return Ok(ModelSource::Dummy {
            name: name.clone(),
            spec,
        });
    }
    match &common.model {
        Some(p) => {
            if !p.exists() {
                bail!("model file {} does not exist", p.display());
            }
            Ok(ModelSource::File(p.clone()))
        }
        None => Ok(ModelSource::File(pagoda::fetch::default_model_path()?)),
    }
}

/// Parses `--kv-dtype`.
pub fn kv_dtype(name: &str) -> Result<DType> {
    match DType::from_name(name) {
        Some(d @ (DType::F32 | DType::F16 | DType::Q8_0)) => Ok(d),
        _ => bail!("unknown KV dtype `{name}` (expected f32, f16 or q8_0)"),
    }
}

/// The budget `--memory-budget` / `--gpu-memory-utilization` give (default 0.90).
pub fn budget(m: &BudgetArgs) -> Result<Budget> {
    if let Some(b) = &m.memory_budget {
        let bytes = parse_bytes(b)
            .ok_or_else(|| anyhow!("cannot parse memory budget `{b}` (try 8GiB or 512MiB)"))?;
        return Ok(Budget::Bytes(bytes));
    }
    let u = m.gpu_memory_utilization.unwrap_or(0.9);
    if !(u > 0.0 && u <= 1.0) {
        bail!("--gpu-memory-utilization must be in (0, 1], got {u}");
    }
    Ok(Budget::Utilization(u))
}

/// Engine settings from the memory flags: the one translation every command
/// that builds an engine (`generate`, `chat`, `logits`) and `plan` share, so
/// `plan` with the same flags prints the plan `generate` builds.
///
/// The step limits size everything: `--max-seqs` (default `default_seqs`,
/// which is `generate`'s `--parallel`, 1 elsewhere; with `--memory-budget`
/// and no `--max-seqs`, as many as the budget holds), `--ctx` and
/// `--max-batched-tokens`. The number of requests never does: requests beyond
/// `--max-seqs` wait and are admitted as others finish. The values are
/// checked by [`EngineConfig::plan_request`].
pub fn engine_config(m: &MemoryArgs, default_seqs: usize) -> Result<EngineConfig> {
    if default_seqs == 0 {
        bail!("--parallel must be at least 1");
    }
    let budget = budget(&m.budget)?;
    let max_seqs = match m.max_seqs {
        Some(n) => Some(n),
        None if matches!(budget, Budget::Bytes(_)) => None,
        None => Some(default_seqs),
    };
    Ok(EngineConfig {
        ctx: m.ctx,
        max_seqs,
        max_num_batched_tokens: m.max_batched_tokens,
        // One logits row per sequence (the plan raises it to the derived count).
        max_logits_rows: max_seqs.unwrap_or(1),
        kv_dtype: kv_dtype(&m.kv_dtype)?,
        budget,
        swap_space_bytes: swap_space(m)?,
        ..EngineConfig::default()
    })
}

/// `--swap-space` in bytes (0 when not given).
fn swap_space(m: &MemoryArgs) -> Result<u64> {
    match &m.swap_space {
        None => Ok(0),
        Some(s) => parse_bytes(s)
            .ok_or_else(|| anyhow!("cannot parse swap space `{s}` (try 4GiB or 512MiB)")),
    }
}

/// Plans, then loads (or for a dummy model generates) the model and builds
/// the engine, logging what it took to stderr. A dummy model is planned from
/// its shape first, so one that does not fit is refused before any weight
/// is generated.
pub fn build<B: Backend>(
    source: &ModelSource,
    backend: Arc<B>,
    cfg: EngineConfig,
) -> Result<Engine<B>> {
    let t = Instant::now();
    // The same device memory `pagoda plan` plans against.
    let device = planning_memory(source, backend.as_ref())?;
    let builder = Engine::builder()
        .backend(backend.clone())
        .config(cfg.clone())
        .device_memory(device);
    let builder = match source {
        ModelSource::File(path) => builder.model(path),
        ModelSource::Dummy { name, spec } => {
            let (model_cfg, weights_bytes) = source.shape(backend.as_ref())?;
            cfg.plan(&model_cfg, weights_bytes, device, backend.as_ref())?;
            eprintln!(
                "pagoda: generating dummy weights {name} ({}, {}) ...",
                spec.weight_dtype,
                human(weights_bytes)
            );
            let g = Instant::now();
            let gguf = synthetic_gguf_file(spec)?;
            eprintln!(
                "pagoda: generated {} in {:.2}s",
                human(gguf.file_bytes()),
                g.elapsed().as_secs_f64()
            );
            builder.gguf(gguf)
        }
    };
    let engine = builder.build()?;
    let p = engine.memory_plan();
    eprintln!(
        "pagoda: loaded {} in {:.2}s ({} backend: {})",
        source.name(),
        t.elapsed().as_secs_f64(),
        engine.runner().backend().info().name,
        engine.runner().backend().info().device
    );
    eprintln!(
        "pagoda: memory plan: weights {} + activations {} + KV {} ({} pages of {} tokens, {}) + headroom {} = {} of {} budget",
        human(p.weights_bytes),
        human(p.workspace_bytes),
        human(p.kv_bytes),
        p.num_pages,
        p.page_size,
        p.kv_dtype,
        human(p.headroom_bytes),
        human(p.total_bytes),
        human(p.budget_bytes)
    );
    print_warnings(p);
    Ok(engine)
}

/// Prints the plan's warnings to stderr.
pub fn print_warnings(p: &MemoryPlan) {
    for w in &p.warnings {
        eprintln!("pagoda: warning: {w}");
    }
}

/// The plan next to what the engine requested and holds per tag (`--json`):
/// pool blocks by tag, and the KV arena's reservation (outside the pool)
/// with what of it is committed.
pub fn memory_json<B: Backend>(engine: &Engine<B>) -> serde_json::Value {
    let p = engine.memory_plan();
    let stats = engine.runner().pool().stats();
    let by_tag = |f: &dyn Fn(MemoryTag) -> u64| {
        MemoryTag::ALL
            .iter()
            .map(|&t| (t.name().to_string(), serde_json::json!(f(t))))
            .collect::<serde_json::Map<_, _>>()
    };
    let kv = engine.runner().kv_cache().stats();
    serde_json::json!({
        "plan": p,
        "pool_requested_by_tag": by_tag(&|t| stats.requested(t)),
        "pool_allocated_by_tag": by_tag(&|t| stats.allocated(t)),
        "pool_reserved_bytes": stats.reserved_bytes,
        "kv_reserved_bytes": kv.reserved_bytes,
        "kv_committed_bytes": kv.committed_bytes,
        "kv_peak_committed_bytes": kv.peak_committed_bytes,
    })
}

/// Test hook: `PAGODA_DEVICE_MEMORY=TOTAL,FREE` (e.g. `4GiB,3GiB`) makes
/// every command plan against that device memory instead of what the backend
/// reports, so budget checks can be tested without a machine of that size.
pub const DEVICE_MEMORY_ENV: &str = "PAGODA_DEVICE_MEMORY";

/// The device memory the backend reports, or [`DEVICE_MEMORY_ENV`]'s.
pub fn device_memory<B: Backend>(backend: &B) -> Result<DeviceMemory> {
    let Ok(text) = std::env::var(DEVICE_MEMORY_ENV) else {
        return Ok(backend.memory()?);
    };
    let bad = || {
        anyhow!("cannot parse {DEVICE_MEMORY_ENV}=`{text}` (expected TOTAL,FREE such as 4GiB,3GiB)")
    };
    let (total, free) = text.split_once(',').ok_or_else(bad)?;
    let (total_bytes, free_bytes) = (
        parse_bytes(total).ok_or_else(bad)?,
        parse_bytes(free).ok_or_else(bad)?,
    );
    if free_bytes > total_bytes {
        bail!("{DEVICE_MEMORY_ENV}=`{text}`: more free than in total");
    }
    Ok(DeviceMemory {
        total_bytes,
        free_bytes,
    })
}

/// The device memory to plan against ([`device_memory`]). For a dummy model
/// on a backend whose memory is host RAM, the generated file lives in that
/// RAM beside the weights loaded from it until the engine is built, so it is
/// counted as taken.
pub fn planning_memory<B: Backend>(source: &ModelSource, backend: &B) -> Result<DeviceMemory> {
    let mut device = device_memory(backend)?;
    if let ModelSource::Dummy { spec, .. } = source
        && backend.info().host_memory
    {
        device.free_bytes = device.free_bytes.saturating_sub(spec.file_bytes()?);
    }
    Ok(device)
}

/// The prompt `--prompt` / `--file` give.
pub fn read_prompt(p: &PromptArgs) -> Result<String> {
    read_prompt_parts(p.prompt.as_deref(), p.file.as_deref())
}

/// The prompt text, or the exact bytes of the prompt file (UTF-8).
pub fn read_prompt_parts(prompt: Option<&str>, file: Option<&Path>) -> Result<String> {
    match (prompt, file) {
        (Some(t), _) => Ok(t.to_string()),
        (None, Some(f)) => {
            let bytes = std::fs::read(f)
                .with_context(|| format!("cannot read prompt file {}", f.display()))?;
            String::from_utf8(bytes)
                .map_err(|e| anyhow!("prompt file {} is not UTF-8: {e}", f.display()))
        }
        (None, None) => bail!("give --prompt or --file"),
    }
}

/// Sampling parameters from the flags (llama.cpp's defaults where unset).
/// Without `--seed`, a fresh seed each run; a sampled run reports the seed
/// on stderr (`pagoda: seed N`), so that `--seed N` repeats it.
pub fn sampling(s: &SamplingArgs) -> SamplingParams {
    let seed = s.seed.unwrap_or_else(fresh_seed);
    let d = SamplingParams::default();
    let p = if s.greedy {
        SamplingParams {
            seed,
            repeat_penalty: s.repeat_penalty,
            ..SamplingParams::greedy()
        }
    } else {
        SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: d.repeat_last_n,
            seed,
        }
    };
    if !p.is_greedy() {
        eprintln!("pagoda: seed {seed}");
    }
    p
}

/// A seed no earlier run is likely to have had: 32 random bits (short enough
/// to retype, and exact in any JSON reader, `jq`'s doubles included).
fn fresh_seed() -> u64 {
    rand::random::<u32>() as u64
}

/// The JSON name of a finish reason.
pub fn reason_str(r: &FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Eog => "eog",
        FinishReason::Stop => "stop",
        FinishReason::Aborted => "aborted",
        FinishReason::Error(_) => "error",
    }
}
