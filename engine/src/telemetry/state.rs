//! The memory state a viewer draws, and the compact changes that keep a
//! copy of it current.
//!
//! A [`MemoryState`] is everything at one moment: totals, the memory plan's
//! lines, every pool segment with its blocks, every KV page. A
//! [`MemoryDelta`] holds the totals (always: they are small) and only the
//! segments and pages that changed since the previous memory event, plus the
//! ids of segments given back. [`MemoryState::apply`] turns the state at the
//! delta's `base_step_id` into the state at its `step_id`;
//! [`reconstruct`] applies a chain of deltas to a [`Keyframe`] and checks that
//! the chain has no gap. The JSON form is documented field by field in
//! `docs/trace-schema.md`.
//!
//! The unit of change is a pool segment (sent with all its blocks) and a KV
//! page. Block ages are carried as the allocation step and time, never as an
//! age, so an unchanged block never has to be re-sent.

use pagoda_backend::MemoryTag;
use pagoda_backend::pool::{BlockInfo, PoolStats, SegmentInfo};
use serde::{Deserialize, Serialize};

use crate::plan::MemoryPlan;

/// Version of the trace / SSE schema; every keyframe carries it.
pub const SCHEMA: &str = "pagoda-trace/2";

/// Bytes and blocks of one tag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TagTotals {
    /// `weights`, `activations`, `kv`, `graph` or `scratch`.
    pub tag: String,
    /// Bytes of live blocks (block sizes, after pool rounding).
    pub allocated_bytes: u64,
    /// Bytes asked for (before rounding): what the memory plan computes.
    pub requested_bytes: u64,
    /// Live blocks.
    pub live_blocks: u64,
}

/// Totals of the caching pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolTotals {
    /// Bytes held from the backend in segments.
    pub reserved_bytes: u64,
    /// Bytes in live blocks.
    pub allocated_bytes: u64,
    /// Bytes in free blocks (`reserved - allocated`).
    pub free_bytes: u64,
    /// Highest `allocated_bytes` seen.
    pub peak_allocated_bytes: u64,
    /// Largest free block over all segments.
    pub largest_free_bytes: u64,
    /// `1 - largest_free / free` over all segments (0 when nothing is free).
    pub fragmentation: f64,
    /// Segments.
    pub num_segments: u64,
    /// Live blocks.
    pub num_live_blocks: u64,
    /// Per tag, in the order weights, activations, kv, graph, scratch.
    pub by_tag: Vec<TagTotals>,
}

impl PoolTotals {
    /// The totals of a pool's stats.
    pub fn from_stats(s: &PoolStats) -> PoolTotals {
        PoolTotals {
            reserved_bytes: s.reserved_bytes,
            allocated_bytes: s.allocated_bytes,
            free_bytes: s.free_bytes,
            peak_allocated_bytes: s.peak_allocated_bytes,
            largest_free_bytes: s.largest_free_bytes,
            fragmentation: s.fragmentation,
            num_segments: s.num_segments as u64,
            num_live_blocks: s.num_live_blocks as u64,
            by_tag: MemoryTag::ALL
                .iter()
                .map(|&t| TagTotals {
                    tag: t.name().to_string(),
                    allocated_bytes: s.allocated(t),
                    requested_bytes: s.requested(t),
                    live_blocks: s.live_blocks_by_tag[t.index()] as u64,
                })
                .collect(),
        }
    }

    /// The totals of one tag.
    pub fn tag(&self, tag: MemoryTag) -> Option<&TagTotals> {
        self.by_tag.iter().find(|t| t.tag == tag.name())
    }
}

/// Totals of the paged KV cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvTotals {
    /// Pages (the length of the page map).
    pub num_pages: u64,
    /// Free pages (refcount 0, cached or not).
    pub free_pages: u64,
    /// Token positions per page.
    pub page_size: u64,
    /// Bytes of one page over all layers.
    pub page_bytes: u64,
    /// Arena pieces the pages live in.
    pub num_pieces: u64,
    /// Address space held for KV pages, all layers.
    pub reserved_bytes: u64,
    /// KV bytes backed by memory (VMM mapped); equal to `reserved_bytes`
    /// while the arenas are plain pool blocks.
    pub committed_bytes: u64,
    /// Commit units the reservation is cut into (VMM chunks on CUDA); 0 in
    /// traces recorded before the field existed.
    #[serde(default)]
    pub num_units: u64,
    /// Units committed now.
    #[serde(default)]
    pub committed_units: u64,
    /// Consecutive pages per unit.
    #[serde(default)]
    pub pages_per_unit: u64,
}

