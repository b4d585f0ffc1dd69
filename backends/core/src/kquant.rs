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

/// The 256 values of a Q4_K (`qh` = None) or Q5_K block: group g (64 values) = the low then
/// the high nibbles of `ql[32g ..]`, plus 16 where bit 2g (low) / 2g + 1 (high) of `qh` is set.
fn dequantize_k4(d: f32, dmin: f32, scales: &[u8], ql: &[u8], qh: Option<&[u8]>, out: &mut [f32]) {
    for (g, (q, y)) in ql
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let [(d1, mn1), (d2, mn2)] = [2 * g, 2 * g + 1].map(|j| {
            let (sc, m) = scale_min_k4(j, scales);
            (d * sc as f32, dmin * m as f32)
        });
        let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
        for l in 0..32 {
            let (h1, h2) = match qh {
                Some(qh) => (
                    if qh[l] & u1 != 0 { 16 } else { 0 },
                    if qh[l] & u2 != 0 { 16 } else { 0 },
                ),
                None => (0, 0),
            };
            y[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - mn1;
            y[32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - mn2;
        }
    }
}

/// Dequantizes one Q4_K super-block (144 bytes) into 256 floats.
pub fn dequantize_block_q4_k(b: &[u8], out: &mut [f32]) {
    dequantize_k4(
        f16_at(b, 0),
        f16_at(b, 2),
        &b[4..16],
        &b[16..144],
        None,
        out,
    );
}

/// Dequantizes one Q5_K super-block (176 bytes) into 256 floats.
pub fn dequantize_block_q5_k(b: &[u8], out: &mut [f32]) {
    dequantize_k4(
        f16_at(b, 0),
        f16_at(b, 2),
        &b[4..16],
        &b[48..176],
        Some(&b[16..48]),
        out,
    );
}

/// Dequantizes one Q6_K super-block (210 bytes) into 256 floats.
pub fn dequantize_block_q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, rest) = b.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let sc = &rest[..16];
    let d = f16_at(rest, 16);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let y = &mut out[128 * n..128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// A block decoder: block bytes in, block elements out.
pub type BlockDecoder = fn(&[u8], &mut [f32]);

/// (block elements, block bytes, decoder) of a 5-bit or K-quant type by its GGUF name.
pub fn block_format(name: &str) -> Option<(usize, usize, BlockDecoder)> {
    Some(match name {
        "Q5_0" => (32, 22, dequantize_block_q5_0 as BlockDecoder),
        "Q5_1" => (32, 24, dequantize_block_q5_1),
        "Q4_K" => (QK_K, 144, dequantize_block_q4_k),
        "Q5_K" => (QK_K, 176, dequantize_block_q5_k),
        "Q6_K" => (QK_K, 210, dequantize_block_q6_k),
        _ => return None,
    })
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
