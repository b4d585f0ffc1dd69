//! The Llama-family model: hyper-parameters, weights, activation workspace and forward pass.

pub mod config;
pub mod llama;
pub mod synthetic;
pub mod weights;
pub mod workspace;

pub use config::LlamaConfig;
pub use llama::{StepShape, forward};
pub use weights::{LlamaWeights, Tensor};
pub use workspace::{StepArgsLayout, Workspace, WorkspaceDims};

/// Top-k candidates per row the workspace holds for device sampling; a
/// request with a larger `top_k` (or above the backend's limit) gets its
/// full logits row.
pub const DEVICE_TOP_K: usize = 64;
