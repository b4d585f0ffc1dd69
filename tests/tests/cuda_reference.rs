//! The whole-model reference checks of `model_reference.rs`,
//! `engine_reference.rs` and `fault_injection.rs` on the CUDA backend (the
//! same bodies, from `pagoda_tests::reference`), plus agreement with the CPU
//! backend. Ignored without a GPU: `cargo test --release -- --ignored`.

use std::sync::Arc;

use pagoda_backend::{Backend, DType};
use pagoda_cuda::CudaBackend;
use pagoda_tests::{cpu_backend, cuda_backend, reference};

// ---------------------------------------------------------------- forward pass

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_last_logits_match_exact_f64_within_1e3() {
    reference::last_logits_match_exact_f64(cuda_backend());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_argmax_at_every_position_matches_references() {
    reference::argmax_at_every_position(cuda_backend());
}

/// Shuffled vs in-order and interleaved pages on the same (CUDA) backend:
/// bit-identical, since no kernel's order depends on page ids.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_shuffled_interleaved_pages_give_bit_identical_logits() {
    reference::shuffled_and_interleaved_pages_are_bit_identical(cuda_backend());
}

// ---------------------------------------------------------------- whole engine

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_greedy_generation_matches_llama_cpp_up_to_low_margin_steps() {
    reference::greedy_matches_llama_cpp(cuda_backend());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_teacher_forced_argmax_matches_llama_cpp_where_the_margin_is_clear() {
    reference::teacher_forced_argmax_matches_llama_cpp(cuda_backend());
}

/// Within 2% of 28.01, and each chunk within 0.01 of exact f64 (as on the CPU).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_perplexity_of_reference_text_is_within_two_percent() {
    reference::perplexity_within_two_percent(cuda_backend());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_batch_invariance_of_greedy_requests() {
    reference::batch_invariance(cuda_backend());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_preemption_with_too_few_pages_keeps_outputs() {
    reference::preemption_keeps_outputs(cuda_backend());
}

/// The swap tier in pinned host memory (`Backend::alloc_host`).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_swapped_and_resumed_requests_match_uninterrupted_runs() {
    reference::swapped_requests_match_uninterrupted_runs(cuda_backend());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_abort_frees_all_pages_at_once() {
    reference::abort_frees_all_pages(cuda_backend());
}

// ---------------------------------------------------------------- CUDA vs CPU

/// f32 KV: CUDA's greedy tokens equal the CPU's for every greedy.json case
/// up to the first step whose fixture margin is below 0.3.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_greedy_tokens_equal_the_cpu_up_to_low_margin_steps() {
    reference::greedy_agrees_across_backends(cuda_backend(), cpu_backend(), DType::F32);
}

/// f16 and q8_0 KV pages: CUDA's greedy tokens equal the CPU's with the
/// same KV dtype, up to the first low-margin step.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_quantized_kv_greedy_tokens_equal_the_cpu_up_to_low_margin_steps() {
    let (gpu, cpu) = (cuda_backend(), cpu_backend());
    for kv in [DType::F16, DType::Q8_0] {
        assert!(gpu.info().supports_kv(kv), "CUDA stores KV as {kv}");
        reference::greedy_agrees_across_backends(gpu.clone(), cpu.clone(), kv);
    }
}

// ---------------------------------------------------------------- fault injection

/// Tolerance on the driver's free-memory figure after an engine is gone.
const FREE_SLACK: u64 = 4 << 20;

/// What the CUDA backend holds while no engine exists: pool segment bytes,
/// physical KV arena bytes, live device ranges, and the driver's free bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    pool_bytes: u64,
    arena_bytes: u64,
    ranges: usize,
    free: u64,
}

fn held(b: &CudaBackend) -> Held {
    Held {
        pool_bytes: b.allocator().live_bytes(),
        arena_bytes: b.arena().physical_bytes(),
        ranges: b.live_ranges(),
        free: b.memory().expect("cuMemGetInfo").free_bytes,
    }
}

/// The CUDA balance after an engine is dropped: pool bytes, arena bytes and
/// live ranges back to their starting values exactly, the driver's free
/// bytes within 4 MiB of theirs.
///
/// The start is taken after one warm-up engine on the tiny model has run
/// and been dropped, so one-time lazy allocations of the driver (module
/// loading, local memory) are not counted as leaks.
fn released(b: &Arc<CudaBackend>) -> impl Fn(&str) + '_ {
    {
        let cfg = reference::small_fault_config();
        let mut e = pagoda::Engine::builder()
            .model(reference::tiny_model())
            .backend(b.clone())
            .config(cfg)
            .build()
            .expect("warm-up engine builds");
        let greedy = pagoda::GenerationParams {
            ignore_eog: true,
            ..reference::greedy(8)
        };
        e.generate(reference::fault_prompts(4, 5), greedy)
            .expect("warm-up run");
    }
    let start = held(b);
    eprintln!("CUDA memory at the start: {start:?}");
    move |what: &str| {
        let now = held(b);
        let graphs = b.graphs().map(|g| (g.num_graphs(), g.memory_bytes()));
        // Metric: pool segment bytes; bound: equal to the start.
        assert_eq!(
            now.pool_bytes, start.pool_bytes,
            "{what}: pool segments given back"
        );
        // Metric: physical KV arena bytes; bound: equal to the start.
        assert_eq!(
            now.arena_bytes, start.arena_bytes,
            "{what}: KV arena memory given back"
        );
        // Metric: live device ranges (segments and reservations); bound: equal to the start.
        assert_eq!(now.ranges, start.ranges, "{what}: device ranges released");
        // Metric: driver free bytes; bound: within 4 MiB of the start.
        assert!(
            now.free.abs_diff(start.free) <= FREE_SLACK,
            "{what}: device free memory {} vs {} at the start ({} MiB apart; graphs held by the backend: {graphs:?})",
            now.free,
            start.free,
            now.free.abs_diff(start.free) >> 20
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_fault_during_build_is_a_clean_error() {
    let b = cuda_backend();
    reference::fault_during_build_is_a_clean_error(&b, &released(&b));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_fault_during_run_fails_only_that_request() {
    let b = cuda_backend();
    reference::fault_during_run_fails_only_that_request(&b, &released(&b));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_fault_sweep_with_concurrency_preemption_and_prefix_sharing() {
    let b = cuda_backend();
    reference::fault_sweep_with_concurrency_preemption_and_prefix_sharing(&b, &released(&b));
}
