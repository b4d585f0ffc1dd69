//! Telemetry: per-step statistics and memory state, published through
//! bounded channels that never block the engine, in a compact form a live
//! viewer can follow at ten updates a second.
//!
//! # Events
//!
//! Every event carries the engine's `step_id` (non-decreasing; a step's
//! `step` event and its memory event share it, later steps have larger ids)
//! and `t_us`, microseconds since the publisher was made:
//! - [`TelemetryEvent::Step`]: what one step did ([`StepStats`]);
//! - [`TelemetryEvent::Keyframe`]: the whole [`MemoryState`];
//! - [`TelemetryEvent::Delta`]: only what changed since the previous memory
//!   event ([`MemoryDelta`]).
//!
//! The JSON-lines form (`--trace FILE`, and the server's SSE stream) is
//! documented field by field in `docs/trace-schema.md`, schema [`SCHEMA`].
//!
//! # Policy
//!
//! 1. A subscriber's first memory event is a keyframe (a late subscriber can
//!    start at once; [`Telemetry::subscribe_now`] sends it at subscription,
//!    stamped with the last memory event's step, which the next delta
//!    follows), and so is the first one after an event was dropped for it
//!    (a delta only applies to the state just before it).
//! 2. Every [`Telemetry::keyframe_interval`] memory events (default
//!    [`DEFAULT_KEYFRAME_INTERVAL`]) everyone gets a keyframe, so a replay can
//!    seek to any step by reading back to the nearest keyframe.
//! 3. Otherwise subscribers get a delta. The publisher keeps no copy of the
//!    state: only a [`Baseline`] (the pool generation, the segment ids and the
//!    step of the last memory event). The pool stamps each segment with the
//!    generation of its last change and the block manager keeps a dirty set of
//!    pages, so a delta reads only changed segments and pages
//!    ([`DeltaCost`] counts it).
//! 4. Sending is `try_send`: when a subscriber's channel is full, the event is
//!    dropped for it (and counted in [`Telemetry::dropped`]); the engine
//!    never waits. A disconnected subscriber is forgotten. Memory state is
//!    only built when someone wants it.
//!
//! # Invariant (checked by the tests)
//!
//! For every subscriber, the keyframe it got plus the deltas after it,
//! applied with [`reconstruct`], equal a full [`MemoryState::capture`] at
//! the step of the last delta.
//!
//! # Costs
//!
//! A delta: `O(segments + blocks of changed segments + changed pages ·
//! holders)`. A keyframe: `O(segments + blocks + pages)`.

mod state;
#[cfg(test)]
mod tests;
pub mod trace;

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pagoda_backend::{Backend, MemoryTag};
use serde::{Deserialize, Serialize};

use crate::model_runner::ModelRunner;
use crate::plan::MemoryPlan;
use crate::scheduler::{KvPageInfo, Scheduler};
use crate::sequence::PageId;
use crate::step_plan::StepPlan;

pub use state::{
    BlockSnapshot, GraphTotals, Keyframe, KvPageSnapshot, KvTotals, MemoryDelta, MemoryState,
    MemoryTotals, PlanLines, PoolTotals, ReplayError, SCHEMA, SegmentSnapshot, TagTotals,
    reconstruct,
};

/// Memory events between two keyframes sent to everyone, by default.
pub const DEFAULT_KEYFRAME_INTERVAL: u64 = 50;

