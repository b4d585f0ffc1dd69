//! `--replay FILE`: a recorded trace, played back at its own pace.
//!
//! # Policy
//!
//! 1. The trace is read whole and checked at open: every line must be a
//!    telemetry event of schema `pagoda-trace/2` and the whole chain of
//!    memory events must replay without a gap. A broken file is a
//!    [`ViewerError`], never a panic and never a partial picture.
//! 2. Playback follows the trace's clock (`t_us`): `speed` trace seconds
//!    per wall second; an idle stretch longer than [`MAX_IDLE_US`] (trace
//!    time) is skipped so a replay never shows nothing for long.
//! 3. Playing forward feeds each event to the [`Timeline`] in order
//!    (exactly what a live viewer would have received). Scrubbing to a
//!    memory event rebuilds: the histories from the events up to it and the
//!    state with [`Trace::memory_at`], which starts at the nearest keyframe.
//!
//! # Costs
//!
//! Forward: `O(events played)` per frame. A seek: `O(events before the
//! target)` for the histories (totals only) plus one keyframe clone and at
//! most one keyframe interval of deltas.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use pagoda::telemetry::TelemetryEvent;
use pagoda::telemetry::trace::Trace;

use crate::error::ViewerError;
use crate::timeline::Timeline;

/// Longest idle stretch of trace time played as it is, µs.
pub const MAX_IDLE_US: u64 = 500_000;

/// One memory event of the trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryFrame {
    /// Index of the event in the trace.
    pub event: usize,
    /// Its step.
    pub step_id: u64,
    /// Its trace time.
    pub t_us: u64,
    /// Whether it is a keyframe.
    pub keyframe: bool,
}

/// A trace being played.
#[derive(Debug)]
pub struct Replay {
    path: PathBuf,
    trace: Trace,
    frames: Vec<MemoryFrame>,
    /// Events fed to the timeline: `events[..fed]`.
    fed: usize,
    /// The frame shown (index into `frames`).
    current: usize,
    /// Playing or paused.
    pub playing: bool,
    /// Trace seconds per wall second.
    pub speed: f32,
    /// Trace time of the playhead, µs.
    clock_us: f64,
    /// Play again from the start at the end.
    pub looping: bool,
}

impl Replay {
    /// Opens and checks a trace file (see the module's policy).
    pub fn open(path: &Path) -> Result<Replay, ViewerError> {
        let f = std::fs::File::open(path).map_err(|source| ViewerError::OpenTrace {
            path: path.to_path_buf(),
            source,
        })?;
        let trace = Trace::read(BufReader::new(f)).map_err(|source| ViewerError::BadTrace {
            path: path.to_path_buf(),
            source,
        })?;
        Replay::from_trace(path, trace)
    }

