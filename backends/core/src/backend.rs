//! The backend contract: device, memory and the op families a Llama forward needs.
//!
//! All ops enqueue on one in-order stream; only [`Backend::download`] and
//! [`Backend::synchronize`] block. Ops take [`BufRef`]s and explicit
//! dimensions; every buffer argument's shape and dtype is in its doc comment.
//! Output buffers must not overlap inputs unless the method says "in place".

use std::sync::Arc;

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::GraphPlanInput;
use crate::kv_cache::KvLayerRef;
use crate::pool::{BufRef, RawAllocator};

/// Static facts about a backend, so the engine can refuse early and tests can skip honestly.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// Short name (`cpu`, `cuda`, `wgpu`).
    pub name: String,
    /// Device description (CPU model, GPU name).
    pub device: String,
    /// Weight dtypes `matmul` and `embedding` accept.
    pub weight_dtypes: Vec<DType>,
    /// KV-cache dtypes `write_kv` and `paged_attention` accept.
    pub kv_dtypes: Vec<DType>,
    /// Alignment of pool segments in bytes.
    pub alignment: u64,
    /// Whether KV arenas can grow and shrink in place (CUDA VMM).
    pub can_grow_kv: bool,
    /// Whether decode steps can be captured as graphs.
    pub supports_graphs: bool,
    /// Whether weights are read from host memory (so "device memory" is host RAM).
    pub host_memory: bool,
}

impl BackendInfo {
    /// Whether `matmul`/`embedding` accept weights of `dtype`.
    pub fn supports_weight(&self, dtype: DType) -> bool {
        self.weight_dtypes.contains(&dtype)
    }
    /// Whether the KV cache can be stored as `dtype`.
    pub fn supports_kv(&self, dtype: DType) -> bool {
        self.kv_dtypes.contains(&dtype)
    }
}

/// Device memory totals as reported by the driver or the OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Total bytes of the device.
    pub total_bytes: u64,
    /// Bytes free right now.
    pub free_bytes: u64,
}

/// Dimensions of `out (n, m) = x (n, k) · w (m, k)ᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulDims {
    /// Rows of `x` (tokens).
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Rows of `w` (output features).
    pub m: usize,
}

/// Dimensions of a RoPE application.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeDims {
    /// Tokens.
    pub num_tokens: usize,
    /// Heads per token.
    pub num_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Leading elements of each head that rotate (`rope.dimension_count`).
    pub rope_dim: usize,
    /// Frequency base θ.
    pub freq_base: f32,
}

/// Dimensions of a paged attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionDims {
    /// Query tokens in the step (all sequences).
    pub num_tokens: usize,
    /// Sequences in the step.
    pub num_seqs: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Width of each row of `block_tables`.
    pub max_blocks_per_seq: usize,
    /// Softmax scale, usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// Elementwise and matrix ops of a Llama-family forward pass.
pub trait TensorOps {
    /// `out[i, :] = table[ids[i], :]` as f32.
    /// table: (vocab, dim) in `table_dtype`; ids: (n) u32; out: (n, dim) f32.
    fn embedding(
        &self,
        table: BufRef,
        table_dtype: DType,
        ids: BufRef,
        out: BufRef,
        n: usize,
        dim: usize,
    ) -> Result<()>;

    /// `out = x · wᵀ`. x: (n, k) f32; w: (m, k) in `w_dtype` (rows of whole blocks); out: (n, m) f32.
    fn matmul(
        &self,
        x: BufRef,
        w: BufRef,
        w_dtype: DType,
        out: BufRef,
        dims: MatmulDims,
    ) -> Result<()>;

