//! The engine: many requests at once over one model, one backend and one
//! paged KV cache.
//!
//! One [`Engine::step`] = `scheduler.schedule()` → `runner.execute(plan)` →
//! sample → `scheduler.postprocess()` → stop strings → telemetry. Requests
//! join and leave at every step (continuous batching).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

use pagoda_backend::{
    Backend, DType, DeviceMemory, FaultInjector, Pool, PoolConfig, decode_graph_batch_sizes,
};

use crate::chat::{ChatTemplate, Message};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::model::{LlamaConfig, LlamaWeights};
use crate::model_runner::{ModelRunner, RowNeed};
use crate::plan::{Budget, MemoryPlan, PlanRequest, plan};
use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::{Scheduler, SchedulerConfig, SwapConfig};
use crate::sequence::{FinishReason, SeqId, SeqParams};
use crate::step_plan::StepPlan;
use crate::telemetry::{EngineMemory, MemoryState, StepStats, Telemetry};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Engine settings. `Default` is a small interactive setup.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Context length per sequence (prompt + generated). `None` = min(model, 4096).
    pub ctx: Option<usize>,
    /// Concurrent sequences. `None` with a byte budget = derive from the budget.
    pub max_seqs: Option<usize>,
    /// Per-step token budget (chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Logits rows per step (raise for perplexity / all-position logits).
    pub max_logits_rows: usize,
    /// Tokens per KV page.
    pub page_size: usize,
    /// KV element type.
    pub kv_dtype: DType,
    /// Share full prompt pages between requests.
    pub enable_prefix_caching: bool,
    /// Memory budget.
    pub budget: Budget,
    /// Explicit KV page count, overriding the one the memory plan derives
    /// (`max_seqs` × pages of one context, or what the budget holds); must be
    /// at least one sequence's worth (`ceil(ctx / page_size)`) and fit the
    /// budget. `None` = derived. For tests and tight-memory experiments.
    pub num_pages: Option<usize>,
    /// Fault injection shared by the pool and the block manager.
    pub faults: FaultInjector,
    /// Padded decode batch sizes. `None` = `1, 2, 4, …, max_seqs` on a
    /// backend with graphs, no padding otherwise; `Some(v)`: exactly these
    /// (a decode step of `s` sequences runs as the smallest bucket `>= s`).
    pub decode_buckets: Option<Vec<usize>>,
    /// Host bytes for swapped-out KV pages (`--swap-space`); 0 = preempted
    /// sequences are always recomputed.
    pub swap_space_bytes: u64,
    /// Target bytes per layer of one KV commit unit (the granule in which the
    /// KV arena grows and shrinks); default [`crate::plan::KV_COMMIT_UNIT_BYTES`].
    pub kv_commit_unit_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            ctx: None,
            max_seqs: Some(8),
            max_num_batched_tokens: 512,
            max_logits_rows: 8,
            page_size: 16,
            kv_dtype: DType::F32,
            enable_prefix_caching: true,
            budget: Budget::Utilization(0.9),
            num_pages: None,
            faults: FaultInjector::from_env(),
            decode_buckets: None,
            swap_space_bytes: 0,
            kv_commit_unit_bytes: crate::plan::KV_COMMIT_UNIT_BYTES,
        }
    }
}

/// Default context cap when none is given (the model's may be huge).
pub const DEFAULT_MAX_CTX: usize = 4096;

/// Most concurrent sequences an engine plans for (`max_seqs`); more is
/// refused, so no size computed from it can overflow.
pub const MAX_SEQS: usize = 1 << 16;

/// Most tokens (or logits rows) one step may hold.
pub const MAX_STEP_TOKENS: usize = 1 << 20;

