//! The viewer's model of what it is looking at: the current memory state,
//! kept current from telemetry events, and the history the charts draw.
//!
//! # Policy
//!
//! 1. A keyframe replaces the state; a delta is applied when its
//!    `base_step_id` is the state's step, else the state is marked stale
//!    (events were lost) and deltas are ignored until the next keyframe.
//!    So what is drawn is always a state the engine was in, never a guess.
//! 2. Every memory event (keyframe or delta) appends one [`MemorySample`]
//!    built from its totals alone; every step event appends its
//!    [`StepStats`]. Both histories are bounded ([`Timeline::capacity`]):
//!    the oldest samples go first.
//! 3. Nothing here reads a clock: times are the trace's `t_us`, so a replay
//!    and a live run of the same events draw the same picture.
//!
//! # Costs
//!
//! A delta: `O(changed segments + changed pages)` ([`MemoryState::apply`]).
//! A sample: `O(tags)`.

use std::collections::VecDeque;

use pagoda::telemetry::{MemoryState, MemoryTotals, StepStats, TelemetryEvent};

/// History points kept by default (at 10 steps a second, several minutes).
pub const DEFAULT_CAPACITY: usize = 4096;

/// The tags the pool reports, in the order the charts stack them.
pub const TAGS: [&str; 5] = ["weights", "activations", "kv", "graph", "scratch"];

/// Index of `kv` in [`TAGS`].
pub const KV: usize = 2;

/// Bytes in use of one tag in `totals`: its live pool blocks, plus the
/// committed KV arena for `kv` (what the legend and the chart show).
pub fn tag_bytes(t: &MemoryTotals, tag: &str) -> u64 {
    let pool = t
        .pool
        .by_tag
        .iter()
        .find(|x| x.tag == tag)
        .map_or(0, |x| x.allocated_bytes);
    if tag == "kv" {
        pool + t.kv.committed_bytes
    } else {
        pool
    }
}

/// One point of the memory-over-time chart, from one memory event's totals.
#[derive(Debug, Clone, PartialEq)]
pub struct MemorySample {
    /// Engine step.
    pub step_id: u64,
    /// Trace time, µs.
    pub t_us: u64,
    /// Bytes in use per tag, in [`TAGS`] order: live pool blocks, and for
    /// `kv` also the KV arena's committed bytes (the arena is not in the pool).
    pub allocated_by_tag: [u64; 5],
    /// Bytes held from the device: the pool's segments and the KV arena's
    /// committed bytes.
    pub reserved_bytes: u64,
    /// Bytes in use: live pool blocks and the committed KV arena.
    pub allocated_bytes: u64,
    /// Device total and free (a live reading).
    pub device_total_bytes: u64,
    /// Device free.
    pub device_free_bytes: u64,
    /// KV address space reserved.
    pub kv_reserved_bytes: u64,
    /// KV bytes backed by memory.
    pub kv_committed_bytes: u64,
    /// Overall pool fragmentation.
    pub fragmentation: f64,
}

impl MemorySample {
    /// The sample of one memory event's totals.
    pub fn from_totals(step_id: u64, t_us: u64, t: &MemoryTotals) -> MemorySample {
        let mut by_tag = [0u64; 5];
        for tt in &t.pool.by_tag {
            if let Some(i) = TAGS.iter().position(|&n| n == tt.tag) {
                by_tag[i] = tt.allocated_bytes;
            }
        }
        // The KV arena lives outside the pool (VMM on CUDA, its own
        // mapping on the CPU); only its page tables are pool blocks.
        by_tag[KV] += t.kv.committed_bytes;
        MemorySample {
            step_id,
            t_us,
            allocated_by_tag: by_tag,
            reserved_bytes: t.pool.reserved_bytes + t.kv.committed_bytes,
            allocated_bytes: t.pool.allocated_bytes + t.kv.committed_bytes,
            device_total_bytes: t.device_total_bytes,
            device_free_bytes: t.device_free_bytes,
            kv_reserved_bytes: t.kv.reserved_bytes,
            kv_committed_bytes: t.kv.committed_bytes,
            fragmentation: t.pool.fragmentation,
        }
    }
}

