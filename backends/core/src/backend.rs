//! The backend contract: device, memory and the op families a Llama forward needs.
//!
//! All ops enqueue on one in-order stream; only [`Backend::download`] and
//! [`Backend::synchronize`] block. Ops take [`BufRef`]s and explicit
//! dimensions; every buffer argument's shape and dtype is in its doc comment.
//! Output buffers must not overlap inputs unless the method says "in place".
//!
//! # How the engine drives a backend (one step)
//!
//! 1. **prepare**: every per-step host array (token ids, positions, slots,
//!    block tables, context lengths, query starts, logits rows) is packed
//!    into one host staging buffer and sent with **one** [`Backend::upload`];
//!    page copies (copy-on-write, swap) are enqueued here too.
//!    `upload` has copied the source when it returns, so an asynchronous
//!    backend may return before the device has the data (the copy is ordered
//!    on the stream before every later op) and the engine may reuse its
//!    staging buffer at once.
//! 2. **forward**: device work only, over buffers whose addresses and sizes
//!    depend only on the step's *padded shape* (for a decode step: its padded
//!    batch size), never on sequence lengths or on KV growth. This is what a
//!    graph captures.
//! 3. **sample**: [`SamplingOps::argmax_rows`] / [`SamplingOps::top_k_rows`]
//!    on the logits rows; full rows only when a request needs them.
//! 4. **read back**: [`Backend::download`] of the ids (and candidates).
//!
//! # Graphs
//!
//! A backend whose [`BackendInfo::supports_graphs`] is true returns
//! [`GraphOps`] from [`Backend::graphs`]. For each padded decode batch size
//! the engine calls [`GraphOps::begin_capture`], runs the forward once (ops
//! are recorded, not run), [`GraphOps::end_capture`], and from then on
//! [`GraphOps::replay`]s it. So at most one graph exists per padded batch
//! size, all over the one workspace; sequence length is data (block tables,
//! context lengths), never a reason for a new graph.
//!
//! # Memory is freed only after the queue
//!
//! A segment ([`RawAllocator::free_segment`]) or committed KV memory
//! ([`KvArenaOps::decommit`]) goes back to the device only after the queued
//! work that may touch it has finished: the pool calls
//! [`RawAllocator::wait_idle`] before it frees segments, and the engine
//! decommits KV units only after the step that last used them has been read
//! back (a blocking download).

use std::sync::Arc;

use crate::dtype::DType;
use crate::error::Result;
use crate::graph::GraphPlanInput;
use crate::host_buffer::{HeapBuffer, HostBuffer};
use crate::kv_cache::KvLayerRef;
use crate::pool::{BufRef, RawAllocator, RawSegment};

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
    /// Largest single buffer (raw segment, KV arena piece) the device can allocate.
    pub max_buffer_bytes: u64,
    /// Largest byte range one kernel argument (binding) may address; weights
    /// and KV arenas above it are split into pieces.
    pub max_binding_bytes: u64,
    /// Largest `k` of [`SamplingOps::top_k_rows`]; a request with a larger
    /// `top_k` (or `top_k = 0`) gets its full logits row instead.
    pub max_top_k: usize,
    /// Granularity of [`KvArenaOps::commit`] offsets and sizes, in bytes (a power of two).
    pub kv_commit_granularity: u64,
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
///
/// `out` row `t` starts at element `t * out_stride` (`out_stride >= m`), so
/// a weight split into row pieces writes column ranges of one output; with
/// `accumulate` the product is added to `out` (`out += x · wᵀ`, the residual
/// add fused into the projection), bit-identical to a matmul followed by
/// [`TensorOps::add_assign`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulDims {
    /// Rows of `x` (tokens).
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Rows of `w` (output features).
    pub m: usize,
    /// Elements between the starts of two rows of `out` (>= m).
    pub out_stride: usize,
    /// Add into `out` instead of overwriting it.
    pub accumulate: bool,
}

impl MatmulDims {
    /// A dense, overwriting product: `out_stride = m`.
    pub const fn new(n: usize, k: usize, m: usize) -> Self {
        MatmulDims {
            n,
            k,
            m,
            out_stride: m,
            accumulate: false,
        }
    }

    /// Elements of `out` the product touches: `(n - 1) * out_stride + m` (0 when `n` or `m` is 0).
    pub const fn out_len(&self) -> usize {
        if self.n == 0 || self.m == 0 {
            0
        } else {
            (self.n - 1) * self.out_stride + self.m
        }
    }
}

/// One projection of a fused [`TensorOps::rms_norm_matmul`]: `out = x̂ · wᵀ`
/// with `x̂` the normed input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Projection {
    /// (m, k) in `dtype`, rows of whole blocks.
    pub w: BufRef,
    /// Weight type.
    pub dtype: DType,
    /// Output features (rows of `w`).
    pub m: usize,
    /// (n, out_stride) f32; columns `0 .. m` of each row are written.
    pub out: BufRef,
    /// Elements between two rows of `out` (>= m).
    pub out_stride: usize,
}