/// What one step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Engine step (steps that ran a plan, counted from 1).
    pub step_id: u64,
    /// Microseconds since the publisher was made (set when published).
    pub t_us: u64,
    /// Sequences in the step.
    pub batch_size: usize,
    /// Tokens in the step.
    pub num_tokens: usize,
    /// Prefill tokens.
    pub num_prefill_tokens: usize,
    /// Decode tokens.
    pub num_decode_tokens: usize,
    /// Time to schedule, µs.
    pub schedule_us: u64,
    /// Time of the forward pass (incl. upload/download), µs.
    pub forward_us: u64,
    /// Whole step, µs.
    pub step_us: u64,
    /// Preemptions so far.
    pub total_preemptions: u64,
    /// Prefix-cache hit tokens so far.
    pub total_prefix_cache_hit_tokens: u64,
    /// Requests waiting.
    pub num_waiting: usize,
    /// Requests running.
    pub num_running: usize,
    /// Free KV pages.
    pub free_pages: usize,
    /// All KV pages.
    pub num_pages: usize,
    /// Prompt tokens looked up in the prefix cache so far (hit rate =
    /// `total_prefix_cache_hit_tokens / total_prefix_cache_queried_tokens`).
    #[serde(default)]
    pub total_prefix_cache_queried_tokens: u64,
    /// Preemptions that swapped the sequence to host memory so far (also in
    /// `total_preemptions`).
    #[serde(default)]
    pub total_swap_preemptions: u64,
    /// KV pages copied device -> host so far.
    #[serde(default)]
    pub total_swap_out_pages: u64,
    /// KV pages copied host -> device so far.
    #[serde(default)]
    pub total_swap_in_pages: u64,
    /// Requests swapped out to host memory after the step.
    #[serde(default)]
    pub num_swapped: usize,
}

impl StepStats {
    /// Stats of a step that ran `plan`.
    pub fn from_plan(
        plan: &StepPlan,
        s: &Scheduler,
        sched: Duration,
        fwd: Duration,
        total: Duration,
    ) -> Self {
        let st = s.stats();
        StepStats {
            step_id: st.num_steps,
            t_us: 0,
            batch_size: plan.num_seqs(),
            num_tokens: plan.num_tokens(),
            num_prefill_tokens: plan.num_prefill_tokens,
            num_decode_tokens: plan.num_decode_tokens,
            schedule_us: sched.as_micros() as u64,
            forward_us: fwd.saturating_sub(sched).as_micros() as u64,
            step_us: total.as_micros() as u64,
            total_preemptions: st.num_preemptions,
            total_prefix_cache_hit_tokens: st.num_prefix_cache_hit_tokens,
            num_waiting: s.num_waiting(),
            num_running: s.num_running(),
            free_pages: s.block_manager().num_free_pages(),
            num_pages: s.block_manager().num_pages(),
            total_prefix_cache_queried_tokens: st.num_prefix_cache_queried_tokens,
            total_swap_preemptions: st.num_swap_preemptions,
            total_swap_out_pages: st.num_swap_out_pages,
            total_swap_in_pages: st.num_swap_in_pages,
            num_swapped: s.num_swapped(),
        }
    }
}

/// One telemetry event; one JSON line of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TelemetryEvent {
    /// A step ran.
    Step(StepStats),
    /// The whole memory state at the end of a step.
    Keyframe(Keyframe),
    /// Memory changes since the previous memory event.
    Delta(MemoryDelta),
}

impl TelemetryEvent {
    /// The engine step of the event.
    pub fn step_id(&self) -> u64 {
        match self {
            TelemetryEvent::Step(s) => s.step_id,
            TelemetryEvent::Keyframe(k) => k.step_id,
            TelemetryEvent::Delta(d) => d.step_id,
        }
    }
}

/// What the publisher remembers of the last memory event: enough to build the
/// next delta, never the state itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Baseline {
    /// Step of the last memory event (`None` before the first).
    pub step_id: Option<u64>,
    /// Pool generation then ([`pagoda_backend::Pool::changes_since`]).
    pub pool_generation: u64,
    /// Segment ids then, in id order.
    pub segment_ids: Vec<u32>,
}

/// The work one delta took: what [`Telemetry`] promises is O(changed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaCost {
    /// Pool blocks read (blocks of changed segments only).
    pub blocks_visited: usize,
    /// KV pages read (changed pages only).
    pub pages_visited: usize,
}

/// The changes a [`MemorySource`] found since a [`Baseline`].
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryChanges {
    /// Totals now.
    pub totals: MemoryTotals,
    /// Segments changed, in id order.
    pub segments: Vec<SegmentSnapshot>,
    /// Segments gone.
    pub removed_segments: Vec<u32>,
    /// Pages changed, in page order.
    pub kv_pages: Vec<KvPageSnapshot>,
    /// What it took.
    pub cost: DeltaCost,
}

