//! Unit tests of the parent module.

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
    // k = 512: two K-quant super-blocks, sixteen 32-element blocks.
    let (n, k, m) = (11, 512, 13);
    let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let wf: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    for dtype in DType::WEIGHT_TYPES {
        let rb = dtype.row_bytes(k).unwrap();
        let mut w = vec![0u8; m * rb];
        for j in 0..m {
            quantize_row(dtype, &wf[j * k..(j + 1) * k], &mut w[j * rb..(j + 1) * rb]).unwrap();
        }
        // Compare against the product with the dequantized weights.
        let mut wd = vec![0f32; m * k];
        for j in 0..m {
            dequantize_row(dtype, &w[j * rb..(j + 1) * rb], &mut wd[j * k..(j + 1) * k]).unwrap();
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

fn random_weights(rng: &mut impl Rng, dtype: DType, m: usize, k: usize) -> Vec<u8> {
    let wf: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let rb = dtype.row_bytes(k).unwrap();
    let mut w = vec![0u8; m * rb];
    match dtype {
        DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => {
            // Random nibbles (and fifth bits) with finite, realistic scales.
            for (i, blk) in w.chunks_exact_mut(dtype.block_bytes()).enumerate() {
                rng.fill(&mut blk[..]);
                let d = half::f16::from_f32(0.01 + (i % 7) as f32 * 0.003);
                blk[0..2].copy_from_slice(&d.to_le_bytes());
                if matches!(dtype, DType::Q4_1 | DType::Q5_1) {
                    let m = half::f16::from_f32(-0.05 - (i % 5) as f32 * 0.01);
                    blk[2..4].copy_from_slice(&m.to_le_bytes());
                }
            }
        }
        DType::Q4_K | DType::Q5_K | DType::Q6_K if rng.random::<bool>() => {
            // Random bits everywhere (negative Q6_K scales, every 6-bit scale and min),
            // finite super-block scales.
            for (i, blk) in w.chunks_exact_mut(dtype.block_bytes()).enumerate() {
                rng.fill(&mut blk[..]);
                let d = half::f16::from_f32(0.001 + (i % 7) as f32 * 0.0003);
                if dtype == DType::Q6_K {
                    blk[208..210].copy_from_slice(&d.to_le_bytes());
                } else {
                    let dmin = half::f16::from_f32(0.002 + (i % 5) as f32 * 0.0004);
                    blk[0..2].copy_from_slice(&d.to_le_bytes());
                    blk[2..4].copy_from_slice(&dmin.to_le_bytes());
                }
            }
        }
        _ => {
            for j in 0..m {
                quantize_row(dtype, &wf[j * k..(j + 1) * k], &mut w[j * rb..(j + 1) * rb]).unwrap();
            }
        }
    }
    w
}

const ALL: [DType; 11] = DType::WEIGHT_TYPES;

/// The smallest `k` at least `k` that holds whole blocks of `dtype`.
fn k_for(dtype: DType, k: usize) -> usize {
    k.next_multiple_of(dtype.block_size())
}

#[test]
fn simd_path_matches_portable_bit_for_bit() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (n, k, m) = (PREDECODE_MIN_TOKENS + 3, 512, 21);
    let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    for (dtype, n) in ALL.iter().flat_map(|&d| [(d, 9), (d, n)]) {
        let w = random_weights(&mut rng, dtype, m, k);
        let rb = dtype.row_bytes(k).unwrap();
        let mut fast = vec![0f32; n * m];
        matmul_rows(&x, &w, dtype, OutPtr::new(&mut fast), n, k, m, 0..m);
        let mut slow = vec![0f32; n * m];
        rows_portable(&x, &w, dtype, rb, OutPtr::new(&mut slow), n, k, m, 0..m);
        assert_eq!(fast, slow, "{dtype} n={n}");
    }
}

#[test]
fn every_tile_shape_gives_the_same_bits() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    // Up to 21 tokens: both the fused and the predecoded paths.
    let (n, m) = (PREDECODE_MIN_TOKENS + 5, 137);
    for dtype in ALL {
        let k = k_for(dtype, 96);
        let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w = random_weights(&mut rng, dtype, m, k);
        let mut all = vec![0f32; n * m];
        matmul_rows(&x, &w, dtype, OutPtr::new(&mut all), n, k, m, 0..m);
        // Every batch size from the front, with odd row splits.
        for nn in 1..=n {
            let mut part = vec![0f32; nn * m];
            let o = OutPtr::new(&mut part);
            let xs = &x[(n - nn) * k..];
            for r in [0..3, 3..70, 70..71, 71..m] {
                matmul_rows(xs, &w, dtype, o, nn, k, m, r);
            }
            assert_eq!(&all[(n - nn) * m..], &part[..], "{dtype} n={nn}");
        }
    }
}