/// Captured graphs (CUDA graphs; none on the CPU).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GraphTotals {
    /// Graphs held: live pool blocks tagged `graph`, one per graph.
    pub count: u64,
    /// Their bytes (requested).
    pub bytes: u64,
    /// The padded decode batch sizes captured, ascending (empty without
    /// graphs, and in traces recorded before the field existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batch_sizes: Vec<u32>,
}

/// The numbers sent with every memory event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryTotals {
    /// Device memory (host RAM on the CPU backend); a live reading.
    pub device_total_bytes: u64,
    /// Device free memory; a live reading.
    pub device_free_bytes: u64,
    /// The pool.
    pub pool: PoolTotals,
    /// The KV cache.
    pub kv: KvTotals,
    /// Captured graphs.
    pub graphs: GraphTotals,
    /// KV bytes swapped out to host memory (0: no swapping yet).
    pub host_swap_bytes: u64,
}

/// The memory plan's lines, drawn over the memory-over-time chart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanLines {
    /// The budget the plan fits into.
    pub budget_bytes: u64,
    /// Weights.
    pub weights_bytes: u64,
    /// Activation workspace.
    pub workspace_bytes: u64,
    /// KV cache.
    pub kv_bytes: u64,
    /// Graph memory.
    pub graph_bytes: u64,
    /// Headroom kept free.
    pub headroom_bytes: u64,
    /// Sum of the above (without the budget).
    pub total_bytes: u64,
}

impl PlanLines {
    /// The lines of a memory plan.
    pub fn from_plan(p: &MemoryPlan) -> PlanLines {
        PlanLines {
            budget_bytes: p.budget_bytes,
            weights_bytes: p.weights_bytes,
            workspace_bytes: p.workspace_bytes,
            kv_bytes: p.kv_bytes,
            graph_bytes: p.graph_bytes,
            headroom_bytes: p.headroom_bytes,
            total_bytes: p.total_bytes,
        }
    }
}

/// One pool block: live (tagged) or free.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockSnapshot {
    /// Offset in the segment.
    pub offset: u64,
    /// Bytes the block occupies (after rounding).
    pub bytes: u64,
    /// Bytes asked for; 0 for a free block.
    pub requested_bytes: u64,
    /// `weights`, `activations`, `kv`, `graph`, `scratch` or `free`.
    pub tag: String,
    /// What it holds (`blk.3.attn_q.weight`, `kv.layer.7`, `ws.logits`);
    /// empty (and left out of the JSON) when unlabelled or free.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// Engine step at allocation (age in steps = `step_id - alloc_step`).
    pub alloc_step: u64,
    /// Microseconds from the pool's creation to the allocation.
    pub alloc_us: u64,
}

impl BlockSnapshot {
    fn from_info(b: &BlockInfo) -> BlockSnapshot {
        BlockSnapshot {
            offset: b.offset,
            bytes: b.bytes,
            requested_bytes: b.requested_bytes,
            tag: b.tag.map_or("free", MemoryTag::name).to_string(),
            label: b.label.to_string(),
            alloc_step: b.alloc_step,
            alloc_us: b.alloc_us,
        }
    }
}

/// One pool segment with all its blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentSnapshot {
    /// Segment id.
    pub id: u32,
    /// Base address in the backend's address space.
    pub base_addr: u64,
    /// Bytes.
    pub bytes: u64,
    /// Bytes in free blocks.
    pub free_bytes: u64,
    /// Largest free block.
    pub largest_free_bytes: u64,
    /// `1 - largest_free / free` (0 when nothing is free).
    pub fragmentation: f64,
    /// Blocks in address order, covering the segment exactly.
    pub blocks: Vec<BlockSnapshot>,
}

impl SegmentSnapshot {
    /// The snapshot of a pool segment.
    pub fn from_info(s: &SegmentInfo) -> SegmentSnapshot {
        SegmentSnapshot {
            id: s.id.0,
            base_addr: s.addr,
            bytes: s.bytes,
            free_bytes: s.free_bytes,
            largest_free_bytes: s.largest_free_bytes,
            fragmentation: s.fragmentation,
            blocks: s.blocks.iter().map(BlockSnapshot::from_info).collect(),
        }
    }
}