/// Where memory events come from: the engine ([`EngineMemory`]), or a fake
/// in tests.
pub trait MemorySource {
    /// The whole state now. Changes nothing.
    fn capture(&self) -> MemoryState;
    /// What changed since `base`; moves `base` (all but `step_id`) to now.
    fn changes(&mut self, base: &mut Baseline) -> MemoryChanges;
}

/// The engine's memory: the runner's pool and KV cache, the scheduler's page
/// map, the memory plan.
#[derive(Debug)]
pub struct EngineMemory<'a, B: Backend> {
    runner: &'a ModelRunner<B>,
    scheduler: &'a mut Scheduler,
    plan: &'a MemoryPlan,
}

impl<'a, B: Backend> EngineMemory<'a, B> {
    /// The memory of an engine's parts.
    pub fn new(
        runner: &'a ModelRunner<B>,
        scheduler: &'a mut Scheduler,
        plan: &'a MemoryPlan,
    ) -> Self {
        EngineMemory {
            runner,
            scheduler,
            plan,
        }
    }
}

impl MemoryState {
    /// The whole state of an engine's parts. `O(segments + blocks + pages)`.
    /// The page map comes from [`Scheduler::kv_page_map`], independently of
    /// the dirty-page path deltas use.
    pub fn capture<B: Backend>(runner: &ModelRunner<B>, s: &Scheduler, plan: &MemoryPlan) -> Self {
        let pool = runner.pool().snapshot();
        MemoryState {
            totals: totals(runner, s, &pool.stats),
            plan: PlanLines::from_plan(plan),
            segments: pool
                .segments
                .iter()
                .map(SegmentSnapshot::from_info)
                .collect(),
            kv_pages: s
                .kv_page_map()
                .iter()
                .map(|p| page_snapshot(runner, p))
                .collect(),
        }
    }
}

/// The totals of an engine's parts now (one device memory reading, the
/// pool's and the KV arena's counters): what every memory event carries.
fn totals<B: Backend>(
    runner: &ModelRunner<B>,
    s: &Scheduler,
    pool: &pagoda_backend::PoolStats,
) -> MemoryTotals {
    totals_with(runner, s, pool, device_memory(runner))
}

/// The backend's device memory reading (zeros when it has none).
pub(crate) fn device_memory<B: Backend>(runner: &ModelRunner<B>) -> pagoda_backend::DeviceMemory {
    runner
        .backend()
        .memory()
        .unwrap_or(pagoda_backend::DeviceMemory {
            total_bytes: 0,
            free_bytes: 0,
        })
}

/// [`totals`] with a device memory reading taken earlier.
pub(crate) fn totals_with<B: Backend>(
    runner: &ModelRunner<B>,
    s: &Scheduler,
    pool: &pagoda_backend::PoolStats,
    dev: pagoda_backend::DeviceMemory,
) -> MemoryTotals {
    let kv = runner.kv_cache();
    let ks = kv.stats();
    let bm = s.block_manager();
    MemoryTotals {
        device_total_bytes: dev.total_bytes,
        device_free_bytes: dev.free_bytes,
        pool: PoolTotals::from_stats(pool),
        kv: KvTotals {
            num_pages: bm.num_pages() as u64,
            free_pages: bm.num_free_pages() as u64,
            page_size: bm.page_size() as u64,
            page_bytes: kv.layout.page_bytes_all_layers() as u64,
            num_pieces: kv.geometry.num_pieces as u64,
            reserved_bytes: ks.reserved_bytes,
            committed_bytes: ks.committed_bytes,
            num_units: ks.num_units as u64,
            committed_units: ks.committed_units as u64,
            pages_per_unit: kv.geometry.pages_per_unit as u64,
        },
        graphs: match runner.backend().graphs() {
            Some(g) => GraphTotals {
                count: g.num_graphs() as u64,
                bytes: g.memory_bytes(),
                batch_sizes: runner.graph_batch_sizes(),
            },
            None => GraphTotals {
                count: pool.live_blocks_by_tag[MemoryTag::Graph.index()] as u64,
                bytes: pool.requested(MemoryTag::Graph),
                batch_sizes: Vec::new(),
            },
        },
        host_swap_bytes: s.host_bytes_in_use(),
    }
}

