//! The engine's one public error enum.

use std::path::PathBuf;

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
    /// Bad or unsupported tokenizer metadata (the message names the key).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad user input (prompt, flags, request).
    #[error("{0}")]
    InvalidInput(String),
}
