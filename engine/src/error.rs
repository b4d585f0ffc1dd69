//! The engine's one public error enum.

use std::path::PathBuf;

use crate::sequence::SeqId;

/// Result alias for engine operations.
pub type Result<T> = std::result::Result<T, EngineError>;

/// Everything the engine can refuse.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A backend or pool error.
    #[error(transparent)]
    Backend(#[from] pagoda_backend::BackendError),
    /// I/O on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A malformed or unsupported model file.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// The model file could not be fetched or verified.
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// The memory plan does not fit the budget (numbers and advice inside).
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    /// Bad or unsupported tokenizer metadata (the message names the key).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad user input (prompt, flags, request).
    #[error("{0}")]
    InvalidInput(String),
    /// A scheduler or KV-cache setting that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A request with no prompt tokens.
    #[error("the prompt is empty: at least one token is needed")]
    EmptyPrompt,
    /// A request asking for more positions than the model has.
    #[error(
        "prompt of {prompt_len} tokens plus max_tokens {max_tokens} exceeds the model context of {max_model_len} tokens"
    )]
    TooLong {
        /// Prompt tokens.
        prompt_len: usize,
        /// Tokens asked for.
        max_tokens: usize,
        /// The model's context length.
        max_model_len: usize,
    },
    /// A request asking for zero new tokens.
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// A request whose K/V could never fit in the whole KV cache.
    #[error(
        "a request of {num_tokens} tokens needs {needed_pages} KV pages of {page_size} tokens but the cache has {num_pages}"
    )]
    ExceedsKvCache {
        /// Tokens whose K/V must be held at once (prompt + max_tokens - 1).
        num_tokens: usize,
        /// Pages they need.
        needed_pages: usize,
        /// Tokens per page.
        page_size: usize,
        /// Pages in the cache.
        num_pages: usize,
    },
    /// No free KV page was left for a sequence that had to grow.
    #[error("out of KV pages: {requested} needed, {free} free")]
    OutOfKvPages {
        /// Pages needed.
        requested: usize,
        /// Pages free.
        free: usize,
    },
    /// An id the scheduler does not know (never added, or already removed).
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    /// An operation that needs a finished sequence got a live one.
    #[error("sequence {0} has not finished")]
    NotFinished(SeqId),
    /// The engine thread behind an [`crate::EngineHandle`] has stopped
    /// (shut down, or it panicked: the text says which).
    #[error("the engine has stopped: {0}")]
    Stopped(String),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Thread(#[source] std::io::Error),
}
