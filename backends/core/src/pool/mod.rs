//! Device memory: raw segments from a backend, carved into tagged blocks by one
//! caching pool.
//!
//! # Algorithm
//!
//! The pool is the one caching allocator of every backend (the design of
//! PyTorch's CUDA caching allocator, written once over [`RawAllocator`]):
//!
//! - **Alignment.** Every block size and every block offset is a multiple of
//!   [`Pool::alignment`]: the backend's [`RawAllocator::alignment`], at least
//!   [`MIN_ALIGNMENT_BYTES`] (256). A request is rounded up to it first.
//! - **Size classes.** A rounded request of at most [`SMALL_REQUEST_MAX_BYTES`]
//!   (1 MiB) is *small* and is served only from small segments of
//!   [`PoolConfig::min_segment_bytes`] (2 MiB by default); a larger one is
//!   *large* and is served only from large segments, whose size is the request
//!   rounded up to a multiple of [`LARGE_SEGMENT_GRANULE_BYTES`] (2 MiB, and at
//!   least `min_segment_bytes`). Keeping small blocks out of large segments
//!   stops long-lived small tensors from pinning big ranges.
//! - **Best fit.** Free blocks of each class sit in an ordered index keyed by
//!   `(size, segment, offset)`; a request takes the smallest free block that
//!   fits (ties: lowest segment id, then lowest offset).
//! - **Split.** When the chosen block is larger than the rounded request, the
//!   remainder becomes a new free block if it can ever be used: any remainder
//!   in a small segment, a remainder above 1 MiB in a large segment. A smaller
//!   remainder stays inside the handed-out block.
//! - **Coalesce.** A dropped [`Block`] becomes free and merges with its free
//!   neighbours on both sides, so a segment never has two adjacent free blocks.
//! - **Growth and out-of-memory.** When no free block fits, the pool asks the
//!   backend for a new segment of the class size (or, if that would exceed
//!   [`PoolConfig::budget_bytes`] or the backend refuses it, a segment of just
//!   the rounded request). If that fails, it calls [`Pool::empty_cache`] (gives
//!   every fully free segment back) and tries once more; then it returns
//!   [`BackendError::OutOfMemory`] with the request, the class, the segment
//!   sizes tried, the budget and the pool's totals in `detail`.
//! - **Caching.** Segments stay reserved when their blocks are dropped, so a
//!   steady workload stops calling the backend. They go back on
//!   [`Pool::empty_cache`], under memory pressure (above), and when the last
//!   [`Pool`] clone and the last [`Block`] are gone.
//!
//! Zero-byte requests are valid: they return a block with [`BufRef::EMPTY`],
//! allocate nothing, are not a fault site, and dropping them does nothing.
//! Every request of more than zero bytes is a fault site
//! ([`FaultInjector::check`]) before anything else happens.
//!
//! # Invariants (checked after every step by the property test)
//!
//! - The blocks of a segment tile it exactly, in address order, with no gap and
//!   no overlap; so no two live blocks overlap.
//! - Block sizes and offsets are multiples of the alignment.
//! - No two free blocks of a segment are adjacent.
//! - The free index holds exactly the free blocks.
//! - `reserved = allocated + free`; the totals per tag sum to `allocated`.
//! - A segment is returned to the backend only when it has no live block.
//!
//! # Accounting
//!
//! `allocated` counts *block* sizes: the request rounded up to the alignment,
//! plus a remainder too small to split (large segments only). [`Block::bytes`]
//! and [`BufRef::bytes`] are the requested size; [`Block::block_bytes`] is the
//! block size. Fragmentation is `1 - largest_free / total_free`, per segment and
//! over all segments, 0 when nothing is free.
//!
//! # Telemetry
//!
//! Each live block keeps a label ([`Pool::alloc_labeled`], interned to a
//! `u32`), its requested size, and the engine step and time of its
//! allocation. Every change to a segment's blocks bumps the pool's
//! generation and stamps the segment with it, so [`Pool::changes_since`]
//! returns only the segments changed since an earlier snapshot: a viewer
//! polling ten times a second never copies the whole pool map.
//!
//! # Costs
//!
//! With `F` free blocks, `B` blocks in the segment concerned and `S` segments:
//! an allocation served from the cache is `O(log F + log B)`; one that grows
//! the pool adds one backend call; a drop is `O(log F + log B)`; [`Pool::stats`]
//! is `O(log F)`; [`Pool::snapshot`] is `O(S + total blocks)`;
//! [`Pool::changes_since`] is `O(S + blocks of the changed segments)`;
//! [`Pool::empty_cache`] is `O(S + F log F)` plus one backend call per freed
//! segment. One mutex guards the state; backend calls are made while holding
//! it, so a [`RawAllocator`] must not call back into the pool.

mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::error::{BackendError, Result};
use crate::fault::FaultInjector;
pub use crate::memory_tag::MemoryTag;

use self::state::{FreeKey, Meta, SizeClass, State};

/// Smallest block alignment in bytes, whatever the backend asks for.
pub const MIN_ALIGNMENT_BYTES: u64 = 256;

/// Largest request (after rounding to the alignment) served from small segments.
pub const SMALL_REQUEST_MAX_BYTES: u64 = 1 << 20;

/// Large segments are a multiple of this size (2 MiB).
pub const LARGE_SEGMENT_GRANULE_BYTES: u64 = 2 << 20;

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
    /// Returns a segment. The pool guarantees no block of it is still live,
    /// and that the queued work that may touch it has finished: it calls
    /// [`Self::wait_idle`] before it frees one or more segments.
    fn free_segment(&self, segment: RawSegment);
    /// Waits until the device has finished every queued op (the stream is
    /// idle), so memory can be given back. Called by the pool before
    /// [`Self::free_segment`].
    fn wait_idle(&self) -> Result<()>;
    /// Alignment of every segment base, in bytes (a power of two).
    fn alignment(&self) -> u64;
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
    pub const EMPTY: BufRef = BufRef {
        segment: None,
        offset: 0,
        addr: 0,
        bytes: 0,
    };

    /// Whether the range is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The sub-range `[offset, offset + bytes)`; fails when it does not fit.
    pub fn slice(&self, offset: u64, bytes: u64) -> Result<BufRef> {
        if offset.checked_add(bytes).is_none_or(|end| end > self.bytes) {
            return Err(BackendError::InvalidArgument {
                op: "slice",
                detail: format!(
                    "range {offset}+{bytes} outside a buffer of {} bytes",
                    self.bytes
                ),
            });
        }
        if bytes == 0 {
            return Ok(BufRef::EMPTY);
        }
        Ok(BufRef {
            segment: self.segment,
            offset: self.offset + offset,
            addr: self.addr + offset,
            bytes,
        })
    }
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Upper bound on reserved bytes; `None` = whatever the backend gives.
    pub budget_bytes: Option<u64>,
    /// Size of small segments, and the smallest large segment. A smaller
    /// segment (just the rounded request) is only asked for when this size
    /// would exceed the budget or the backend refuses it.
    pub min_segment_bytes: u64,
    /// The largest segment the device can make ([`crate::BackendInfo::max_buffer_bytes`]):
    /// segments are never larger, and a larger request is refused.
    pub max_segment_bytes: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            budget_bytes: None,
            min_segment_bytes: 2 << 20,
            max_segment_bytes: u64::MAX,
        }
    }
}

/// Totals reported by the pool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStats {
    /// Bytes held from the backend in segments.
    pub reserved_bytes: u64,
    /// Bytes in live blocks, counting block sizes: each request rounded up to
    /// the alignment (plus any remainder too small to split off), see
    /// [`Block::block_bytes`].
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
    /// Allocated bytes (block sizes) per tag, indexed by [`MemoryTag::index`].
    pub allocated_by_tag: [u64; 5],
    /// Requested (unrounded) bytes of live blocks per tag: what a memory plan
    /// computes; `allocated_by_tag` minus this is the pool's rounding.
    pub requested_by_tag: [u64; 5],
    /// Live blocks per tag (for `graph`: captured graphs, one block each).
    pub live_blocks_by_tag: [usize; 5],
    /// Segments of each size class: `[small, large]` (requests up to
    /// [`SMALL_REQUEST_MAX_BYTES`] are served from small segments only).
    pub by_class: [ClassStats; 2],
}

