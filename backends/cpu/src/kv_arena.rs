//! Growable KV arena pieces in host memory ([`KvArenaOps`] for the CPU).
//!
//! A reservation is one anonymous private mapping (`mmap`, `MAP_NORESERVE`):
//! address space only, no RAM until a page is touched. *Commit* marks
//! granules usable and counts them; *decommit* gives their RAM back to the
//! OS at once (`madvise(MADV_DONTNEED)`, after which they read as zeros) —
//! the CPU's equivalent of mapping and unmapping 2 MiB VMM chunks on CUDA.
//! The mapping stays readable and writable throughout (so views of it are
//! always valid memory), but ops check that the K/V rows they write lie in
//! committed granules ([`HostMemory::check_committed`]): a write to
//! uncommitted KV memory is an error, as it would be a fault on a GPU.
//!
//! All state changes happen under one mutex (the CUDA backend's rule for
//! VMM mapping: one lock, never two threads mapping the same range).

use std::sync::atomic::Ordering;

use pagoda_backend::{BackendError, KvArenaOps, MemoryTag, RawSegment, Result, SegmentId};

use crate::HostMemory;

/// Commit granularity of CPU arenas (64 KiB).
pub const GRANULE_BYTES: u64 = 64 << 10;

/// One reservation.
#[derive(Debug)]
pub(crate) struct Arena {
    pub(crate) addr: u64,
    bytes: u64,
    /// One flag per granule.
    committed: Vec<bool>,
    num_committed: usize,
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `addr .. addr + bytes` is exactly the mapping made in `reserve`, unmapped once (the arena is dropped once).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.bytes as usize) };
    }
}

fn invalid(op: &'static str, detail: String) -> BackendError {
    BackendError::InvalidArgument { op, detail }
}

impl HostMemory {
    fn arenas(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<SegmentId, Arena>> {
        self.arenas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails unless `[addr, addr + len)` lies in committed granules of an
    /// arena (or outside every arena: a pool segment).
    pub fn check_committed(&self, segment: Option<SegmentId>, addr: u64, len: u64) -> Result<()> {
        let Some(id) = segment else { return Ok(()) };
        if len == 0 {
            return Ok(());
        }
        let arenas = self.arenas();
        let Some(a) = arenas.get(&id) else {
            return Ok(());
        };
        let (g0, g1) = (
            (addr - a.addr) / GRANULE_BYTES,
            (addr - a.addr + len).div_ceil(GRANULE_BYTES),
        );
        if (g0..g1).all(|g| a.committed.get(g as usize).copied().unwrap_or(false)) {
            Ok(())
        } else {
            Err(invalid(
                "kv write",
                format!(
                    "bytes {}..{} of KV arena piece {id:?} are not committed",
                    addr - a.addr,
                    addr - a.addr + len
                ),
            ))
        }
    }

    fn granules(
        a: &Arena,
        op: &'static str,
        offset: u64,
        bytes: u64,
    ) -> Result<std::ops::Range<usize>> {
        if !offset.is_multiple_of(GRANULE_BYTES)
            || !bytes.is_multiple_of(GRANULE_BYTES)
            || offset.checked_add(bytes).is_none_or(|e| e > a.bytes)
        {
            return Err(invalid(
                op,
                format!(
                    "range {offset}+{bytes} is not granule-aligned inside a {}-byte arena",
                    a.bytes
                ),
            ));
        }
        Ok((offset / GRANULE_BYTES) as usize..((offset + bytes) / GRANULE_BYTES) as usize)
    }
}

impl KvArenaOps for HostMemory {
    fn reserve(&self, bytes: u64) -> Result<RawSegment> {
        if bytes == 0 || !bytes.is_multiple_of(GRANULE_BYTES) {
            return Err(invalid(
                "reserve",
                format!("{bytes} bytes is not a positive multiple of {GRANULE_BYTES}"),
            ));
        }
        let len = usize::try_from(bytes)
            .map_err(|_| invalid("reserve", "larger than the address space".into()))?;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(BackendError::OutOfMemory {
                tag: MemoryTag::Kv,
                requested_bytes: bytes,
                detail: format!(
                    "mmap of {bytes} bytes of address space failed: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        let id = SegmentId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let addr = ptr as u64;
        let granules = (bytes / GRANULE_BYTES) as usize;
        self.arenas().insert(
            id,
            Arena {
                addr,
                bytes,
                committed: vec![false; granules],
                num_committed: 0,
            },
        );
        self.live
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, (bytes, id));
        Ok(RawSegment { id, addr, bytes })
    }

    fn commit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        let mut arenas = self.arenas();
        let a = arenas
            .get_mut(&range.id)
            .ok_or_else(|| invalid("commit", format!("{range:?} is not a KV arena")))?;
        let gs = Self::granules(a, "commit", offset, bytes)?;
        if a.committed[gs.clone()].iter().any(|&c| c) {
            return Err(invalid(
                "commit",
                format!("range {offset}+{bytes} is already (partly) committed"),
            ));
        }
        for g in gs {
            a.committed[g] = true;
            a.num_committed += 1;
        }
        Ok(())
    }

    fn decommit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        let mut arenas = self.arenas();
        let a = arenas
            .get_mut(&range.id)
            .ok_or_else(|| invalid("decommit", format!("{range:?} is not a KV arena")))?;
        let gs = Self::granules(a, "decommit", offset, bytes)?;
        if !a.committed[gs.clone()].iter().all(|&c| c) {
            return Err(invalid(
                "decommit",
                format!("range {offset}+{bytes} is not committed"),
            ));
        }
        // SAFETY: the range lies inside the mapping (checked by `granules`); MADV_DONTNEED on a private anonymous mapping drops the pages, which then read as zeros. No view of these bytes is live: ops hold the stream lock, and so does the engine's call path.
        let rc = unsafe {
            libc::madvise(
                (a.addr + offset) as *mut libc::c_void,
                bytes as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(invalid(
                "decommit",
                format!("madvise failed: {}", std::io::Error::last_os_error()),
            ));
        }
        for g in gs {
            a.committed[g] = false;
            a.num_committed -= 1;
        }
        Ok(())
    }

    fn committed_bytes(&self, range: RawSegment) -> u64 {
        self.arenas()
            .get(&range.id)
            .map_or(0, |a| a.num_committed as u64 * GRANULE_BYTES)
    }

    fn unreserve(&self, range: RawSegment) {
        let removed = self.arenas().remove(&range.id);
        if let Some(a) = removed {
            self.live
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&a.addr);
            drop(a);
        }
    }
}
