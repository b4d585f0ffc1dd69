//! `out (n, m) = x (n, k) · w (m, k)ᵀ` with `w` in any weight dtype, f32 activations.
//!
//! Weights are never dequantized as a whole: each 32-element block of a weight
//! row is decoded into registers/stack and immediately multiplied with the
//! matching block of up to [`TOKEN_TILE`] activation rows. Every (token, row)
//! dot product is accumulated in the same order whatever the batch size or
//! thread count (8 lanes, blocks in order, lanes summed pairwise at the end),
//! so results are bit-identical between a request run alone and in a batch.

use pagoda_backend::DType;

use crate::par::SharedMut;

/// The output of one matmul, written by several threads at disjoint columns.
pub type OutPtr = SharedMut<f32>;
use pagoda_backend::quant::{
    QK, dequantize_block_q4_0, dequantize_block_q4_1, dequantize_block_q8_0,
};

/// Tokens that share one decoded weight block.
pub const TOKEN_TILE: usize = 8;

/// Lanes of the f32 accumulators (one AVX register).
const LANES: usize = 8;

/// Decodes block `b` of a weight row into 32 floats.
#[inline(always)]
fn decode_block(dtype: DType, row: &[u8], b: usize, out: &mut [f32; QK]) {
    match dtype {
        DType::Q4_1 => dequantize_block_q4_1(&row[b * 20..b * 20 + 20], out),
        DType::Q4_0 => dequantize_block_q4_0(&row[b * 18..b * 18 + 18], out),
        DType::Q8_0 => dequantize_block_q8_0(&row[b * 34..b * 34 + 34], out),
        DType::F32 => {
            for (j, o) in out.iter_mut().enumerate() {
                let i = (b * QK + j) * 4;
                *o = f32::from_le_bytes([row[i], row[i + 1], row[i + 2], row[i + 3]]);
            }
        }
        DType::F16 => {
            for (j, o) in out.iter_mut().enumerate() {
                let i = (b * QK + j) * 2;
                *o = half::f16::from_le_bytes([row[i], row[i + 1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (j, o) in out.iter_mut().enumerate() {
                let i = (b * QK + j) * 2;
                *o = half::bf16::from_le_bytes([row[i], row[i + 1]]).to_f32();
            }
        }
        DType::U32 => out.fill(0.0),
    }
}

/// `acc += w · x` over one block, 8 lanes.
#[inline(always)]
fn fma_block(acc: &mut [f32; LANES], w: &[f32; QK], x: &[f32]) {
    let x = &x[..QK];
    for c in 0..QK / LANES {
        for l in 0..LANES {
            acc[l] = w[c * LANES + l].mul_add(x[c * LANES + l], acc[l]);
        }
    }
}

/// Pairwise sum of the lanes (fixed order).
#[inline(always)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// Handles rows `rows` of `w` for all `n` tokens, for `k` a multiple of 32.
///
/// x: (n, k) f32; w: the whole weight, `row_bytes` per row; out: (n, m) f32
/// written through `out_ptr` at `(t, j)` for `j` in `rows` only.
#[inline(always)]
fn rows_body(
    x: &[f32],
    w: &[u8],
    dtype: DType,
    row_bytes: usize,
    out: OutPtr,
    n: usize,
    k: usize,
    m: usize,
    rows: std::ops::Range<usize>,
) {
    let nb = k / QK;
    let mut wb = [0f32; QK];
    let mut t0 = 0;
    while t0 < n {
        let tn = TOKEN_TILE.min(n - t0);
        for j in rows.clone() {
            let row = &w[j * row_bytes..(j + 1) * row_bytes];
            let mut acc = [[0f32; LANES]; TOKEN_TILE];
            for b in 0..nb {
                decode_block(dtype, row, b, &mut wb);
                for (t, a) in acc.iter_mut().enumerate().take(tn) {
                    let xo = (t0 + t) * k + b * QK;
                    fma_block(a, &wb, &x[xo..xo + QK]);
                }
            }
            for (t, a) in acc.iter().enumerate().take(tn) {
                // SAFETY: (t0 + t, j) is inside (n, m) and column j belongs to
                // this call's `rows` only, so no other thread writes it.
                unsafe { out.write((t0 + t) * m + j, reduce(a)) };
            }
        }
        t0 += tn;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2(
    x: &[f32],
    w: &[u8],
    dtype: DType,
    row_bytes: usize,
    out: OutPtr,
    n: usize,
    k: usize,
    m: usize,
    rows: std::ops::Range<usize>,
) {
    rows_body(x, w, dtype, row_bytes, out, n, k, m, rows)
}

/// Computes the rows `rows` of the product (all tokens), choosing the widest
/// instruction set the CPU has. `k` must be a multiple of 32.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows(
    x: &[f32],
    w: &[u8],
    dtype: DType,
    out: OutPtr,
    n: usize,
    k: usize,
    m: usize,
    rows: std::ops::Range<usize>,
) {
    let row_bytes = dtype.row_bytes(k).unwrap_or(0);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { rows_avx2(x, w, dtype, row_bytes, out, n, k, m, rows) };
            return;
        }
    }
    rows_body(x, w, dtype, row_bytes, out, n, k, m, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_backend::quant::{dequantize_row, quantize_row};
    use rand::{Rng, SeedableRng};

    fn reference(x: &[f32], w: &[f32], n: usize, k: usize, m: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * m];
        for t in 0..n {
            for j in 0..m {
                out[t * m + j] = (0..k)
                    .map(|i| x[t * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_for_every_weight_dtype() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, k, m) = (11, 96, 13);
        let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let wf: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0] {
            let rb = dtype.row_bytes(k).unwrap();
            let mut w = vec![0u8; m * rb];
            for j in 0..m {
                quantize_row(dtype, &wf[j * k..(j + 1) * k], &mut w[j * rb..(j + 1) * rb]).unwrap();
            }
            // Compare against the product with the dequantized weights.
            let mut wd = vec![0f32; m * k];
            for j in 0..m {
                dequantize_row(dtype, &w[j * rb..(j + 1) * rb], &mut wd[j * k..(j + 1) * k])
                    .unwrap();
            }
            let want = reference(&x, &wd, n, k, m);
            let mut out = vec![0f32; n * m];
            matmul_rows(&x, &w, dtype, OutPtr::new(&mut out), n, k, m, 0..m);
            for (a, b) in out.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-4, "{dtype}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn batch_and_split_do_not_change_results() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (n, k, m) = (13, 64, 10);
        let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<u8> = (0..m * DType::Q4_1.row_bytes(k).unwrap())
            .map(|_| rng.random())
            .collect();
        // Sanitize the f16 scales so they are finite.
        let rb = DType::Q4_1.row_bytes(k).unwrap();
        let mut w = w;
        for blk in w.chunks_exact_mut(20) {
            blk[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            blk[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        }
        let mut all = vec![0f32; n * m];
        matmul_rows(&x, &w, DType::Q4_1, OutPtr::new(&mut all), n, k, m, 0..m);
        for t in 0..n {
            let mut one = vec![0f32; m];
            let o = OutPtr::new(&mut one);
            matmul_rows(&x[t * k..(t + 1) * k], &w, DType::Q4_1, o, 1, k, m, 0..4);
            matmul_rows(&x[t * k..(t + 1) * k], &w, DType::Q4_1, o, 1, k, m, 4..m);
            assert_eq!(&all[t * m..(t + 1) * m], &one[..], "token {t}");
        }
        assert_eq!(rb, 40);
    }
}
