//! Pagoda: the backend-agnostic engine.
//!
//! Loads Llama-family GGUF models, tokenizes, schedules many requests over a
//! paged KV cache, runs the forward pass on any [`pagoda_backend::Backend`],
//! samples and streams tokens.
#![deny(missing_docs)]

pub mod block_manager;
pub mod error;
pub mod scheduler;
pub mod sequence;
pub mod step_plan;

pub use error::{EngineError, Result};
pub use scheduler::{Scheduler, SchedulerConfig};
pub use sequence::{FinishReason, PageId, SeqId, SeqParams, SeqStatus, Sequence, TokenId};
pub use step_plan::StepPlan;
