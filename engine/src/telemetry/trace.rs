//! Reading and replaying a trace: the JSON lines `pagoda generate --trace
//! FILE` writes (one [`TelemetryEvent`] per line, schema [`SCHEMA`]).
//!
//! [`Trace::memory_at`] seeks: it finds the last keyframe at or before the
//! step asked for (binary search over the keyframe index) and applies the
//! deltas after it, so replaying any step reads at most one keyframe
//! interval of events.

use std::io::BufRead;

use super::state::{Keyframe, MemoryDelta, MemoryState, ReplayError, SCHEMA};
use super::{StepStats, TelemetryEvent};

/// Why a trace cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("cannot read the trace: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not a telemetry event of this schema.
    #[error("trace line {line}: {source}")]
    Json {
        /// 1-based line number.
        line: usize,
        /// What serde said.
        source: serde_json::Error,
    },
    /// A keyframe of another schema, or a delta that does not follow.
    #[error("trace line {line}: {source}")]
    Replay {
        /// 1-based line number.
        line: usize,
        /// The problem.
        source: ReplayError,
    },
}

/// A trace read into memory, with an index of its keyframes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    events: Vec<TelemetryEvent>,
    /// Indices into `events` of the keyframes, in order.
    keyframes: Vec<usize>,
}

impl Trace {
    /// Reads JSON lines (blank lines are skipped) and checks every keyframe's schema.
    pub fn read(r: impl BufRead) -> Result<Trace, TraceError> {
        let mut t = Trace::default();
        for (i, line) in r.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let ev: TelemetryEvent =
                serde_json::from_str(&line).map_err(|source| TraceError::Json {
                    line: i + 1,
                    source,
                })?;
            t.push(ev).map_err(|source| TraceError::Replay {
                line: i + 1,
                source,
            })?;
        }
        Ok(t)
    }

    /// Appends one event (as a live subscriber receives them).
    pub fn push(&mut self, ev: TelemetryEvent) -> Result<(), ReplayError> {
        if let TelemetryEvent::Keyframe(k) = &ev {
            if k.schema != SCHEMA {
                return Err(ReplayError::Schema {
                    found: k.schema.clone(),
                });
            }
            self.keyframes.push(self.events.len());
        }
        self.events.push(ev);
        Ok(())
    }

    /// Every event, in order.
    pub fn events(&self) -> &[TelemetryEvent] {
        &self.events
    }

    /// The step events, in order.
    pub fn steps(&self) -> impl Iterator<Item = &StepStats> {
        self.events.iter().filter_map(|e| match e {
            TelemetryEvent::Step(s) => Some(s),
            _ => None,
        })
    }

    /// Steps that have a memory event, in order.
    pub fn memory_steps(&self) -> Vec<u64> {
        self.events
            .iter()
            .filter(|e| !matches!(e, TelemetryEvent::Step(_)))
            .map(TelemetryEvent::step_id)
            .collect()
    }

    /// The memory state at the last memory event at or before `step_id`:
    /// seeks to the nearest keyframe before it and applies the deltas up to
    /// it. `Ok(None)` when no keyframe is that early. Fails on a gap (a
    /// delta that does not follow the state before it).
    pub fn memory_at(&self, step_id: u64) -> Result<Option<MemoryState>, ReplayError> {
        let n = self
            .keyframes
            .partition_point(|&i| self.events[i].step_id() <= step_id);
        let Some(&start) = n.checked_sub(1).and_then(|k| self.keyframes.get(k)) else {
            return Ok(None);
        };
        let TelemetryEvent::Keyframe(key) = &self.events[start] else {
            return Ok(None);
        };
        let mut state = key.memory.clone();
        let mut have = key.step_id;
        for ev in &self.events[start + 1..] {
            match ev {
                TelemetryEvent::Delta(d) if d.step_id <= step_id => {
                    follow(d, have)?;
                    state.apply(d);
                    have = d.step_id;
                }
                TelemetryEvent::Step(_) => {}
                _ => break,
            }
        }
        Ok(Some(state))
    }

    /// Replays the whole trace in order: the state after every memory event,
    /// with its step. Later keyframes must agree with the replay (they are
    /// taken as they come). Fails on a gap.
    pub fn replay(&self) -> Result<Vec<(u64, MemoryState)>, ReplayError> {
        let mut out = Vec::new();
        let mut cur: Option<(u64, MemoryState)> = None;
        for ev in &self.events {
            match ev {
                TelemetryEvent::Keyframe(Keyframe {
                    step_id, memory, ..
                }) => cur = Some((*step_id, memory.clone())),
                TelemetryEvent::Delta(d) => {
                    let Some((have, state)) = cur.as_mut() else {
                        return Err(ReplayError::Gap {
                            step_id: d.step_id,
                            base_step_id: d.base_step_id,
                            have: 0,
                        });
                    };
                    follow(d, *have)?;
                    state.apply(d);
                    *have = d.step_id;
                }
                TelemetryEvent::Step(_) => continue,
            }
            if let Some(c) = &cur {
                out.push(c.clone());
            }
        }
        Ok(out)
    }
}

/// Checks that `d` applies to the state at step `have`.
fn follow(d: &MemoryDelta, have: u64) -> Result<(), ReplayError> {
    if d.base_step_id == have {
        Ok(())
    } else {
        Err(ReplayError::Gap {
            step_id: d.step_id,
            base_step_id: d.base_step_id,
            have,
        })
    }
}