impl EngineConfig {
    /// What to plan for this configuration on a model: the one translation
    /// from settings to a [`PlanRequest`], used by [`EngineBuilder::build`],
    /// [`EngineBuilder::plan`] and [`EngineConfig::plan`]. Resolves the
    /// context (`None` = the model's, at most [`DEFAULT_MAX_CTX`]) and
    /// refuses one longer than the model's or shorter than 2.
    pub fn plan_request(&self, model: &LlamaConfig) -> Result<PlanRequest> {
        let ctx = self.ctx.unwrap_or(model.context_len.min(DEFAULT_MAX_CTX));
        if ctx > model.context_len {
            return Err(EngineError::InvalidInput(format!(
                "context {ctx} is longer than the model's training context {}",
                model.context_len
            )));
        }
        if ctx < 2 {
            return Err(EngineError::InvalidInput(format!(
                "a context (--ctx) of {ctx} tokens is too short: it must hold at least 2"
            )));
        }
        let limit = |what: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(EngineError::InvalidInput(format!(
                    "{what} must be between 1 and {max}, got {v}"
                )))
            } else {
                Ok(())
            }
        };
        if let Some(n) = self.max_seqs {
            limit("the number of sequences (--max-seqs)", n, MAX_SEQS)?;
        }
        limit(
            "the tokens per step (--max-batched-tokens)",
            self.max_num_batched_tokens,
            MAX_STEP_TOKENS,
        )?;
        limit(
            "the logits rows per step",
            self.max_logits_rows,
            MAX_STEP_TOKENS,
        )?;
        limit("the KV page size", self.page_size, MAX_STEP_TOKENS)?;
        Ok(PlanRequest {
            ctx: Some(ctx),
            max_seqs: self.max_seqs,
            kv_dtype: self.kv_dtype,
            page_size: self.page_size,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_logits_rows: self.max_logits_rows,
            budget: self.budget,
        })
    }

    /// The memory plan an engine with these settings would make for a model
    /// of `model_cfg` whose weights take `weights_bytes`, on a device with
    /// `device` memory: what [`EngineBuilder::build`] checks before loading
    /// anything. Refuses a context longer than the model's, a KV dtype the
    /// backend cannot store, and a plan over the budget.
    pub fn plan<B: Backend>(
        &self,
        model_cfg: &LlamaConfig,
        weights_bytes: u64,
        device: DeviceMemory,
        backend: &B,
    ) -> Result<MemoryPlan> {
        let info = backend.info();
        if !info.supports_kv(self.kv_dtype) {
            return Err(EngineError::InvalidInput(format!(
                "the {} backend cannot store KV as {}",
                info.name, self.kv_dtype
            )));
        }
        let req = self.plan_request(model_cfg)?;
        let mut mem_plan = plan(model_cfg, weights_bytes, &req, device, info, |g| {
            backend.graph_memory_bytes(g)
        })?;
        if let Some(n) = self.num_pages {
            mem_plan
                .set_num_pages(n)
                .map_err(|e| EngineError::InvalidInput(format!("num_pages: {e}")))?;
        }
        if self.kv_commit_unit_bytes != mem_plan.kv_limits.unit_bytes {
            mem_plan
                .set_kv_commit_unit_bytes(self.kv_commit_unit_bytes)
                .map_err(|e| EngineError::InvalidInput(format!("kv commit unit: {e}")))?;
        }
        mem_plan.set_swap_space(self.swap_space_bytes);
        Ok(mem_plan)
    }
}

/// Where the builder's model comes from.
#[derive(Debug)]
enum ModelSource {
    /// A GGUF file, memory-mapped at build time.
    Path(PathBuf),
    /// A GGUF already parsed (in memory: synthetic models).
    Gguf(GgufFile),
}

/// Builds an [`Engine`].
#[derive(Debug, Default)]
pub struct EngineBuilder<B: Backend> {
    model: Option<ModelSource>,
    backend: Option<Arc<B>>,
    config: EngineConfig,
    device_memory: Option<DeviceMemory>,
}

impl<B: Backend> EngineBuilder<B> {
    /// The GGUF file to load.
    pub fn model(mut self, path: impl AsRef<Path>) -> Self {
        self.model = Some(ModelSource::Path(path.as_ref().to_path_buf()));
        self
    }

    /// A model already in memory (e.g.
    /// [`crate::model::synthetic::synthetic_gguf_file`]): nothing is read
    /// from disk. Replaces [`EngineBuilder::model`].
    pub fn gguf(mut self, file: GgufFile) -> Self {
        self.model = Some(ModelSource::Gguf(file));
        self
    }

