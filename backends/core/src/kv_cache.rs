//! The paged KV-cache layout, decided once for every backend.
//!
//! KV storage is a set of fixed-size *pages*, each holding `page_size`
//! consecutive token positions of one sequence. Pages are addressed by
//! `PageId`s handed out by the engine's block manager; kernels see only flat
//! arrays: `slot_mapping` (slot = `page * page_size + offset_in_page` for
//! each new token) and padded per-sequence `block_tables`.
//!
//! ## Memory layout (one arena per layer)
//!
//! Layer `l` owns one buffer of `layer_bytes()` bytes laid out page-major:
//!
//! ```text
//! (num_pages, 2 /* 0 = K, 1 = V */, page_size, num_kv_heads, head_dim)   in `dtype`
//! ```
//!
//! The innermost `head_dim` elements of one (page, K|V, token, head) form one
//! *row* of `dtype.row_bytes(head_dim)` bytes (for Q8_0: `head_dim / 32`
//! blocks of 34 bytes each, so the page bytes really are Q8_0-sized). Byte
//! offset of row (page p, kv, token-in-page t, head h):
//!
//! ```text
//! ((p * 2 + kv) * page_size + t) * num_kv_heads * row + h * row
//! ```
//!
//! Page-major order keeps a page of one layer contiguous (`page_bytes()`),
//! so copy-on-write and swapping move one range per layer, and growing the
//! cache appends pages at the end of every layer's range.

use crate::dtype::DType;
use crate::pool::BufRef;

/// Shape of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Transformer layers.
    pub num_layers: usize,
    /// Pages per layer.
    pub num_pages: usize,
    /// Token positions per page.
    pub page_size: usize,
    /// KV heads (GQA groups).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Element type of the stored K and V.
    pub dtype: DType,
}

impl KvLayout {
    /// Bytes of one K (or V) row: `head_dim` elements of `dtype`.
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.head_dim).unwrap_or(0)
    }

    /// Bytes of K and V of one token in one layer.
    pub fn token_bytes_per_layer(&self) -> usize {
        2 * self.num_kv_heads * self.row_bytes()
    }

    /// Bytes of one page in one layer (K and V).
    pub fn page_bytes(&self) -> usize {
        self.page_size * self.token_bytes_per_layer()
    }

    /// Bytes of one page across all layers.
    pub fn page_bytes_all_layers(&self) -> usize {
        self.page_bytes() * self.num_layers
    }

    /// Bytes of one layer's arena.
    pub fn layer_bytes(&self) -> usize {
        self.page_bytes() * self.num_pages
    }

    /// Total bytes of the cache.
    pub fn total_bytes(&self) -> usize {
        self.layer_bytes() * self.num_layers
    }

    /// Byte offset of the row (page, kv, token-in-page, head) inside a layer arena.
    /// `kv` is 0 for K and 1 for V.
    #[inline]
    pub fn row_offset(&self, page: usize, kv: usize, token: usize, head: usize) -> usize {
        let row = self.row_bytes();
        ((page * 2 + kv) * self.page_size + token) * self.num_kv_heads * row + head * row
    }

    /// Whether `head_dim` is compatible with `dtype`'s block size.
    pub fn is_valid(&self) -> bool {
        self.dtype.row_bytes(self.head_dim).is_some() && self.page_size > 0
    }
}

/// One layer's KV arena as seen by kernels.
#[derive(Debug, Clone, Copy)]
pub struct KvLayerRef {
    /// The layer's buffer: `(num_pages, 2, page_size, num_kv_heads, head_dim)` in `layout.dtype`.
    pub buf: BufRef,
    /// The cache layout.
    pub layout: KvLayout,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_pages_are_q8_0_sized() {
        let l = KvLayout {
            num_layers: 30,
            num_pages: 10,
            page_size: 16,
            num_kv_heads: 3,
            head_dim: 64,
            dtype: DType::Q8_0,
        };
        assert_eq!(l.row_bytes(), 68);
        assert_eq!(l.page_bytes(), 16 * 2 * 3 * 68);
        let f16 = KvLayout {
            dtype: DType::F16,
            ..l
        };
        assert_eq!(f16.page_bytes(), 16 * 2 * 3 * 128);
        assert_eq!(l.row_offset(1, 1, 2, 1), ((2 + 1) * 16 + 2) * 3 * 68 + 68);
    }
}
