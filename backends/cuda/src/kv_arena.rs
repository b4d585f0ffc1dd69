//! Growable KV arena pieces: CUDA virtual memory management (the vAttention
//! idea) behind the contract's [`KvArenaOps`](pagoda_backend::KvArenaOps).
//!
//! - `reserve` takes virtual address space only (`cuMemAddressReserve`);
//! - `commit` maps physical chunks of the granularity (2 MiB on the H200):
//!   `cuMemCreate` → `cuMemMap` → `cuMemSetAccess` (descriptors zeroed, then
//!   filled), then zeroes the range on the stream;
//! - `decommit` waits for the stream, then `cuMemUnmap` → `cuMemRelease`;
//! - `unreserve` unmaps and releases what is mapped, then `cuMemAddressFree`.
//!
//! Every map and unmap happens under one lock (the arena's state mutex), so
//! concurrent commits never race on the same addresses. A failure part way
//! through a commit undoes what that commit mapped (unmap → release, in that
//! order) and leaves the range uncommitted; each chunk map is a fault site of
//! the injector given with [`KvArena::set_faults`] (`cuda chunk map`).
//!
//! Where VMM is unsupported, or `PAGODA_CUDA_VMM=0` is set, the arena is
//! *fixed*: `reserve` allocates the whole range with `cuMemAlloc` and
//! commit/decommit only track (and zero) granules, so device memory does not
//! follow load; [`KvArena::is_growable`] says which.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys as cu;
use pagoda_backend::{BackendError, FaultInjector, MemoryTag, RawSegment, Result};

use crate::device::Device;
use crate::driver::{check, check_alloc};
use crate::memory::Registry;

/// Environment variable that forces the fixed (non-VMM) arena when `0`.
pub const VMM_ENV: &str = "PAGODA_CUDA_VMM";

/// One reservation and the handle of each mapped chunk.
struct Reservation {
    seg: RawSegment,
    /// One entry per granule: the physical handle (VMM) or 1 (fixed) when
    /// committed, 0 when not.
    chunks: Vec<cu::CUmemGenericAllocationHandle>,
}

struct State {
    reservations: HashMap<u64, Reservation>,
}

/// The arena allocator of one device.
pub struct KvArena {
    dev: Arc<Device>,
    registry: Arc<Registry>,
    vmm: bool,
    granularity: u64,
    prop: cu::CUmemAllocationProp,
    access: cu::CUmemAccessDesc,
    state: Mutex<State>,
    faults: Mutex<Option<FaultInjector>>,
    /// Physical bytes committed (VMM) or allocated (fixed) over all reservations.
    physical: AtomicU64,
}

// SAFETY: the raw descriptors are plain data; every use of the driver handles is under `state`'s lock.
unsafe impl Send for KvArena {}
// SAFETY: as above.
unsafe impl Sync for KvArena {}

fn bad(op: &'static str, detail: String) -> BackendError {
    BackendError::InvalidArgument { op, detail }
}

impl KvArena {
    /// The arena of `dev`: VMM when the device supports it and `PAGODA_CUDA_VMM`
    /// is not `0`, else fixed.
    pub(crate) fn new(dev: Arc<Device>, registry: Arc<Registry>) -> Result<KvArena> {
        let forced_off = std::env::var(VMM_ENV).is_ok_and(|v| v.trim() == "0");
        let supported = dev.attribute(
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
        )? != 0;
        // SAFETY: an all-zero descriptor is the documented starting point; the fields that matter are set below.
        let mut prop: cu::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = cu::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = cu::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = dev.ordinal as i32;
        // SAFETY: as above.
        let mut access: cu::CUmemAccessDesc = unsafe { std::mem::zeroed() };
        access.location = prop.location;
        access.flags = cu::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        let vmm = supported && !forced_off;
        let mut granularity: usize = 2 << 20;
        if vmm {
            dev.bind()?;
            // SAFETY: prop is initialised; writes one size.
            let r = unsafe {
                cu::cuMemGetAllocationGranularity(
                    &mut granularity,
                    &prop,
                    cu::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                )
            };
            check("cuMemGetAllocationGranularity", r)?;
        }
        Ok(KvArena {
            dev,
            registry,
            vmm,
            granularity: granularity as u64,
            prop,
            access,
            state: Mutex::new(State {
                reservations: HashMap::new(),
            }),
            faults: Mutex::new(None),
            physical: AtomicU64::new(0),
        })
    }