    /// `out[i] = x[i] / sqrt(mean(x[i]²) + eps) * weight`.
    /// x: (n, dim) f32; weight: (dim) f32; out: (n, dim) f32.
    fn rms_norm(
        &self,
        x: BufRef,
        weight: BufRef,
        out: BufRef,
        n: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()>;

    /// Rotary embedding in place, llama.cpp NORM mode (adjacent pairs `(2i, 2i+1)`,
    /// `θ_i = pos · base^(-2i/rope_dim)`).
    /// x: (num_tokens, num_heads, head_dim) f32, in place; positions: (num_tokens) u32.
    fn rope(&self, x: BufRef, positions: BufRef, dims: RopeDims) -> Result<()>;

    /// `out = silu(gate) * up`. gate, up, out: (len) f32.
    fn silu_mul(&self, gate: BufRef, up: BufRef, out: BufRef, len: usize) -> Result<()>;

    /// `x += y` in place. x, y: (len) f32.
    fn add_assign(&self, x: BufRef, y: BufRef, len: usize) -> Result<()>;

    /// `out[i, :] = x[indices[i], :]`. x: (n, dim) f32; indices: (m) u32; out: (m, dim) f32.
    fn gather_rows(
        &self,
        x: BufRef,
        indices: BufRef,
        out: BufRef,
        m: usize,
        dim: usize,
    ) -> Result<()>;
}

/// Writes and moves paged KV data (layout in [`crate::kv_cache`]).
pub trait KvCacheOps {
    /// Stores the K and V rows of `num_tokens` new tokens at their slots.
    /// k, v: (num_tokens, num_kv_heads, head_dim) f32; slot_mapping: (num_tokens) u32
    /// (`page * page_size + offset`). Converts to the cache dtype.
    fn write_kv(
        &self,
        cache: KvLayerRef,
        k: BufRef,
        v: BufRef,
        slot_mapping: BufRef,
        num_tokens: usize,
    ) -> Result<()>;

    /// Copies whole pages within one layer arena: for each `(src, dst)` pair, page
    /// `dst` becomes a copy of page `src` (copy-on-write, defragmentation).
    fn copy_pages(&self, cache: KvLayerRef, pairs: &[(u32, u32)]) -> Result<()>;
}

/// Attention over the paged KV cache.
pub trait AttentionOps {
    /// Causal, ragged, GQA attention reading K/V only through block tables.
    ///
    /// q: (num_tokens, num_heads, head_dim) f32; the tokens of sequence `s` are
    /// rows `query_start_locs[s] .. query_start_locs[s+1]`.
    /// positions: (num_tokens) u32: token `t` attends to positions `0 ..= positions[t]`.
    /// block_tables: (num_seqs, max_blocks_per_seq) u32: page ids of each sequence in order.
    /// context_lens: (num_seqs) u32: tokens stored for each sequence (including this step's).
    /// query_start_locs: (num_seqs + 1) u32.
    /// out: (num_tokens, num_heads, head_dim) f32.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        q: BufRef,
        cache: KvLayerRef,
        positions: BufRef,
        block_tables: BufRef,
        context_lens: BufRef,
        query_start_locs: BufRef,
        out: BufRef,
        dims: AttentionDims,
    ) -> Result<()>;
}

/// A compute device: raw memory, transfers and the op families.
pub trait Backend: TensorOps + KvCacheOps + AttentionOps + Send + Sync + 'static {
    /// Static facts.
    fn info(&self) -> &BackendInfo;
    /// Device total and free memory right now.
    fn memory(&self) -> Result<DeviceMemory>;
    /// The raw segment source the engine's pool is built on.
    fn raw_allocator(&self) -> Arc<dyn RawAllocator>;
    /// Bytes the backend's captured graphs will take for `input` (the memory
    /// plan's `graphs` line, allocated under `MemoryTag::Graph`); 0 on a
    /// backend that does not capture graphs.
    fn graph_memory_bytes(&self, input: &GraphPlanInput) -> u64;
    /// Copies host bytes into device memory. `src.len()` must equal `dst.bytes`;
    /// zero bytes copies nothing.
    fn upload(&self, dst: BufRef, src: &[u8]) -> Result<()>;
    /// Copies device memory to the host, waiting for queued work.
    fn download(&self, src: BufRef, dst: &mut [u8]) -> Result<()>;
    /// Device-to-device copy of `src.bytes` bytes (equal lengths; zero copies nothing).
    fn copy(&self, src: BufRef, dst: BufRef) -> Result<()>;
    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;
}