/// The segments of one size class ([`PoolStats::by_class`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClassStats {
    /// Segments of the class.
    pub num_segments: usize,
    /// Bytes of those segments.
    pub reserved_bytes: u64,
    /// Bytes in their free blocks.
    pub free_bytes: u64,
    /// Their largest free block.
    pub largest_free_bytes: u64,
    /// `1 - largest_free / free` over the class (0 when nothing is free).
    pub fragmentation: f64,
}

impl ClassStats {
    /// The names of the classes, in [`PoolStats::by_class`] order.
    pub const NAMES: [&'static str; 2] = ["small", "large"];
}

impl PoolStats {
    /// Allocated bytes of one tag.
    pub fn allocated(&self, tag: MemoryTag) -> u64 {
        self.allocated_by_tag[tag.index()]
    }

    /// Requested (unrounded) bytes of one tag.
    pub fn requested(&self, tag: MemoryTag) -> u64 {
        self.requested_by_tag[tag.index()]
    }
}

/// One block of a segment in a [`PoolSnapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockInfo {
    /// Offset inside the segment.
    pub offset: u64,
    /// Size in bytes (the block size, see [`Block::block_bytes`]).
    pub bytes: u64,
    /// Tag of a live block, `None` when free.
    pub tag: Option<MemoryTag>,
    /// Label given to [`Pool::alloc_labeled`] (empty for free blocks and [`Pool::alloc`]).
    pub label: Arc<str>,
    /// Requested (unrounded) bytes of a live block, 0 when free.
    pub requested_bytes: u64,
    /// Engine step current when the block was allocated ([`Pool::set_step`]); 0 when free.
    pub alloc_step: u64,
    /// Microseconds from the pool's creation to the allocation; 0 when free.
    pub alloc_us: u64,
}

/// One segment in a [`PoolSnapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentInfo {
    /// Segment id.
    pub id: SegmentId,
    /// Base address ([`RawSegment::addr`]).
    pub addr: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Blocks in address order, covering the segment exactly.
    pub blocks: Vec<BlockInfo>,
    /// Bytes in free blocks of this segment.
    pub free_bytes: u64,
    /// Largest free block of this segment.
    pub largest_free_bytes: u64,
    /// `1 - largest_free / total_free` in this segment.
    pub fragmentation: f64,
    /// Pool generation of the segment's last change ([`Pool::changes_since`]).
    pub changed_at: u64,
}

/// The pool's full layout, for telemetry and the viewer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolSnapshot {
    /// Segments in id order.
    pub segments: Vec<SegmentInfo>,
    /// Totals.
    pub stats: PoolStats,
    /// Generation the snapshot was taken at: pass it to [`Pool::changes_since`].
    pub generation: u64,
}

/// What changed in the pool since a generation ([`Pool::changes_since`]):
/// the unit of change is a segment, sent with all its blocks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolChanges {
    /// The generation asked about.
    pub since: u64,
    /// The generation now: the `since` of the next call.
    pub generation: u64,
    /// Ids of every segment now, in id order (those missing from an earlier
    /// list were given back to the backend).
    pub segment_ids: Vec<SegmentId>,
    /// Segments added or changed after `since`, in id order.
    pub changed: Vec<SegmentInfo>,
    /// Totals now.
    pub stats: PoolStats,
    /// Blocks read to build `changed` (the cost: unchanged segments cost none).
    pub blocks_visited: usize,
}

struct Shared {
    raw: Arc<dyn RawAllocator>,
    config: PoolConfig,
    faults: FaultInjector,
    /// Block alignment: a power of two, at least [`MIN_ALIGNMENT_BYTES`].
    align: u64,
    /// The engine step new blocks are stamped with ([`Pool::set_step`]).
    step: AtomicU64,
    /// When the pool was made; block ages are measured from it.
    epoch: Instant,
    state: Mutex<State>,
}

/// `x` rounded up to a multiple of the power of two `align`; `None` on overflow.
fn round_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

