//! Pagoda's CPU backend: the executable specification every other backend is
//! checked against.
//!
//! "Device memory" is host memory ([`memory::HostMemory`]); ops are plain,
//! correct loops, parallelised over output rows on the backend's own thread
//! pool ([`par::Pool`], or inline with one thread), with AVX2/FMA used when
//! the CPU has it.
//! File names match the kernels of the other backends: `matmul.rs` ↔
//! `kernels/matmul.cu` ↔ `shaders/matmul.wgsl`, and so on.
#![deny(missing_docs)]

pub mod elementwise;
pub mod embedding;
pub mod kv_arena;
pub mod kv_cache;
pub mod matmul;
pub mod memory;
pub mod paged_attention;
pub mod par;
pub mod rms_norm;
pub mod rms_norm_matmul;
pub mod rope;
pub mod rope_write_kv;
pub mod sampling;
pub mod simd;
mod tensor_ops;

use std::sync::{Arc, Mutex};

use pagoda_backend::{
    Backend, BackendError, BackendInfo, BufRef, DType, DeviceMemory, GraphOps, GraphPlanInput,
    KvArenaOps, RawAllocator, RawSegment, Result,
};

pub use memory::HostMemory;

/// The CPU backend.
pub struct CpuBackend {
    mem: Arc<HostMemory>,
    info: BackendInfo,
    pool: Option<par::Pool>,
    /// Serialises ops, like a GPU stream: two ops never run at once, so an
    /// op's output cannot be another running op's input.
    stream: Mutex<()>,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.num_threads())
            .finish()
    }
}

impl CpuBackend {
    /// Largest top-k the CPU's `top_k_rows` serves (larger k: full rows).
    pub const MAX_TOP_K: usize = 1024;

    /// A backend using `threads` threads (`0` = all cores).
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_limits(threads, u64::MAX, u64::MAX)
    }

    /// The same backend claiming only `dtypes` as weight types (`BackendInfo::weight_dtypes`):
    /// how the engine treats a device that lacks a type (a GPU backend without K-quant
    /// kernels) is tested with it on the CPU.
    pub fn with_weight_dtypes(mut self, dtypes: &[DType]) -> Self {
        self.info.weight_dtypes = dtypes.to_vec();
        self
    }

    /// A backend with artificial device limits: no buffer above
    /// `max_buffer_bytes`, no kernel argument above `max_binding_bytes` (as
    /// lavapipe's 128 MiB bindings), so the engine's splitting of weights and
    /// KV arenas into pieces is exercised on the CPU.
    pub fn with_limits(
        threads: usize,
        max_buffer_bytes: u64,
        max_binding_bytes: u64,
    ) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            threads
        };
        let pool = if threads > 1 {
            Some(
                par::Pool::new(threads).map_err(|e| BackendError::InvalidArgument {
                    op: "CpuBackend::new",
                    detail: format!("thread pool: {e}"),
                })?,
            )
        } else {
            None
        };
        let device = cpu_model_name();
        Ok(CpuBackend {
            mem: Arc::new(HostMemory::new()),
            info: BackendInfo {
                name: "cpu".into(),
                device: format!("{device} ({threads} threads)"),
                weight_dtypes: DType::WEIGHT_TYPES.to_vec(),
                kv_dtypes: vec![DType::F32, DType::F16, DType::BF16, DType::Q8_0],
                alignment: memory::SEGMENT_ALIGN,
                can_grow_kv: true,
                supports_graphs: false,
                host_memory: true,
                max_buffer_bytes,
                max_binding_bytes,
                max_top_k: Self::MAX_TOP_K,
                kv_commit_granularity: kv_arena::GRANULE_BYTES,
            },
            pool,
            stream: Mutex::new(()),
        })
    }

    /// Threads used by ops.
    pub fn num_threads(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.threads())
    }

    /// Raw host segments currently allocated through this backend (by every
    /// pool over it). Zero once every pool and block is dropped.
    pub fn live_segments(&self) -> usize {
        self.mem.num_segments()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checked host view of `b` as `len` elements of `T`.
    fn view<T: bytemuck::Pod>(&self, b: BufRef, len: usize, op: &'static str) -> Result<&[T]> {
        let ptr = self.check::<T>(b, len, op)?;
        // `check` verified the range lies inside a live segment and is aligned
        // for T; T is Pod so any bytes are a valid T; ops are serialised by the
        // stream lock and outputs are checked not to overlap inputs.
        // SAFETY: valid, aligned, live range of Pod values (above).
        Ok(unsafe { std::slice::from_raw_parts(ptr as *const T, len) })
    }

    /// Checked mutable host view of `b` as `len` elements of `T`.
    #[allow(clippy::mut_from_ref)]
    fn view_mut<T: bytemuck::Pod>(
        &self,
        b: BufRef,
        len: usize,
        op: &'static str,
    ) -> Result<&mut [T]> {
        let ptr = self.check::<T>(b, len, op)?;
        // SAFETY: as in `view`; callers check that no input view overlaps this one.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) })
    }

    fn check<T>(&self, b: BufRef, len: usize, op: &'static str) -> Result<*mut u8> {
        let need = len.saturating_mul(std::mem::size_of::<T>()) as u64;
        if b.bytes > self.info.max_binding_bytes {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!(
                    "a {}-byte argument is above the device's largest binding ({} bytes)",
                    b.bytes, self.info.max_binding_bytes
                ),
            });
        }
        if need > b.bytes {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!(
                    "buffer of {} bytes is too small for {len} elements ({need} bytes)",
                    b.bytes
                ),
            });
        }
        if need == 0 {
            return Ok(std::ptr::dangling_mut::<[u64; 8]>() as *mut u8);
        }
        let ptr = self.mem.resolve(b, op)?;
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!("buffer {b:?} is misaligned"),
            });
        }
        Ok(ptr)
    }
}

