//! The Llama-family model: hyper-parameters, weights, activation workspace and forward pass.

pub mod config;
pub mod llama;
pub mod synthetic;
pub mod weights;
pub mod workspace;

pub use config::LlamaConfig;
pub use llama::forward;
pub use weights::{LlamaWeights, Tensor};
pub use workspace::{Workspace, WorkspaceDims};