    /// The backend to run on.
    pub fn backend(mut self, backend: Arc<B>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Engine settings.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Plans against this device memory instead of what the backend reports
    /// (tests; planning for another machine).
    pub fn device_memory(mut self, device: DeviceMemory) -> Self {
        self.device_memory = Some(device);
        self
    }

    fn backend_ref(&self) -> Result<&Arc<B>> {
        self.backend
            .as_ref()
            .ok_or_else(|| EngineError::InvalidInput("no backend given".into()))
    }

    /// The plan of `gguf` (parsed) with this builder's settings.
    fn plan_of(&self, gguf: &GgufFile) -> Result<(LlamaConfig, MemoryPlan)> {
        let backend = self.backend_ref()?;
        let model_cfg = LlamaConfig::from_gguf(gguf)?;
        let weights_bytes = LlamaWeights::planned_bytes(gguf, &model_cfg, backend.as_ref())?;
        let device = match self.device_memory {
            Some(d) => d,
            None => backend.memory()?,
        };
        let p = self
            .config
            .plan(&model_cfg, weights_bytes, device, backend.as_ref())?;
        Ok((model_cfg, p))
    }

    /// The memory plan [`EngineBuilder::build`] would use, without loading
    /// any weight (what `pagoda plan` prints). Refuses exactly when `build`
    /// would refuse to plan.
    pub fn plan(&self) -> Result<MemoryPlan> {
        match &self.model {
            Some(ModelSource::Path(p)) => Ok(self.plan_of(&GgufFile::open(p)?)?.1),
            Some(ModelSource::Gguf(f)) => Ok(self.plan_of(f)?.1),
            None => Err(EngineError::InvalidInput("no model given".into())),
        }
    }

    /// Plans memory (refusing before any weight is loaded when it does not
    /// fit), loads the model and allocates the workspace and KV cache.
    pub fn build(mut self) -> Result<Engine<B>> {
        let gguf = match self.model.take() {
            Some(ModelSource::Path(path)) => GgufFile::open(&path)?,
            Some(ModelSource::Gguf(file)) => file,
            None => return Err(EngineError::InvalidInput("no model given".into())),
        };
        let backend = self.backend_ref()?.clone();
        let (model_cfg, mem_plan) = self.plan_of(&gguf)?;
        let cfg = self.config;
        let path = gguf.path().to_path_buf();
        let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf)?);
        let chat = match gguf.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) => {
                let text = |id: Option<u32>| {
                    id.map(|i| String::from_utf8_lossy(tokenizer.token_bytes(i)).into_owned())
                        .unwrap_or_default()
                };
                Some(Arc::new(ChatTemplate::new(
                    src,
                    &text(tokenizer.bos_id()),
                    &text(tokenizer.eos_id()),
                )?))
            }
            None => None,
        };
        let info = backend.info().clone();
        let geometry = mem_plan
            .kv_limits
            .geometry(mem_plan.num_pages)
            .ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "a KV arena of {} pages does not fit the {} device's buffer limits",
                    mem_plan.num_pages, info.name
                ))
            })?;
        // The KV arena is reserved outside the pool; the pool holds the rest.
        let pool_cfg = PoolConfig {
            budget_bytes: Some(
                mem_plan
                    .budget_bytes
                    .saturating_sub(geometry.reserved_bytes()),
            ),
            max_segment_bytes: info.max_buffer_bytes,
            ..PoolConfig::default()
        };
        let pool = Pool::new(backend.raw_allocator(), pool_cfg, cfg.faults.clone());
        let dims = mem_plan.workspace_dims;
        let ctx = mem_plan.ctx;
        let buckets = cfg.decode_buckets.clone().unwrap_or_else(|| {
            if info.supports_graphs {
                decode_graph_batch_sizes(mem_plan.max_seqs)
            } else {
                Vec::new()
            }
        });
        // The backend's own allocation points (VMM chunk maps) are fault sites too.
        backend.attach_faults(&cfg.faults);
        let mut runner = ModelRunner::new(
            backend,
            pool,
            &gguf,
            model_cfg.clone(),
            dims,
            geometry,
            buckets,
            cfg.faults.clone(),
        )?;
        let swap = SwapConfig {
            space_bytes: cfg.swap_space_bytes,
            page_bytes: geometry.layout.page_bytes_all_layers() as u64,
            ..SwapConfig::default()
        };
        runner.set_swap_slots(swap.num_slots())?;
        // Decode graphs, largest batch first, before the first request.
        runner.capture_decode_graphs()?;
        // Growable KV: the block manager commits and releases units of the
        // arena as pages are needed; a backend that cannot grow commits all.
        let commit = if info.can_grow_kv {
            Some(runner.kv_cache().commit_handle())
        } else {
            runner.kv_cache().commit_all()?;
            None
        };
        let scheduler = Scheduler::with_kv_commit(
            SchedulerConfig {
                page_size: cfg.page_size,
                num_pages: mem_plan.num_pages,
                max_num_seqs: mem_plan.max_seqs,
                max_num_batched_tokens: dims.max_tokens,
                max_model_len: ctx,
                enable_prefix_caching: cfg.enable_prefix_caching,
                swap,
            },
            cfg.faults.clone(),
            commit,
        )?;
        Ok(Engine {
            runner,
            scheduler,
            tokenizer,
            chat,
            requests: HashMap::new(),
            plan: mem_plan,
            ctx,
            model_path: path,
            telemetry: Telemetry::new(),
            sampled: Vec::new(),
            needs: Vec::with_capacity(dims.max_logits_rows),
        })
    }
}

