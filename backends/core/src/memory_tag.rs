//! What a pool block holds: the tag every allocation carries, so the pool
//! (and every report built on it) can total memory per purpose.
//!
//! Its own module, so the error type (which names the tag of a failed
//! allocation) and the pool (which counts per tag) both depend on it and not
//! on each other.

use std::fmt;

/// What a block holds; the pool reports totals per tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryTag {
    /// Model weights.
    Weights,
    /// Activation workspace.
    Activations,
    /// KV-cache pages.
    Kv,
    /// CUDA graph memory.
    Graph,
    /// Short-lived scratch (uploads, staging).
    Scratch,
}

impl MemoryTag {
    /// All tags, in report order.
    pub const ALL: [MemoryTag; 5] = [
        MemoryTag::Weights,
        MemoryTag::Activations,
        MemoryTag::Kv,
        MemoryTag::Graph,
        MemoryTag::Scratch,
    ];

    /// Index into per-tag arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            MemoryTag::Weights => "weights",
            MemoryTag::Activations => "activations",
            MemoryTag::Kv => "kv",
            MemoryTag::Graph => "graph",
            MemoryTag::Scratch => "scratch",
        }
    }
}

impl fmt::Display for MemoryTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
