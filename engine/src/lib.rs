//! Pagoda: the backend-agnostic engine.
//!
//! Loads Llama-family GGUF models, tokenizes, schedules many requests over a
//! paged KV cache, runs the forward pass on any [`pagoda_backend::Backend`],
//! samples and streams tokens.
#![deny(missing_docs)]

pub mod error;
pub mod gguf;
pub mod tokenizer;

pub use error::{EngineError, Result};