/// How one request generates.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Tokens to generate at most (clamped to the context).
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings: generation ends when the text contains one (it is cut off).
    pub stop: Vec<String>,
    /// Keep going after end-of-generation tokens.
    pub ignore_eog: bool,
    /// Return logits for every prompt position (perplexity).
    pub want_all_logits: bool,
    /// Return the logits the first generated token was sampled from (the
    /// last prompt position), without keeping every position's.
    pub want_first_logits: bool,
    /// Log-probabilities of each generated token and of the `n` most likely
    /// tokens at its position (`Some(0)`: the chosen token's only), up to
    /// [`MAX_TOP_LOGPROBS`]. Of the model's distribution (log-softmax of the
    /// raw logits, before penalties and temperature). Such rows are read back
    /// whole.
    pub logprobs: Option<usize>,
}

/// The most alternatives [`GenerationParams::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Log-probabilities at one generated position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the token generated.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, descending (ties
    /// to the lower id).
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// The log-probabilities of `token` and of the `n` best tokens of a
    /// logits row: a logsumexp over the row and one pass that keeps the best
    /// `n` in order (`O(vocab)` for small `n`; allocates `n` entries).
    pub fn from_logits(row: &[f32], token: u32, n: usize) -> TokenLogprobs {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max + sum.ln() as f32;
        let n = n.min(row.len());
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
        if n > 0 {
            for (i, &l) in row.iter().enumerate() {
                if top.len() == n && top[n - 1].1 >= l {
                    continue;
                }
                // After every entry with a logit >= l: ties keep the lower id first.
                let at = top.partition_point(|e| e.1 >= l);
                top.insert(at, (i as u32, l));
                top.truncate(n);
            }
            for e in &mut top {
                e.1 -= lse;
            }
        }
        TokenLogprobs {
            logprob: row
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |&l| l - lse),
            top,
        }
    }
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eog: false,
            want_all_logits: false,
            want_first_logits: false,
            logprobs: None,
        }
    }
}

/// What happened to one request in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    /// The request.
    pub id: SeqId,
    /// The token generated this step, if any.
    pub token: Option<u32>,
    /// Newly complete text (may be empty while a UTF-8 character is split).
    pub text: String,
    /// Set when the request finished this step.
    pub finished: Option<FinishReason>,
    /// Log-probabilities of `token`, when the request asked for them.
    pub logprobs: Option<TokenLogprobs>,
}

/// A finished request's full result.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The request.
    pub id: SeqId,
    /// Prompt token ids.
    pub prompt_tokens: Vec<u32>,
    /// Generated token ids (including the EOG token that ended it).
    pub generated_tokens: Vec<u32>,
    /// Generated text (cut at a stop string). An end-of-generation token adds
    /// no text, and an incomplete last character (a reply cut by
    /// `max_tokens` inside one) is dropped, never U+FFFD.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// (num_prompt_tokens, vocab) logits when `want_all_logits` was set.
    pub prompt_logits: Option<Vec<f32>>,
    /// (vocab) logits at the last prompt position when `want_first_logits` was set.
    pub first_logits: Option<Vec<f32>>,
}

struct RequestState {
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: Vec<String>,
    prompt_tokens: Vec<u32>,
    generated: Vec<u32>,
    text: String,
    /// Bytes of `text` already reported.
    reported: usize,
    prompt_logits: Option<Vec<f32>>,
    /// Wanted and not yet captured: `Some(empty)`; captured: `Some(vocab values)`.
    first_logits: Option<Vec<f32>>,
    finished: Option<FinishReason>,
    /// Alternatives wanted per generated token ([`GenerationParams::logprobs`]).
    logprobs: Option<usize>,
    /// Log-probabilities of the token sampled this step, until its event is built.
    pending_logprobs: Option<TokenLogprobs>,
    /// Per-request stream of outputs, when the caller asked for one.
    stream: Option<Sender<RequestOutput>>,
}

/// The engine. Generic over the backend; the edges pick one.
pub struct Engine<B: Backend> {
    runner: ModelRunner<B>,
    scheduler: Scheduler,
    /// Shared with every [`crate::EngineHandle`] clone, so callers tokenize on their own threads.
    tokenizer: Arc<Tokenizer>,
    chat: Option<Arc<ChatTemplate>>,
    requests: HashMap<SeqId, RequestState>,
    plan: MemoryPlan,
    ctx: usize,
    model_path: PathBuf,
    telemetry: Telemetry,
    /// (num_seqs) tokens sampled this step, reused.
    sampled: Vec<Option<u32>>,
    /// (num_logits) what the host needs of each logits row this step, reused.
    needs: Vec<RowNeed>,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model_path)
            .field("ctx", &self.ctx)
            .finish()
    }
}

