//! Pagoda: the backend-agnostic engine.
//!
//! Loads Llama-family GGUF models, tokenizes, schedules many requests over a
//! paged KV cache, runs the forward pass on any [`pagoda_backend::Backend`],
//! samples and streams tokens.
#![deny(missing_docs)]

pub mod block_manager;
pub mod chat;
pub mod engine;
pub mod engine_handle;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod host_kv_tier;
pub mod kv_cache;
pub mod kv_commit;
pub mod model;
pub mod model_runner;
pub mod perplexity;
pub mod plan;
pub mod prefix_hash;
pub mod quantize;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod step_plan;
pub mod telemetry;
pub mod tokenizer;

pub use engine::{
    Completion, Engine, EngineBuilder, EngineConfig, GenerationParams, MAX_TOP_LOGPROBS,
    RequestOutput, TokenLogprobs,
};
pub use engine_handle::{EngineHandle, EngineInfo, EngineStats, Prompt};
pub use error::{EngineError, Result};
pub use fetch::FetchError;
pub use scheduler::{Scheduler, SchedulerConfig};
pub use sequence::{FinishReason, PageId, SeqId, SeqParams, SeqStatus, Sequence, TokenId};
pub use step_plan::StepPlan;