/// Dimensions of an embedding lookup over one row piece of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingDims {
    /// Tokens.
    pub n: usize,
    /// Row width.
    pub dim: usize,
    /// Rows of the whole table (ids at or above it are an error).
    pub vocab: usize,
    /// First table row held by this piece.
    pub first_row: usize,
    /// Rows held by this piece; ids outside `first_row .. first_row + num_rows` are skipped.
    pub num_rows: usize,
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

/// Dimensions of a fused RoPE + KV write ([`KvCacheOps::rope_write_kv`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeKvDims {
    /// Tokens.
    pub num_tokens: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Leading elements of each head that rotate.
    pub rope_dim: usize,
    /// Frequency base θ.
    pub freq_base: f32,
}

impl RopeKvDims {
    /// The RoPE dimensions of the query (`kv = false`) or key (`kv = true`) heads.
    pub fn rope(&self, kv: bool) -> RopeDims {
        RopeDims {
            num_tokens: self.num_tokens,
            num_heads: if kv {
                self.num_kv_heads
            } else {
                self.num_heads
            },
            head_dim: self.head_dim,
            rope_dim: self.rope_dim,
            freq_base: self.freq_base,
        }
    }
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
    /// `out[i, :] = table[ids[i], :]` as f32 for the ids this piece holds
    /// (`first_row <= ids[i] < first_row + num_rows`); other rows of `out`
    /// are left as they are.
    /// table: (num_rows, dim) in `table_dtype`, table rows `first_row ..`;
    /// ids: (n) u32; out: (n, dim) f32.
    fn embedding(
        &self,
        table: BufRef,
        table_dtype: DType,
        ids: BufRef,
        out: BufRef,
        dims: EmbeddingDims,
    ) -> Result<()>;

    /// `out = x · wᵀ` (or `out += x · wᵀ` with `dims.accumulate`).
    /// x: (n, k) f32; w: (m, k) in `w_dtype` (rows of whole blocks);
    /// out: (n, out_stride) f32, columns `0 .. m` written.
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

    /// Fused RMSNorm and several projections of the normed input (Q, K, V;
    /// gate and up): `normed = rms_norm(x)`, then for each projection
    /// `p.out = normed · p.wᵀ`. Bit-identical to [`Self::rms_norm`] followed
    /// by one [`Self::matmul`] per projection.
    /// x: (n, k) f32; weight: (k) f32; normed: (n, k) f32 scratch (the
    /// backend may or may not write it); projections as in [`Projection`].
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_matmul(
        &self,
        x: BufRef,
        weight: BufRef,
        normed: BufRef,
        n: usize,
        k: usize,
        eps: f32,
        projections: &[Projection],
    ) -> Result<()>;

    /// Rotary embedding in place, llama.cpp NORM mode (adjacent pairs `(2i, 2i+1)`,
    /// `θ_i = pos · base^(-2i/rope_dim)`).
    /// x: (num_tokens, num_heads, head_dim) f32, in place; positions: (num_tokens) u32.
    fn rope(&self, x: BufRef, positions: BufRef, dims: RopeDims) -> Result<()>;

    /// `out = silu(gate) * up` (SwiGLU's activation, fused). gate, up, out: (len) f32.
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
        cache: KvLayerRef<'_>,
        k: BufRef,
        v: BufRef,
        slot_mapping: BufRef,
        num_tokens: usize,
    ) -> Result<()>;

    /// Fused RoPE and KV write: rotates `q` and `k` in place (as
    /// [`TensorOps::rope`]) and stores the rotated K and V rows at their
    /// slots (as [`Self::write_kv`]). Bit-identical to that sequence.
    /// q: (num_tokens, num_heads, head_dim) f32, in place;
    /// k: (num_tokens, num_kv_heads, head_dim) f32, in place;
    /// v: (num_tokens, num_kv_heads, head_dim) f32; positions, slot_mapping: (num_tokens) u32.
    #[allow(clippy::too_many_arguments)]
    fn rope_write_kv(
        &self,
        q: BufRef,
        k: BufRef,
        v: BufRef,
        positions: BufRef,
        slot_mapping: BufRef,
        cache: KvLayerRef<'_>,
        dims: RopeKvDims,
    ) -> Result<()>;

    /// Copies whole pages within one layer arena: for each `(src, dst)` pair, page
    /// `dst` becomes a copy of page `src` (copy-on-write, defragmentation).
    /// `pairs` is host memory, read before the call returns.
    fn copy_pages(&self, cache: KvLayerRef<'_>, pairs: &[(u32, u32)]) -> Result<()>;
}

