//! Pagoda's CUDA backend, through cudarc with the driver and NVRTC loaded at
//! run time (building needs no CUDA toolkit).
//!
//! - Kernels: `kernels/*.cu`, one file per op family with the stems of the
//!   CPU backend's files, compiled by NVRTC at start for the device's
//!   architecture and cached on disk ([`kernels`]).
//! - Memory: the engine's pool over `cuMemAlloc` segments ([`memory`]); every
//!   op checks its buffers against the live ranges; zero-byte buffers are
//!   valid everywhere and touch nothing.
//! - KV: growable arena pieces over CUDA VMM, or a fixed arena where VMM is
//!   unavailable or `PAGODA_CUDA_VMM=0` ([`kv_arena`]).
//! - Graphs: decode steps captured and replayed ([`graph`]).
//! - Pinned host memory for the swap tier ([`pinned`]).
//!
//! All work is ordered on one stream; `download` and `synchronize` block.
#![deny(missing_docs)]

mod args;
pub mod device;
pub mod driver;
pub mod graph;
pub mod kernels;
pub mod kv_arena;
mod kv_cache;
pub mod memory;
mod paged_attention;
pub mod pinned;
mod sampling;
mod tensor_ops;
pub use pagoda_backend::weight_layout;

use std::sync::Arc;

use cudarc::driver::sys as cu;
use pagoda_backend::{
    Backend, BackendError, BackendInfo, BufRef, DType, DeviceMemory, FaultInjector, GraphOps,
    GraphPlanInput, HostBuffer, KvArenaOps, KvLayerRef, MAX_KV_PIECES, RawAllocator, RawSegment,
    Result,
};

pub use device::Device;
pub use driver::driver_present;
pub use kv_arena::{KvArena, VMM_ENV};
pub use memory::DeviceAllocator;

use crate::driver::check;
use crate::graph::Graphs;
use crate::kernels::Kernels;
use crate::memory::Registry;
use crate::pinned::{PinnedBuffer, PinnedRanges};

/// KV arena piece base addresses as kernels take them (by value).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct KvPieces {
    base: [u64; MAX_KV_PIECES],
}

/// Largest top-k `top_k_rows` serves (larger k: full rows to the host).
pub const MAX_TOP_K: usize = 1024;

/// Largest head dimension of `paged_attention`.
pub const MAX_HEAD_DIM: usize = 256;

/// The CUDA backend of one device.
pub struct CudaBackend {
    dev: Arc<Device>,
    kernels: Kernels,
    registry: Arc<Registry>,
    allocator: Arc<DeviceAllocator>,
    arena: KvArena,
    graphs: Graphs,
    pinned: Arc<PinnedRanges>,
    /// (SCRATCH_BYTES) device bytes for small host arrays of ops (page-copy pairs),
    /// then ATTN_PARTIAL_BYTES for split attention's partials.
    scratch: u64,
    /// Held from a scratch upload until the kernel that reads it is enqueued
    /// (several threads may enqueue at once).
    scratch_lock: std::sync::Mutex<()>,
    /// Streaming multiprocessors of the device (persistent kernels' grids).
    sm_count: u32,
    info: BackendInfo,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.dev)
            .finish()
    }
}

/// Bytes of the backend's scratch for small host arrays of ops (outside the pool;
/// counted in [`CudaBackend::own_device_bytes`]).
pub const SCRATCH_BYTES: u64 = 64 << 10;

/// Bytes after the scratch for the partial results of split attention
/// (`kernels/paged_attention.cu`; counted in [`CudaBackend::own_device_bytes`]).
pub const ATTN_PARTIAL_BYTES: u64 = 1 << 20;

/// Bytes after the partials for split attention's arrival counters (one u32 a token-head,
/// zeroed at start; the last chunk block of a token-head merges the partials and resets it).
pub const ATTN_COUNTER_BYTES: u64 = 4096;

/// Device bytes of the scratch, the partials and the counters.
const OWN_DEVICE_BYTES: u64 = SCRATCH_BYTES + ATTN_PARTIAL_BYTES + ATTN_COUNTER_BYTES;

