//! Pagoda's wgpu backend: the backend contract in WGSL on Vulkan, Metal and DX12
//! (WebGPU later), driven synchronously with pollster where the engine needs a result.
//!
//! - Shaders: `shaders/*.wgsl`, the stems of the CUDA kernels and the CPU backend's
//!   files, embedded and cached as pipelines ([`kernels`]).
//! - Memory: every pool segment and KV arena piece is a `wgpu::Buffer`; zero-byte requests
//!   are valid everywhere and touch nothing ([`memory`]). Weights and KV arenas respect the
//!   adapter's `max_storage_buffer_binding_size` (the engine splits them into pieces).
//! - KV: a reservation is a whole buffer (wgpu has no virtual memory): commit clears a
//!   range, decommit only books it; `can_grow_kv` is false ([`kv_arena`]).
//! - Recording: all work goes into one command encoder, submitted when the host needs a
//!   result or waits.
//! - Arithmetic is f32 everywhere (f16 and bf16 are storage types). With `SHADER_F16` the
//!   coalesced matmul reads f16 weights as `array<vec2<f16>>` (same values, same sums); with `SUBGROUP` the matmul_co and rms_norm reductions
//!   use `subgroupAdd` (fallback: workgroup memory), each in a fixed order for a device. The
//!   features are detected, reported (`BackendInfo::device`: features and paths) and
//!   maskable with `PAGODA_WGPU_MASK`; the matmul shader is chosen by adapter type
//!   (`PAGODA_WGPU_MATMUL=rows|coalesced` overrides).
#![deny(missing_docs)]

pub mod device;
pub mod kernels;
mod kv_arena;
mod kv_cache;
pub mod memory;
mod paged_attention;
mod sampling;
mod tensor_ops;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pagoda_backend::{
    Backend, BackendError, BackendInfo, BufRef, DType, DeviceMemory, GraphOps, GraphPlanInput,
    RawAllocator, Result, weight_layout,
};

pub use device::{MASK_ENV, MATMUL_ENV, MatmulPath, WgpuOptions, adapter_infos};
pub use kernels::{
    ENTRY_POINTS, F16_ENTRY_POINTS, SHADER_FILES, Shader, ShaderFeatures, module_source, specialise,
};

use crate::device::Gpu;
use crate::kernels::Kernels;
use crate::memory::{Registry, WgpuAllocator};

/// Alignment of segment bases reported to the pool (wgpu buffers start at 0; offsets of
/// bound windows are aligned down to the adapter's storage offset alignment).
pub const SEGMENT_ALIGN: u64 = 256;

/// Largest top-k `top_k_rows` serves (larger k: full rows to the host).
pub const MAX_TOP_K: usize = 256;

/// Commit granularity of KV arenas.
pub const KV_GRANULE: u64 = 4096;

/// The weight types the shaders compute with.
pub const WEIGHT_DTYPES: [DType; 11] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
];

/// State shared by the backend and its allocator.
pub(crate) struct Shared {
    pub(crate) gpu: Gpu,
    pub(crate) registry: Registry,
    pub(crate) kernels: Kernels,
    /// KV arenas by base address: committed granules.
    pub(crate) arenas: Mutex<HashMap<u64, Vec<bool>>>,
    /// Scratch buffers of recorded work, freed once the queue is idle.
    pub(crate) retired: Mutex<Vec<u64>>,
}

/// A short-lived device copy of host data (kernel arguments the host builds, such as the
/// page pairs of `copy_pages`), freed at the next synchronisation.
pub(crate) struct ScratchRef {
    pub(crate) buf: BufRef,
}

/// The wgpu backend.
pub struct WgpuBackend {
    shared: Arc<Shared>,
    allocator: Arc<WgpuAllocator>,
    info: BackendInfo,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("device", &self.info.device)
            .finish()
    }
}

/// The kernels' code of a dtype (`shaders/common.wgsl`'s `DT_*`).
pub(crate) fn dtype_code(op: &'static str, dtype: DType) -> Result<u32> {
    Ok(match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::Q8_0 => 3,
        DType::Q4_0 => 4,
        DType::Q4_1 => 5,
        DType::Q5_0 => 6,
        DType::Q5_1 => 7,
        DType::Q4_K => 8,
        DType::Q5_K => 9,
        DType::Q6_K => 10,
        _ => {
            return Err(BackendError::Unsupported {
                op,
                dtype: dtype.to_string(),
            });
        }
    })
}

impl WgpuBackend {
    /// Opens the adapter `opts` names (see [`WgpuOptions`]).
    pub fn new(opts: &WgpuOptions) -> Result<Self> {
        let gpu = device::open(opts)?;
        // Slack for a window that starts below its data (offset alignment).
        let bind = gpu.limits.max_storage_buffer_binding_size as u64;
        let max_binding_bytes = bind.saturating_sub(SEGMENT_ALIGN) / KV_GRANULE * KV_GRANULE;
        let a = &gpu.adapter_info;
        let features = gpu.feature_names();
        let info = BackendInfo {
            name: "wgpu".into(),
            device: format!(
                "{} ({:?}, {:?}; features: {}; paths: {})",
                a.name,
                a.backend,
                a.device_type,
                if features.is_empty() {
                    "none".into()
                } else {
                    features.join(", ")
                },
                gpu.paths()
            ),
            weight_dtypes: WEIGHT_DTYPES.to_vec(),
            kv_dtypes: vec![DType::F32, DType::F16, DType::BF16, DType::Q8_0],
            alignment: SEGMENT_ALIGN,
            can_grow_kv: false,
            supports_graphs: false,
            host_memory: a.device_type == wgpu::DeviceType::Cpu,
            max_buffer_bytes: gpu.limits.max_buffer_size,
            max_binding_bytes,
            max_top_k: MAX_TOP_K,
            kv_commit_granularity: KV_GRANULE,
        };
        let shared = Arc::new(Shared {
            gpu,
            registry: Registry::default(),
            kernels: Kernels::default(),
            arenas: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
        });
        Ok(WgpuBackend {
            allocator: Arc::new(WgpuAllocator {
                shared: shared.clone(),
            }),
            shared,
            info,
        })
    }