/// The current state and the history, fed with telemetry events.
#[derive(Debug, Clone)]
pub struct Timeline {
    state: Option<MemoryState>,
    /// Step of `state`.
    state_step: u64,
    /// Trace time of `state`.
    state_t_us: u64,
    /// Events were lost since the last keyframe: `state` is old.
    stale: bool,
    memory: VecDeque<MemorySample>,
    steps: VecDeque<StepStats>,
    capacity: usize,
    /// Memory events that could not be applied (gaps), in all.
    pub gaps: u64,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Timeline {
    /// An empty timeline keeping at most `capacity` points of each history.
    pub fn with_capacity(capacity: usize) -> Timeline {
        Timeline {
            state: None,
            state_step: 0,
            state_t_us: 0,
            stale: false,
            memory: VecDeque::new(),
            steps: VecDeque::new(),
            capacity: capacity.max(2),
            gaps: 0,
        }
    }

    /// Points kept per history.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Takes one event (see the module's policy).
    pub fn push(&mut self, ev: &TelemetryEvent) {
        match ev {
            TelemetryEvent::Step(s) => {
                if self.steps.len() == self.capacity {
                    self.steps.pop_front();
                }
                self.steps.push_back(s.clone());
            }
            TelemetryEvent::Keyframe(k) => {
                self.state = Some(k.memory.clone());
                self.state_step = k.step_id;
                self.state_t_us = k.t_us;
                self.stale = false;
                self.sample(k.step_id, k.t_us, &k.memory.totals);
            }
            TelemetryEvent::Delta(d) => {
                match self.state.as_mut() {
                    Some(st) if !self.stale && d.base_step_id == self.state_step => {
                        st.apply(d);
                        self.state_step = d.step_id;
                        self.state_t_us = d.t_us;
                    }
                    _ => {
                        self.stale = true;
                        self.gaps += 1;
                    }
                }
                // The totals are whole in every delta: the chart stays true.
                self.sample(d.step_id, d.t_us, &d.totals);
            }
        }
    }

    /// Takes one event into the histories only (a replay's seek rebuilds
    /// them this way and sets the state once with [`Timeline::set_state`]).
    pub fn push_history(&mut self, ev: &TelemetryEvent) {
        match ev {
            TelemetryEvent::Step(_) => self.push(ev),
            TelemetryEvent::Keyframe(k) => self.sample(k.step_id, k.t_us, &k.memory.totals),
            TelemetryEvent::Delta(d) => self.sample(d.step_id, d.t_us, &d.totals),
        }
    }

    fn sample(&mut self, step_id: u64, t_us: u64, t: &MemoryTotals) {
        if self.memory.len() == self.capacity {
            self.memory.pop_front();
        }
        self.memory
            .push_back(MemorySample::from_totals(step_id, t_us, t));
    }

    /// Replaces the state (a replay's seek), keeping the histories.
    pub fn set_state(&mut self, step_id: u64, t_us: u64, state: MemoryState) {
        self.state = Some(state);
        self.state_step = step_id;
        self.state_t_us = t_us;
        self.stale = false;
    }

    /// Drops the histories after step `step_id` (a replay that seeks back).
    pub fn truncate_after(&mut self, step_id: u64) {
        while self.memory.back().is_some_and(|s| s.step_id > step_id) {
            self.memory.pop_back();
        }
        while self.steps.back().is_some_and(|s| s.step_id > step_id) {
            self.steps.pop_back();
        }
    }

    /// Empties everything.
    pub fn clear(&mut self) {
        *self = Timeline::with_capacity(self.capacity);
    }

    /// The memory state drawn now, if any keyframe came yet.
    pub fn state(&self) -> Option<&MemoryState> {
        self.state.as_ref()
    }

    /// Step of the state.
    pub fn state_step(&self) -> u64 {
        self.state_step
    }

    /// Trace time of the state, µs.
    pub fn state_t_us(&self) -> u64 {
        self.state_t_us
    }

    /// Whether events were lost since the last keyframe.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// The memory history, oldest first.
    pub fn memory_history(&self) -> &VecDeque<MemorySample> {
        &self.memory
    }

    /// The step history, oldest first.
    pub fn step_history(&self) -> &VecDeque<StepStats> {
        &self.steps
    }

    /// The last step event.
    pub fn last_step(&self) -> Option<&StepStats> {
        self.steps.back()
    }
}
