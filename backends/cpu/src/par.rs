//! Parallel loops over disjoint output ranges.
//!
//! With one thread everything runs inline on the caller (no other thread, no
//! heap allocation: the zero-allocation decode test relies on it). With more,
//! a [`Pool`] of `threads - 1` persistent workers and the calling thread
//! share the chunks of each loop through an atomic counter, so a thread that
//! the OS preempts just takes fewer chunks. Between loops workers wait
//! actively for a short while (the ops of one decode step follow each other
//! within microseconds, far below the cost of waking a sleeping thread),
//! yielding the CPU between checks so as not to starve a thread of ours on a
//! shared machine, then sleep.
//! Loops allocate nothing.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A mutable buffer shared by the threads of one op; each thread touches only
/// the elements of the index ranges it was given.
#[derive(Clone, Copy)]
pub struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: threads only access disjoint elements (each op documents its split), and the buffer outlives the parallel section (it is borrowed by the op).
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Wraps a slice for the duration of one op.
    pub fn new(s: &mut [T]) -> Self {
        SharedMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// Length of the wrapped slice.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the wrapped slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// No other thread may access element `i` concurrently.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.len, "SharedMut write out of bounds");
        // SAFETY: in bounds (asserted); exclusive per the contract.
        unsafe { *self.ptr.add(i) = v };
    }

    /// The sub-slice `[start, start + len)`.
    ///
    /// # Safety
    /// No other thread may access any element of the range while the returned
    /// slice lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "SharedMut slice out of bounds");
        // SAFETY: in bounds (asserted); exclusive per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// How long an idle worker waits (spinning, then yielding) before it sleeps.
const SPIN: Duration = Duration::from_micros(300);
/// Spins before a waiting thread starts yielding the CPU.
const SPINS_BEFORE_YIELD: u32 = 256;

/// One parallel loop: `f` over `0..n` in chunks of `chunk`.
struct Job<'a> {
    f: &'a (dyn Fn(Range<usize>) + Sync),
    n: usize,
    chunk: usize,
    /// Index of the next chunk to hand out.
    next: AtomicUsize,
}

impl Job<'_> {
    /// Runs chunks until none is left.
    fn run(&self) {
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            let start = c.saturating_mul(self.chunk);
            if start >= self.n {
                return;
            }
            (self.f)(start..(start + self.chunk).min(self.n));
        }
    }
}

/// How much of the recent loops' time the caller spent waiting for workers
/// that had taken a chunk and were then descheduled (a machine shared with
/// other processes). When, over [`LATE_WINDOW`] loops, it waited longer than
/// it worked, splitting costs more than it gains, and the caller runs loops
/// alone for [`SOLO_FOR`] (results are the same either way).
#[derive(Default)]
struct Lateness {
    loops: u32,
    busy: Duration,
    waited: Duration,
    solo_until: Option<Instant>,
}

/// Loops per lateness verdict.
const LATE_WINDOW: u32 = 64;
/// How long the caller runs loops alone after a bad window.
const SOLO_FOR: Duration = Duration::from_millis(100);

impl Lateness {
    /// Accounts one loop: `own` spent on chunks, then `waited` for workers.
    fn record(&mut self, own: Duration, waited: Duration) {
        self.loops += 1;
        self.busy += own;
        self.waited += waited;
        if self.loops == LATE_WINDOW {
            // Waiting longer than working: a worker with no core of its
            // own held the loops up.
            if self.waited > self.busy {
                self.solo_until = Some(Instant::now() + SOLO_FOR);
            }
            *self = Lateness {
                solo_until: self.solo_until,
                ..Lateness::default()
            };
        }
    }
}

/// State shared by the caller and the workers.
struct Shared {
    /// Bumped to publish a loop; every worker runs each published loop once.
    epoch: AtomicUsize,
    /// The published loop, a `*const Job` on the publishing caller's stack.
    job: AtomicPtr<()>,
    /// Workers that have not yet finished the published loop.
    remaining: AtomicUsize,
    /// A worker's chunk panicked.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Workers asleep (or about to be) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// Persistent worker threads for [`for_ranges`].
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises loops (one loop at a time owns the workers) and holds the
    /// bookkeeping of how late the workers are.
    busy: Mutex<Lateness>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads())
            .finish()
    }
}

