//! Device memory: raw segments from a backend, carved into tagged blocks by one pool.
//!
//! PLACEHOLDER IMPLEMENTATION: one segment per block. The caching pool
//! (best-fit, split/coalesce, size classes) replaces the internals behind the
//! same API.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::error::{BackendError, Result};
use crate::fault::FaultInjector;

/// Identifier of a raw segment, unique per [`RawAllocator`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId(pub u32);

/// A raw allocation made by a backend: host memory, `cuMemAlloc`/VMM range, a wgpu buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSegment {
    /// Identifier chosen by the allocator.
    pub id: SegmentId,
    /// Base address of the segment in the backend's address space (a host
    /// pointer on the CPU, a device pointer on CUDA, 0 for a wgpu buffer).
    pub addr: u64,
    /// Size in bytes.
    pub bytes: u64,
}

/// A backend's source of raw segments. The pool is its only client.
pub trait RawAllocator: Send + Sync {
    /// Allocates a segment of exactly `bytes` (> 0) bytes, aligned to [`Self::alignment`].
    fn alloc_segment(&self, bytes: u64) -> Result<RawSegment>;
    /// Returns a segment. The pool guarantees no block of it is still live.
    fn free_segment(&self, segment: RawSegment);
    /// Alignment of every segment base, in bytes (a power of two).
    fn alignment(&self) -> u64;
}

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
    pub const ALL: [MemoryTag; 5] =
        [MemoryTag::Weights, MemoryTag::Activations, MemoryTag::Kv, MemoryTag::Graph, MemoryTag::Scratch];

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

/// A reference to a byte range of device memory, what ops take as arguments.
///
/// A zero-byte `BufRef` has no segment and is valid everywhere: ops and copies
/// on it do nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufRef {
    /// Segment holding the range (`None` for zero bytes).
    pub segment: Option<SegmentId>,
    /// Offset of the range inside the segment.
    pub offset: u64,
    /// Address of the range's first byte: segment base address + offset.
    pub addr: u64,
    /// Length in bytes.
    pub bytes: u64,
}

impl BufRef {
    /// The empty range.
    pub const EMPTY: BufRef = BufRef { segment: None, offset: 0, addr: 0, bytes: 0 };

    /// Whether the range is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The sub-range `[offset, offset + bytes)`; fails when it does not fit.
    pub fn slice(&self, offset: u64, bytes: u64) -> Result<BufRef> {
        if offset.checked_add(bytes).is_none_or(|end| end > self.bytes) {
            return Err(BackendError::InvalidArgument {
                op: "slice",
                detail: format!("range {offset}+{bytes} outside a buffer of {} bytes", self.bytes),
            });
        }
        if bytes == 0 {
            return Ok(BufRef::EMPTY);
        }
        Ok(BufRef { segment: self.segment, offset: self.offset + offset, addr: self.addr + offset, bytes })
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Upper bound on reserved bytes; `None` = whatever the backend gives.
    pub budget_bytes: Option<u64>,
    /// Smallest segment requested from the backend.
    pub min_segment_bytes: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { budget_bytes: None, min_segment_bytes: 2 << 20 }
    }
}

/// Totals reported by the pool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStats {
    /// Bytes held from the backend in segments.
    pub reserved_bytes: u64,
    /// Bytes in live blocks.
    pub allocated_bytes: u64,
    /// Bytes in free blocks (`reserved - allocated`).
    pub free_bytes: u64,
    /// Largest free block over all segments.
    pub largest_free_bytes: u64,
    /// `1 - largest_free / total_free` over all segments (0 when nothing is free).
    pub fragmentation: f64,
    /// Highest `allocated_bytes` seen.
    pub peak_allocated_bytes: u64,
    /// Number of segments.
    pub num_segments: usize,
    /// Number of live blocks.
    pub num_live_blocks: usize,
    /// Allocated bytes per tag, indexed by [`MemoryTag::index`].
    pub allocated_by_tag: [u64; 5],
}

impl PoolStats {
    /// Allocated bytes of one tag.
    pub fn allocated(&self, tag: MemoryTag) -> u64 {
        self.allocated_by_tag[tag.index()]
    }
}

/// One block of a segment in a [`PoolSnapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockInfo {
    /// Offset inside the segment.
    pub offset: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Tag of a live block, `None` when free.
    pub tag: Option<MemoryTag>,
}

