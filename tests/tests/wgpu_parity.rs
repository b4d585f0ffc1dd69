//! Parity of every op of the backend contract between the CPU backend and the wgpu backend
//! (`pagoda_tests::parity`), on the adapter as it is and with `SHADER_F16` and `SUBGROUP`
//! masked off. CI runs them on Mesa's lavapipe (Vulkan on the CPU; `.ci/run` installs it);
//! without a Vulkan/Metal/DX12 adapter they fail, they do not skip.

use std::sync::Arc;

use pagoda_cpu::CpuBackend;
use pagoda_tests::parity::check_all_ops;
use pagoda_wgpu::{WgpuBackend, WgpuOptions};

fn wgpu(opts: WgpuOptions) -> Arc<WgpuBackend> {
    Arc::new(WgpuBackend::new(&opts).expect(
        "a wgpu adapter (CI: Mesa lavapipe, `apt-get install mesa-vulkan-drivers libvulkan1`)",
    ))
}

#[test]
fn wgpu_matches_cpu() {
    let cpu = Arc::new(CpuBackend::new(0).unwrap());
    check_all_ops(&cpu, &wgpu(WgpuOptions::default()));
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