    /// The adapter's description.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.shared.gpu.adapter_info
    }

    /// The shader features in use (`shader-f16`, `subgroup`).
    pub fn features(&self) -> Vec<&'static str> {
        self.shared.gpu.feature_names()
    }

    /// The shader paths in use (matmul entry point and reductions, how halves are read).
    pub fn paths(&self) -> String {
        self.shared.gpu.paths()
    }

    /// The matmul shader in use.
    pub fn matmul_path(&self) -> MatmulPath {
        self.shared.gpu.matmul
    }

    /// Storage buffers one shader may bind.
    pub(crate) fn max_storage_buffers(&self) -> u32 {
        self.shared.gpu.limits.max_storage_buffers_per_shader_stage
    }

    /// Bytes in live buffers (pool segments and KV pieces).
    pub fn live_bytes(&self) -> u64 {
        self.shared.registry.live_bytes()
    }

    /// Live buffers.
    pub fn live_buffers(&self) -> usize {
        self.shared.registry.len()
    }

    /// Compiles every pipeline now (instead of at first use), so a broken shader or a
    /// driver that refuses one is an error at start.
    pub fn warm_up(&self) -> Result<()> {
        for (shader, entry) in ENTRY_POINTS {
            self.shared.pipeline_for(shader, entry)?;
        }
        if self.shared.gpu.shader_f16 {
            for (shader, entry) in kernels::F16_ENTRY_POINTS {
                self.shared.pipeline_for(shader, entry)?;
            }
        }
        Ok(())
    }
}

impl WgpuBackend {
    /// `data` in a scratch buffer of its own (freed once the work using it has run).
    pub(crate) fn scratch(&self, op: &'static str, data: &[u8]) -> Result<ScratchRef> {
        let seg = self.shared.registry.alloc(
            &self.shared.gpu,
            data.len().max(4) as u64,
            pagoda_backend::MemoryTag::Scratch,
            op,
        )?;
        self.shared
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(seg.addr);
        let buf = BufRef {
            segment: Some(seg.id),
            offset: 0,
            addr: seg.addr,
            bytes: data.len() as u64,
        };
        self.shared.upload(buf, data)?;
        Ok(ScratchRef { buf })
    }
}

fn weight_bytes(dtype: DType, rows: usize, cols: usize) -> Option<u64> {
    dtype
        .row_bytes(cols)
        .map(|r| (r as u64 * rows as u64).next_multiple_of(4))
}

/// Host memory totals for an adapter that is the CPU (lavapipe).
fn host_memory() -> Option<DeviceMemory> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    Some(DeviceMemory {
        total_bytes: kib("MemTotal:")? * 1024,
        free_bytes: kib("MemAvailable:")? * 1024,
    })
}

/// The environment variable giving a GPU's memory in bytes (wgpu cannot ask the driver).
pub const MEMORY_ENV: &str = "PAGODA_WGPU_MEMORY_BYTES";

impl Backend for WgpuBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn memory(&self) -> Result<DeviceMemory> {
        if self.info.host_memory
            && let Some(m) = host_memory()
        {
            return Ok(m);
        }
        // wgpu reports no memory size: take it from the environment, else the largest
        // buffer the adapter allows (a lower bound of its memory).
        let total = std::env::var(MEMORY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(self.info.max_buffer_bytes);
        Ok(DeviceMemory {
            total_bytes: total,
            free_bytes: total.saturating_sub(self.shared.registry.live_bytes()),
        })
    }

    fn raw_allocator(&self) -> Arc<dyn RawAllocator> {
        self.allocator.clone()
    }

    fn graph_memory_bytes(&self, _input: &GraphPlanInput) -> u64 {
        0
    }

    fn upload(&self, dst: BufRef, src: &[u8]) -> Result<()> {
        self.shared.upload(dst, src)
    }

    fn download(&self, src: BufRef, dst: &mut [u8]) -> Result<()> {
        self.shared.download(src, dst)
    }

    fn copy(&self, src: BufRef, dst: BufRef) -> Result<()> {
        self.shared.copy(src, dst)
    }

    fn synchronize(&self) -> Result<()> {
        self.shared.synchronize()
    }

    fn graphs(&self) -> Option<&dyn GraphOps> {
        None
    }

    fn prepared_weight_bytes(&self, dtype: DType, rows: usize, cols: usize) -> Option<u64> {
        dtype_code("prepared_weight_bytes", dtype).ok()?;
        // The GGUF size (quants then scales, weight_layout.rs), rounded up to whole words.
        weight_bytes(dtype, rows, cols)
    }

    fn upload_weight(
        &self,
        dst: BufRef,
        src: &[u8],
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        dtype_code("upload_weight", dtype)?;
        let want = dtype.row_bytes(cols).map(|r| r * rows);
        if want != Some(src.len()) {
            return Err(BackendError::InvalidArgument {
                op: "upload_weight",
                detail: format!("{} bytes for ({rows}, {cols}) of {dtype}", src.len()),
            });
        }
        let mut bytes = weight_layout::repack(dtype, src).unwrap_or_else(|| src.to_vec());
        bytes.resize(dst.bytes as usize, 0);
        self.shared.upload(dst, &bytes)
    }
}
