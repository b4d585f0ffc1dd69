//! Page-locked host memory (`cuMemHostAlloc`) for the engine's KV swap tier:
//! device ↔ host copies of swapped pages run as DMA transfers.
//!
//! A copy from pinned memory is asynchronous in the driver, so
//! [`crate::CudaBackend::upload`] waits for it when the source lies in a
//! pinned buffer (the contract: the source has been read when upload returns).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys as cu;
use pagoda_backend::{HostBuffer, MemoryTag, Result};

use crate::device::Device;
use crate::driver::check_alloc;

/// Live pinned ranges (host address → bytes).
#[derive(Debug, Default)]
pub(crate) struct PinnedRanges(Mutex<BTreeMap<usize, usize>>);

impl PinnedRanges {
    /// Whether `[ptr, ptr + len)` overlaps a pinned buffer.
    pub(crate) fn overlaps(&self, ptr: usize, len: usize) -> bool {
        let m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        m.range(..ptr.saturating_add(len.max(1)))
            .next_back()
            .is_some_and(|(&a, &n)| a + n > ptr)
    }

    fn insert(&self, ptr: usize, len: usize) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ptr, len);
    }

    fn remove(&self, ptr: usize) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ptr);
    }
}

/// A zeroed, page-locked host buffer.
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    dev: Arc<Device>,
    ranges: Arc<PinnedRanges>,
}

// SAFETY: the buffer is plain host memory owned by this value.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access is read-only through `as_slice`.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub(crate) fn new(dev: Arc<Device>, ranges: Arc<PinnedRanges>, len: usize) -> Result<Self> {
        dev.bind()?;
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        if len > 0 {
            // SAFETY: writes one host pointer; CU_MEMHOSTALLOC_PORTABLE = 1.
            let r = unsafe { cu::cuMemHostAlloc(&mut p, len, 1) };
            check_alloc("cuMemHostAlloc", r, MemoryTag::Kv, len as u64)?;
            // SAFETY: p points to len writable bytes just allocated.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0, len) };
            ranges.insert(p as usize, len);
        }
        Ok(PinnedBuffer {
            ptr: p as *mut u8,
            len,
            dev,
            ranges,
        })
    }
}

impl HostBuffer for PinnedBuffer {
    fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr holds len initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as above, borrowed mutably through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn is_pinned(&self) -> bool {
        true
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        self.ranges.remove(self.ptr as usize);
        // Copies into or out of the buffer may still be queued.
        let _ = self.dev.synchronize();
        // SAFETY: allocated by cuMemHostAlloc, freed once, no copy pending.
        unsafe { cu::cuMemFreeHost(self.ptr as *mut _) };
    }
}
