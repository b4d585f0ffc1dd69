//! GGUF's 5-bit and K-quant block formats (llama.cpp's `ggml-quants.c` reference
//! dequantizers, ported): the decoders every backend's K-quant support is checked against.
//!
//! | type | block | bytes | layout |
//! |---|---|---|---|
//! | Q5_0 | 32 | 22 | `d: f16, qh: u32, qs: [u8; 16]` |
//! | Q5_1 | 32 | 24 | `d: f16, m: f16, qh: u32, qs: [u8; 16]` |
//! | Q4_K | 256 | 144 | `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]` |
//! | Q5_K | 256 | 176 | `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]` |
//! | Q6_K | 256 | 210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16` |
//!
//! Q5: element `j < 16` is `qs[j] & 15 | bit j of qh << 4`, element `j + 16` is
//! `qs[j] >> 4 | bit j + 16 of qh << 4`; value `d * (q - 16)` (Q5_0) or `d * q + m` (Q5_1).
//! Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scale and min packed in `scales`
//! ([`scale_min_k4`]); value `d * sc * q - dmin * m`. Q6_K: 16 sub-blocks of 16 with i8
//! scales; value `d * sc * (q - 32)`. Arithmetic is f32 in ggml's order (products left to
//! right, no fused multiply-add), so results are bit-identical to llama.cpp's and the
//! `gguf` Python package's.

use half::f16;

use crate::dtype::DType;

/// Elements of a K-quant super-block.
pub const QK_K: usize = 256;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes one Q5_0 block (22 bytes) into 32 floats.
pub fn dequantize_block_q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        let x0 = ((qs[j] as u32 & 0x0F) | h0) as i32 - 16;
        let x1 = ((qs[j] as u32 >> 4) | h1) as i32 - 16;
        out[j] = x0 as f32 * d;
        out[j + 16] = x1 as f32 * d;
    }
}

/// Dequantizes one Q5_1 block (24 bytes) into 32 floats.
pub fn dequantize_block_q5_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        let x0 = (qs[j] as u32 & 0x0F) | h0;
        let x1 = (qs[j] as u32 >> 4) | h1;
        out[j] = x0 as f32 * d + m;
        out[j + 16] = x1 as f32 * d + m;
    }
}

/// Scale and min of sub-block `j` (0..8) from a Q4_K / Q5_K block's 12 scale bytes.
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sub-block `j` (0..8: 32 values) of a Q4_K (`qh` = None) or Q5_K super-block: the low
/// (even `j`) or high (odd `j`) nibbles of `ql[32 (j / 2) ..]`, plus 16 where bit `j` of
/// `qh[l]` is set; value `d * sc * q - dmin * m` with the sub-block's 6-bit scale and min.
fn sub_k4(b: &[u8], j: usize, qh: Option<&[u8]>, out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, m) = scale_min_k4(j, &b[4..16]);
    let (d1, mn1) = (d * sc as f32, dmin * m as f32);
    let ql_at = if qh.is_some() { 48 } else { 16 } + 32 * (j / 2);
    let ql = &b[ql_at..ql_at + 32];
    let shift = 4 * (j % 2);
    for (l, y) in out[..32].iter_mut().enumerate() {
        let h = match qh {
            Some(qh) if (qh[l] >> j) & 1 != 0 => 16,
            _ => 0,
        };
        *y = d1 * (((ql[l] >> shift) & 0x0F) + h) as f32 - mn1;
    }
}

/// Sub-block `j` (0..8: 32 values) of a Q6_K super-block: half `n = j / 4`, quarter
/// `i = j % 4` of it; 4 bits from `ql` (low or high nibbles), 2 from `qh`, minus 32, times
/// `d * sc` with one i8 scale per 16 values.
fn sub_q6_k(b: &[u8], j: usize, out: &mut [f32]) {
    let (n, i) = (j / 4, j % 4);
    let ql = &b[64 * n + 32 * (i & 1)..][..32];
    let qh = &b[128 + 32 * n..][..32];
    let sc = &b[192 + 8 * n + 2 * i..][..2];
    let d = f16_at(b, 208);
    let (ql_shift, qh_shift) = (4 * (i >> 1), 2 * i);
    for (l, y) in out[..32].iter_mut().enumerate() {
        let q = (((ql[l] >> ql_shift) & 0x0F) | (((qh[l] >> qh_shift) & 3) << 4)) as i32 - 32;
        *y = d * (sc[l / 16] as i8) as f32 * q as f32;
    }
}

