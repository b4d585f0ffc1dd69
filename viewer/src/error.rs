//! The viewer library's errors.

use std::path::PathBuf;

/// Why the viewer cannot show a source.
#[derive(Debug, thiserror::Error)]
pub enum ViewerError {
    /// A trace file could not be opened.
    #[error("cannot open trace {path}: {source}")]
    OpenTrace {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A trace file is not a valid `pagoda-trace/2` trace.
    #[error("{path} is not a valid trace: {source}")]
    BadTrace {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        source: pagoda::telemetry::trace::TraceError,
    },
    /// A trace without any memory event: nothing to draw.
    #[error("{path} holds no memory event (was it recorded with --trace?)")]
    EmptyTrace {
        /// The file.
        path: PathBuf,
    },
    /// A trace whose deltas do not follow each other.
    #[error("trace cannot be replayed: {0}")]
    Replay(#[from] pagoda::telemetry::ReplayError),
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] pagoda::EngineError),
    /// A backend could not be made.
    #[error("the {name} backend has no device: {message}")]
    Backend {
        /// `cpu`, `cuda` or `wgpu`.
        name: &'static str,
        /// Why.
        message: String,
    },
    /// A backend that is not compiled into this binary.
    #[error("the {0} backend is not compiled into this binary (rebuild with --features {0})")]
    NotCompiled(&'static str),
    /// The default model could not be fetched.
    #[error("cannot fetch the default model: {0}")]
    Fetch(String),
}
