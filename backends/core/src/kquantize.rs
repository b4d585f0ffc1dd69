//! llama.cpp's reference quantizers (no importance matrix) for Q5_0, Q5_1, Q4_K, Q5_K and
//! Q6_K, ported from `ggml-quants.c` (`quantize_row_*_ref`, `make_qkx2_quants`,
//! `make_qx_quants`, `nearest_int`): the same f32 input gives the same bytes
//! (`tests/tests/kquant.rs` checks every row of `kquant_rows.json`). Block layouts:
//! [`crate::kquant`].

use half::f16;

use crate::dtype::DType;
use crate::kquant::QK_K;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below it is all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, through the float adder (ggml's `nearest_int`).
#[inline]
fn nearest_int(f: f32) -> i32 {
    let v = f + 12_582_912.0;
    (v.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

#[inline]
fn put_f16(b: &mut [u8], x: f32) {
    b[..2].copy_from_slice(&f16::from_f32(x).to_le_bytes());
}

#[inline]
fn get_f16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// One Q5_0 block (22 bytes) of 32 floats: `d = max / -16` (max: the element of largest
/// magnitude, sign kept), `q = min(31, trunc(x / d + 16.5))`.
pub fn quantize_block_q5_0(x: &[f32], b: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in &x[..32] {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut b[0..2], d);
    let mut qh = 0u32;
    for j in 0..16 {
        // `as i8` truncates toward zero like ggml's `(int8_t)` on these values.
        let x0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let x1 = ((x[16 + j] * id + 16.5) as i8).min(31) as u8;
        b[6 + j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= (((x0 & 0x10) >> 4) as u32) << j;
        qh |= (((x1 & 0x10) >> 4) as u32) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// One Q5_1 block (24 bytes) of 32 floats: `d = (max - min) / 31`, `m = min`,
/// `q = trunc((x - min) / d + 0.5)`.
pub fn quantize_block_q5_1(x: &[f32], b: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in &x[..32] {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut b[0..2], d);
    put_f16(&mut b[2..4], min);
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = ((x[j] - min) * id + 0.5) as u8;
        let x1 = ((x[16 + j] - min) * id + 0.5) as u8;
        b[8 + j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= (((x0 & 0x10) >> 4) as u32) << j;
        qh |= (((x1 & 0x10) >> 4) as u32) << (j + 16);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// ggml's `make_qkx2_quants` (weighted, min-searching): levels into `l`, returns the
/// scale and writes the (negated) min.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    the_min: &mut f32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> f32 {
    let n = x.len();
    let mut laux = [0u8; 32];
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        *the_min = -min;
        return 0.0;
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let dd = sum_w * sum_l2 - sum_l * sum_l;
        if dd > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    scale
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no weights (Q6_K): returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Sub-block weights of the K-quants: `sqrt(mean(x^2)) + |x|`.
fn kq_weights(x: &[f32], w: &mut [f32; 32]) {
    let mut sum_x2 = 0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    let av_x = (sum_x2 / 32.0).sqrt();
    for (o, &v) in w.iter_mut().zip(x) {
        *o = av_x + v.abs();
    }
}

/// The 8 (scale, min) pairs of a Q4_K / Q5_K block as 6-bit levels in 12 bytes, and the
/// block's d and dmin.
fn pack_scales_k4(scales: &[f32; 8], mins: &[f32; 8], b: &mut [u8]) {
    let max_scale = scales.iter().fold(0f32, |a, &s| if s > a { s } else { a });
    let max_min = mins.iter().fold(0f32, |a, &m| if m > a { m } else { a });
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut b[4..16];
    sc.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(&mut b[0..2], max_scale / 63.0);
    put_f16(&mut b[2..4], max_min / 63.0);
}

/// Levels of a Q4_K / Q5_K block from its packed scales: `clamp(round((x + dm) / d), 0, nmax)`.
fn levels_k4(x: &[f32], b: &[u8], nmax: i32, l: &mut [u8; QK_K]) {
    let (d0, dmin0) = (get_f16(&b[0..2]), get_f16(&b[2..4]));
    for j in 0..8 {
        let (sc, m) = crate::kquant::scale_min_k4(j, &b[4..16]);
        let d = d0 * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin0 * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

/// Scales and mins of the 8 sub-blocks of a Q4_K / Q5_K block (levels in `l`).
fn subblock_scales(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
    l: &mut [u8; QK_K],
) -> ([f32; 8], [f32; 8]) {
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let mut w = [0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        kq_weights(xs, &mut w);
        scales[j] = make_qkx2_quants(
            nmax,
            xs,
            &w,
            &mut l[32 * j..32 * j + 32],
            &mut mins[j],
            rmin,
            0.1,
            nstep,
        );
    }
    (scales, mins)
}

/// One Q4_K super-block (144 bytes) of 256 floats.
pub fn quantize_block_q4_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (scales, mins) = subblock_scales(x, 15, -1.0, 20, &mut l);
    pack_scales_k4(&scales, &mins, b);
    levels_k4(x, b, 15, &mut l);
    let q = &mut b[16..144];
    for (g, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            q[32 * g + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

/// One Q5_K super-block (176 bytes) of 256 floats.
pub fn quantize_block_q5_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (scales, mins) = subblock_scales(x, 31, -0.5, 15, &mut l);
    pack_scales_k4(&scales, &mins, b);
    levels_k4(x, b, 31, &mut l);
    let (head, ql) = b.split_at_mut(48);
    let qh = &mut head[16..48];
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (g, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * g + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// One Q6_K super-block (210 bytes) of 256 floats.
pub fn quantize_block_q6_k(x: &[f32], b: &mut [u8]) {
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for (ib, s) in scales.iter_mut().enumerate() {
        *s = make_qx_quants(32, &x[16 * ib..16 * ib + 16]);
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = *s;
        }
    }
    b[..210].fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(&mut b[208..210], 1.0 / iscale);
    for (ib, s) in scales.iter().enumerate() {
        b[192 + ib] = nearest_int(iscale * s).min(127) as i8 as u8;
    }
    let d0 = get_f16(&b[208..210]);
    let mut l = [0u8; QK_K];
    for j in 0..16 {
        let d = d0 * (b[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as u8;
        }
    }
    let (ql, rest) = b.split_at_mut(128);
    let qh = &mut rest[..64];
    for (g, j) in (0..QK_K).step_by(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * g..], &mut qh[32 * g..]);
        for i in 0..32 {
            let (q1, q2, q3, q4) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            ql[i] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
            ql[i + 32] = (q2 & 0x0F) | ((q4 & 0x0F) << 4);
            qh[i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

/// A block quantizer: block elements in, block bytes out.
pub type BlockEncoder = fn(&[f32], &mut [u8]);

/// The quantizer of a 5-bit or K-quant type.
pub fn encoder(dtype: DType) -> Option<BlockEncoder> {
    Some(match dtype {
        DType::Q5_0 => quantize_block_q5_0 as BlockEncoder,
        DType::Q5_1 => quantize_block_q5_1,
        DType::Q4_K => quantize_block_q4_k,
        DType::Q5_K => quantize_block_q5_k,
        DType::Q6_K => quantize_block_q6_k,
        _ => return None,
    })
}

/// (block elements, block bytes, quantizer) of a 5-bit or K-quant type by its GGUF name.
pub fn block_encoder(name: &str) -> Option<(usize, usize, BlockEncoder)> {
    let dtype = DType::from_name(name)?;
    Some((dtype.block_size(), dtype.block_bytes(), encoder(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 2.4, -2.6].map(nearest_int),
            [0, 2, 2, 0, -2, 2, -3]
        );
    }
}
