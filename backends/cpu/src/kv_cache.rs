//! Writing and copying paged KV data (layout: `pagoda_backend::kv_cache`).

use pagoda_backend::quant::{dequantize_row, quantize_row};
use pagoda_backend::{BackendError, KvLayout, Result};

/// Stores K and V of `num_tokens` tokens at their slots.
/// cache: one layer arena; k, v: (num_tokens, num_kv_heads, head_dim) f32; slots: (num_tokens).
pub fn write_kv(
    cache: &mut [u8],
    layout: &KvLayout,
    k: &[f32],
    v: &[f32],
    slots: &[u32],
) -> Result<()> {
    let (hd, kvh, row) = (layout.head_dim, layout.num_kv_heads, layout.row_bytes());
    for (t, &slot) in slots.iter().enumerate() {
        let (page, off) = (
            slot as usize / layout.page_size,
            slot as usize % layout.page_size,
        );
        if page >= layout.num_pages {
            return Err(BackendError::InvalidArgument {
                op: "write_kv",
                detail: format!(
                    "slot {slot} is in page {page}, the cache has {} pages",
                    layout.num_pages
                ),
            });
        }
        for h in 0..kvh {
            let src = (t * kvh + h) * hd;
            let ko = layout.row_offset(page, 0, off, h);
            quantize_row(layout.dtype, &k[src..src + hd], &mut cache[ko..ko + row])?;
            let vo = layout.row_offset(page, 1, off, h);
            quantize_row(layout.dtype, &v[src..src + hd], &mut cache[vo..vo + row])?;
        }
    }
    Ok(())
}

/// Copies whole pages `src -> dst` within one layer arena.
pub fn copy_pages(cache: &mut [u8], layout: &KvLayout, pairs: &[(u32, u32)]) -> Result<()> {
    let pb = layout.page_bytes();
    for &(src, dst) in pairs {
        let (s, d) = (src as usize, dst as usize);
        if s >= layout.num_pages || d >= layout.num_pages {
            return Err(BackendError::InvalidArgument {
                op: "copy_pages",
                detail: format!(
                    "page pair ({src}, {dst}) outside {} pages",
                    layout.num_pages
                ),
            });
        }
        if s != d {
            cache.copy_within(s * pb..(s + 1) * pb, d * pb);
        }
    }
    Ok(())
}

/// Reads one K or V row back as f32 (for tests and attention). out: (head_dim).
#[inline]
pub fn read_row(cache: &[u8], layout: &KvLayout, offset: usize, out: &mut [f32]) -> Result<()> {
    dequantize_row(
        layout.dtype,
        &cache[offset..offset + layout.row_bytes()],
        out,
    )
}