impl<B: Backend> Engine<B> {
    /// A builder.
    pub fn builder() -> EngineBuilder<B> {
        EngineBuilder {
            model: None,
            backend: None,
            config: EngineConfig::default(),
            device_memory: None,
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The tokenizer, shareable with other threads.
    pub fn shared_tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    /// The model's chat template, shareable with other threads (`None` when
    /// the model has none).
    pub fn shared_chat_template(&self) -> Option<Arc<ChatTemplate>> {
        self.chat.clone()
    }

    /// The model's hyper-parameters.
    pub fn model_config(&self) -> &LlamaConfig {
        &self.runner.config
    }

    /// The memory plan the engine was built with.
    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Context length per sequence.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// The scheduler (read-only: counters, page map, balance checks).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The model runner (pool, backend).
    pub fn runner(&self) -> &ModelRunner<B> {
        &self.runner
    }

    /// Telemetry publisher (subscribe for step stats and memory events).
    pub fn telemetry(&mut self) -> &mut Telemetry {
        &mut self.telemetry
    }

    /// A telemetry subscriber that, with `with_memory`, gets a keyframe of
    /// the memory now at once ([`Telemetry::subscribe_now`]), not at the next step.
    pub fn subscribe_telemetry_now(
        &mut self,
        capacity: usize,
        with_memory: bool,
    ) -> Receiver<crate::telemetry::TelemetryEvent> {
        let memory = EngineMemory::new(&self.runner, &mut self.scheduler, &self.plan);
        self.telemetry.subscribe_now(capacity, with_memory, &memory)
    }

    /// The whole memory state now (what a telemetry keyframe holds).
    /// `O(segments + blocks + pages)`.
    pub fn memory_state(&self) -> MemoryState {
        MemoryState::capture(&self.runner, &self.scheduler, &self.plan)
    }

    /// Tokenizes prompt text: special tokens parsed, BOS only when the model asks.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode_prompt(text)
    }

    /// Renders chat messages with the model's template.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String> {
        let t = self
            .chat
            .as_ref()
            .ok_or_else(|| EngineError::InvalidInput("the model has no chat template".into()))?;
        t.render(messages, true)
    }

