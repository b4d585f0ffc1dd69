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
        for _ in 0..layout.num_layers {
            layers.push(pool.alloc(layout.layer_bytes() as u64, MemoryTag::Kv)?);
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
}
