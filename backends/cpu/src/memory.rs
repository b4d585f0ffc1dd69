//! Host memory as "device" memory: raw segments for the pool, and checked
//! access from ops.
//!
//! Segments are zeroed, 64-byte aligned heap allocations. Every segment is
//! registered by base address, so an op can verify that each [`BufRef`] it is
//! given lies inside a live segment before touching it: a stale or forged
//! `BufRef` is an error, never a wild pointer.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU32, Ordering};

use pagoda_backend::{
    BackendError, BufRef, DeviceMemory, MemoryTag, RawAllocator, RawSegment, Result, SegmentId,
};

/// Alignment of every host segment.
pub const SEGMENT_ALIGN: u64 = 64;

/// Raw host segments, registered by base address.
#[derive(Debug, Default)]
pub struct HostMemory {
    pub(crate) next_id: AtomicU32,
    /// base address -> (size, id): pool segments and KV arena reservations.
    pub(crate) live: RwLock<BTreeMap<u64, (u64, SegmentId)>>,
    /// KV arena reservations (also in `live`), see [`crate::kv_arena`].
    pub(crate) arenas: std::sync::Mutex<BTreeMap<SegmentId, crate::kv_arena::Arena>>,
}

impl HostMemory {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Verifies that `[b.addr, b.addr + b.bytes)` lies inside one live segment
    /// and returns the address as a pointer. Zero-byte ranges are always valid
    /// and give a dangling, 64-byte aligned pointer.
    pub fn resolve(&self, b: BufRef, op: &'static str) -> Result<*mut u8> {
        if b.bytes == 0 {
            return Ok(std::ptr::dangling_mut::<[u64; 8]>() as *mut u8);
        }
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let ok = live
            .range(..=b.addr)
            .next_back()
            .is_some_and(|(&base, &(len, id))| {
                Some(id) == b.segment && b.addr + b.bytes <= base + len
            });
        if !ok {
            return Err(BackendError::InvalidArgument {
                op,
                detail: format!("buffer {b:?} is not inside a live CPU segment"),
            });
        }
        Ok(b.addr as *mut u8)
    }

    /// Number of live segments.
    pub fn num_segments(&self) -> usize {
        self.live.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl RawAllocator for HostMemory {
    fn alloc_segment(&self, bytes: u64) -> Result<RawSegment> {
        let oom = |detail: String| BackendError::OutOfMemory {
            tag: MemoryTag::Scratch,
            requested_bytes: bytes,
            detail,
        };
        if bytes == 0 {
            return Err(BackendError::InvalidArgument {
                op: "alloc_segment",
                detail: "zero-byte segment".into(),
            });
        }
        let size =
            usize::try_from(bytes).map_err(|_| oom("larger than the address space".into()))?;
        let layout = Layout::from_size_align(size, SEGMENT_ALIGN as usize)
            .map_err(|e| oom(format!("bad layout: {e}")))?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(oom("the host allocator returned no memory".into()));
        }
        let id = SegmentId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let addr = ptr as u64;
        self.live
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, (bytes, id));
        Ok(RawSegment { id, addr, bytes })
    }

    fn free_segment(&self, segment: RawSegment) {
        let removed = self
            .live
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&segment.addr);
        if let Some((bytes, id)) = removed {
            debug_assert_eq!(id, segment.id, "segment id mismatch on free");
            // `bytes` and the alignment made a valid layout when the segment was allocated.
            if let Ok(layout) = Layout::from_size_align(bytes as usize, SEGMENT_ALIGN as usize) {
                // SAFETY: `segment.addr` came from `alloc_zeroed(layout)` with this exact layout and was still registered, so it is freed exactly once.
                unsafe { dealloc(segment.addr as *mut u8, layout) };
            }
        }
    }

    fn alignment(&self) -> u64 {
        SEGMENT_ALIGN
    }

    fn wait_idle(&self) -> Result<()> {
        // Ops run synchronously under the stream lock: nothing is ever queued.
        Ok(())
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        let arenas = std::mem::take(self.arenas.get_mut().unwrap_or_else(|e| e.into_inner()));
        let mut live = std::mem::take(self.live.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (_, arena) in arenas {
            live.remove(&arena.addr);
            drop(arena);
        }
        for (addr, (bytes, _)) in live {
            if let Ok(layout) = Layout::from_size_align(bytes as usize, SEGMENT_ALIGN as usize) {
                // SAFETY: every registered address came from `alloc_zeroed` with this layout.
                unsafe { dealloc(addr as *mut u8, layout) };
            }
        }
    }
}

/// Host RAM totals from `/proc/meminfo` (`MemTotal`, `MemAvailable`).
pub fn host_memory_info() -> DeviceMemory {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let total = field("MemTotal:").unwrap_or(0);
    let free = field("MemAvailable:")
        .or_else(|| field("MemFree:"))
        .unwrap_or(0);
    DeviceMemory {
        total_bytes: total,
        free_bytes: free,
    }
}