    /// Queues a request; returns its id.
    pub fn add_request(
        &mut self,
        prompt_tokens: Vec<u32>,
        params: GenerationParams,
    ) -> Result<SeqId> {
        params.sampling.validate()?;
        if prompt_tokens.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        if params.max_tokens == 0 {
            return Err(EngineError::InvalidInput(
                "max tokens must be at least 1".into(),
            ));
        }
        let vocab = self.runner.config.vocab_size;
        if let Some(&bad) = prompt_tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} outside the vocabulary of {vocab}"
            )));
        }
        if prompt_tokens.len() >= self.ctx {
            return Err(EngineError::InvalidInput(format!(
                "the prompt has {} tokens; the context holds {} (prompt + at least one generated token)",
                prompt_tokens.len(),
                self.ctx
            )));
        }
        if let Some(n) = params.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(EngineError::InvalidInput(format!(
                "top logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"
            )));
        }
        let dims = self.runner.workspace_dims();
        if params.want_all_logits && dims.max_logits_rows < dims.max_tokens {
            return Err(EngineError::InvalidInput(format!(
                "all-position logits need max_logits_rows ({}) >= the step token budget ({})",
                dims.max_logits_rows, dims.max_tokens
            )));
        }
        let max_tokens = params.max_tokens.min(self.ctx - prompt_tokens.len());
        let seq_params = SeqParams {
            max_tokens,
            eog_ids: self.tokenizer.eog_ids().to_vec(),
            ignore_eog: params.ignore_eog,
            want_all_logits: params.want_all_logits,
        };
        let id = self.scheduler.add(prompt_tokens.clone(), seq_params)?;
        let n = prompt_tokens.len();
        self.requests.insert(
            id,
            RequestState {
                sampler: Sampler::new(params.sampling, vocab),
                decoder: StreamDecoder::new(),
                stop: params.stop,
                prompt_tokens,
                generated: Vec::with_capacity(max_tokens),
                text: String::new(),
                reported: 0,
                prompt_logits: params.want_all_logits.then(|| vec![0f32; n * vocab]),
                first_logits: params.want_first_logits.then(|| Vec::with_capacity(vocab)),
                finished: None,
                logprobs: params.logprobs,
                pending_logprobs: None,
                stream: None,
            },
        );
        Ok(id)
    }

    /// Queues a request and returns a channel that receives its outputs as
    /// they are produced (the last one has `finished` set). Dropping the
    /// receiver cancels the request at the next step.
    pub fn add_request_stream(
        &mut self,
        prompt_tokens: Vec<u32>,
        params: GenerationParams,
    ) -> Result<(SeqId, Receiver<RequestOutput>)> {
        let id = self.add_request(prompt_tokens, params)?;
        let (tx, rx) = channel();
        if let Some(r) = self.requests.get_mut(&id) {
            r.stream = Some(tx);
        }
        Ok((id, rx))
    }

    /// Cancels a request; its pages are freed at once. A request with a
    /// stream gets a last event with `finished: Aborted`. A request that has
    /// already finished keeps its first reason.
    pub fn abort(&mut self, id: SeqId) -> Result<()> {
        self.end_request(id, FinishReason::Aborted)
    }

    /// Ends an unfinished request now with `reason` (its pages are freed at
    /// once) and sends the final event to its stream, if it has one.
    fn end_request(&mut self, id: SeqId, reason: FinishReason) -> Result<()> {
        self.scheduler.finish(id, reason.clone())?;
        if let Some(r) = self.requests.get_mut(&id)
            && r.finished.is_none()
        {
            r.finished = Some(reason.clone());
            if let Some(tx) = r.stream.as_ref() {
                let _ = tx.send(RequestOutput {
                    id,
                    token: None,
                    text: String::new(),
                    finished: Some(reason),
                    logprobs: None,
                });
            }
        }
        Ok(())
    }

    /// Ends every unfinished request with `reason` (shutdown, or an error
    /// that poisons a whole step); each stream gets its final event.
    pub fn finish_all(&mut self, reason: FinishReason) {
        let ids: Vec<SeqId> = self
            .scheduler
            .running_ids()
            .iter()
            .copied()
            .chain(self.scheduler.waiting_ids())
            .collect();
        for id in ids {
            let _ = self.end_request(id, reason.clone());
        }
    }

    /// Removes every finished request (its state here and its sequence in the
    /// scheduler) and returns their ids and reasons, by id. What a server
    /// loop calls after each step, so memory does not grow with the number of
    /// requests served; results of removed requests are gone (streams already
    /// carried them).
    pub fn remove_finished(&mut self) -> Vec<(SeqId, FinishReason)> {
        let mut done: Vec<(SeqId, FinishReason)> = self
            .requests
            .iter()
            .filter_map(|(&id, r)| r.finished.clone().map(|f| (id, f)))
            .collect();
        done.sort_by_key(|(id, _)| *id);
        for (id, _) in &done {
            self.requests.remove(id);
            let _ = self.scheduler.remove(*id);
        }
        done
    }

    /// Requests the engine holds state for: unfinished ones plus finished
    /// ones whose completion has not been taken or removed.
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// Whether any request is unfinished.
    pub fn has_unfinished(&self) -> bool {
        self.scheduler.has_unfinished()
    }

    /// Runs one step; returns what happened to each request in it.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>> {
        let t0 = Instant::now();
        let out = self.scheduler.schedule();
        let mut events = Vec::new();
        for f in &out.failed {
            let reason = FinishReason::Error(f.error.to_string());
            if let Some(r) = self.requests.get_mut(&f.seq_id) {
                r.finished = Some(reason.clone());
            }
            events.push(RequestOutput {
                id: f.seq_id,
                token: None,
                text: String::new(),
                finished: Some(reason),
                logprobs: None,
            });
        }
        let Some(plan) = out.plan else {
            // Units the block manager released are unused by any queued work.
            self.runner.flush_kv_releases();
            self.forward_to_streams(&events);
            return Ok(events);
        };
        // Blocks allocated from here on are stamped with this step (their age).
        self.runner
            .pool()
            .set_step(self.scheduler.stats().num_steps);
        let t_sched = t0.elapsed();
        let vocab = self.runner.config.vocab_size;
        self.fill_needs(&plan);
        let out = match self.runner.execute(&plan, &self.needs) {
            Ok(l) => l,
            Err(e) => {
                // The whole step failed: end the requests in it, keep the engine serving.
                let msg = e.to_string();
                for &id in &plan.seq_ids {
                    let _ = self.scheduler.finish(id, FinishReason::Error(msg.clone()));
                    if let Some(r) = self.requests.get_mut(&id) {
                        r.finished = Some(FinishReason::Error(msg.clone()));
                    }
                    events.push(RequestOutput {
                        id,
                        token: None,
                        text: String::new(),
                        finished: Some(FinishReason::Error(msg.clone())),
                        logprobs: None,
                    });
                }
                self.forward_to_streams(&events);
                return Ok(events);
            }
        };
        let t_fwd = t0.elapsed();
        self.sampled.clear();
        for (i, &id) in plan.seq_ids.iter().enumerate() {
            let Some(r) = self.requests.get_mut(&id) else {
                self.sampled.push(None);
                continue;
            };
            let logits = &out.logits;
            if let Some(all) = r.prompt_logits.as_mut() {
                // Stored by position, so a recomputation after preemption overwrites, never appends.
                let (a, b) = (plan.query_start_locs[i], plan.query_start_locs[i + 1]);
                let n_prompt = r.prompt_tokens.len();
                for (row, &tok) in plan.logits_indices.iter().enumerate() {
                    let pos = plan.positions[tok as usize] as usize;
                    if tok >= a && tok < b && pos < n_prompt {
                        all[pos * vocab..(pos + 1) * vocab]
                            .copy_from_slice(&logits[row * vocab..(row + 1) * vocab]);
                    }
                }
            }
            let needs = &self.needs;
            let tok = plan.sample_rows[i].map(|row| {
                let row = row as usize;
                match needs[row] {
                    RowNeed::Argmax => out.argmax[row],
                    RowNeed::TopK(_) => {
                        let (v, ids) = out.candidates(row);
                        r.sampler.sample_candidates(v, ids)
                    }
                    RowNeed::Full => {
                        if let Some(first) = r.first_logits.as_mut().filter(|f| f.is_empty()) {
                            first.extend_from_slice(out.row(row, vocab));
                        }
                        let history = self
                            .scheduler
                            .get(id)
                            .map(|s| s.tokens.as_slice())
                            .unwrap_or(&[]);
                        r.sampler.sample(out.row(row, vocab), history)
                    }
                }
            });
            if let (Some(n), Some(t), Some(row)) = (r.logprobs, tok, plan.sample_rows[i]) {
                r.pending_logprobs = Some(TokenLogprobs::from_logits(
                    out.row(row as usize, vocab),
                    t,
                    n,
                ));
            }
            self.sampled.push(tok);
        }
        let updates = self.scheduler.postprocess(&plan, &self.sampled);
        for u in updates {
            let Some(r) = self.requests.get_mut(&u.seq_id) else {
                continue;
            };
            let mut finished = u.finished.clone();
            if let Some(tok) = u.new_token {
                r.generated.push(tok);
                // An end-of-generation token is not text (its id stays in
                // `generated`).
                if finished != Some(FinishReason::Eog) {
                    let piece = r.decoder.push(&self.tokenizer, tok);
                    r.text.push_str(&piece);
                }
                if finished.is_some() {
                    // An incomplete last character is dropped, not U+FFFD.
                    r.decoder.finish();
                }
                if (finished.is_none() || finished == Some(FinishReason::Length))
                    && let Some(cut) = find_stop(&r.text, &r.stop, r.reported)
                {
                    r.text.truncate(cut);
                    if finished.is_none() {
                        let _ = self.scheduler.finish(u.seq_id, FinishReason::Stop);
                    }
                    finished = Some(FinishReason::Stop);
                }
            }
            // Hold back text that could be the start of a stop string.
            let safe = if finished.is_some() {
                r.text.len()
            } else {
                stop_safe_len(&r.text, &r.stop, r.reported)
            };
            let text = r.text[r.reported..safe].to_string();
            r.reported = safe;
            if finished.is_some() {
                r.finished = finished.clone();
            }
            events.push(RequestOutput {
                id: u.seq_id,
                token: u.new_token,
                text,
                finished,
                logprobs: if u.new_token.is_some() {
                    r.pending_logprobs.take()
                } else {
                    None
                },
            });
        }
        // Units released by postprocess: the step's work was read back, so
        // nothing queued can touch them; give them back now, not a step later.
        self.runner.flush_kv_releases();
        self.forward_to_streams(&events);
        self.telemetry.publish_step(
            StepStats::from_plan(&plan, &self.scheduler, t_sched, t_fwd, t0.elapsed()),
            &mut EngineMemory::new(&self.runner, &mut self.scheduler, &self.plan),
        );
        Ok(events)
    }

    /// Decides, per logits row of `plan`, what the host needs: the argmax
    /// (greedy), the device's top-k candidates (sampling with `top_k` within
    /// the device limit) or the full row (all-position or first logits, a
    /// repetition penalty, `top_k = 0` or above the limit). Allocation-free.
    fn fill_needs(&mut self, plan: &StepPlan) {
        self.needs.clear();
        self.needs.resize(plan.logits_indices.len(), RowNeed::Full);
        let max_k = self.runner.max_top_k();
        for (i, &id) in plan.seq_ids.iter().enumerate() {
            let Some(row) = plan.sample_rows[i] else {
                continue;
            };
            let Some(r) = self.requests.get(&id) else {
                continue;
            };
            let p = r.sampler.params();
            let wants_row = r.prompt_logits.is_some()
                || r.logprobs.is_some()
                || r.first_logits.as_ref().is_some_and(|f| f.is_empty());
            let penalize = p.repeat_penalty != 1.0 && p.repeat_last_n > 0;
            self.needs[row as usize] = if wants_row || penalize {
                RowNeed::Full
            } else if p.is_greedy() {
                RowNeed::Argmax
            } else if p.top_k == 0 || p.top_k > max_k {
                RowNeed::Full
            } else {
                RowNeed::TopK(p.top_k)
            };
        }
    }

    /// Sends each event to its request's stream; a closed stream aborts its request.
    fn forward_to_streams(&mut self, events: &[RequestOutput]) {
        for ev in events {
            let closed = match self.requests.get(&ev.id).and_then(|r| r.stream.as_ref()) {
                Some(tx) => tx.send(ev.clone()).is_err(),
                None => false,
            };
            if closed && ev.finished.is_none() {
                let _ = self.abort(ev.id);
            }
        }
    }

    /// Removes a finished request and returns its result.
    pub fn take_completion(&mut self, id: SeqId) -> Option<Completion> {
        let finished = self.requests.get(&id)?.finished.clone()?;
        let r = self.requests.remove(&id)?;
        let _ = self.scheduler.remove(id);
        Some(Completion {
            id,
            prompt_tokens: r.prompt_tokens,
            generated_tokens: r.generated,
            text: r.text,
            finish_reason: finished,
            prompt_logits: r.prompt_logits,
            first_logits: r.first_logits,
        })
    }

    /// Runs every request given to completion, returning results in order.
    pub fn generate(
        &mut self,
        prompts: Vec<Vec<u32>>,
        params: GenerationParams,
    ) -> Result<Vec<Completion>> {
        let ids = prompts
            .into_iter()
            .map(|p| self.add_request(p, params.clone()))
            .collect::<Result<Vec<_>>>()?;
        while ids
            .iter()
            .any(|id| self.requests.get(id).is_some_and(|r| r.finished.is_none()))
        {
            self.step()?;
        }
        Ok(ids
            .iter()
            .filter_map(|&id| self.take_completion(id))
            .collect())
    }
}