fn page_snapshot<B: Backend>(runner: &ModelRunner<B>, p: &KvPageInfo) -> KvPageSnapshot {
    let (piece, offset_bytes) = runner.kv_cache().page_location(p.page.0);
    KvPageSnapshot {
        page: p.page.0,
        piece,
        offset_bytes,
        refcount: p.refcount,
        owners: p.owners.iter().map(|o| o.0).collect(),
        positions: p.positions.clone(),
        tokens_used: p.tokens_used as u32,
        shared: p.shared,
        cached: p.cached,
    }
}

impl<B: Backend> MemorySource for EngineMemory<'_, B> {
    fn capture(&self) -> MemoryState {
        MemoryState::capture(self.runner, self.scheduler, self.plan)
    }

    fn changes(&mut self, base: &mut Baseline) -> MemoryChanges {
        let pc = self.runner.pool().changes_since(base.pool_generation);
        let ids: Vec<u32> = pc.segment_ids.iter().map(|s| s.0).collect();
        let removed_segments = base
            .segment_ids
            .iter()
            .filter(|id| ids.binary_search(id).is_err())
            .copied()
            .collect();
        base.pool_generation = pc.generation;
        base.segment_ids = ids;
        let mut pages: Vec<PageId> = Vec::new();
        self.scheduler.take_kv_changes(&mut pages);
        pages.sort_unstable();
        let kv_pages = pages
            .iter()
            .filter_map(|&p| self.scheduler.kv_page_info(p))
            .map(|p| page_snapshot(self.runner, &p))
            .collect();
        MemoryChanges {
            totals: totals(self.runner, self.scheduler, &pc.stats),
            segments: pc.changed.iter().map(SegmentSnapshot::from_info).collect(),
            removed_segments,
            kv_pages,
            cost: DeltaCost {
                blocks_visited: pc.blocks_visited,
                pages_visited: pages.len(),
            },
        }
    }
}

#[derive(Debug)]
struct Subscriber {
    tx: SyncSender<TelemetryEvent>,
    /// Gets memory events.
    memory: bool,
    /// Its next memory event must be a keyframe (new, or it missed one).
    needs_keyframe: bool,
}

/// Publishes events to subscribers without ever blocking. See the module docs.
#[derive(Debug)]
pub struct Telemetry {
    subscribers: Vec<Subscriber>,
    /// Events dropped because a subscriber was full.
    pub dropped: u64,
    keyframe_interval: u64,
    /// Memory events since the last keyframe sent to everyone.
    since_keyframe: u64,
    baseline: Baseline,
    last_cost: Option<DeltaCost>,
    epoch: Instant,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            subscribers: Vec::new(),
            dropped: 0,
            keyframe_interval: DEFAULT_KEYFRAME_INTERVAL,
            since_keyframe: 0,
            baseline: Baseline::default(),
            last_cost: None,
            epoch: Instant::now(),
        }
    }
}

impl Telemetry {
    /// No subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new subscriber with room for `capacity` events; it gets memory
    /// events (a keyframe first, then deltas) when `with_memory`.
    pub fn subscribe(&mut self, capacity: usize, with_memory: bool) -> Receiver<TelemetryEvent> {
        let (tx, rx) = sync_channel(capacity.max(1));
        self.subscribers.push(Subscriber {
            tx,
            memory: with_memory,
            needs_keyframe: true,
        });
        rx
    }