impl Shared {
    /// The state, also after a panic elsewhere poisoned the mutex: every state
    /// change is complete before any call that could panic, so it is consistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Size of a new segment for a rounded request of `class`.
    fn segment_bytes(&self, rounded: u64, class: SizeClass) -> Option<u64> {
        let want = rounded.max(self.config.min_segment_bytes);
        match class {
            SizeClass::Small => round_up(want, self.align),
            SizeClass::Large => round_up(want, LARGE_SEGMENT_GRANULE_BYTES.max(self.align)),
        }
    }

    /// Gives every fully free segment back to the backend; returns the bytes released.
    fn release_free_segments(&self, st: &mut State) -> u64 {
        let mut released = 0u64;
        let segs = st.take_free_segments();
        if segs.is_empty() {
            return 0;
        }
        // Frees wait for the queue: ops enqueued before may still read these
        // segments. A failed wait means the device is lost; nothing queued
        // will run any more, so freeing is then safe too.
        let _ = self.raw.wait_idle();
        for seg in segs {
            released = released.saturating_add(seg.bytes);
            self.raw.free_segment(seg);
        }
        released
    }

    /// The out-of-memory error for a request, with the pool's numbers.
    fn oom(&self, st: &State, tag: MemoryTag, requested: u64, why: String) -> BackendError {
        let s = st.stats();
        let budget = match self.config.budget_bytes {
            Some(b) => format!("{b} B"),
            None => "none".to_string(),
        };
        BackendError::OutOfMemory {
            tag,
            requested_bytes: requested,
            detail: format!(
                "{why}; pool: reserved {} B in {} segments, allocated {} B, free {} B \
                 (largest free block {} B), budget {budget}",
                s.reserved_bytes,
                s.num_segments,
                s.allocated_bytes,
                s.free_bytes,
                s.largest_free_bytes,
            ),
        }
    }

    /// Adds a new segment able to hold a block of `rounded` bytes of `class`
    /// and returns its free block. Tries the class size, then the rounded size
    /// alone; with `retry`, empties the cache and tries once more.
    fn grow(
        &self,
        st: &mut State,
        requested: u64,
        rounded: u64,
        class: SizeClass,
        tag: MemoryTag,
        retry: bool,
    ) -> Result<FreeKey> {
        let Some(preferred) = self.segment_bytes(rounded, class) else {
            let why = format!("request of {requested} B cannot be rounded to a segment size");
            return Err(self.oom(st, tag, requested, why));
        };
        let max = self.config.max_segment_bytes;
        if rounded > max {
            let why = format!(
                "the request is larger than the device's largest buffer ({max} B); split it"
            );
            return Err(self.oom(st, tag, requested, why));
        }
        let preferred = preferred.min(max);
        let sizes: &[u64] = if preferred > rounded {
            &[preferred, rounded]
        } else {
            &[preferred]
        };
        let mut failures: Vec<String> = Vec::new();
        let mut released = None;
        for attempt in 0..2 {
            for &size in sizes {
                if let Some(budget) = self.config.budget_bytes
                    && st.reserved().saturating_add(size) > budget
                {
                    failures.push(format!("a {size} B segment would exceed the budget"));
                    continue;
                }
                match self.raw.alloc_segment(size) {
                    Ok(seg) => return self.adopt(st, seg, size, class),
                    Err(BackendError::OutOfMemory { detail, .. }) => {
                        failures.push(format!("backend refused a {size} B segment ({detail})"))
                    }
                    Err(other) => return Err(other),
                }
            }
            if attempt == 0 {
                if !retry {
                    break;
                }
                released = Some(self.release_free_segments(st));
            }
        }
        let retried = match released {
            Some(bytes) => format!("; retried after empty_cache released {bytes} B"),
            None => String::new(),
        };
        let why = format!(
            "{} block of {rounded} B: {}{retried}",
            class.name(),
            failures.join(", then ")
        );
        Err(self.oom(st, tag, requested, why))
    }