impl CudaBackend {
    /// The backend of device `ordinal`: opens it, compiles (or reads from the
    /// cache) every kernel for its architecture and loads them. An error
    /// value when there is no driver, device or NVRTC.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let dev = Device::open(ordinal)?;
        args::set_pdl(
            dev.capability.0 >= 9 && std::env::var("PAGODA_CUDA_PDL").map_or(true, |v| v != "0"),
        );
        dev.bind()?;
        let arch = format!("sm_{}{}", dev.capability.0, dev.capability.1);
        let kernels = Kernels::load(&arch)?;
        let sm_count = dev
            .attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as u32;
        let registry = Arc::new(Registry::default());
        let allocator = Arc::new(DeviceAllocator::new(dev.clone(), registry.clone()));
        let arena = KvArena::new(dev.clone(), registry.clone())?;
        let graphs = Graphs::new(dev.clone());
        let mut scratch: cu::CUdeviceptr = 0;
        // SAFETY: writes one device pointer; the context is current.
        check("cuMemAlloc (scratch)", unsafe {
            cu::cuMemAlloc_v2(&mut scratch, OWN_DEVICE_BYTES as usize)
        })?;
        // SAFETY: the split-attention counters lie inside the allocation just made; the memset completes before any kernel runs (synchronised below).
        check("cuMemsetD32 (attention counters)", unsafe {
            cu::cuMemsetD32_v2(
                scratch + SCRATCH_BYTES + ATTN_PARTIAL_BYTES,
                0,
                (ATTN_COUNTER_BYTES / 4) as usize,
            )
        })?;
        // SAFETY: no arguments; the context is current.
        check("cuCtxSynchronize", unsafe { cu::cuCtxSynchronize() })?;
        let (total, _) = memory::mem_info(&dev)?;
        let info = BackendInfo {
            name: "cuda".into(),
            device: format!(
                "{} (sm_{}{}, {:.1} GiB, KV arena {}, PDL {})",
                dev.name,
                dev.capability.0,
                dev.capability.1,
                total as f64 / (1u64 << 30) as f64,
                if arena.is_growable() {
                    "growable (VMM)"
                } else {
                    "fixed (no VMM)"
                },
                match (
                    args::pdl_enabled(),
                    std::env::var("PAGODA_CUDA_PDL").as_deref()
                ) {
                    (false, _) => "off",
                    (true, Ok("early")) => "early",
                    (true, _) => "at exit",
                }
            ),
            weight_dtypes: WEIGHT_DTYPES.to_vec(),
            kv_dtypes: vec![DType::F32, DType::F16, DType::BF16, DType::Q8_0],
            alignment: memory::SEGMENT_ALIGN,
            can_grow_kv: arena.is_growable(),
            supports_graphs: true,
            host_memory: false,
            max_buffer_bytes: total,
            max_binding_bytes: total,
            max_top_k: MAX_TOP_K,
            kv_commit_granularity: arena.granularity(),
        };
        Ok(CudaBackend {
            dev,
            kernels,
            registry,
            allocator,
            arena,
            graphs,
            pinned: Arc::new(PinnedRanges::default()),
            scratch,
            scratch_lock: std::sync::Mutex::new(()),
            sm_count,
            info,
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// The KV arena allocator (VMM or fixed).
    pub fn arena(&self) -> &KvArena {
        &self.arena
    }

    /// The pool's raw allocator (live segment counts and bytes).
    pub fn allocator(&self) -> &Arc<DeviceAllocator> {
        &self.allocator
    }

    /// Seconds NVRTC spent compiling at start (0 when all kernels were cached).
    pub fn compile_seconds(&self) -> f64 {
        self.kernels.compile_seconds
    }

    /// Device bytes held outside the pool and the arenas (scratch and attention partials).
    pub fn own_device_bytes(&self) -> u64 {
        OWN_DEVICE_BYTES
    }

    /// Split attention's partials (ATTN_PARTIAL_BYTES); used under [`Self::lock_scratch`].
    pub(crate) fn attn_partials(&self) -> u64 {
        self.scratch + SCRATCH_BYTES
    }

    /// Split attention's arrival counters (ATTN_COUNTER_BYTES, zero between launches).
    pub(crate) fn attn_counters(&self) -> u64 {
        self.scratch + SCRATCH_BYTES + ATTN_PARTIAL_BYTES
    }

    /// Makes chunk maps of the KV arena fault sites of `faults`.
    pub fn set_faults(&self, faults: Option<FaultInjector>) {
        self.arena.set_faults(faults);
    }

    /// Live device ranges (pool segments and arena reservations).
    pub fn live_ranges(&self) -> usize {
        self.registry.len()
    }

    pub(crate) fn stream(&self) -> cu::CUstream {
        self.dev.stream()
    }

    pub(crate) fn func(&self, name: &'static str) -> Result<cu::CUfunction> {
        self.kernels.get(name)
    }

    /// Streaming multiprocessors of the device.
    pub(crate) fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The most blocks of kernel `name` the whole device holds at once (a persistent grid).
    pub(crate) fn device_blocks(&self, name: &'static str, threads: u32, smem: u32) -> Result<u32> {
        Ok(self.sm_count * self.kernels.resident_blocks(name, threads, smem)?)
    }

    /// The device address of `b` after checking it holds `need` bytes inside
    /// live device memory, aligned to `align`. 0 for a zero-byte need.
    pub(crate) fn ptr(&self, b: BufRef, need: u64, align: u64, op: &'static str) -> Result<u64> {
        if need > b.bytes {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!(
                    "buffer of {} bytes is too small ({need} bytes needed)",
                    b.bytes
                ),
            });
        }
        if need == 0 {
            return Ok(b.addr);
        }
        if !self.registry.contains(b.addr, need) {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!("{b:?} is not live device memory of this backend"),
            });
        }
        if !b.addr.is_multiple_of(align.max(1)) {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!("{b:?} is not {align}-byte aligned"),
            });
        }
        Ok(b.addr)
    }

    /// `ptr` for `len` f32 / u32 elements.
    pub(crate) fn ptr32(&self, b: BufRef, len: usize, op: &'static str) -> Result<u64> {
        self.ptr(b, len as u64 * 4, 4, op)
    }

    /// The piece bases of a layer arena, each checked to be a live range
    /// holding its pages.
    pub(crate) fn pieces(&self, cache: &KvLayerRef<'_>, op: &'static str) -> Result<KvPieces> {
        if cache.pieces.is_empty() || cache.pieces.len() > MAX_KV_PIECES {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!(
                    "{} arena pieces (1 ..= {MAX_KV_PIECES})",
                    cache.pieces.len()
                ),
            });
        }
        let mut p = KvPieces {
            base: [0; MAX_KV_PIECES],
        };
        for (i, b) in cache.pieces.iter().enumerate() {
            p.base[i] = self.ptr(*b, b.bytes, 4, op)?;
        }
        self.ptr32(cache.page_table, cache.layout.num_pages * 2, op)?;
        Ok(p)
    }

    /// Holds the scratch buffer until the kernels reading it are enqueued.
    pub(crate) fn lock_scratch(&self) -> std::sync::MutexGuard<'_, ()> {
        self.scratch_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes a pattern over `[offset, offset + bytes)` of a committed arena
    /// range, reads it back on the device and returns the number of 4-byte
    /// words that differ (0 when every byte is readable and writable), as the
    /// CPU arena's `check_committed` does (`kernels/kv_arena.cu`).
    pub fn check_committed(
        &self,
        range: RawSegment,
        offset: u64,
        bytes: u64,
        seed: u32,
    ) -> Result<u64> {
        const OP: &str = "check_committed";
        if bytes == 0 {
            return Ok(0);
        }
        if offset.checked_add(bytes).is_none_or(|e| e > range.bytes)
            || !offset.is_multiple_of(4)
            || !bytes.is_multiple_of(4)
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                detail: format!("range {offset}+{bytes} of {range:?}"),
            });
        }
        let addr = range.addr + offset;
        let words = bytes / 4;
        let grid = (words.div_ceil(256).min(4096)) as u32;
        let _g = self.lock_scratch();
        let counter = self.to_scratch(&0u32.to_le_bytes())?;
        args::Args::new().arg(addr).arg(words).arg(seed).launch(
            OP,
            self.func("fill_words")?,
            (grid, 1, 1),
            256,
            0,
            self.stream(),
        )?;
        args::Args::new()
            .arg(addr)
            .arg(words)
            .arg(seed)
            .arg(counter)
            .launch(
                OP,
                self.func("check_words")?,
                (grid, 1, 1),
                256,
                0,
                self.stream(),
            )?;
        let mut bad = [0u8; 4];
        // SAFETY: counter is the scratch buffer's first word; synchronised below before reading.
        check("cuMemcpyDtoHAsync", unsafe {
            cu::cuMemcpyDtoHAsync_v2(bad.as_mut_ptr() as *mut _, counter, 4, self.stream())
        })?;
        self.dev.synchronize()?;
        Ok(u32::from_le_bytes(bad) as u64)
    }

    /// Uploads a small host array into the scratch buffer (stream-ordered, so
    /// the next upload waits for the kernels that read this one). The caller
    /// holds [`Self::lock_scratch`] until those kernels are enqueued.
    pub(crate) fn to_scratch(&self, bytes: &[u8]) -> Result<u64> {
        if bytes.len() as u64 > SCRATCH_BYTES {
            return Err(BackendError::InvalidArgument {
                op: "scratch",
                detail: format!(
                    "{} bytes above the {SCRATCH_BYTES}-byte scratch",
                    bytes.len()
                ),
            });
        }
        // SAFETY: scratch holds SCRATCH_BYTES; the pageable source is staged by the driver before this returns.
        check("cuMemcpyHtoDAsync", unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                self.scratch,
                bytes.as_ptr() as *const _,
                bytes.len(),
                self.stream(),
            )
        })?;
        Ok(self.scratch)
    }

    /// Zeroes the first `bytes` (a multiple of 4) of the scratch buffer on the stream and
    /// returns its address. The caller holds [`Self::lock_scratch`] until the kernels that
    /// use it are enqueued.
    pub(crate) fn zeroed_scratch(&self, bytes: u64) -> Result<u64> {
        if bytes > SCRATCH_BYTES || !bytes.is_multiple_of(4) {
            return Err(BackendError::InvalidArgument {
                op: "scratch",
                detail: format!("{bytes} bytes: not words within the {SCRATCH_BYTES}-byte scratch"),
            });
        }
        // SAFETY: scratch holds SCRATCH_BYTES >= bytes; the memset is stream-ordered.
        check("cuMemsetD32Async", unsafe {
            cu::cuMemsetD32Async(self.scratch, 0, (bytes / 4) as usize, self.stream())
        })?;
        Ok(self.scratch)
    }

    fn same_len(op: &'static str, a: u64, b: u64) -> Result<()> {
        if a != b {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!("{a} bytes for a {b}-byte buffer"),
            });
        }
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.dev.synchronize();
        // SAFETY: the scratch buffer was allocated in `new` and is freed once, the stream idle.
        unsafe { cu::cuMemFree_v2(self.scratch) };
    }
}