/// Byte index where the first stop string found at or after `from` begins.
fn find_stop(text: &str, stops: &[String], from: usize) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let start = from.saturating_sub(s.len());
            let start = (start..=from)
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(from);
            text[start..].find(s.as_str()).map(|i| start + i)
        })
        .min()
}

/// Length of `text` that can be reported: everything except a tail that is
/// a proper prefix of some stop string.
fn stop_safe_len(text: &str, stops: &[String], reported: usize) -> usize {
    let mut safe = text.len();
    for s in stops.iter().filter(|s| !s.is_empty()) {
        for k in (1..s.len()).rev() {
            if text.len() >= k
                && text.is_char_boundary(text.len() - k)
                && s.as_bytes().starts_with(&text.as_bytes()[text.len() - k..])
            {
                safe = safe.min(text.len() - k);
                break;
            }
        }
    }
    safe.max(reported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_the_best_first() {
        let row = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln() as f32;
        let lp = TokenLogprobs::from_logits(&row, 2, 3);
        assert!((lp.logprob - (2.0 - lse)).abs() < 1e-6);
        // Descending, ties to the lower id.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!((lp.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        let all = TokenLogprobs::from_logits(&row, 4, 20);
        assert_eq!(all.top.len(), row.len());
        let mass: f64 = all.top.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-5, "{mass}");
        assert!(TokenLogprobs::from_logits(&row, 0, 0).top.is_empty());
    }

    #[test]
    fn stop_strings_are_found_across_pieces_and_held_back() {
        let stops = vec!["</end>".to_string()];
        assert_eq!(find_stop("abc</en", &stops, 0), None);
        assert_eq!(stop_safe_len("abc</en", &stops, 0), 3);
        assert_eq!(find_stop("abc</end>xyz", &stops, 5), Some(3));
        assert_eq!(stop_safe_len("abcdef", &stops, 2), 6);
    }
}