/// Reserve-then-commit memory for KV arena pieces (CUDA: a VMM address range
/// with 2 MiB physical chunks mapped on demand; CPU: an anonymous mapping
/// whose pages are made accessible and dropped on demand).
///
/// Growing never moves memory: a piece keeps its address from [`Self::reserve`]
/// to [`Self::unreserve`], so kernel arguments (and captured graphs) stay valid.
/// Offsets and sizes are multiples of [`BackendInfo::kv_commit_granularity`].
pub trait KvArenaOps {
    /// Reserves `bytes` (> 0, a multiple of the granularity, at most
    /// [`BackendInfo::max_buffer_bytes`]) of address space; nothing is committed.
    fn reserve(&self, bytes: u64) -> Result<RawSegment>;
    /// Commits `[offset, offset + bytes)` of a reserved range: afterwards it
    /// reads as zeros and can be written. Committing a committed range is an error.
    fn commit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()>;
    /// Gives committed memory back. The engine calls it only after the queued
    /// work that may touch the range has finished.
    fn decommit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()>;
    /// Bytes of `range` committed right now.
    fn committed_bytes(&self, range: RawSegment) -> u64;
    /// Releases a reservation (committed parts included).
    fn unreserve(&self, range: RawSegment);
}

/// Picking tokens on the device, so only ids (or a few candidates) cross to
/// the host.
pub trait SamplingOps {
    /// `ids[r] = argmax(logits[r, :])`, ties to the lower id (NaN never wins),
    /// exactly as the host sampler's greedy pick.
    /// logits: (rows, vocab) f32; ids: (rows) u32.
    fn argmax_rows(&self, logits: BufRef, ids: BufRef, rows: usize, vocab: usize) -> Result<()>;

    /// The `k` largest logits of each row, in descending order by
    /// `f32::total_cmp`, ties to the lower id (the host sampler's order).
    /// logits: (rows, vocab) f32; values: (rows, k) f32; ids: (rows, k) u32.
    /// `k <= min(vocab, BackendInfo::max_top_k)`.
    fn top_k_rows(
        &self,
        logits: BufRef,
        values: BufRef,
        ids: BufRef,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<()>;
}

/// Identifies a captured graph of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GraphId(pub u32);

/// Graph capture and replay (CUDA graphs), for backends with
/// [`BackendInfo::supports_graphs`].
pub trait GraphOps {
    /// Starts recording: ops enqueued until [`Self::end_capture`] are
    /// recorded with their arguments, not run.
    fn begin_capture(&self) -> Result<()>;
    /// Ends recording and instantiates the graph.
    fn end_capture(&self) -> Result<GraphId>;
    /// Enqueues the recorded ops again, with the same arguments.
    fn replay(&self, graph: GraphId) -> Result<()>;
    /// Destroys a graph and gives back its memory (its engine, and so the
    /// workspace it replays on, is going away). Its id is not reused.
    fn release(&self, graph: GraphId) -> Result<()>;
    /// Graphs alive now (captured and not released).
    fn num_graphs(&self) -> usize;
    /// Device memory held by the live graphs (measured after capture).
    fn memory_bytes(&self) -> u64;
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
        cache: KvLayerRef<'_>,
        positions: BufRef,
        block_tables: BufRef,
        context_lens: BufRef,
        query_start_locs: BufRef,
        out: BufRef,
        dims: AttentionDims,
    ) -> Result<()>;
}

/// A compute device: raw memory, transfers and the op families.
pub trait Backend:
    TensorOps + KvCacheOps + AttentionOps + SamplingOps + KvArenaOps + Send + Sync + 'static
{
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
    /// zero bytes copies nothing. The source has been copied (into the
    /// device or a staging buffer of the backend's own) when this returns,
    /// so the caller may reuse it at once; the device copy is ordered before
    /// every op enqueued later.
    fn upload(&self, dst: BufRef, src: &[u8]) -> Result<()>;
    /// Copies device memory to the host, waiting for queued work.
    fn download(&self, src: BufRef, dst: &mut [u8]) -> Result<()>;
    /// Device-to-device copy of `src.bytes` bytes (equal lengths; zero copies nothing).
    fn copy(&self, src: BufRef, dst: BufRef) -> Result<()>;
    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;
    /// Graph capture, when the backend has it (`None` otherwise).
    fn graphs(&self) -> Option<&dyn GraphOps>;
    /// Bytes a weight tensor of `dtype` and `(rows, cols)` takes on this
    /// device after [`Self::upload_weight`] (a backend may repack weights
    /// into a kernel-friendly layout); the memory plan counts this figure.
    fn prepared_weight_bytes(&self, dtype: DType, rows: usize, cols: usize) -> Option<u64>;
    /// Uploads a weight tensor's GGUF bytes (rows of whole blocks) into
    /// `dst` (of [`Self::prepared_weight_bytes`] bytes), repacking as the
    /// backend likes; matmul and embedding then read `dst`.
    fn upload_weight(
        &self,
        dst: BufRef,
        src: &[u8],
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// Zeroed host memory for staging device data (the KV swap tier):
    /// page-locked where transfers are faster from it (CUDA), plain heap
    /// memory by default.
    fn alloc_host(&self, bytes: usize) -> Result<Box<dyn HostBuffer>> {
        Ok(Box::new(HeapBuffer::new(bytes)))
    }
    /// Makes the backend's own allocation points (CUDA: each VMM chunk map)
    /// fault sites of `faults`, the engine's injector, so a fault sweep
    /// reaches them too. The engine calls it when it is built; the last
    /// engine built on a backend wins. Default: no sites of the backend's own.
    fn attach_faults(&self, faults: &crate::fault::FaultInjector) {
        let _ = faults;
    }
}
