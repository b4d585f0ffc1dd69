//! Raw device memory: segments from `cuMemAlloc` for the engine's pool, and
//! the registry of every live device range (pool segments and KV arena
//! reservations) that ops check their arguments against, so a stale or
//! foreign address is an error value, never a device fault.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys as cu;
use pagoda_backend::{BackendError, MemoryTag, RawAllocator, RawSegment, Result, SegmentId};

use crate::device::Device;
use crate::driver::{check, check_alloc};

/// Every pool segment and arena reservation of one backend, by base address.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next_id: AtomicU32,
    /// base address -> (id, bytes)
    ranges: Mutex<BTreeMap<u64, (SegmentId, u64)>>,
}

impl Registry {
    pub(crate) fn add(&self, addr: u64, bytes: u64) -> RawSegment {
        let id = SegmentId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.lock().insert(addr, (id, bytes));
        RawSegment { id, addr, bytes }
    }

    pub(crate) fn remove(&self, addr: u64) {
        self.lock().remove(&addr);
    }

    /// Whether `[addr, addr + bytes)` lies inside one live range.
    pub(crate) fn contains(&self, addr: u64, bytes: u64) -> bool {
        let map = self.lock();
        match map.range(..=addr).next_back() {
            Some((&base, &(_, len))) => {
                addr.checked_add(bytes).is_some_and(|end| end <= base + len)
            }
            None => false,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (SegmentId, u64)>> {
        self.ranges.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The [`RawAllocator`] of the CUDA backend: one `cuMemAlloc` per segment.
pub struct DeviceAllocator {
    dev: Arc<Device>,
    registry: Arc<Registry>,
    live_bytes: AtomicU64,
    live_segments: AtomicU64,
}

impl DeviceAllocator {
    pub(crate) fn new(dev: Arc<Device>, registry: Arc<Registry>) -> Self {
        DeviceAllocator {
            dev,
            registry,
            live_bytes: AtomicU64::new(0),
            live_segments: AtomicU64::new(0),
        }
    }

    /// Bytes of device memory held in pool segments right now.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::SeqCst)
    }

    /// Pool segments alive right now.
    pub fn live_segments(&self) -> u64 {
        self.live_segments.load(Ordering::SeqCst)
    }
}

/// Alignment of every segment (the driver's is 256 bytes or more).
pub const SEGMENT_ALIGN: u64 = 256;

impl RawAllocator for DeviceAllocator {
    fn alloc_segment(&self, bytes: u64) -> Result<RawSegment> {
        if bytes == 0 {
            return Err(BackendError::InvalidArgument {
                op: "alloc_segment",
                detail: "zero-byte segments are handled by the pool".into(),
            });
        }
        self.dev.bind()?;
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: writes one device pointer; the context is current.
        let r = unsafe { cu::cuMemAlloc_v2(&mut ptr, bytes as usize) };
        check_alloc("cuMemAlloc", r, MemoryTag::Scratch, bytes)?;
        self.live_bytes.fetch_add(bytes, Ordering::SeqCst);
        self.live_segments.fetch_add(1, Ordering::SeqCst);
        Ok(self.registry.add(ptr, bytes))
    }

    fn free_segment(&self, segment: RawSegment) {
        self.registry.remove(segment.addr);
        if self.dev.bind().is_ok() {
            // SAFETY: the pool frees each segment once, after wait_idle, with no live block in it.
            unsafe { cu::cuMemFree_v2(segment.addr) };
        }
        self.live_bytes.fetch_sub(segment.bytes, Ordering::SeqCst);
        self.live_segments.fetch_sub(1, Ordering::SeqCst);
    }

    fn wait_idle(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn alignment(&self) -> u64 {
        SEGMENT_ALIGN
    }
}

/// Device total and free bytes (`cuMemGetInfo`).
pub(crate) fn mem_info(dev: &Device) -> Result<(u64, u64)> {
    dev.bind()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: writes two sizes; the context is current.
    let r = unsafe { cu::cuMemGetInfo_v2(&mut free, &mut total) };
    check("cuMemGetInfo", r)?;
    Ok((total as u64, free as u64))
}
