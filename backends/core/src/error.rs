//! The one error enum of the backend crates.

use crate::memory_tag::MemoryTag;

/// Result alias for backend operations.
pub type Result<T> = std::result::Result<T, BackendError>;

/// Everything a backend or the memory pool can refuse.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum BackendError {
    /// The device (or the pool's budget) cannot provide `requested_bytes`.
    #[error("out of device memory: {tag} request of {requested_bytes} bytes failed ({detail})")]
    OutOfMemory {
        /// What the allocation was for.
        tag: MemoryTag,
        /// Size of the failed request.
        requested_bytes: u64,
        /// Backend-specific explanation (budget, driver message).
        detail: String,
    },
    /// A fault injected by [`crate::FaultInjector`] (tests, `PAGODA_FAULT_ALLOC`).
    #[error("injected fault at allocation site #{site} ({what})")]
    FaultInjected {
        /// 1-based index of the fault site that failed.
        site: u64,
        /// What was being allocated.
        what: String,
    },
    /// The backend does not implement `op` for `dtype`.
    #[error("backend does not support {op} for dtype {dtype}")]
    Unsupported {
        /// Operation name.
        op: &'static str,
        /// Data type name.
        dtype: String,
    },
    /// A malformed argument: wrong sizes, out-of-range ids.
    #[error("invalid argument to {op}: {detail}")]
    InvalidArgument {
        /// Operation name.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Malformed quantized data.
    #[error("bad quantized data: {0}")]
    BadData(String),
    /// The device or its driver failed (a CUDA driver error, a lost device).
    #[error("device error in {op}: {detail}")]
    Device {
        /// Operation name.
        op: &'static str,
        /// The driver's message.
        detail: String,
    },
}