    /// A replay of a trace already read (`path` names it in messages).
    pub fn from_trace(path: &Path, trace: Trace) -> Result<Replay, ViewerError> {
        let frames: Vec<MemoryFrame> = trace
            .events()
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                TelemetryEvent::Keyframe(k) => Some(MemoryFrame {
                    event: i,
                    step_id: k.step_id,
                    t_us: k.t_us,
                    keyframe: true,
                }),
                TelemetryEvent::Delta(d) => Some(MemoryFrame {
                    event: i,
                    step_id: d.step_id,
                    t_us: d.t_us,
                    keyframe: false,
                }),
                TelemetryEvent::Step(_) => None,
            })
            .collect();
        if frames.is_empty() || !frames[0].keyframe {
            return Err(ViewerError::EmptyTrace {
                path: path.to_path_buf(),
            });
        }
        check_chain(&trace)?;
        let clock_us = frames[0].t_us as f64;
        Ok(Replay {
            path: path.to_path_buf(),
            trace,
            frames,
            fed: 0,
            current: 0,
            playing: true,
            speed: 1.0,
            clock_us,
            looping: false,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The trace.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// The memory events, in order.
    pub fn frames(&self) -> &[MemoryFrame] {
        &self.frames
    }

    /// Index of the frame shown.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Whether the playhead is past the last event.
    pub fn at_end(&self) -> bool {
        self.fed == self.trace.events().len()
    }

    /// Starts the trace: feeds events up to the first memory event.
    pub fn start(&mut self, tl: &mut Timeline) {
        self.feed_to(self.frames[0].event, tl);
    }

    /// Advances the playhead by `dt` wall seconds (when playing) and feeds
    /// the events it passes. Returns whether anything changed.
    pub fn advance(&mut self, dt: f32, tl: &mut Timeline) -> bool {
        if !self.playing {
            return false;
        }
        if self.at_end() {
            if self.looping {
                self.seek(0, tl);
                return true;
            }
            self.playing = false;
            return false;
        }
        self.clock_us += f64::from(dt) * f64::from(self.speed) * 1e6;
        let next = self.current + 1;
        if let Some(f) = self.frames.get(next) {
            // Skip idle stretches.
            let floor = f.t_us.saturating_sub(MAX_IDLE_US) as f64;
            if self.clock_us < floor {
                self.clock_us = floor;
            }
        }
        let mut target = self.current;
        while let Some(f) = self.frames.get(target + 1) {
            if (f.t_us as f64) <= self.clock_us {
                target += 1;
            } else {
                break;
            }
        }
        if target == self.current && self.current + 1 < self.frames.len() {
            return false;
        }
        if target + 1 == self.frames.len() {
            // Past the last memory event: the trailing step events too.
            let end = self.trace.events().len();
            self.current = target;
            self.feed_to(end - 1, tl);
            return true;
        }
        self.current = target;
        self.feed_to(self.frames[target].event, tl);
        true
    }

    /// Feeds events up to and including index `last`.
    fn feed_to(&mut self, last: usize, tl: &mut Timeline) {
        let events = self.trace.events();
        while self.fed <= last && self.fed < events.len() {
            tl.push(&events[self.fed]);
            self.fed += 1;
        }
    }

    /// Shows memory frame `frame` (clamped): the state there and the
    /// histories up to it (see the module's policy).
    pub fn seek(&mut self, frame: usize, tl: &mut Timeline) {
        let frame = frame.min(self.frames.len() - 1);
        let f = self.frames[frame];
        tl.clear();
        let events = self.trace.events();
        for ev in &events[..=f.event] {
            tl.push_history(ev);
        }
        // Checked at open: every step replays.
        if let Ok(Some(state)) = self.trace.memory_at(f.step_id) {
            tl.set_state(f.step_id, f.t_us, state);
        }
        self.fed = f.event + 1;
        self.current = frame;
        self.clock_us = f.t_us as f64;
    }

    /// Steps one memory event forward or back (pauses).
    pub fn step_by(&mut self, delta: i64, tl: &mut Timeline) {
        self.playing = false;
        let to = (self.current as i64 + delta).clamp(0, self.frames.len() as i64 - 1) as usize;
        if to == self.current + 1 {
            self.current = to;
            self.feed_to(self.frames[to].event, tl);
        } else if to != self.current {
            self.seek(to, tl);
        }
    }
}

/// Checks that every delta follows the memory event before it.
fn check_chain(trace: &Trace) -> Result<(), ViewerError> {
    let mut have: Option<u64> = None;
    for ev in trace.events() {
        match ev {
            TelemetryEvent::Keyframe(k) => have = Some(k.step_id),
            TelemetryEvent::Delta(d) => {
                if have != Some(d.base_step_id) {
                    return Err(ViewerError::Replay(pagoda::telemetry::ReplayError::Gap {
                        step_id: d.step_id,
                        base_step_id: d.base_step_id,
                        have: have.unwrap_or(0),
                    }));
                }
                have = Some(d.step_id);
            }
            TelemetryEvent::Step(_) => {}
        }
    }
    Ok(())
}
