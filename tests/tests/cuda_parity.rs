//! Parity of every op of the backend contract against the CPU backend: the CPU with small
//! device limits (CI) and the CUDA backend (GPU). The harness is `pagoda_tests::parity`.

use std::sync::Arc;

use pagoda_cpu::CpuBackend;
use pagoda_tests::parity::check_all_ops;

#[test]
fn limited_cpu_matches_cpu() {
    let cpu = Arc::new(CpuBackend::new(0).unwrap());
    // 16 MiB buffers, 1 MiB bindings: every weight above 1 MiB (576x576 f32
    // and up, the vocab table in every dtype) and every KV arena is split.
    let other = Arc::new(CpuBackend::with_limits(0, 16 << 20, 1 << 20).unwrap());
    check_all_ops(&cpu, &other);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_matches_cpu() {
    let cpu = Arc::new(CpuBackend::new(0).unwrap());
    let cuda = pagoda_tests::cuda_backend();
    check_all_ops(&cpu, &cuda);
}
