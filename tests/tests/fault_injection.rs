//! Fault-injection sweeps on the synthetic tiny model, on the CPU (the
//! bodies are in `pagoda_tests::reference`, shared with `cuda_reference.rs`).
//!
//! Every pool allocation and every KV page allocation is a fault site,
//! numbered from 1 by one [`FaultInjector`](pagoda_backend::FaultInjector)
//! shared by the engine's pool and its block manager. Each sweep first
//! measures a fault-free run, then fails every site in turn on a fresh
//! engine and checks that
//! - a fault while building is a clean `Err` naming the injected fault, with
//!   all host memory given back;
//! - a fault while running ends exactly the request that wanted the page
//!   (with `FinishReason::Error` naming the fault), every other request
//!   generates exactly what it did without the fault (greedy is
//!   batch-invariant), every KV page is free at the end and all host memory
//!   is given back when the engine is dropped.

use std::sync::Arc;

use pagoda_cpu::CpuBackend;
use pagoda_tests::reference;

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new(1).expect("cpu backend"))
}

/// The CPU's balance: no host segment of the backend is alive.
fn released(backend: &Arc<CpuBackend>) -> impl Fn(&str) + '_ {
    move |what: &str| {
        // Metric: live host segments; bound: 0.
        assert_eq!(
            backend.live_segments(),
            0,
            "{what}: all host memory is given back"
        );
    }
}

#[test]
fn fault_during_build_is_a_clean_error() {
    let b = backend();
    reference::fault_during_build_is_a_clean_error(&b, &released(&b));
}

#[test]
fn fault_during_run_fails_only_that_request() {
    let b = backend();
    reference::fault_during_run_fails_only_that_request(&b, &released(&b));
}

#[test]
fn fault_sweep_with_concurrency_preemption_and_prefix_sharing() {
    let b = backend();
    reference::fault_sweep_with_concurrency_preemption_and_prefix_sharing(&b, &released(&b));
}
