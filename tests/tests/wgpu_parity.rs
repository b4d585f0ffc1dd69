//! Parity of every op of the backend contract between the CPU backend and the wgpu backend
//! (`pagoda_tests::parity`). Every shader path is covered: the adapter as it is with the
//! coalesced matmul (subgroupAdd, f16 weights as f16), `SHADER_F16` and `SUBGROUP` masked
//! with the adapter's own matmul (lane per row on lavapipe), and the coalesced matmul's
//! workgroup-memory fallback on matmul alone. CI runs them on Mesa's lavapipe (Vulkan on the
//! CPU; `.ci/run` installs it); without a Vulkan/Metal/DX12 adapter they fail, they do not
//! skip.

use std::sync::Arc;

use pagoda_cpu::CpuBackend;
use pagoda_tests::parity::{check_all_ops, check_ops};
use pagoda_wgpu::{MatmulPath, WgpuBackend, WgpuOptions};

fn wgpu(opts: WgpuOptions) -> Arc<WgpuBackend> {
    Arc::new(WgpuBackend::new(&opts).expect(
        "a wgpu adapter (CI: Mesa lavapipe, `apt-get install mesa-vulkan-drivers libvulkan1`)",
    ))
}

#[test]
fn wgpu_matches_cpu() {
    let cpu = Arc::new(CpuBackend::new(0).unwrap());
    let b = wgpu(WgpuOptions {
        matmul: Some(MatmulPath::Coalesced),
        ..WgpuOptions::default()
    });
    assert_eq!(b.matmul_path(), MatmulPath::Coalesced);
    check_all_ops(&cpu, &b);
}

#[test]
fn wgpu_coalesced_matmul_fallback_matches_cpu() {
    let cpu = Arc::new(CpuBackend::new(0).unwrap());
    let b = wgpu(WgpuOptions {
        mask_shader_f16: true,
        mask_subgroup: true,
        matmul: Some(MatmulPath::Coalesced),
        ..WgpuOptions::default()
    });
    let ops: &[&str] = &["matmul"];
    check_ops(&cpu, &b, Some(ops));
}

#[test]
fn wgpu_with_f16_and_subgroups_masked_matches_cpu() {
    let cpu = Arc::new(CpuBackend::new(0).unwrap());
    let b = wgpu(WgpuOptions {
        mask_shader_f16: true,
        mask_subgroup: true,
        ..WgpuOptions::default()
    });
    assert!(b.features().is_empty(), "{:?}", b.features());
    check_all_ops(&cpu, &b);
}
