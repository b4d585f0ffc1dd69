//! The paged KV cache in device memory: one pool block (tag `kv`) per layer,
//! laid out as documented in `pagoda_backend::kv_cache`.

use pagoda_backend::{Block, KvLayerRef, KvLayout, MemoryTag, Pool};

use crate::error::Result;

/// KV storage for every layer.
#[derive(Debug)]
pub struct KvCache {
    /// The layout shared by all layers.
    pub layout: KvLayout,
    /// One arena per layer: (num_pages, 2, page_size, num_kv_heads, head_dim) in `layout.dtype`.
    layers: Vec<Block>,
}

impl KvCache {
    /// Allocates `layout.num_layers` arenas from `pool`.
    pub fn new(layout: KvLayout, pool: &Pool) -> Result<KvCache> {
        let mut layers = Vec::with_capacity(layout.num_layers);
        for l in 0..layout.num_layers {
            let label = format!("kv.layer.{l}");
            layers.push(pool.alloc_labeled(layout.layer_bytes() as u64, MemoryTag::Kv, &label)?);
        }
        Ok(KvCache { layout, layers })
    }

    /// Layer `l` as kernels see it.
    pub fn layer(&self, l: usize) -> KvLayerRef {
        KvLayerRef {
            buf: self.layers[l].buf(),
            layout: self.layout,
        }
    }

    /// Where `page` lives, for telemetry: `(piece, offset_bytes)`, the arena
    /// piece holding it and its byte offset inside that piece, the same in
    /// every layer. Today one arena per layer: piece 0, `page * page_bytes`.
    pub fn page_location(&self, page: u32) -> (u32, u64) {
        (0, page as u64 * self.layout.page_bytes() as u64)
    }

    /// Bytes of address space held for KV pages, all layers.
    pub fn reserved_bytes(&self) -> u64 {
        self.layers.iter().map(|b| b.bytes()).sum()
    }

    /// Bytes of KV pages backed by memory (VMM mapped), all layers; equal
    /// to [`KvCache::reserved_bytes`] while the arenas are plain blocks.
    pub fn committed_bytes(&self) -> u64 {
        self.reserved_bytes()
    }
}
