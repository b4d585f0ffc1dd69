//! The interface between the block manager and the memory behind KV pages.
//!
//! A growable KV arena *reserves* room for every page the plan allows
//! (`num_pages`) but *commits* physical memory only in commit units of
//! [`KvCommit::pages_per_unit`] consecutive page ids, as the
//! [`crate::block_manager::BlockManager`] needs them, and releases a unit when
//! none of its pages is live. Page ids never move and kernel arguments never
//! change when a unit is committed or released, so captured graphs stay valid.
//!
//! Implementations: the device KV cache (CUDA maps 2 MiB VMM chunks; the CPU
//! backend commits host segments on demand) and test doubles
//! ([`RecordingCommit`]), which the block-manager and scheduler tests use to
//! see every commit and release and to inject faults.

use std::sync::Mutex;

use pagoda_backend::{BackendError, FaultInjector, MemoryTag};

/// The physical memory behind KV pages, committed and released in units of
/// `pages_per_unit()` consecutive page ids (unit u = pages u*ppu .. (u+1)*ppu).
/// Implemented by the device KV cache (the lead's code) and by test doubles.
pub trait KvCommit: Send + Sync {
    /// Pages per commit unit (>= 1).
    fn pages_per_unit(&self) -> usize;
    /// Commits unit `unit` so its pages can be written. A fault site. Err = the device (or budget) cannot back it; the scheduler then preempts instead.
    fn commit(&self, unit: usize) -> pagoda_backend::Result<()>;
    /// Releases unit `unit`; none of its pages is live. The implementation defers the actual free until queued device work that may touch it has finished.
    fn release(&self, unit: usize);
}

/// One call the block manager made on a [`RecordingCommit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitEvent {
    /// `commit(unit)` succeeded.
    Commit(usize),
    /// `commit(unit)` failed (cap reached or fault injected).
    Refused(usize),
    /// `release(unit)`.
    Release(usize),
}

#[derive(Debug, Default)]
struct RecordState {
    /// (num_units) whether each unit is committed now.
    committed: Vec<bool>,
    events: Vec<CommitEvent>,
    /// Most units committed at once so far.
    peak: usize,
    /// A commit or release that broke the contract (double commit, release
    /// of an uncommitted unit).
    violation: Option<String>,
}

/// A [`KvCommit`] test double: records every call, checks the contract
/// (no unit committed twice, none released while not committed), refuses
/// commits past a cap of committed units, and calls
/// `faults.check("kv grow")` on every commit, so each grow is a fault site.
#[derive(Debug)]
pub struct RecordingCommit {
    pages_per_unit: usize,
    /// Most units committed at once; `None` = no cap.
    cap: Option<usize>,
    faults: FaultInjector,
    state: Mutex<RecordState>,
}

impl RecordingCommit {
    /// A double with `pages_per_unit` pages per unit (at least 1), an
    /// optional cap on committed units, and `faults` checked at every commit.
    pub fn new(pages_per_unit: usize, cap: Option<usize>, faults: FaultInjector) -> Self {
        Self {
            pages_per_unit: pages_per_unit.max(1),
            cap,
            faults,
            state: Mutex::new(RecordState::default()),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut RecordState) -> T) -> T {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut s)
    }

    /// Every call so far, in order.
    pub fn events(&self) -> Vec<CommitEvent> {
        self.with_state(|s| s.events.clone())
    }

    /// Units committed now, ascending.
    pub fn committed_units(&self) -> Vec<usize> {
        self.with_state(|s| {
            s.committed
                .iter()
                .enumerate()
                .filter(|(_, c)| **c)
                .map(|(u, _)| u)
                .collect()
        })
    }

    /// Most units committed at once so far.
    pub fn peak_units(&self) -> usize {
        self.with_state(|s| s.peak)
    }

    /// The first contract violation seen, if any.
    pub fn violation(&self) -> Option<String> {
        self.with_state(|s| s.violation.clone())
    }
}

impl KvCommit for RecordingCommit {
    fn pages_per_unit(&self) -> usize {
        self.pages_per_unit
    }

    fn commit(&self, unit: usize) -> pagoda_backend::Result<()> {
        let fault = self.faults.check("kv grow");
        self.with_state(|s| {
            if s.committed.len() <= unit {
                s.committed.resize(unit + 1, false);
            }
            if s.committed[unit] {
                s.violation
                    .get_or_insert(format!("unit {unit} committed twice"));
            }
            let num_committed = s.committed.iter().filter(|c| **c).count();
            let capped = self.cap.is_some_and(|cap| num_committed >= cap);
            if let Err(e) = fault {
                s.events.push(CommitEvent::Refused(unit));
                return Err(e);
            }
            if capped {
                s.events.push(CommitEvent::Refused(unit));
                return Err(BackendError::OutOfMemory {
                    tag: MemoryTag::Kv,
                    requested_bytes: self.pages_per_unit as u64,
                    detail: format!("KV commit cap of {num_committed} units reached"),
                });
            }
            s.committed[unit] = true;
            s.peak = s.peak.max(num_committed + 1);
            s.events.push(CommitEvent::Commit(unit));
            Ok(())
        })
    }

    fn release(&self, unit: usize) {
        self.with_state(|s| {
            if !s.committed.get(unit).copied().unwrap_or(false) {
                s.violation
                    .get_or_insert(format!("unit {unit} released while not committed"));
            } else {
                s.committed[unit] = false;
            }
            s.events.push(CommitEvent::Release(unit));
        });
    }
}