    /// Takes a segment the backend just returned into the state.
    fn adopt(
        &self,
        st: &mut State,
        seg: RawSegment,
        bytes: u64,
        class: SizeClass,
    ) -> Result<FreeKey> {
        let problem = if seg.bytes < bytes {
            Some(format!(
                "returned {} B for a request of {bytes} B",
                seg.bytes
            ))
        } else if st.has_segment(seg.id) {
            Some(format!("returned id {:?}, which is still in use", seg.id))
        } else {
            None
        };
        if let Some(detail) = problem {
            self.raw.free_segment(seg);
            return Err(BackendError::InvalidArgument {
                op: "alloc_segment",
                detail,
            });
        }
        Ok(st.add_segment(seg, bytes, class))
    }
}

impl Drop for Shared {
    /// The last [`Pool`] clone and the last [`Block`] are gone (blocks hold the
    /// shared state), so no block is live: every segment goes back.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let segs = st.take_free_segments();
        if !segs.is_empty() {
            // Frees wait for the queue (see `release_free_segments`).
            let _ = self.raw.wait_idle();
        }
        for seg in segs {
            self.raw.free_segment(seg);
        }
    }
}

/// The caching allocator over a backend's raw segments. Cheap to clone (shared).
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.stats())
            .finish()
    }
}

/// A live allocation. Returned to the pool when dropped (RAII).
pub struct Block {
    shared: Arc<Shared>,
    buf: BufRef,
    /// Size of the block in the pool (0 for a zero-byte block).
    block_bytes: u64,
    tag: MemoryTag,
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("buf", &self.buf)
            .field("block_bytes", &self.block_bytes)
            .field("tag", &self.tag)
            .finish()
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
    /// Size the block occupies in its segment: the request rounded up to the
    /// alignment, plus any remainder too small to split off. What
    /// [`PoolStats::allocated_bytes`] counts. 0 for a zero-byte block.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }
    /// What the block holds.
    pub fn tag(&self) -> MemoryTag {
        self.tag
    }
}

impl Drop for Block {
    /// Frees the block and merges it with free neighbours. Never panics, also
    /// with a poisoned mutex; the segment stays cached.
    fn drop(&mut self) {
        let Some(id) = self.buf.segment else { return };
        let mut st = self.shared.lock();
        if st.release(id, self.buf.offset) {
            let r = &mut st.requested_by_tag[self.tag.index()];
            *r = r.saturating_sub(self.buf.bytes);
        }
    }
}

impl Pool {
    /// A pool over `raw`, counting fault sites on `faults`.
    pub fn new(raw: Arc<dyn RawAllocator>, config: PoolConfig, faults: FaultInjector) -> Pool {
        let align = raw
            .alignment()
            .max(MIN_ALIGNMENT_BYTES)
            .checked_next_power_of_two()
            .unwrap_or(MIN_ALIGNMENT_BYTES);
        Pool {
            shared: Arc::new(Shared {
                raw,
                config,
                faults,
                align,
                step: AtomicU64::new(0),
                epoch: Instant::now(),
                state: Mutex::new(State::new(align)),
            }),
        }
    }

    /// The fault injector shared with this pool.
    pub fn faults(&self) -> &FaultInjector {
        &self.shared.faults
    }

    /// Alignment of every block's size and offset: the backend's alignment,
    /// at least [`MIN_ALIGNMENT_BYTES`]. A block's address is aligned to
    /// `min(this, RawAllocator::alignment())`, since segment bases are aligned
    /// to the backend's alignment only.
    pub fn alignment(&self) -> u64 {
        self.shared.align
    }

    /// The settings the pool was made with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    /// Allocates `bytes` for `tag`. Zero bytes is valid and allocates nothing.
    /// Every call with `bytes > 0` is a fault site, checked first.
    ///
    /// Fails with [`BackendError::OutOfMemory`] when neither the cache, a new
    /// segment, nor a new segment after [`Pool::empty_cache`] can serve it
    /// (see the module documentation).
    pub fn alloc(&self, bytes: u64, tag: MemoryTag) -> Result<Block> {
        self.alloc_labeled(bytes, tag, "")
    }