impl Pool {
    /// A pool for `threads` threads in all: the caller and `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Pool {
            shared: shared.clone(),
            workers: Vec::new(),
            busy: Mutex::new(Lateness::default()),
        };
        for i in 1..threads.max(1) {
            let s = shared.clone();
            pool.workers.push(
                std::thread::Builder::new()
                    .name(format!("pagoda-cpu-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(pool)
    }

    /// Threads that run a loop (workers + the caller).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job` on every thread and returns when all are done with it.
    fn run(&self, job: &Job<'_>) {
        let mut late = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if late.solo_until.is_some_and(|u| Instant::now() < u) {
            // The workers keep being preempted: do it all here for a while.
            job.run();
            return;
        }
        let s = &*self.shared;
        s.job
            .store(job as *const Job<'_> as *mut (), Ordering::Relaxed);
        s.remaining.store(self.workers.len(), Ordering::Relaxed);
        // SeqCst pairs with the sleepers check in `worker`: either the worker
        // sees the new epoch or we see it asleep and notify it.
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let start = Instant::now();
        let mine = catch_unwind(AssertUnwindSafe(|| job.run()));
        let own = start.elapsed();
        // Workers hold `job` (on this stack) until they decrement `remaining`:
        // wait for all of them, even if our own chunk panicked.
        wait_until(|| s.remaining.load(Ordering::Acquire) == 0, None);
        late.record(own, start.elapsed() - own);
        let worker_panicked = s.panicked.swap(false, Ordering::Relaxed);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if worker_panicked {
            panic!("a pagoda-cpu worker thread panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Busy-waits until `done()`: a few hundred spins (the common case, both
/// threads on their own core, takes well under a microsecond), then yields
/// the CPU between checks, so that a thread of ours preempted onto the same
/// core (the machine may be shared) gets to finish. Gives up after `limit`.
fn wait_until(done: impl Fn() -> bool, limit: Option<Duration>) -> bool {
    for _ in 0..SPINS_BEFORE_YIELD {
        if done() {
            return true;
        }
        std::hint::spin_loop();
    }
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if limit.is_some_and(|l| start.elapsed() > l) {
            return false;
        }
        std::thread::yield_now();
    }
}

/// A worker: waits for each new epoch, runs its share of the loop, reports.
fn worker(s: &Shared) {
    let mut seen = 0usize;
    loop {
        // Wait for a new loop: spin, yield, then sleep.
        let new_loop =
            || s.epoch.load(Ordering::Acquire) != seen || s.shutdown.load(Ordering::Acquire);
        if !wait_until(new_loop, Some(SPIN)) {
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = s.epoch.load(Ordering::Acquire);
        // The publisher stored a valid `Job` before bumping the epoch (we
        // acquired it), and keeps it alive until `remaining` reaches 0, which
        // needs our decrement below, after our last use of it.
        // SAFETY: the job pointer is valid and outlives this borrow (above).
        let job = unsafe { &*(s.job.load(Ordering::Relaxed) as *const Job<'_>) };
        if catch_unwind(AssertUnwindSafe(|| job.run())).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

/// Runs `f` over `0..n` split into contiguous ranges; every range but the
/// last is a multiple of `align` long (row tiles stay whole). `f` must not
/// itself call `for_ranges` on the same pool (loops do not nest).
pub fn for_ranges(pool: Option<&Pool>, n: usize, align: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    let align = align.max(1);
    match pool {
        Some(pool) if pool.threads() > 1 && n > align => {
            // Several chunks per thread: a preempted thread holds up little.
            let chunk = n.div_ceil(pool.threads() * 8).next_multiple_of(align);
            pool.run(&Job {
                f: &f,
                n,
                chunk,
                next: AtomicUsize::new(0),
            });
        }
        _ => f(0..n),
    }
}

#[cfg(test)]
mod tests;
