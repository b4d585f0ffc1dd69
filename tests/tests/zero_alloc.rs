//! "No heap allocation per decoded token", measured by a counting global
//! allocator. This binary holds one test so that no other test allocates
//! while it counts (the counter is process-wide: worker threads count too).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pagoda::model::WorkspaceDims;
use pagoda::sampler::{Sampler, SamplingParams};
use pagoda::{Scheduler, SchedulerConfig, SeqParams};
use pagoda_backend::{DType, FaultInjector};
use pagoda_tests::cpu_runner;

/// Counts heap allocations of every thread while `COUNTING` is set.
struct CountingAlloc;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates every call to the system allocator unchanged; the counters are atomics that never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (out, ALLOCS.load(Ordering::SeqCst))
}

/// Pins "no heap allocation per decoded token": 100 decode steps of 4 requests
/// through the model runner and the sampler allocate nothing, with one CPU
/// thread and with every core (the CPU backend's worker pool allocates nothing
/// per loop).
#[test]
fn decode_step_makes_zero_heap_allocations() {
    for threads in [1, 0] {
        decode_steps_allocate_nothing(threads);
    }
}

fn decode_steps_allocate_nothing(threads: usize) {
    let (page_size, pages, ctx) = (16, 64, 256);
    let dims = WorkspaceDims {
        max_tokens: 64,
        max_seqs: 4,
        max_blocks_per_seq: ctx / page_size,
        max_logits_rows: 4,
        max_top_k: pagoda::model::DEVICE_TOP_K,
    };
    let mut runner = cpu_runner(threads, DType::F16, dims, pages);
    let vocab = runner.config.vocab_size;
    let sc = SchedulerConfig {
        page_size,
        num_pages: pages,
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        max_model_len: ctx,
        enable_prefix_caching: true,
        swap: Default::default(),
    };
    let mut sched = Scheduler::new(sc, FaultInjector::new()).unwrap();
    let mut samplers = Vec::new();
    for i in 0..4u32 {
        let prompt: Vec<u32> = (0..10 + i).map(|t| 100 + t * 7 + i).collect();
        sched
            .add(
                prompt,
                SeqParams {
                    max_tokens: 120,
                    eog_ids: vec![],
                    ignore_eog: true,
                    want_all_logits: false,
                },
            )
            .unwrap();
        samplers.push(Sampler::new(
            SamplingParams {
                seed: i as u64,
                ..SamplingParams::default()
            },
            vocab,
        ));
    }
    let mut sampled = [None; 4];
    let mut decode_steps = 0;
    let mut total_allocs = 0;
    while decode_steps < 100 {
        let plan = sched.schedule().plan.expect("work to do");
        let is_decode = plan.num_prefill_tokens == 0;
        let (res, allocs) = counted(|| {
            let logits = runner.logits(&plan)?;
            for (i, row) in plan.sample_rows.iter().enumerate() {
                sampled[i] = row.map(|r| {
                    let r = r as usize;
                    samplers[i].sample(&logits[r * vocab..(r + 1) * vocab], &[])
                });
            }
            Ok::<_, pagoda::EngineError>(())
        });
        res.unwrap();
        if is_decode {
            assert_eq!(plan.num_seqs(), 4);
            total_allocs += allocs;
            decode_steps += 1;
        }
        sched.postprocess(&plan, &sampled[..plan.num_seqs()]);
    }
    assert_eq!(
        total_allocs, 0,
        "heap allocations in 100 decode steps with {threads} threads (0 = all)"
    );
}
