//! Writing and copying paged KV data (layout: `pagoda_backend::kv_cache`),
//! and host views of a layer arena's pieces through its page table.

use pagoda_backend::quant::{dequantize_row, quantize_row};
use pagoda_backend::{BackendError, KvLayout, MAX_KV_PIECES, Result};

fn invalid(op: &'static str, detail: String) -> BackendError {
    BackendError::InvalidArgument { op, detail }
}

/// Read-only host view of one layer arena: its pieces and page table.
#[derive(Clone, Copy)]
pub struct KvPages<'a> {
    /// The pieces (first `num_pieces` used).
    pub pieces: [&'a [u8]; MAX_KV_PIECES],
    /// Pieces in use.
    pub num_pieces: usize,
    /// (num_pages, 2) u32: piece, page in piece.
    pub table: &'a [u32],
    /// The layout.
    pub layout: KvLayout,
}

/// Mutable host view of one layer arena.
pub struct KvPagesMut<'a> {
    /// The pieces (first `num_pieces` used).
    pub pieces: [&'a mut [u8]; MAX_KV_PIECES],
    /// Pieces in use.
    pub num_pieces: usize,
    /// (num_pages, 2) u32: piece, page in piece.
    pub table: &'a [u32],
    /// The layout.
    pub layout: KvLayout,
}

/// `(piece, byte offset in the piece)` of page `page`, checked against the pieces' lengths.
#[inline]
fn locate(
    table: &[u32],
    lens: impl Fn(usize) -> Option<usize>,
    layout: &KvLayout,
    page: usize,
    op: &'static str,
) -> Result<(usize, usize)> {
    if page >= layout.num_pages || table.len() < 2 * layout.num_pages {
        return Err(invalid(
            op,
            format!("page {page} outside {} pages", layout.num_pages),
        ));
    }
    let (piece, idx) = (table[2 * page] as usize, table[2 * page + 1] as usize);
    let pb = layout.page_bytes();
    let off = idx * pb;
    match lens(piece) {
        Some(len) if off + pb <= len => Ok((piece, off)),
        _ => Err(invalid(
            op,
            format!("page {page} maps to piece {piece} page {idx}, outside the arena"),
        )),
    }
}

impl<'a> KvPages<'a> {
    /// Checks that page `page` maps inside its piece.
    pub fn check(&self, page: usize, op: &'static str) -> Result<()> {
        locate(
            self.table,
            |i| (i < self.num_pieces).then(|| self.pieces[i].len()),
            &self.layout,
            page,
            op,
        )
        .map(|_| ())
    }

    /// The bytes of page `page` (checked with [`Self::check`] before).
    #[inline(always)]
    pub fn page(&self, page: usize) -> &'a [u8] {
        let pb = self.layout.page_bytes();
        let (piece, idx) = (
            self.table[2 * page] as usize,
            self.table[2 * page + 1] as usize,
        );
        &self.pieces[piece][idx * pb..(idx + 1) * pb]
    }

    /// Whether every piece can be read in place as f32.
    pub fn f32_aligned(&self) -> bool {
        self.pieces[..self.num_pieces]
            .iter()
            .all(|p| bytemuck::try_cast_slice::<u8, f32>(p).is_ok())
    }
}

impl KvPagesMut<'_> {
    /// `(piece, byte offset)` of page `page`, checked.
    fn at(&self, page: usize, op: &'static str) -> Result<(usize, usize)> {
        locate(
            self.table,
            |i| (i < self.num_pieces).then(|| self.pieces[i].len()),
            &self.layout,
            page,
            op,
        )
    }
}

/// Stores K and V of `num_tokens` tokens at their slots.
/// k, v: (num_tokens, num_kv_heads, head_dim) f32; slots: (num_tokens).
/// `committed(piece, byte offset, len)` checks that the page's memory is committed.
pub fn write_kv(
    cache: &mut KvPagesMut<'_>,
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    committed: impl Fn(usize, usize, usize) -> Result<()>,
) -> Result<()> {
    let layout = cache.layout;
    let (hd, kvh, row) = (layout.head_dim, layout.num_kv_heads, layout.row_bytes());
    for (t, &slot) in slots.iter().enumerate() {
        let (page, off) = (
            slot as usize / layout.page_size,
            slot as usize % layout.page_size,
        );
        let (piece, base) = cache.at(page, "write_kv")?;
        committed(piece, base, layout.page_bytes())?;
        let mem = &mut cache.pieces[piece][base..base + layout.page_bytes()];
        for h in 0..kvh {
            let src = (t * kvh + h) * hd;
            let ko = layout.row_offset(0, 0, off, h);
            quantize_row(layout.dtype, &k[src..src + hd], &mut mem[ko..ko + row])?;
            let vo = layout.row_offset(0, 1, off, h);
            quantize_row(layout.dtype, &v[src..src + hd], &mut mem[vo..vo + row])?;
        }
    }
    Ok(())
}

/// Copies whole pages `src -> dst` within one layer arena.
pub fn copy_pages(cache: &mut KvPagesMut<'_>, pairs: &[(u32, u32)]) -> Result<()> {
    let pb = cache.layout.page_bytes();
    for &(src, dst) in pairs {
        let (sp, so) = cache.at(src as usize, "copy_pages")?;
        let (dp, doff) = cache.at(dst as usize, "copy_pages")?;
        if (sp, so) == (dp, doff) {
            continue;
        }
        if sp == dp {
            cache.pieces[sp].copy_within(so..so + pb, doff);
        } else {
            let (a, b) = if sp < dp {
                let (lo, hi) = cache.pieces.split_at_mut(dp);
                (&lo[sp], &mut hi[0])
            } else {
                let (lo, hi) = cache.pieces.split_at_mut(sp);
                (&hi[0], &mut lo[dp])
            };
            b[doff..doff + pb].copy_from_slice(&a[so..so + pb]);
        }
    }
    Ok(())
}

/// Reads one K or V row back as f32 (for tests). `row` is the row's bytes.
#[inline]
pub fn read_row(layout: &KvLayout, row: &[u8], out: &mut [f32]) -> Result<()> {
    dequantize_row(layout.dtype, &row[..layout.row_bytes()], out)
}
