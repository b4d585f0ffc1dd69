//! [`KvArenaOps`] without virtual memory: a reservation is one whole buffer (allocated at
//! once), a commit clears its range to zeros and books it, a decommit only books it (the
//! memory stays held until `unreserve`). So `BackendInfo::can_grow_kv` is false and the
//! memory plan counts KV at its reserved size.

use pagoda_backend::{BackendError, KvArenaOps, MemoryTag, RawSegment, Result};

use crate::{KV_GRANULE, WgpuBackend};

fn invalid(op: &'static str, detail: String) -> BackendError {
    BackendError::InvalidArgument { op, detail }
}

impl WgpuBackend {
    /// The granules `[offset, offset + bytes)` of arena `range`, checked.
    fn granules(
        range: RawSegment,
        op: &'static str,
        offset: u64,
        bytes: u64,
    ) -> Result<std::ops::Range<usize>> {
        if !offset.is_multiple_of(KV_GRANULE)
            || !bytes.is_multiple_of(KV_GRANULE)
            || offset.checked_add(bytes).is_none_or(|e| e > range.bytes)
        {
            return Err(invalid(
                op,
                format!(
                    "range {offset}+{bytes} of an arena of {} (granule {KV_GRANULE})",
                    range.bytes
                ),
            ));
        }
        Ok((offset / KV_GRANULE) as usize..((offset + bytes) / KV_GRANULE) as usize)
    }
}

impl KvArenaOps for WgpuBackend {
    fn reserve(&self, bytes: u64) -> Result<RawSegment> {
        if bytes == 0 || !bytes.is_multiple_of(KV_GRANULE) {
            return Err(invalid(
                "reserve",
                format!("{bytes} bytes is not a positive multiple of {KV_GRANULE}"),
            ));
        }
        let seg = self.shared.registry.alloc(
            &self.shared.gpu,
            bytes,
            MemoryTag::Kv,
            "pagoda KV arena piece",
        )?;
        self.shared
            .arenas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seg.addr, vec![false; (bytes / KV_GRANULE) as usize]);
        Ok(seg)
    }

    fn commit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        let gs = Self::granules(range, "commit", offset, bytes)?;
        {
            let mut arenas = self.shared.arenas.lock().unwrap_or_else(|e| e.into_inner());
            let a = arenas
                .get_mut(&range.addr)
                .ok_or_else(|| invalid("commit", format!("{range:?} is not a KV arena")))?;
            if a[gs.clone()].iter().any(|&c| c) {
                return Err(invalid(
                    "commit",
                    format!("range {offset}+{bytes} is already (partly) committed"),
                ));
            }
            a[gs].iter_mut().for_each(|c| *c = true);
        }
        if bytes > 0 {
            let seg = self
                .shared
                .registry
                .segment(range.addr)
                .ok_or_else(|| invalid("commit", format!("{range:?} is not live")))?;
            self.shared
                .record(|enc| enc.clear_buffer(&seg.buffer, offset, Some(bytes)));
        }
        Ok(())
    }

    fn decommit(&self, range: RawSegment, offset: u64, bytes: u64) -> Result<()> {
        let gs = Self::granules(range, "decommit", offset, bytes)?;
        let mut arenas = self.shared.arenas.lock().unwrap_or_else(|e| e.into_inner());
        let a = arenas
            .get_mut(&range.addr)
            .ok_or_else(|| invalid("decommit", format!("{range:?} is not a KV arena")))?;
        if !a[gs.clone()].iter().all(|&c| c) {
            return Err(invalid(
                "decommit",
                format!("range {offset}+{bytes} is not committed"),
            ));
        }
        a[gs].iter_mut().for_each(|c| *c = false);
        Ok(())
    }

    fn committed_bytes(&self, range: RawSegment) -> u64 {
        self.shared
            .arenas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&range.addr)
            .map_or(0, |a| a.iter().filter(|&&c| c).count() as u64 * KV_GRANULE)
    }

    fn unreserve(&self, range: RawSegment) {
        let removed = self
            .shared
            .arenas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&range.addr);
        if removed.is_some() {
            // Work queued on the piece finishes first (the buffer is destroyed after).
            let _ = self.shared.synchronize();
            self.shared.registry.free(range.addr);
        }
    }
}
