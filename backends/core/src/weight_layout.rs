//! The device layout of quantized weights, written by `upload_weight`
//! (the CUDA kernels' `common.cuh` and the wgpu shaders read it).
//!
//! A GGUF piece of `rows` rows of `cols / QK` blocks interleaves each block's
//! fields (scales, high bits, quants), so no block starts on a 16-byte
//! boundary. On the device the same bytes are split into one region per field,
//! in the order of [`regions`], each `[rows * nb][len]` bytes:
//!
//! ```text
//! type   block  regions (GGUF byte range of the block → region), in device order
//! Q8_0     34   qs[2..34] 32 | d[0..2] 2
//! Q4_0     18   qs[2..18] 16 | d[0..2] 2
//! Q4_1     20   qs[4..20] 16 | d,m[0..4] 4
//! Q5_0     22   qs[6..22] 16 | qh[2..6] 4 | d[0..2] 2
//! Q5_1     24   qs[8..24] 16 | qh[4..8] 4 | d,m[0..4] 4
//! Q4_K    144   qs[16..144] 128 | d,dmin,scales[0..16] 16
//! Q5_K    176   qh,qs[16..176] 160 | d,dmin,scales[0..16] 16
//! Q6_K    210   ql,qh[0..192] 192 | scales[192..208] 16 | d[208..210] 2
//! ```
//!
//! Region `r` of a piece of `n` blocks starts at `n * (sum of the lengths before r)`, so
//! every region starts aligned to its own length's power of two (16 for the quants), the
//! kernels read a block's quants with 16-byte loads and a warp reads whole cache lines. The
//! size is unchanged: the regions' lengths add up to the GGUF block.

use crate::dtype::DType;

/// The fields of a `dtype` block as `(first byte in the GGUF block, length)`, in device
/// order (the quants first); `None` for float dtypes, which are uploaded as they are.
pub fn regions(dtype: DType) -> Option<&'static [(usize, usize)]> {
    Some(match dtype {
        DType::Q8_0 => &[(2, 32), (0, 2)],
        DType::Q4_0 => &[(2, 16), (0, 2)],
        DType::Q4_1 => &[(4, 16), (0, 4)],
        DType::Q5_0 => &[(6, 16), (2, 4), (0, 2)],
        DType::Q5_1 => &[(8, 16), (4, 4), (0, 4)],
        DType::Q4_K => &[(16, 128), (0, 16)],
        DType::Q5_K => &[(16, 160), (0, 16)],
        DType::Q6_K => &[(0, 192), (192, 16), (208, 2)],
        _ => return None,
    })
}

/// The device bytes of a quantized GGUF piece (`None` for float dtypes, which are
/// uploaded as they are). `src` holds whole blocks.
pub fn repack(dtype: DType, src: &[u8]) -> Option<Vec<u8>> {
    let fields = regions(dtype)?;
    let blk: usize = fields.iter().map(|f| f.1).sum();
    debug_assert_eq!(blk, dtype.block_bytes());
    let n = src.len() / blk;
    let mut out = vec![0u8; src.len()];
    let mut at = 0;
    for &(first, len) in fields {
        let region = &mut out[at..at + n * len];
        for (b, o) in src.chunks_exact(blk).zip(region.chunks_exact_mut(len)) {
            o.copy_from_slice(&b[first..first + len]);
        }
        at += n * len;
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

    #[test]
    fn every_quantized_type_has_regions_that_cover_its_block() {
        for dtype in &DType::ALL {
            let Some(fields) = regions(*dtype) else {
                assert!(!dtype.is_quantized(), "{dtype} has no device layout");
                continue;
            };
            let blk = dtype.block_bytes();
            let mut covered = vec![0u8; blk];
            for &(first, len) in fields {
                covered[first..first + len].iter_mut().for_each(|c| *c += 1);
            }
            assert!(covered.iter().all(|&c| c == 1), "{dtype}: {covered:?}");
            // Two blocks of distinct bytes: each region holds block 0's field, then block 1's.
            let src: Vec<u8> = (0..2 * blk).map(|i| (i % 251) as u8).collect();
            let out = repack(*dtype, &src).unwrap();
            let mut at = 0;
            for &(first, len) in fields {
                for b in 0..2 {
                    let want = &src[b * blk + first..b * blk + first + len];
                    assert_eq!(&out[at..at + len], want, "{dtype} field at {first}");
                    at += len;
                }
            }
        }
    }
}