/// One segment in a [`PoolSnapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentInfo {
    /// Segment id.
    pub id: SegmentId,
    /// Size in bytes.
    pub bytes: u64,
    /// Blocks in address order, covering the segment exactly.
    pub blocks: Vec<BlockInfo>,
    /// `1 - largest_free / total_free` in this segment.
    pub fragmentation: f64,
}

/// The pool's full layout, for telemetry and the viewer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolSnapshot {
    /// Segments in id order.
    pub segments: Vec<SegmentInfo>,
    /// Totals.
    pub stats: PoolStats,
}

struct State {
    segments: BTreeMap<SegmentId, (RawSegment, Option<MemoryTag>)>,
    stats: PoolStats,
}

struct Shared {
    raw: Arc<dyn RawAllocator>,
    config: PoolConfig,
    faults: FaultInjector,
    state: Mutex<State>,
}

/// The caching allocator over a backend's raw segments. Cheap to clone (shared).
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("stats", &self.stats()).finish()
    }
}

/// A live allocation. Returned to the pool when dropped (RAII).
pub struct Block {
    shared: Arc<Shared>,
    buf: BufRef,
    tag: MemoryTag,
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block").field("buf", &self.buf).field("tag", &self.tag).finish()
    }
}

impl Block {
    /// The block's byte range.
    pub fn buf(&self) -> BufRef {
        self.buf
    }
    /// Size in bytes (as requested, before rounding).
    pub fn bytes(&self) -> u64 {
        self.buf.bytes
    }
    /// What the block holds.
    pub fn tag(&self) -> MemoryTag {
        self.tag
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        let Some(id) = self.buf.segment else { return };
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seg, _)) = st.segments.remove(&id) {
            st.stats.reserved_bytes -= seg.bytes;
            st.stats.allocated_bytes -= seg.bytes;
            st.stats.allocated_by_tag[self.tag.index()] -= seg.bytes;
            st.stats.num_segments -= 1;
            st.stats.num_live_blocks -= 1;
            self.shared.raw.free_segment(seg);
        }
    }
}

impl Pool {
    /// A pool over `raw`, counting fault sites on `faults`.
    pub fn new(raw: Arc<dyn RawAllocator>, config: PoolConfig, faults: FaultInjector) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                raw,
                config,
                faults,
                state: Mutex::new(State { segments: BTreeMap::new(), stats: PoolStats::default() }),
            }),
        }
    }

    /// The fault injector shared with this pool.
    pub fn faults(&self) -> &FaultInjector {
        &self.shared.faults
    }

    /// Allocates `bytes` for `tag`. Zero bytes is valid and allocates nothing.
    /// Every call with `bytes > 0` is a fault site.
    pub fn alloc(&self, bytes: u64, tag: MemoryTag) -> Result<Block> {
        if bytes == 0 {
            return Ok(Block { shared: self.shared.clone(), buf: BufRef::EMPTY, tag });
        }
        self.shared.faults.check(tag.name())?;
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(budget) = self.shared.config.budget_bytes {
            if st.stats.reserved_bytes + bytes > budget {
                return Err(BackendError::OutOfMemory {
                    tag,
                    requested_bytes: bytes,
                    detail: format!("pool budget {budget} bytes, {} reserved", st.stats.reserved_bytes),
                });
            }
        }
        let seg = self.shared.raw.alloc_segment(bytes)?;
        st.segments.insert(seg.id, (seg, Some(tag)));
        st.stats.reserved_bytes += seg.bytes;
        st.stats.allocated_bytes += seg.bytes;
        st.stats.allocated_by_tag[tag.index()] += seg.bytes;
        st.stats.peak_allocated_bytes = st.stats.peak_allocated_bytes.max(st.stats.allocated_bytes);
        st.stats.num_segments += 1;
        st.stats.num_live_blocks += 1;
        Ok(Block {
            shared: self.shared.clone(),
            buf: BufRef { segment: Some(seg.id), offset: 0, addr: seg.addr, bytes },
            tag,
        })
    }

    /// Current totals.
    pub fn stats(&self) -> PoolStats {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).stats.clone()
    }

    /// Segments and blocks.
    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        PoolSnapshot {
            segments: st
                .segments
                .values()
                .map(|(s, tag)| SegmentInfo {
                    id: s.id,
                    bytes: s.bytes,
                    blocks: vec![BlockInfo { offset: 0, bytes: s.bytes, tag: *tag }],
                    fragmentation: 0.0,
                })
                .collect(),
            stats: st.stats.clone(),
        }
    }

    /// Returns every segment with no live block to the backend.
    pub fn empty_cache(&self) {}
}
