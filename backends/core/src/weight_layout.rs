//! The device layout of quantized weights, written by `upload_weight`
//! (the CUDA kernels' `common.cuh` and the wgpu shaders read it).
//!
//! A GGUF piece of `rows` rows of `cols / 32` blocks interleaves each block's
//! scales and quants (18, 20 or 34 bytes), so no block starts on a 16-byte
//! boundary. On the device the same bytes are split in two regions:
//!
//! ```text
//! quants: [rows][nb][QB] bytes   QB = 32 (Q8_0), 16 (Q4_0, Q4_1); 16-byte aligned blocks
//! scales: [rows][nb][SB] bytes   SB = 2 (d: Q8_0, Q4_0), 4 (d then m: Q4_1)
//! ```
//!
//! so the matmul kernels read a block's quants with one (Q4) or two (Q8_0)
//! 16-byte loads and a warp reads whole cache lines. The size is unchanged:
//! `rows * nb * (QB + SB)` is the GGUF size.

use crate::dtype::DType;

/// (bytes of a GGUF block, bytes of its scales = where its quants start, bytes of its quants).
fn block_parts(dtype: DType) -> Option<(usize, usize, usize)> {
    match dtype {
        DType::Q8_0 => Some((34, 2, 32)),
        DType::Q4_0 => Some((18, 2, 16)),
        DType::Q4_1 => Some((20, 4, 16)),
        _ => None,
    }
}

/// The device bytes of a quantized GGUF piece (`None` for float dtypes, which are
/// uploaded as they are). `src` holds whole blocks.
pub fn repack(dtype: DType, src: &[u8]) -> Option<Vec<u8>> {
    let (blk, sb, qb) = block_parts(dtype)?;
    let n = src.len() / blk;
    let mut out = vec![0u8; src.len()];
    let (quants, scales) = out.split_at_mut(n * qb);
    for ((b, q), s) in src
        .chunks_exact(blk)
        .zip(quants.chunks_exact_mut(qb))
        .zip(scales.chunks_exact_mut(sb))
    {
        s.copy_from_slice(&b[..sb]);
        q.copy_from_slice(&b[sb..]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quants_then_scales_same_size() {
        // Two Q4_1 blocks: d, m, 16 quants each.
        let mut src = Vec::new();
        for blk in 0..2u8 {
            src.extend([blk, 0xD0, blk, 0x40]);
            src.extend((0..16).map(|i| blk * 16 + i));
        }
        let out = repack(DType::Q4_1, &src).unwrap();
        assert_eq!(out.len(), src.len());
        assert_eq!(&out[..16], &src[4..20]);
        assert_eq!(&out[16..32], &src[24..40]);
        assert_eq!(&out[32..36], &src[..4]);
        assert_eq!(&out[36..40], &src[20..24]);
        assert!(repack(DType::F16, &src).is_none());
        // Q8_0 and Q4_0: a 2-byte scale, then 32 / 16 bytes of quants.
        let q8: Vec<u8> = (0..68).map(|i| i as u8).collect();
        let out = repack(DType::Q8_0, &q8).unwrap();
        assert_eq!(&out[..32], &q8[2..34]);
        assert_eq!(&out[64..68], &[0, 1, 34, 35]);
        let q4: Vec<u8> = (0..18).map(|i| i as u8).collect();
        let out = repack(DType::Q4_0, &q4).unwrap();
        assert_eq!(&out[..16], &q4[2..]);
        assert_eq!(&out[16..], &q4[..2]);
    }
}
