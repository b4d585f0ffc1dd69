//! GGUF block formats: the reference (de)quantization every backend is checked against.
//!
//! | type | block | bytes | layout | value of element `j` |
//! |---|---|---|---|---|
//! | Q8_0 | 32 | 34 | `d: f16, qs: [i8; 32]` | `d * qs[j]` |
//! | Q4_0 | 32 | 18 | `d: f16, qs: [u8; 16]` | `d * (nib(j) - 8)` |
//! | Q4_1 | 32 | 20 | `d: f16, m: f16, qs: [u8; 16]` | `d * nib(j) + m` |
//!
//! where `nib(j) = qs[j] & 0xF` for `j < 16` and `qs[j - 16] >> 4` for `j >= 16`
//! (low nibbles hold the first half of the block, high nibbles the second).
//! Q5_0, Q5_1 and the K-quants (Q4_K, Q5_K, Q6_K) are in [`crate::kquant`] (decoders) and
//! [`crate::kquantize`] (llama.cpp's reference quantizers); the row functions here dispatch
//! to them.

use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{BackendError, Result};

/// Elements per quantized block.
pub const QK: usize = 32;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn check_len(op: &'static str, dtype: DType, src_bytes: usize, n: usize) -> Result<()> {
    match dtype.row_bytes(n) {
        Some(b) if b == src_bytes => Ok(()),
        Some(b) => Err(BackendError::InvalidArgument {
            op,
            detail: format!("{n} {dtype} elements need {b} bytes, got {src_bytes}"),
        }),
        None => Err(BackendError::InvalidArgument {
            op,
            detail: format!(
                "{n} elements is not a multiple of the {dtype} block size {}",
                dtype.block_size()
            ),
        }),
    }
}

/// Dequantizes one Q8_0 block (34 bytes) into 32 floats.
#[inline]
pub fn dequantize_block_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..QK {
        out[j] = d * (b[2 + j] as i8) as f32;
    }
}

/// Dequantizes one Q4_0 block (18 bytes) into 32 floats.
#[inline]
pub fn dequantize_block_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..QK / 2 {
        let q = b[2 + j];
        out[j] = d * ((q & 0x0F) as i32 - 8) as f32;
        out[j + QK / 2] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Dequantizes one Q4_1 block (20 bytes) into 32 floats.
#[inline]
pub fn dequantize_block_q4_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..QK / 2 {
        let q = b[4 + j];
        out[j] = d * (q & 0x0F) as f32 + m;
        out[j + QK / 2] = d * (q >> 4) as f32 + m;
    }
}

/// Dequantizes a row of `dst.len()` elements of `dtype` stored in `src`.
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_len("dequantize_row", dtype, src.len(), dst.len())?;
    match dtype {
        DType::F32 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(34)) {
                dequantize_block_q8_0(b, o);
            }
        }
        DType::Q4_0 => {
            for (o, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(18)) {
                dequantize_block_q4_0(b, o);
            }
        }
        DType::Q4_1 => {
            for (o, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(20)) {
                dequantize_block_q4_1(b, o);
            }
        }
        DType::Q5_0 | DType::Q5_1 | DType::Q4_K | DType::Q5_K | DType::Q6_K => {
            let decode =
                crate::kquant::decoder(dtype).ok_or_else(|| BackendError::Unsupported {
                    op: "dequantize_row",
                    dtype: dtype.to_string(),
                })?;
            let (bs, bb) = (dtype.block_size(), dtype.block_bytes());
            for (o, b) in dst.chunks_exact_mut(bs).zip(src.chunks_exact(bb)) {
                decode(b, o);
            }
        }
        DType::U32 => {
            return Err(BackendError::Unsupported {
                op: "dequantize_row",
                dtype: dtype.to_string(),
            });
        }
    }
    Ok(())
}

/// Quantizes `src` (a multiple of 32 floats) to Q8_0 the way ggml does:
/// `d = max|x| / 127`, `q = round(x / d)`.
pub fn quantize_row_q8_0(src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_len("quantize_row_q8_0", DType::Q8_0, dst.len(), src.len())?;
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(34)) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..QK {
            b[2 + j] = ((x[j] * id).round() as i32).clamp(-127, 127) as i8 as u8;
        }
    }
    Ok(())
}

/// Quantizes `src` (a multiple of 32 floats) to Q4_0 the way ggml's
/// `quantize_row_q4_0_ref` does: `d = max / -8` where `max` is the element
/// of largest magnitude (sign kept), `q = min(15, trunc(x / d + 8.5))`.
pub fn quantize_row_q4_0(src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_len("quantize_row_q4_0", DType::Q4_0, dst.len(), src.len())?;
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(18)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..QK / 2 {
            // `as u8` truncates toward zero like ggml's `(int8_t)` on these
            // non-negative values (and saturates a NaN to 0).
            let lo = ((x[j] * id + 8.5) as u8).min(15);
            let hi = ((x[j + QK / 2] * id + 8.5) as u8).min(15);
            b[2 + j] = lo | (hi << 4);
        }
    }
    Ok(())
}

/// Quantizes `src` (a multiple of 32 floats) to Q4_1 the way ggml's
/// `quantize_row_q4_1_ref` does: `d = (max - min) / 15`, `m = min`,
/// `q = min(15, trunc((x - min) / d + 0.5))`.
pub fn quantize_row_q4_1(src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_len("quantize_row_q4_1", DType::Q4_1, dst.len(), src.len())?;
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(20)) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in x {
            min = min.min(v);
            max = max.max(v);
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
        for j in 0..QK / 2 {
            let lo = (((x[j] - min) * id + 0.5) as u8).min(15);
            let hi = (((x[j + QK / 2] - min) * id + 0.5) as u8).min(15);
            b[4 + j] = lo | (hi << 4);
        }
    }
    Ok(())
}

/// Quantizes `src` into a row of `dtype` (every type but U32).
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_len("quantize_row", dtype, dst.len(), src.len())?;
    match dtype {
        DType::F32 => {
            for (x, c) in src.iter().zip(dst.chunks_exact_mut(4)) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        DType::F16 => {
            for (x, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
                c.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (x, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
                c.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        }
        DType::Q8_0 => quantize_row_q8_0(src, dst)?,
        DType::Q4_0 => quantize_row_q4_0(src, dst)?,
        DType::Q4_1 => quantize_row_q4_1(src, dst)?,
        DType::Q5_0 | DType::Q5_1 | DType::Q4_K | DType::Q5_K | DType::Q6_K => {
            let encode =
                crate::kquantize::encoder(dtype).ok_or_else(|| BackendError::Unsupported {
                    op: "quantize_row",
                    dtype: dtype.to_string(),
                })?;
            let (bs, bb) = (dtype.block_size(), dtype.block_bytes());
            for (x, b) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(bb)) {
                encode(x, b);
            }
        }
        DType::U32 => {
            return Err(BackendError::Unsupported {
                op: "quantize_row",
                dtype: dtype.to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