/// Dequantizes sub-block `j` (32 values, `j < 8`) of a Q4_K, Q5_K or Q6_K super-block `b`
/// into `out[..32]`: the same floats as the matching 32 of the whole-block dequantizer.
///
/// # Panics
/// For any other type (a caller's bug, not bad input).
pub fn dequantize_sub(dtype: DType, b: &[u8], j: usize, out: &mut [f32]) {
    match dtype {
        DType::Q4_K => sub_k4(b, j, None, out),
        DType::Q5_K => sub_k4(b, j, Some(&b[16..48]), out),
        DType::Q6_K => sub_q6_k(b, j, out),
        _ => panic!("{dtype} has no 32-element sub-blocks"),
    }
}

fn dequantize_subs(dtype: DType, b: &[u8], out: &mut [f32]) {
    for (j, y) in out[..QK_K].chunks_exact_mut(32).enumerate() {
        dequantize_sub(dtype, b, j, y);
    }
}

/// Dequantizes one Q4_K super-block (144 bytes) into 256 floats.
pub fn dequantize_block_q4_k(b: &[u8], out: &mut [f32]) {
    dequantize_subs(DType::Q4_K, b, out);
}

/// Dequantizes one Q5_K super-block (176 bytes) into 256 floats.
pub fn dequantize_block_q5_k(b: &[u8], out: &mut [f32]) {
    dequantize_subs(DType::Q5_K, b, out);
}

/// Dequantizes one Q6_K super-block (210 bytes) into 256 floats.
pub fn dequantize_block_q6_k(b: &[u8], out: &mut [f32]) {
    dequantize_subs(DType::Q6_K, b, out);
}

/// A block decoder: block bytes in, block elements out.
pub type BlockDecoder = fn(&[u8], &mut [f32]);

/// The decoder of a 5-bit or K-quant type.
pub fn decoder(dtype: DType) -> Option<BlockDecoder> {
    Some(match dtype {
        DType::Q5_0 => dequantize_block_q5_0 as BlockDecoder,
        DType::Q5_1 => dequantize_block_q5_1,
        DType::Q4_K => dequantize_block_q4_k,
        DType::Q5_K => dequantize_block_q5_k,
        DType::Q6_K => dequantize_block_q6_k,
        _ => return None,
    })
}

/// (block elements, block bytes, decoder) of a 5-bit or K-quant type by its GGUF name.
pub fn block_format(name: &str) -> Option<(usize, usize, BlockDecoder)> {
    let dtype = DType::from_name(name)?;
    Some((dtype.block_size(), dtype.block_bytes(), decoder(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_unpacks_six_bit_pairs() {
        // Sub-blocks 0..4: low 6 bits of bytes 0..4 (scale) and 4..8 (min); 4..8: nibbles of
        // bytes 8..12 plus the top 2 bits of bytes 0..8.
        let q = [0xC1, 2, 3, 4, 0x45, 6, 7, 8, 0x9A, 0, 0, 0];
        assert_eq!(scale_min_k4(0, &q), (1, 5));
        assert_eq!(scale_min_k4(4, &q), (0x0A | (3 << 4), 0x09 | (1 << 4)));
    }

    #[test]
    fn q5_0_high_bits_come_from_qh() {
        // d = 1.0, qh bit 0 and bit 16 set, qs[0] = 0x21: element 0 = (1 | 16) - 16 = 1,
        // element 16 = (2 | 16) - 16 = 2, element 1 = 0 - 16.
        let mut b = vec![0u8; 22];
        b[..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2..6].copy_from_slice(&(1u32 | 1 << 16).to_le_bytes());
        b[6] = 0x21;
        let mut out = [0f32; 32];
        dequantize_block_q5_0(&b, &mut out);
        assert_eq!((out[0], out[16], out[1]), (1.0, 2.0, -16.0));
    }
}
