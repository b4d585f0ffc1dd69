//! Telemetry: per-step statistics and memory snapshots, published through
//! bounded channels that never block the engine.
//!
//! Subscribers get a `Receiver`; when a subscriber falls behind, new events
//! are dropped for it (and counted), the engine never waits. Snapshots are
//! only built when someone listens. The JSON-lines trace schema is
//! documented in `docs/trace-schema.md`.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use pagoda_backend::Backend;
use pagoda_backend::pool::PoolSnapshot;
use serde::Serialize;

use crate::model_runner::ModelRunner;
use crate::scheduler::Scheduler;
use crate::step_plan::StepPlan;

/// What one step did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepStats {
    /// Step number since the engine started.
    pub step: u64,
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
            step: st.num_steps,
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
        }
    }
}

/// One KV page in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvPageSnapshot {
    /// Page id.
    pub page: u32,
    /// Owning sequence ids.
    pub owners: Vec<u64>,
    /// Tokens written.
    pub tokens_used: usize,
    /// Held by more than one sequence.
    pub shared: bool,
    /// In the prefix cache.
    pub cached: bool,
}

/// One pool segment in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentSnapshot {
    /// Segment id.
    pub id: u32,
    /// Bytes.
    pub bytes: u64,
    /// Blocks: (offset, bytes, tag or "free").
    pub blocks: Vec<BlockSnapshot>,
    /// `1 - largest_free / total_free`.
    pub fragmentation: f64,
}

/// One pool block in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockSnapshot {
    /// Offset in the segment.
    pub offset: u64,
    /// Bytes.
    pub bytes: u64,
    /// `weights`, `activations`, `kv`, `graph`, `scratch` or `free`.
    pub tag: String,
}

/// Where every byte is, at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemorySnapshot {
    /// Device total bytes.
    pub device_total_bytes: u64,
    /// Device free bytes.
    pub device_free_bytes: u64,
    /// Pool reserved bytes.
    pub pool_reserved_bytes: u64,
    /// Pool allocated bytes.
    pub pool_allocated_bytes: u64,
    /// Overall fragmentation.
    pub pool_fragmentation: f64,
    /// Allocated bytes per tag.
    pub allocated_by_tag: Vec<(String, u64)>,
    /// Pool segments and blocks.
    pub segments: Vec<SegmentSnapshot>,
    /// KV page map.
    pub kv_pages: Vec<KvPageSnapshot>,
}

impl MemorySnapshot {
    /// Captures the pool and the KV page map.
    pub fn capture<B: Backend>(runner: &ModelRunner<B>, s: &Scheduler) -> Self {
        let dev = runner
            .backend()
            .memory()
            .unwrap_or(pagoda_backend::DeviceMemory {
                total_bytes: 0,
                free_bytes: 0,
            });
        Self::from_parts(dev, &runner.pool().snapshot(), s)
    }

    fn from_parts(dev: pagoda_backend::DeviceMemory, pool: &PoolSnapshot, s: &Scheduler) -> Self {
        MemorySnapshot {
            device_total_bytes: dev.total_bytes,
            device_free_bytes: dev.free_bytes,
            pool_reserved_bytes: pool.stats.reserved_bytes,
            pool_allocated_bytes: pool.stats.allocated_bytes,
            pool_fragmentation: pool.stats.fragmentation,
            allocated_by_tag: pagoda_backend::MemoryTag::ALL
                .iter()
                .map(|t| (t.name().to_string(), pool.stats.allocated(*t)))
                .collect(),
            segments: pool
                .segments
                .iter()
                .map(|seg| SegmentSnapshot {
                    id: seg.id.0,
                    bytes: seg.bytes,
                    fragmentation: seg.fragmentation,
                    blocks: seg
                        .blocks
                        .iter()
                        .map(|b| BlockSnapshot {
                            offset: b.offset,
                            bytes: b.bytes,
                            tag: b.tag.map_or("free".to_string(), |t| t.name().to_string()),
                        })
                        .collect(),
                })
                .collect(),
            kv_pages: s
                .kv_page_map()
                .into_iter()
                .map(|p| KvPageSnapshot {
                    page: p.page.0,
                    owners: p.owners.iter().map(|o| o.0).collect(),
                    tokens_used: p.tokens_used,
                    shared: p.shared,
                    cached: p.cached,
                })
                .collect(),
        }
    }
}

/// One telemetry event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TelemetryEvent {
    /// A step ran.
    Step(StepStats),
    /// Memory at the end of a step.
    Memory(MemorySnapshot),
}

/// Publishes events to subscribers without ever blocking.
#[derive(Debug, Default)]
pub struct Telemetry {
    subscribers: Vec<SyncSender<TelemetryEvent>>,
    /// Events dropped because a subscriber was full.
    pub dropped: u64,
    /// Whether subscribers also get a memory snapshot every step.
    pub snapshots: bool,
}

impl Telemetry {
    /// No subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new subscriber with room for `capacity` events; snapshots are sent
    /// when `with_snapshots`.
    pub fn subscribe(&mut self, capacity: usize, with_snapshots: bool) -> Receiver<TelemetryEvent> {
        let (tx, rx) = sync_channel(capacity.max(1));
        self.subscribers.push(tx);
        self.snapshots |= with_snapshots;
        rx
    }

    /// Publishes one step (and a snapshot, built only when someone wants it).
    pub fn publish_step(&mut self, stats: StepStats, snapshot: impl FnOnce() -> MemorySnapshot) {
        if self.subscribers.is_empty() {
            return;
        }
        self.send(TelemetryEvent::Step(stats));
        if self.snapshots {
            self.send(TelemetryEvent::Memory(snapshot()));
        }
    }

    fn send(&mut self, ev: TelemetryEvent) {
        let mut dropped = 0;
        self.subscribers.retain(|tx| match tx.try_send(ev.clone()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(step: u64) -> StepStats {
        StepStats {
            step,
            batch_size: 1,
            num_tokens: 1,
            num_prefill_tokens: 0,
            num_decode_tokens: 1,
            schedule_us: 1,
            forward_us: 1,
            step_us: 2,
            total_preemptions: 0,
            total_prefix_cache_hit_tokens: 0,
            num_waiting: 0,
            num_running: 1,
            free_pages: 1,
            num_pages: 2,
        }
    }

    #[test]
    fn a_slow_subscriber_never_blocks_the_engine() {
        let mut t = Telemetry::new();
        let rx = t.subscribe(2, false);
        let mut built = 0;
        for i in 0..100 {
            // Snapshots are not built when nobody asked for them.
            t.publish_step(stats(i), || {
                built += 1;
                unreachable_snapshot()
            });
        }
        assert_eq!(built, 0);
        assert_eq!(
            t.dropped, 98,
            "events beyond the channel's capacity are dropped"
        );
        let got: Vec<_> = rx.try_iter().collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], TelemetryEvent::Step(stats(0)));
        // A disconnected subscriber is forgotten.
        drop(rx);
        t.publish_step(stats(100), unreachable_snapshot);
        assert!(t.subscribers.is_empty());
    }

    fn unreachable_snapshot() -> MemorySnapshot {
        MemorySnapshot {
            device_total_bytes: 0,
            device_free_bytes: 0,
            pool_reserved_bytes: 0,
            pool_allocated_bytes: 0,
            pool_fragmentation: 0.0,
            allocated_by_tag: vec![],
            segments: vec![],
            kv_pages: vec![],
        }
    }
}