/// Whether two ranges share a byte.
pub(crate) fn overlaps_ref(a: BufRef, b: BufRef) -> bool {
    overlaps(a, b)
}

/// Whether two ranges share a byte.
fn overlaps(a: BufRef, b: BufRef) -> bool {
    a.bytes > 0
        && b.bytes > 0
        && a.segment == b.segment
        && a.addr < b.addr + b.bytes
        && b.addr < a.addr + a.bytes
}

/// Fails when the output overlaps any input.
fn disjoint(op: &'static str, out: BufRef, inputs: &[BufRef]) -> Result<()> {
    if inputs.iter().any(|&i| overlaps(out, i)) {
        return Err(BackendError::InvalidArgument {
            op,
            detail: "output overlaps an input".into(),
        });
    }
    Ok(())
}

fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

impl Backend for CpuBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn memory(&self) -> Result<DeviceMemory> {
        Ok(memory::host_memory_info())
    }

    fn raw_allocator(&self) -> Arc<dyn RawAllocator> {
        self.mem.clone()
    }

    /// The CPU runs every step directly: no graphs, no graph memory.
    fn graph_memory_bytes(&self, _input: &GraphPlanInput) -> u64 {
        0
    }

    fn upload(&self, dst: BufRef, src: &[u8]) -> Result<()> {
        if src.len() as u64 != dst.bytes {
            return Err(BackendError::InvalidArgument {
                op: "upload",
                detail: format!("{} source bytes for a {}-byte buffer", src.len(), dst.bytes),
            });
        }
        let _g = self.lock();
        self.view_mut::<u8>(dst, src.len(), "upload")?
            .copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: BufRef, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != src.bytes {
            return Err(BackendError::InvalidArgument {
                op: "download",
                detail: format!(
                    "{}-byte destination for a {}-byte buffer",
                    dst.len(),
                    src.bytes
                ),
            });
        }
        let _g = self.lock();
        dst.copy_from_slice(self.view::<u8>(src, dst.len(), "download")?);
        Ok(())
    }

    fn copy(&self, src: BufRef, dst: BufRef) -> Result<()> {
        if src.bytes != dst.bytes {
            return Err(BackendError::InvalidArgument {
                op: "copy",
                detail: format!(
                    "{}-byte source for a {}-byte destination",
                    src.bytes, dst.bytes
                ),
            });
        }
        disjoint("copy", dst, &[src])?;
        let _g = self.lock();
        let n = src.bytes as usize;
        self.view_mut::<u8>(dst, n, "copy")?
            .copy_from_slice(self.view::<u8>(src, n, "copy")?);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn graphs(&self) -> Option<&dyn GraphOps> {
        // Ops run as they are called; there is nothing to capture.
        None
    }

    fn prepared_weight_bytes(&self, dtype: DType, rows: usize, cols: usize) -> Option<u64> {
        // Weights stay in their GGUF blocks.
        Some(dtype.row_bytes(cols)? as u64 * rows as u64)
    }

    fn upload_weight(
        &self,
        dst: BufRef,
        src: &[u8],
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let want = self.prepared_weight_bytes(dtype, rows, cols);
        if want != Some(src.len() as u64) {
            return Err(BackendError::InvalidArgument {
                op: "upload_weight",
                detail: format!(
                    "{} bytes for a ({rows}, {cols}) {dtype} tensor of {want:?} bytes",
                    src.len()
                ),
            });
        }
        self.upload(dst, src)
    }
}

impl KvArenaOps for CpuBackend {
    fn reserve(&self, bytes: u64) -> Result<RawSegment> {
        if bytes > self.info.max_buffer_bytes {
            return Err(BackendError::InvalidArgument {
                op: "reserve",
                detail: format!(
                    "{bytes} bytes is above the largest buffer ({})",
                    self.info.max_buffer_bytes
                ),
            });
        }
        self.mem.reserve(bytes)
    }

    fn commit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        let _g = self.lock();
        self.mem.commit(range, offset, bytes)
    }

    fn decommit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        let _g = self.lock();
        self.mem.decommit(range, offset, bytes)
    }

    fn committed_bytes(&self, range: RawSegment) -> u64 {
        self.mem.committed_bytes(range)
    }

    fn unreserve(&self, range: RawSegment) {
        let _g = self.lock();
        self.mem.unreserve(range)
    }
}
