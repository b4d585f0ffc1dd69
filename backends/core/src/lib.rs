//! The Pagoda backend contract.
//!
//! Everything a backend (CPU, CUDA, wgpu) must provide, and everything that is
//! written once for all of them:
//! - [`DType`] and the GGUF block formats ([`quant`]),
//! - raw device memory ([`RawAllocator`]) and the one caching [`Pool`] that
//!   carves it into tagged [`Block`]s,
//! - the paged KV layout ([`KvLayout`], documented once in [`kv_cache`]),
//! - the op families ([`TensorOps`], [`KvCacheOps`], [`AttentionOps`]) and the
//!   [`Backend`] trait that ties them together,
//! - fault injection ([`FaultInjector`]) used by the pool and the KV block manager.
//!
//! Buffers are addressed by [`BufRef`]: a segment, an offset and a length. Ops
//! take `BufRef`s plus explicit dimensions, the way GPU kernels take pointers
//! and sizes; shapes are written in each method's doc comment.
#![deny(missing_docs)]

pub mod backend;
pub mod dtype;
pub mod error;
pub mod fault;
pub mod graph;
pub mod host_buffer;
pub mod kquant;
pub mod kquantize;
pub mod kv_cache;
pub mod memory_tag;
pub mod pool;
pub mod quant;
pub mod weight_layout;

pub use backend::{
    AttentionDims, AttentionOps, Backend, BackendInfo, DeviceMemory, EmbeddingDims, GraphId,
    GraphOps, KvArenaOps, KvCacheOps, MatmulDims, Projection, RopeDims, RopeKvDims, SamplingOps,
    TensorOps,
};
pub use dtype::DType;
pub use error::{BackendError, Result};
pub use fault::FaultInjector;
pub use graph::{GraphPlanInput, decode_graph_batch_sizes};
pub use host_buffer::{HeapBuffer, HostBuffer};
pub use kv_cache::{KvGeometry, KvLayerRef, KvLayout, MAX_KV_PIECES};
pub use memory_tag::MemoryTag;
pub use pool::{
    Block, BufRef, ClassStats, Pool, PoolChanges, PoolConfig, PoolSnapshot, PoolStats,
    RawAllocator, RawSegment, SegmentId,
};