/// One KV page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvPageSnapshot {
    /// Page id.
    pub page: u32,
    /// Arena piece holding the page.
    pub piece: u32,
    /// Byte offset of the page inside its piece (the same in every layer).
    pub offset_bytes: u64,
    /// Sequences holding it.
    pub refcount: u32,
    /// Their ids, by arrival.
    pub owners: Vec<u64>,
    /// The page's index in each owner's block table, parallel to `owners`
    /// (left out when no one holds it, and absent in older traces).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<u32>,
    /// Tokens written (`page_size` for a cached page).
    pub tokens_used: u32,
    /// Held by more than one sequence.
    pub shared: bool,
    /// Registered in the prefix cache (a free cached page can be revived).
    pub cached: bool,
}

/// Everything at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryState {
    /// Totals.
    pub totals: MemoryTotals,
    /// The memory plan's lines.
    pub plan: PlanLines,
    /// Every pool segment, in id order.
    pub segments: Vec<SegmentSnapshot>,
    /// Every KV page, in page order (`kv_pages[i].page == i`).
    pub kv_pages: Vec<KvPageSnapshot>,
}

/// A full state: the first memory event of every subscriber, then one every
/// N memory events, so a replay can seek and a late subscriber can start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyframe {
    /// [`SCHEMA`].
    pub schema: String,
    /// Engine step the state is at.
    pub step_id: u64,
    /// Microseconds since the engine's telemetry started.
    pub t_us: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The state.
    pub memory: MemoryState,
}

/// Changes since the previous memory event (`base_step_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryDelta {
    /// Engine step the state is at after applying this.
    pub step_id: u64,
    /// Microseconds since the engine's telemetry started.
    pub t_us: u64,
    /// Step of the memory event this applies to.
    pub base_step_id: u64,
    /// Totals now.
    pub totals: MemoryTotals,
    /// Segments added or changed, each with all its blocks, in id order.
    pub segments: Vec<SegmentSnapshot>,
    /// Ids of segments given back to the backend.
    pub removed_segments: Vec<u32>,
    /// Pages changed, in page order.
    pub kv_pages: Vec<KvPageSnapshot>,
}

/// Why a chain of memory events cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// A delta does not follow the state it is applied to (events were lost).
    #[error(
        "delta for step {step_id} applies to step {base_step_id}, but the state is at step {have}"
    )]
    Gap {
        /// The delta's step.
        step_id: u64,
        /// The step it applies to.
        base_step_id: u64,
        /// The step of the state at hand.
        have: u64,
    },
    /// A keyframe of another schema version.
    #[error("keyframe of schema {found:?}; this reader knows {SCHEMA:?}")]
    Schema {
        /// The schema found.
        found: String,
    },
}

impl MemoryState {
    /// Applies `delta` (the changes from the state's step to `delta.step_id`):
    /// new totals, changed segments replaced or added, removed ones dropped,
    /// the page map resized to `totals.kv.num_pages` and changed pages
    /// replaced. `O(changes · log segments)`.
    pub fn apply(&mut self, delta: &MemoryDelta) {
        self.totals = delta.totals.clone();
        self.segments
            .retain(|s| !delta.removed_segments.contains(&s.id));
        for seg in &delta.segments {
            match self.segments.binary_search_by_key(&seg.id, |s| s.id) {
                Ok(i) => self.segments[i] = seg.clone(),
                Err(i) => self.segments.insert(i, seg.clone()),
            }
        }
        let n = self.totals.kv.num_pages as usize;
        self.kv_pages.truncate(n);
        while self.kv_pages.len() < n {
            // A new page; the delta that grows the map lists it.
            let page = self.kv_pages.len() as u32;
            self.kv_pages.push(KvPageSnapshot {
                page,
                piece: 0,
                offset_bytes: 0,
                refcount: 0,
                owners: Vec::new(),
                positions: Vec::new(),
                tokens_used: 0,
                shared: false,
                cached: false,
            });
        }
        for p in &delta.kv_pages {
            if let Some(slot) = self.kv_pages.get_mut(p.page as usize) {
                *slot = p.clone();
            }
        }
    }
}

/// The state after `deltas`, applied in order to `keyframe`; fails on a
/// schema mismatch or when a delta does not follow the one before.
pub fn reconstruct(
    keyframe: &Keyframe,
    deltas: &[MemoryDelta],
) -> Result<MemoryState, ReplayError> {
    if keyframe.schema != SCHEMA {
        return Err(ReplayError::Schema {
            found: keyframe.schema.clone(),
        });
    }
    let mut state = keyframe.memory.clone();
    let mut have = keyframe.step_id;
    for d in deltas {
        if d.base_step_id != have {
            return Err(ReplayError::Gap {
                step_id: d.step_id,
                base_step_id: d.base_step_id,
                have,
            });
        }
        state.apply(d);
        have = d.step_id;
    }
    Ok(state)
}