/// Bytes of a matmul / embedding weight of `(rows, cols)` in `dtype`.
pub(crate) fn weight_bytes(
    op: &'static str,
    dtype: DType,
    rows: usize,
    cols: usize,
) -> Result<u64> {
    dtype
        .row_bytes(cols)
        .map(|r| r as u64 * rows as u64)
        .ok_or_else(|| BackendError::InvalidArgument {
            op,
            detail: format!("{cols} columns is not a multiple of the {dtype} block"),
        })
}

/// The weight types the kernels compute with: every GGUF weight type the CPU has.
pub const WEIGHT_DTYPES: [DType; 11] = DType::WEIGHT_TYPES;

/// The kernels' code of a dtype (`kernels/common.cuh`'s `DT_*`).
pub(crate) fn dtype_code(op: &'static str, dtype: DType) -> Result<i32> {
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
        DType::U32 => {
            return Err(BackendError::Unsupported {
                op,
                dtype: dtype.to_string(),
            });
        }
    })
}

impl Backend for CudaBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn memory(&self) -> Result<DeviceMemory> {
        let (total_bytes, free_bytes) = memory::mem_info(&self.dev)?;
        Ok(DeviceMemory {
            total_bytes,
            free_bytes,
        })
    }

    fn raw_allocator(&self) -> Arc<dyn RawAllocator> {
        self.allocator.clone()
    }

    fn graph_memory_bytes(&self, input: &GraphPlanInput) -> u64 {
        graph::planned_graph_bytes(input)
    }

    fn upload(&self, dst: BufRef, src: &[u8]) -> Result<()> {
        Self::same_len("upload", src.len() as u64, dst.bytes)?;
        if src.is_empty() {
            return Ok(());
        }
        let d = self.ptr(dst, dst.bytes, 1, "upload")?;
        self.dev.bind()?;
        // SAFETY: d holds src.len() bytes (checked); a pageable source is staged by the driver before the call returns.
        check("cuMemcpyHtoDAsync", unsafe {
            cu::cuMemcpyHtoDAsync_v2(d, src.as_ptr() as *const _, src.len(), self.stream())
        })?;
        if self.pinned.overlaps(src.as_ptr() as usize, src.len()) {
            // From pinned memory the copy is a DMA still in flight: wait, so
            // the caller may reuse the source.
            self.dev.synchronize()?;
        }
        Ok(())
    }

    fn download(&self, src: BufRef, dst: &mut [u8]) -> Result<()> {
        Self::same_len("download", dst.len() as u64, src.bytes)?;
        if dst.is_empty() {
            return Ok(());
        }
        let s = self.ptr(src, src.bytes, 1, "download")?;
        self.dev.bind()?;
        // SAFETY: s holds dst.len() bytes (checked); the stream is synchronised before dst is read.
        check("cuMemcpyDtoHAsync", unsafe {
            cu::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut _, s, dst.len(), self.stream())
        })?;
        self.dev.synchronize()
    }

    fn copy(&self, src: BufRef, dst: BufRef) -> Result<()> {
        Self::same_len("copy", src.bytes, dst.bytes)?;
        if src.bytes == 0 {
            return Ok(());
        }
        let s = self.ptr(src, src.bytes, 1, "copy")?;
        let d = self.ptr(dst, dst.bytes, 1, "copy")?;
        if s < d + dst.bytes && d < s + src.bytes {
            return Err(BackendError::InvalidArgument {
                op: "copy",
                detail: "source and destination overlap".into(),
            });
        }
        self.dev.bind()?;
        // SAFETY: both ranges are live device memory of src.bytes bytes (checked).
        check("cuMemcpyDtoDAsync", unsafe {
            cu::cuMemcpyDtoDAsync_v2(d, s, src.bytes as usize, self.stream())
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn graphs(&self) -> Option<&dyn GraphOps> {
        Some(&self.graphs)
    }

    fn prepared_weight_bytes(&self, dtype: DType, rows: usize, cols: usize) -> Option<u64> {
        // Quantized blocks are split into quants and scales (weight_layout.rs), same size.
        weight_bytes("prepared_weight_bytes", dtype, rows, cols).ok()
    }

    fn upload_weight(
        &self,
        dst: BufRef,
        src: &[u8],
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let want = weight_bytes("upload_weight", dtype, rows, cols)?;
        Self::same_len("upload_weight", src.len() as u64, want)?;
        match weight_layout::repack(dtype, src) {
            Some(packed) => self.upload(dst, &packed),
            None => self.upload(dst, src),
        }
    }

    fn attach_faults(&self, faults: &FaultInjector) {
        self.arena.set_faults(Some(faults.clone()));
    }

    fn alloc_host(&self, bytes: usize) -> Result<Box<dyn HostBuffer>> {
        Ok(Box::new(PinnedBuffer::new(
            self.dev.clone(),
            self.pinned.clone(),
            bytes,
        )?))
    }
}

impl KvArenaOps for CudaBackend {
    fn reserve(&self, bytes: u64) -> Result<RawSegment> {
        self.arena.reserve(bytes)
    }
    fn commit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        self.arena.commit(range, offset, bytes)
    }
    fn decommit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        self.arena.decommit(range, offset, bytes)
    }
    fn committed_bytes(&self, range: RawSegment) -> u64 {
        self.arena.committed_bytes(range)
    }
    fn unreserve(&self, range: RawSegment) {
        self.arena.unreserve(range)
    }
}
