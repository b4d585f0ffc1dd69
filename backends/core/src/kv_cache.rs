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
//! so copy-on-write and swapping move one range per layer.
//!
//! ## Arena pieces
//!
//! A layer arena larger than the device's largest buffer or binding
//! ([`crate::BackendInfo::max_binding_bytes`]) is split into *pieces*: runs
//! of `pages_per_piece` consecutive pages, one buffer each ([`KvGeometry`]).
//! A page never straddles two pieces. Kernels find a page through the
//! layer's *page table* (fixed size, `(num_pages, 2)` u32: piece index,
//! page index inside the piece), so the row offset above is taken inside
//! the piece: `piece_base + page_in_piece * page_bytes + (row offset of page 0)`.
//!
//! ## Commit units and the null page
//!
//! Memory behind pages is committed in *commit units* of `pages_per_unit`
//! consecutive page ids (unit `u` = pages `u * ppu ..`), inside one piece
//! (pieces hold whole units). The last page, [`KvLayout::null_page`], is
//! never handed out: padded rows of a fixed-shape step write their K/V there
//! and read it, harmlessly; it is always committed.

use crate::dtype::DType;
use crate::pool::BufRef;

/// Shape of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Transformer layers.
    pub num_layers: usize,
    /// Pages per layer, the null page (the last) included.
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
        self.dtype.row_bytes(self.head_dim).is_some() && self.page_size > 0 && self.num_pages > 0
    }

    /// The reserved page padded rows point at: the last page.
    pub fn null_page(&self) -> u32 {
        self.num_pages.saturating_sub(1) as u32
    }

    /// The slot of the null page's first token.
    pub fn null_slot(&self) -> u32 {
        self.null_page() * self.page_size as u32
    }
}

/// One layer's KV arena as seen by kernels.
#[derive(Debug, Clone, Copy)]
pub struct KvLayerRef<'a> {
    /// The arena's pieces in order; piece `i` holds pages
    /// `i * pages_per_piece ..`: `(pages, 2, page_size, num_kv_heads, head_dim)` in `layout.dtype`.
    pub pieces: &'a [BufRef],
    /// (num_pages, 2) u32: `(piece, page in piece)` of every page.
    pub page_table: BufRef,
    /// The cache layout.
    pub layout: KvLayout,
}

/// Most pieces one layer arena may have (kernels take them as a small fixed array).
pub const MAX_KV_PIECES: usize = 64;

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a.max(1)) * a.max(1)
}

/// How one layer arena is cut into pieces and commit units, for a device's limits.
///
/// Every layer has the same geometry. Sizes:
/// - `pages_per_unit = ceil(unit_target_bytes / page_bytes)`, at most the
///   pages a piece can hold;
/// - `pages_per_piece` = the most whole units whose bytes fit
///   `min(max_buffer_bytes, max_binding_bytes)`;
/// - piece `i` reserves its pages' bytes rounded up to the commit granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    /// The layout (null page included in `num_pages`).
    pub layout: KvLayout,
    /// Pages per commit unit.
    pub pages_per_unit: usize,
    /// Pages per piece (a multiple of `pages_per_unit`).
    pub pages_per_piece: usize,
    /// Pieces per layer.
    pub num_pieces: usize,
    /// Commit granularity of the device in bytes.
    pub granularity: u64,
}

impl KvGeometry {
    /// The geometry of `layout` on a device with these limits; `None` when
    /// one page does not fit a binding or the arena would need more than
    /// [`MAX_KV_PIECES`] pieces.
    pub fn new(
        layout: KvLayout,
        max_buffer_bytes: u64,
        max_binding_bytes: u64,
        granularity: u64,
        unit_target_bytes: u64,
    ) -> Option<KvGeometry> {
        let pb = layout.page_bytes() as u64;
        if pb == 0 || layout.num_pages == 0 {
            return None;
        }
        let granularity = granularity.max(1);
        // A piece reserves whole granules, so leave room for the rounding.
        let limit = max_buffer_bytes.min(max_binding_bytes) / granularity * granularity;
        let fit = (limit / pb) as usize;
        if fit == 0 {
            return None;
        }
        let ppu = (unit_target_bytes.div_ceil(pb) as usize).clamp(1, fit);
        let ppp = (fit / ppu * ppu).min(layout.num_pages.div_ceil(ppu) * ppu);
        if layout.num_pages.div_ceil(ppp) > MAX_KV_PIECES {
            return None;
        }
        Some(KvGeometry {
            layout,
            pages_per_unit: ppu,
            pages_per_piece: ppp,
            num_pieces: layout.num_pages.div_ceil(ppp),
            granularity,
        })
    }

