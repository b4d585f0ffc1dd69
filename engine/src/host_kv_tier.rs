//! The host tier of the KV cache: page slots in host memory that a
//! swapped-out sequence's pages are copied to, and copied back from when it
//! resumes (swap-to-host preemption, see [`crate::scheduler`]).
//!
//! Slot `s` holds one page of every layer: bytes
//! `(s * num_layers + l) * page_bytes ..` for layer `l`, each the exact bytes
//! of the page's contiguous range in that layer's arena piece
//! ([`KvCache::page_buf`], layout in `pagoda_backend::kv_cache`). Copies use
//! only `Backend::download` / `Backend::upload` on slices of the layer
//! buffers, so every backend supports them. The slots are
//! [`Backend::alloc_host`] memory: heap memory on the CPU backend, pinned
//! (page-locked) memory on CUDA, so the copies are DMA transfers.
//!
//! Cost: one download (swap-out) or upload (swap-in) of `page_bytes` per
//! page per layer. Memory: `num_slots * page_bytes_all_layers` host bytes,
//! zero-filled lazily by the OS.

use pagoda_backend::{Backend, HeapBuffer, HostBuffer, KvLayout};

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;

/// Host page slots for swapped-out KV pages.
pub struct HostKvTier {
    /// Bytes of one page in one layer.
    page_bytes: usize,
    num_layers: usize,
    num_slots: usize,
    /// (num_slots, num_layers, page_bytes) bytes
    data: Box<dyn HostBuffer>,
}

impl Default for HostKvTier {
    fn default() -> Self {
        HostKvTier {
            page_bytes: 0,
            num_layers: 0,
            num_slots: 0,
            data: Box::new(HeapBuffer::default()),
        }
    }
}

impl std::fmt::Debug for HostKvTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKvTier")
            .field("num_slots", &self.num_slots)
            .field("bytes", &self.bytes())
            .field("pinned", &self.data.is_pinned())
            .finish()
    }
}

impl HostKvTier {
    /// `num_slots` page slots for pages of `layout` (0 = no swap space).
    pub fn new<B: Backend>(backend: &B, layout: &KvLayout, num_slots: usize) -> Result<Self> {
        let bytes = num_slots
            .checked_mul(layout.page_bytes_all_layers())
            .ok_or_else(|| {
                EngineError::InvalidConfig(format!("{num_slots} host swap slots overflow"))
            })?;
        Ok(Self {
            page_bytes: layout.page_bytes(),
            num_layers: layout.num_layers,
            num_slots,
            data: if bytes == 0 {
                Box::new(HeapBuffer::default())
            } else {
                backend.alloc_host(bytes)?
            },
        })
    }

    /// Page slots.
    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    /// Host bytes reserved for the slots.
    pub fn bytes(&self) -> usize {
        self.data.as_slice().len()
    }

    /// Byte range of (slot, layer) in `data`.
    fn range(&self, slot: u32, layer: usize) -> Result<std::ops::Range<usize>> {
        if slot as usize >= self.num_slots {
            return Err(EngineError::InvalidInput(format!(
                "host swap slot {slot} out of {} slots",
                self.num_slots
            )));
        }
        let start = (slot as usize * self.num_layers + layer) * self.page_bytes;
        Ok(start..start + self.page_bytes)
    }

    /// Copies each `(device page, host slot)` pair's page, every layer, to
    /// the host slot. Waits for queued device work (a download).
    pub fn swap_out<B: Backend>(
        &mut self,
        backend: &B,
        kv: &KvCache<B>,
        pairs: &[(u32, u32)],
    ) -> Result<()> {
        for &(page, slot) in pairs {
            for l in 0..self.num_layers {
                let r = self.range(slot, l)?;
                let src = kv.page_buf(l, page as usize)?;
                backend.download(src, &mut self.data.as_mut_slice()[r])?;
            }
        }
        Ok(())
    }

    /// Copies each `(host slot, device page)` pair's slot, every layer, back
    /// to the device page.
    pub fn swap_in<B: Backend>(
        &self,
        backend: &B,
        kv: &KvCache<B>,
        pairs: &[(u32, u32)],
    ) -> Result<()> {
        for &(slot, page) in pairs {
            for l in 0..self.num_layers {
                let r = self.range(slot, l)?;
                let dst = kv.page_buf(l, page as usize)?;
                backend.upload(dst, &self.data.as_slice()[r])?;
            }
        }
        Ok(())
    }
}