    /// [`Pool::alloc`] with a short label naming what the block holds
    /// (`blk.3.attn_q.weight`, `kv.layer.7`, `ws.logits`), shown by telemetry
    /// with the block's allocation step and time. Labels are interned: a new
    /// label allocates once, a known one never, and freeing a block never
    /// touches the heap. Give labels per purpose, not per instance (at most
    /// 65536 distinct labels are kept; later ones read `(too many labels)`).
    pub fn alloc_labeled(&self, bytes: u64, tag: MemoryTag, label: &str) -> Result<Block> {
        if bytes == 0 {
            return Ok(Block {
                shared: self.shared.clone(),
                buf: BufRef::EMPTY,
                block_bytes: 0,
                tag,
            });
        }
        self.shared.faults.check(tag.name())?;
        let shared = &*self.shared;
        let mut st = shared.lock();
        let Some(rounded) = round_up(bytes, shared.align) else {
            let why = format!("request of {bytes} B cannot be aligned");
            return Err(shared.oom(&st, tag, bytes, why));
        };
        let class = SizeClass::of(rounded);
        let key = match st.best_fit(class, rounded) {
            Some(key) => key,
            None => shared.grow(&mut st, bytes, rounded, class, tag, true)?,
        };
        let meta = Meta {
            label: st.intern(label),
            requested: bytes,
            step: shared.step.load(Ordering::Relaxed),
            t_us: shared.epoch.elapsed().as_micros() as u64,
        };
        let Some(carved) = st.carve(key, rounded, tag, meta) else {
            let why = format!("internal error: free block {key:?} cannot hold {rounded} B");
            return Err(shared.oom(&st, tag, bytes, why));
        };
        st.requested_by_tag[tag.index()] = st.requested_by_tag[tag.index()].saturating_add(bytes);
        drop(st);
        Ok(Block {
            shared: self.shared.clone(),
            buf: BufRef {
                segment: Some(carved.segment),
                offset: carved.offset,
                addr: carved.addr,
                bytes,
            },
            block_bytes: carved.bytes,
            tag,
        })
    }

    /// Reserves a new segment sized for a request of `bytes` (same size class
    /// and rounding as [`Pool::alloc`]) and keeps it cached and free, so later
    /// allocations up to that size are served without calling the backend.
    /// Returns the segment's size; 0 for `bytes == 0`. `tag` only names the
    /// purpose in errors.
    ///
    /// Not a fault site. Never empties the cache (that could give back an
    /// earlier reservation); fails with [`BackendError::OutOfMemory`] when the
    /// budget or the backend refuses. Like every free segment, a reserved one
    /// is given back by [`Pool::empty_cache`].
    pub fn reserve(&self, bytes: u64, tag: MemoryTag) -> Result<u64> {
        if bytes == 0 {
            return Ok(0);
        }
        let shared = &*self.shared;
        let mut st = shared.lock();
        let Some(rounded) = round_up(bytes, shared.align) else {
            let why = format!("request of {bytes} B cannot be aligned");
            return Err(shared.oom(&st, tag, bytes, why));
        };
        let (size, _, _) =
            shared.grow(&mut st, bytes, rounded, SizeClass::of(rounded), tag, false)?;
        Ok(size)
    }

    /// Current totals.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats()
    }

    /// Segments and blocks, with the totals taken at the same moment.
    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.shared.lock();
        PoolSnapshot {
            segments: st.segment_infos(),
            stats: st.stats(),
            generation: st.generation(),
        }
    }

    /// The segments changed after generation `since` (from an earlier
    /// [`PoolSnapshot::generation`] or [`PoolChanges::generation`]), each with
    /// all its blocks, plus every segment id and the totals, at one moment.
    /// Applying them to the earlier snapshot's segments (replace the changed
    /// ones, drop the ids no longer listed) gives [`Pool::snapshot`]'s.
    /// `O(S + blocks of the changed segments)`: unchanged segments are not read.
    pub fn changes_since(&self, since: u64) -> PoolChanges {
        self.shared.lock().changes_since(since)
    }

    /// Sets the engine step that new blocks are stamped with (their age in
    /// telemetry). Lock-free.
    pub fn set_step(&self, step: u64) {
        self.shared.step.store(step, Ordering::Relaxed);
    }

    /// Returns every segment with no live block to the backend.
    pub fn empty_cache(&self) {
        let shared = &*self.shared;
        let mut st = shared.lock();
        shared.release_free_segments(&mut st);
    }
}