    /// Pages held by piece `i`.
    pub fn piece_pages(&self, i: usize) -> usize {
        let start = i * self.pages_per_piece;
        self.layout
            .num_pages
            .saturating_sub(start)
            .min(self.pages_per_piece)
    }

    /// Bytes reserved for piece `i`.
    pub fn piece_bytes(&self, i: usize) -> u64 {
        round_up(
            self.piece_pages(i) as u64 * self.layout.page_bytes() as u64,
            self.granularity,
        )
    }

    /// Bytes reserved for one layer.
    pub fn layer_reserved_bytes(&self) -> u64 {
        (0..self.num_pieces).map(|i| self.piece_bytes(i)).sum()
    }

    /// Bytes reserved for all layers: the memory plan's KV figure (with the page tables).
    pub fn reserved_bytes(&self) -> u64 {
        self.layer_reserved_bytes() * self.layout.num_layers as u64
    }

    /// Bytes of one layer's page table: `(num_pages, 2)` u32.
    pub fn page_table_bytes(&self) -> u64 {
        self.layout.num_pages as u64 * 8
    }

    /// `(piece, page in piece)` of a page.
    pub fn locate(&self, page: usize) -> (usize, usize) {
        (page / self.pages_per_piece, page % self.pages_per_piece)
    }

    /// Commit units per layer (the last may be short).
    pub fn num_units(&self) -> usize {
        self.layout.num_pages.div_ceil(self.pages_per_unit)
    }

    /// `(piece, byte range inside the piece)` of unit `u`, rounded out to the granularity.
    pub fn unit_range(&self, u: usize) -> (usize, std::ops::Range<u64>) {
        let first = u * self.pages_per_unit;
        let last = (first + self.pages_per_unit).min(self.layout.num_pages);
        let (piece, p0) = self.locate(first);
        let pb = self.layout.page_bytes() as u64;
        let a = p0 as u64 * pb / self.granularity * self.granularity;
        let b = round_up((p0 + (last - first)) as u64 * pb, self.granularity)
            .min(self.piece_bytes(piece));
        (piece, a..b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hold_whole_units_and_never_split_a_page() {
        let l = KvLayout {
            num_layers: 2,
            num_pages: 101,
            page_size: 16,
            num_kv_heads: 3,
            head_dim: 64,
            dtype: DType::F32,
        };
        let pb = l.page_bytes() as u64; // 24 KiB
        let g = KvGeometry::new(l, u64::MAX, 1 << 20, 4096, 100_000).unwrap();
        assert_eq!(g.pages_per_unit, 5);
        assert_eq!(g.pages_per_piece, 40);
        assert!(g.pages_per_piece as u64 * pb <= 1 << 20);
        assert_eq!(g.num_pieces, 3);
        assert_eq!((0..3).map(|i| g.piece_pages(i)).sum::<usize>(), 101);
        assert_eq!(g.locate(41), (1, 1));
        let (piece, r) = g.unit_range(8);
        assert_eq!(piece, 1);
        assert_eq!(r, 0..5 * pb);
        // The last unit (page 100 alone) is inside the last piece.
        assert_eq!(g.num_units(), 21);
        let (piece, r) = g.unit_range(20);
        assert_eq!((piece, r), (2, 20 * pb..21 * pb));
        assert!(KvGeometry::new(l, u64::MAX, pb - 1, 4096, 1).is_none());
        // One piece when the limits are large.
        let g = KvGeometry::new(l, u64::MAX, u64::MAX, 4096, 2 << 20).unwrap();
        assert_eq!(g.num_pieces, 1);
        assert_eq!(g.reserved_bytes(), 2 * (101 * pb).div_ceil(4096) * 4096);
    }

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