    /// A new subscriber, as [`Telemetry::subscribe`], that with
    /// `with_memory` gets a keyframe of the state *now* at once, so a viewer
    /// that connects to an idle engine sees its memory without waiting for
    /// a step. The keyframe carries the step of the last memory event (0
    /// before any), so the next delta, which holds every change since that
    /// step, applies to it: a delta replaces what changed with its current
    /// value, and changes the keyframe already shows are set to the same
    /// values again.
    pub fn subscribe_now(
        &mut self,
        capacity: usize,
        with_memory: bool,
        memory: &impl MemorySource,
    ) -> Receiver<TelemetryEvent> {
        let rx = self.subscribe(capacity, with_memory);
        if with_memory {
            let key = self.keyframe(self.baseline.step_id.unwrap_or(0), memory);
            if let Some(s) = self.subscribers.last_mut()
                && s.tx.try_send(key).is_ok()
            {
                s.needs_keyframe = false;
            }
        }
        rx
    }

    /// A keyframe of `memory` now, stamped with `step_id`.
    fn keyframe(&self, step_id: u64, memory: &impl MemorySource) -> TelemetryEvent {
        TelemetryEvent::Keyframe(Keyframe {
            schema: SCHEMA.to_string(),
            step_id,
            t_us: self.now_us(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            memory: memory.capture(),
        })
    }

    /// Memory events between keyframes sent to everyone.
    pub fn keyframe_interval(&self) -> u64 {
        self.keyframe_interval
    }

    /// Sets the keyframe interval (at least 1: 1 = keyframes only).
    pub fn set_keyframe_interval(&mut self, n: u64) {
        self.keyframe_interval = n.max(1);
    }

    /// Whether any subscriber wants memory events.
    pub fn wants_memory(&self) -> bool {
        self.subscribers.iter().any(|s| s.memory)
    }

    /// The work of the last delta computed, if any.
    pub fn last_delta_cost(&self) -> Option<DeltaCost> {
        self.last_cost
    }

    /// Microseconds since the publisher was made.
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Publishes one step, then its memory event (built only when someone
    /// wants it; a keyframe or a delta per the module's policy).
    pub fn publish_step(&mut self, mut stats: StepStats, memory: &mut impl MemorySource) {
        if self.subscribers.is_empty() {
            return;
        }
        let step_id = stats.step_id;
        stats.t_us = self.now_us();
        self.send_step(TelemetryEvent::Step(stats));
        if !self.wants_memory() {
            return;
        }
        let t_us = self.now_us();
        let changes = memory.changes(&mut self.baseline);
        self.last_cost = Some(changes.cost);
        let base_step_id = self.baseline.step_id.replace(step_id);
        self.since_keyframe += 1;
        // `None`: this is a keyframe for everyone.
        let delta = match base_step_id {
            Some(base_step_id) if self.since_keyframe < self.keyframe_interval => {
                Some(TelemetryEvent::Delta(MemoryDelta {
                    step_id,
                    t_us,
                    base_step_id,
                    totals: changes.totals,
                    segments: changes.segments,
                    removed_segments: changes.removed_segments,
                    kv_pages: changes.kv_pages,
                }))
            }
            _ => {
                self.since_keyframe = 0;
                None
            }
        };
        let mut key: Option<TelemetryEvent> = None;
        let mut make_key = || {
            TelemetryEvent::Keyframe(Keyframe {
                schema: SCHEMA.to_string(),
                step_id,
                t_us,
                unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                memory: memory.capture(),
            })
        };
        let mut dropped = 0;
        self.subscribers.retain_mut(|s| {
            if !s.memory {
                return true;
            }
            let ev = match &delta {
                Some(d) if !s.needs_keyframe => d.clone(),
                _ => key.get_or_insert_with(&mut make_key).clone(),
            };
            let is_key = matches!(ev, TelemetryEvent::Keyframe(_));
            match s.tx.try_send(ev) {
                Ok(()) => {
                    s.needs_keyframe &= !is_key;
                    true
                }
                Err(TrySendError::Full(_)) => {
                    // A delta applies only to the state just before it.
                    dropped += 1;
                    s.needs_keyframe = true;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        self.dropped += dropped;
    }

    /// Sends a step event to everyone; a full channel drops it.
    fn send_step(&mut self, ev: TelemetryEvent) {
        let mut dropped = 0;
        self.subscribers
            .retain(|s| match s.tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    dropped += 1;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        self.dropped += dropped;
    }
}