    /// Whether commits map memory on demand (VMM) rather than within a fixed allocation.
    pub fn is_growable(&self) -> bool {
        self.vmm
    }

    /// Commit granularity in bytes.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Physical device bytes behind all reservations now.
    pub fn physical_bytes(&self) -> u64 {
        self.physical.load(Ordering::SeqCst)
    }

    /// Reservations alive now.
    pub fn num_reservations(&self) -> usize {
        self.lock().reservations.len()
    }

    /// Makes every chunk map a fault site of `faults` (`cuda chunk map`).
    pub fn set_faults(&self, faults: Option<FaultInjector>) {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner) = faults;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fault_check(&self) -> Result<()> {
        match &*self.faults.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(f) => f.check("cuda chunk map"),
            None => Ok(()),
        }
    }

    pub(crate) fn reserve(&self, bytes: u64) -> Result<RawSegment> {
        if bytes == 0 || !bytes.is_multiple_of(self.granularity) {
            return Err(bad(
                "reserve",
                format!(
                    "{bytes} bytes is not a positive multiple of {}",
                    self.granularity
                ),
            ));
        }
        self.dev.bind()?;
        let mut va: cu::CUdeviceptr = 0;
        if self.vmm {
            // SAFETY: writes one address; reserves address space only.
            let r = unsafe {
                cu::cuMemAddressReserve(&mut va, bytes as usize, self.granularity as usize, 0, 0)
            };
            check_alloc("cuMemAddressReserve", r, MemoryTag::Kv, bytes)?;
        } else {
            // SAFETY: writes one device pointer.
            let r = unsafe { cu::cuMemAlloc_v2(&mut va, bytes as usize) };
            check_alloc("cuMemAlloc (fixed KV arena)", r, MemoryTag::Kv, bytes)?;
            self.physical.fetch_add(bytes, Ordering::SeqCst);
        }
        let seg = self.registry.add(va, bytes);
        let chunks = vec![0; (bytes / self.granularity) as usize];
        self.lock()
            .reservations
            .insert(va, Reservation { seg, chunks });
        Ok(seg)
    }

    /// Granule range of `[offset, offset + bytes)` of `range`, checked.
    fn granules(
        &self,
        op: &'static str,
        res: &Reservation,
        offset: u64,
        bytes: u64,
    ) -> Result<std::ops::Range<usize>> {
        let g = self.granularity;
        if !offset.is_multiple_of(g) || !bytes.is_multiple_of(g) {
            return Err(bad(
                op,
                format!("offset {offset} / size {bytes} not multiples of {g}"),
            ));
        }
        if offset
            .checked_add(bytes)
            .is_none_or(|end| end > res.seg.bytes)
        {
            return Err(bad(
                op,
                format!("range {offset}+{bytes} outside {} bytes", res.seg.bytes),
            ));
        }
        Ok((offset / g) as usize..((offset + bytes) / g) as usize)
    }

    /// Maps one chunk at `addr`; on failure nothing stays mapped or allocated.
    fn map_chunk(&self, addr: u64) -> Result<cu::CUmemGenericAllocationHandle> {
        self.fault_check()?;
        let g = self.granularity as usize;
        let mut handle: cu::CUmemGenericAllocationHandle = 0;
        // SAFETY: prop is fully initialised; writes one handle.
        let r = unsafe { cu::cuMemCreate(&mut handle, g, &self.prop, 0) };
        check_alloc("cuMemCreate", r, MemoryTag::Kv, g as u64)?;
        // SAFETY: addr is a granule of a live reservation with nothing mapped there (checked under the lock by the caller); handle is g bytes.
        let r = unsafe { cu::cuMemMap(addr, g, 0, handle, 0) };
        if let Err(e) = check("cuMemMap", r) {
            // SAFETY: the handle was created above and is not mapped.
            unsafe { cu::cuMemRelease(handle) };
            return Err(e);
        }
        // SAFETY: the access descriptor is fully initialised; the range is mapped.
        let r = unsafe { cu::cuMemSetAccess(addr, g, &self.access, 1) };
        if let Err(e) = check("cuMemSetAccess", r) {
            self.unmap_chunk(addr, handle);
            return Err(e);
        }
        Ok(handle)
    }

    /// Unmaps and releases one chunk: unmap, then release the handle (the
    /// clean-up order). Nothing queued touches it (the caller synchronised,
    /// or the chunk was never used).
    fn unmap_chunk(&self, addr: u64, handle: cu::CUmemGenericAllocationHandle) {
        // SAFETY: the chunk at addr is mapped with `handle` and no queued work touches it.
        unsafe { cu::cuMemUnmap(addr, self.granularity as usize) };
        // SAFETY: the handle is no longer mapped anywhere; released once.
        unsafe { cu::cuMemRelease(handle) };
    }

    pub(crate) fn commit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        self.dev.bind()?;
        let mut st = self.lock();
        let res = st
            .reservations
            .get_mut(&range.addr)
            .ok_or_else(|| bad("commit", format!("{range:?} is not a reservation")))?;
        let gr = self.granules("commit", res, offset, bytes)?;
        if let Some(i) = gr.clone().find(|&i| res.chunks[i] != 0) {
            return Err(bad(
                "commit",
                format!("granule {i} of {range:?} is already committed"),
            ));
        }
        let g = self.granularity;
        for i in gr.clone() {
            let addr = range.addr + i as u64 * g;
            let mapped = if self.vmm {
                self.map_chunk(addr)
            } else {
                self.fault_check().map(|()| 1)
            };
            match mapped {
                Ok(handle) => {
                    res.chunks[i] = handle;
                    if self.vmm {
                        self.physical.fetch_add(g, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    // Undo this commit's chunks, newest first.
                    self.dev.synchronize()?;
                    for j in (gr.start..i).rev() {
                        let h = std::mem::replace(&mut res.chunks[j], 0);
                        if self.vmm {
                            self.unmap_chunk(range.addr + j as u64 * g, h);
                            self.physical.fetch_sub(g, Ordering::SeqCst);
                        }
                    }
                    return Err(e);
                }
            }
        }
        // Committed memory reads as zeros.
        // SAFETY: the range is mapped (or allocated) and the memset is ordered on the stream before every later op.
        let r = unsafe {
            cu::cuMemsetD8Async(range.addr + offset, 0, bytes as usize, self.dev.stream())
        };
        check("cuMemsetD8Async", r)
    }

    pub(crate) fn decommit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        self.dev.bind()?;
        let mut st = self.lock();
        let res = st
            .reservations
            .get_mut(&range.addr)
            .ok_or_else(|| bad("decommit", format!("{range:?} is not a reservation")))?;
        let gr = self.granules("decommit", res, offset, bytes)?;
        if let Some(i) = gr.clone().find(|&i| res.chunks[i] == 0) {
            return Err(bad(
                "decommit",
                format!("granule {i} of {range:?} is not committed"),
            ));
        }
        // Queued work may still read the chunks: wait before unmapping.
        self.dev.synchronize()?;
        let g = self.granularity;
        for i in gr {
            let h = std::mem::replace(&mut res.chunks[i], 0);
            if self.vmm {
                self.unmap_chunk(range.addr + i as u64 * g, h);
                self.physical.fetch_sub(g, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    pub(crate) fn committed_bytes(&self, range: RawSegment) -> u64 {
        self.lock().reservations.get(&range.addr).map_or(0, |r| {
            r.chunks.iter().filter(|&&h| h != 0).count() as u64 * self.granularity
        })
    }

    pub(crate) fn unreserve(&self, range: RawSegment) {
        let _ = self.dev.bind();
        let mut st = self.lock();
        let Some(res) = st.reservations.remove(&range.addr) else {
            return;
        };
        self.release(res);
    }

    /// unmap → release every mapped chunk, then free the address range.
    fn release(&self, mut res: Reservation) {
        let _ = self.dev.synchronize();
        let g = self.granularity;
        self.registry.remove(res.seg.addr);
        if self.vmm {
            for (i, h) in res.chunks.iter_mut().enumerate() {
                if *h != 0 {
                    self.unmap_chunk(res.seg.addr + i as u64 * g, std::mem::replace(h, 0));
                    self.physical.fetch_sub(g, Ordering::SeqCst);
                }
            }
            // SAFETY: nothing is mapped in the range any more; freed once.
            unsafe { cu::cuMemAddressFree(res.seg.addr, res.seg.bytes as usize) };
        } else {
            // SAFETY: the fixed arena's allocation, freed once after the stream is idle.
            unsafe { cu::cuMemFree_v2(res.seg.addr) };
            self.physical.fetch_sub(res.seg.bytes, Ordering::SeqCst);
        }
    }
}

impl Drop for KvArena {
    fn drop(&mut self) {
        let _ = self.dev.bind();
        let all: Vec<Reservation> = self.lock().reservations.drain().map(|(_, r)| r).collect();
        for r in all {
            self.release(r);
        }
    }
}
