//! Unit tests of the parent module.

//! Blocks built byte by byte from the format definitions above, with the
//! expected values worked out by hand in the comments.

use super::*;

fn deq(dtype: DType, src: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    dequantize_row(dtype, src, &mut out).expect("dequantize_row");
    out
}

/// Exact comparison, bit for bit (so -0.0 differs from 0.0).
fn assert_bits(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (j, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "element {j}: got {g}, want {w}");
    }
}

#[test]
fn q8_0_block_by_hand() {
    // d = f16 0x3800: sign 0, exponent 0b01110 = 14, mantissa 0
    //   => 2^(14 - 15) = 0.5. Little-endian bytes [0x00, 0x38].
    let mut b = vec![0x00, 0x38];
    // qs as two's-complement bytes; the rest stay 0.
    let qs = [0x80u8, 0x7F, 0xFF, 0x01, 0x10, 0xF0];
    b.extend_from_slice(&qs);
    b.resize(34, 0);
    let mut want = [0f32; 32];
    want[0] = -64.0; // 0x80 = -128; 0.5 * -128
    want[1] = 63.5; //  0x7F =  127; 0.5 * 127
    want[2] = -0.5; //  0xFF =   -1; 0.5 * -1
    want[3] = 0.5; //   0x01 =    1
    want[4] = 8.0; //   0x10 =   16; 0.5 * 16
    want[5] = -8.0; //  0xF0 =  -16
    assert_bits(&deq(DType::Q8_0, &b, 32), &want);

    // A second block with d = 0x3C00 = 2^(15 - 15) = 1.0 and qs[31] = 0x05:
    // element 32 + 31 = 63 is 5.0; the blocks stay in order.
    let mut row = b.clone();
    row.extend_from_slice(&[0x00, 0x3C]);
    row.extend_from_slice(&[0u8; 31]);
    row.push(0x05);
    let got = deq(DType::Q8_0, &row, 64);
    assert_bits(&got[..32], &want);
    assert_eq!(got[63], 5.0);
    assert!(got[32..63].iter().all(|&x| x == 0.0));
}

#[test]
fn q4_0_block_by_hand() {
    // d = f16 0x4000: exponent 16 => 2^(16 - 15) = 2.0.
    let mut b = vec![0x00, 0x40];
    let mut qs = [0x88u8; 16]; // nibbles 8 and 8: (8 - 8) * 2 = 0
    qs[0] = 0x9F; // low 0xF = 15 -> elem 0:  2 * (15 - 8) =  14; high 9 -> elem 16: 2 * (9 - 8) = 2
    qs[1] = 0x08; // low 8        -> elem 1:  2 * (8 - 8)  =   0; high 0 -> elem 17: 2 * (0 - 8) = -16
    qs[2] = 0x7A; // low 0xA = 10 -> elem 2:  2 * (10 - 8) =   4; high 7 -> elem 18: 2 * (7 - 8) = -2
    qs[15] = 0x0F; // low 15      -> elem 15: 14;                 high 0 -> elem 31: -16
    b.extend_from_slice(&qs);
    let mut want = [0f32; 32];
    want[0] = 14.0;
    want[16] = 2.0;
    want[17] = -16.0;
    want[2] = 4.0;
    want[18] = -2.0;
    want[15] = 14.0;
    want[31] = -16.0;
    assert_bits(&deq(DType::Q4_0, &b, 32), &want);
}

#[test]
fn q4_1_block_by_hand() {
    // d = f16 0x3400: exponent 13 => 2^(13 - 15) = 0.25.
    // m = f16 0xC000: sign 1, exponent 16 => -2.0.
    let mut b = vec![0x00, 0x34, 0x00, 0xC0];
    let mut qs = [0x00u8; 16]; // nibble 0: 0.25 * 0 - 2 = -2
    qs[0] = 0x3A; // low 10 -> elem 0:  0.25 * 10 - 2 =  0.5;  high 3  -> elem 16: 0.75 - 2 = -1.25
    qs[7] = 0x51; // low 1  -> elem 7:  0.25 - 2      = -1.75; high 5  -> elem 23: 1.25 - 2 = -0.75
    qs[15] = 0xF0; // low 0 -> elem 15: -2;                    high 15 -> elem 31: 3.75 - 2 =  1.75
    b.extend_from_slice(&qs);
    let mut want = [-2f32; 32];
    want[0] = 0.5;
    want[16] = -1.25;
    want[7] = -1.75;
    want[23] = -0.75;
    want[31] = 1.75;
    assert_bits(&deq(DType::Q4_1, &b, 32), &want);
}

#[test]
fn f16_by_hand() {
    let bits: [u16; 8] = [
        0x3C00, // exponent 15, mantissa 0: 1.0
        0xC000, // sign, exponent 16: -2.0
        0x7BFF, // exponent 30, mantissa 1023: 2^15 * (1 + 1023/1024) = 65504 (largest finite)
        0x0001, // subnormal: 1 * 2^-24
        0x3555, // exponent 13, mantissa 0x155 = 341: 2^-2 * (1 + 341/1024) = 1365/4096
        0x7C00, // exponent 31, mantissa 0: +inf
        0x8000, // sign only: -0.0
        0x03FF, // largest subnormal: 1023 * 2^-24
    ];
    let src: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let want = [
        1.0,
        -2.0,
        65504.0,
        2f32.powi(-24),
        1365.0 / 4096.0, // 0.333251953125
        f32::INFINITY,
        -0.0,
        1023.0 * 2f32.powi(-24),
    ];
    assert_bits(&deq(DType::F16, &src, 8), &want);
}

#[test]
fn bf16_by_hand() {
    // bf16 is the top half of an f32: value = f32::from_bits(bits << 16).
    let bits: [u16; 7] = [
        0x3F80, // 0x3F800000: exponent 127, mantissa 0: 1.0
        0xC040, // 0xC0400000: sign, exponent 128, mantissa 0.5: -(1.5 * 2) = -3.0
        0x4049, // 0x40490000: exponent 128, mantissa 0x490000 / 2^23 = 0.5703125: 3.140625
        0x0000, // 0.0
        0x8000, // -0.0
        0x7F80, // +inf
        0x0001, // 0x00010000: subnormal 65536 * 2^-149 = 2^-133
    ];
    let src: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let want = [
        1.0,
        -3.0,
        3.140625,
        0.0,
        -0.0,
        f32::INFINITY,
        2f32.powi(-133),
    ];
    assert_bits(&deq(DType::BF16, &src, 7), &want);
}

#[test]
fn f32_by_hand() {
    let src = [
        0x00, 0x00, 0xC0, 0x3F, // 0x3FC00000: exponent 127, mantissa 0.5: 1.5
        0x00, 0x00, 0x80, 0xBF, // 0xBF800000: -1.0
        0x01, 0x00, 0x00, 0x00, // 0x00000001: 2^-149, the smallest subnormal
        0xFF, 0xFF, 0x7F, 0x7F, // 0x7F7FFFFF: f32::MAX
    ];
    let want = [1.5, -1.0, f32::from_bits(1), f32::MAX];
    assert_eq!(want[2], 2f32.powi(-126) * 2f32.powi(-23));
    assert_bits(&deq(DType::F32, &src, 4), &want);
}

/// Deterministic pseudo-random floats in [-1, 1) (64-bit LCG).
fn lcg_floats(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn q8_0_round_trip(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut q = vec![0u8; x.len() / 32 * 34];
    quantize_row_q8_0(x, &mut q).expect("quantize");
    let back = deq(DType::Q8_0, &q, x.len());
    (q, back)
}

#[test]
fn q8_0_round_trip_error_is_at_most_half_a_step() {
    // Blocks of very different magnitudes.
    let mut x = lcg_floats(1, 32 * 8);
    for (b, scale) in [1.0f32, 1e-3, 100.0, 3.7, 1e4, 0.5, 1e-6, 42.0]
        .iter()
        .enumerate()
    {
        for v in &mut x[b * 32..(b + 1) * 32] {
            *v *= scale;
        }
    }
    let (q, back) = q8_0_round_trip(&x);
    for (b, block) in x.chunks_exact(32).enumerate() {
        let qb = &q[b * 34..(b + 1) * 34];
        let d = f16_at(qb, 0); // the stored scale
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d_exact = amax / 127.0;
        // Rounding x / d_exact to an integer q costs at most d_exact / 2.
        // The scale is stored as f16 (d), so dequantizing with d is off
        // by |q| * |d - d_exact| more: zero when d_exact is an f16 (see
        // the test below), all of x when d_exact underflows f16 (the
        // 1e-6 block, as in ggml).
        for j in 0..32 {
            let qj = qb[2 + j] as i8 as f32;
            let bound = d_exact / 2.0 + qj.abs() * (d - d_exact).abs() + amax * 1e-6;
            let err = (block[j] - back[b * 32 + j]).abs();
            assert!(
                err <= bound,
                "block {b} elem {j}: |{} - {}| = {err} > {bound}",
                block[j],
                back[b * 32 + j]
            );
        }
        // The largest magnitude maps to +-127.
        let jmax = block.iter().position(|v| v.abs() == amax).expect("max");
        assert_eq!((qb[2 + jmax] as i8).unsigned_abs(), 127, "block {b}");
    }
}

#[test]
fn q8_0_round_trip_with_an_exact_scale_is_within_d_over_2() {
    // amax = 63.5 => d = 63.5 / 127 = 0.5, exact in f16, so the only error
    // is rounding x / 0.5 = 2x to an integer: at most 0.5 steps = d / 2.
    let mut x: Vec<f32> = lcg_floats(9, 64).iter().map(|v| v * 63.0).collect();
    x[5] = -63.5;
    x[40] = 63.5;
    x[41] = 0.25; // exactly half a step: rounds away from zero to q = 1
    let (q, back) = q8_0_round_trip(&x);
    assert_eq!(&q[0..2], &[0x00, 0x38]); // f16 0.5
    assert_eq!(&q[34..36], &[0x00, 0x38]);
    for (j, (a, b)) in x.iter().zip(&back).enumerate() {
        assert!((a - b).abs() <= 0.25, "elem {j}: {a} -> {b}");
    }
    assert_eq!(q[2 + 5] as i8, -127);
    assert_eq!(q[34 + 2 + 8] as i8, 127);
    assert_eq!(q[34 + 2 + 9] as i8, 1);
    assert_eq!(back[41], 0.5);
}

#[test]
fn q8_0_zero_block() {
    let x = [0f32; 32];
    let (q, back) = q8_0_round_trip(&x);
    assert_eq!(q, vec![0u8; 34]); // d = 0, every q = 0
    assert_bits(&back, &[0.0; 32]);
    // d = 0 zeroes whatever the quants are.
    let mut b = vec![0u8, 0];
    b.extend((0..32u8).map(|j| j.wrapping_mul(37)));
    assert!(deq(DType::Q8_0, &b, 32).iter().all(|&v| v == 0.0));
}

#[test]
fn quantize_row_kv_types_round_trip() {
    let x = lcg_floats(3, 64);
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0] {
        let mut q = vec![0u8; dtype.row_bytes(64).expect("row")];
        quantize_row(dtype, &x, &mut q).expect("quantize_row");
        let back = deq(dtype, &q, 64);
        let tol = match dtype {
            DType::F32 => 0.0,
            DType::F16 => 1.0 / 2048.0,
            DType::BF16 => 1.0 / 256.0,
            _ => 1.0 / 127.0,
        };
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= tol, "{dtype}: {a} -> {b}");
        }
    }
    let mut q = vec![0u8; 128];
    assert!(quantize_row(DType::U32, &x[..32], &mut q).is_err());
}

#[test]
fn q4_0_quantize_by_hand() {
    // x[j] = (j mod 16) - 8: the largest magnitude is x[0] = x[16] = -8, so
    // d = -8 / -8 = 1 (f16 0x3C00) and q = trunc(x + 8.5) = j mod 16, which
    // dequantizes back exactly.
    let x: Vec<f32> = (0..32).map(|j| (j % 16) as f32 - 8.0).collect();
    let mut q = vec![0u8; 18];
    quantize_row(DType::Q4_0, &x, &mut q).expect("quantize");
    assert_eq!(&q[0..2], &[0x00, 0x3C]);
    for j in 0..16 {
        assert_eq!(q[2 + j], j as u8 | ((j as u8) << 4), "byte {j}");
    }
    assert_bits(&deq(DType::Q4_0, &q, 32), &x);
    // A positive extreme: max = 4 gives d = -0.5; 4 maps to q = 0
    // (trunc(4 * -2 + 8.5) = 0) and back to -0.5 * (0 - 8) = 4.
    let mut y = [0f32; 32];
    y[3] = 4.0;
    y[20] = -1.0; // -1 * -2 + 8.5 = 10.5 -> 10 -> -0.5 * 2 = -1
    quantize_row(DType::Q4_0, &y, &mut q).expect("quantize");
    assert_eq!(&q[0..2], &f16::from_f32(-0.5).to_le_bytes());
    assert_eq!(q[2 + 3] & 0x0F, 0);
    assert_eq!(q[2 + 4] >> 4, 10);
    let back = deq(DType::Q4_0, &q, 32);
    assert_eq!(back[3], 4.0);
    assert_eq!(back[20], -1.0);
    assert_eq!(back[0], 0.0); // 0 -> q = 8 -> 0
}

#[test]
fn q4_1_quantize_by_hand() {
    // x[j] = (j mod 16) / 4 - 2: min -2 (f16 0xC000), max 1.75, so
    // d = 3.75 / 15 = 0.25 (0x3400) and q = trunc((x + 2) * 4 + 0.5) = j mod 16.
    let x: Vec<f32> = (0..32).map(|j| (j % 16) as f32 * 0.25 - 2.0).collect();
    let mut q = vec![0u8; 20];
    quantize_row(DType::Q4_1, &x, &mut q).expect("quantize");
    assert_eq!(&q[0..4], &[0x00, 0x34, 0x00, 0xC0]);
    for j in 0..16 {
        assert_eq!(q[4 + j], j as u8 | ((j as u8) << 4), "byte {j}");
    }
    assert_bits(&deq(DType::Q4_1, &q, 32), &x);
}

#[test]
fn q4_zero_blocks() {
    let x = [0f32; 32];
    let mut q = vec![0u8; 18];
    quantize_row_q4_0(&x, &mut q).expect("q4_0");
    // d = 0 / -8 = -0.0 (f16 0x8000), exactly as ggml stores it; q = trunc(8.5) = 8.
    assert_eq!(&q[0..2], &[0x00, 0x80]);
    assert!(q[2..].iter().all(|&b| b == 0x88));
    assert!(deq(DType::Q4_0, &q, 32).iter().all(|&v| v == 0.0));
    let mut q = vec![0u8; 20];
    quantize_row_q4_1(&x, &mut q).expect("q4_1");
    assert_eq!(q, vec![0u8; 20]); // d = 0, m = 0, q = trunc(0.5) = 0
}

#[test]
fn q4_round_trip_errors_are_within_half_a_step() {
    // Blocks of very different magnitudes, as for Q8_0 above.
    let mut x = lcg_floats(5, 32 * 8);
    for (b, scale) in [1.0f32, 1e-3, 100.0, 3.7, 1e4, 0.5, 2e-2, 42.0]
        .iter()
        .enumerate()
    {
        for v in &mut x[b * 32..(b + 1) * 32] {
            *v *= scale;
        }
    }
    let mut q0 = vec![0u8; 8 * 18];
    quantize_row_q4_0(&x, &mut q0).expect("q4_0");
    let back0 = deq(DType::Q4_0, &q0, x.len());
    let mut q1 = vec![0u8; 8 * 20];
    quantize_row_q4_1(&x, &mut q1).expect("q4_1");
    let back1 = deq(DType::Q4_1, &q1, x.len());
    for (b, block) in x.chunks_exact(32).enumerate() {
        // Q4_0: d_exact = max / -8; q = round(x / d) + 8 except x / d = 8
        // (an element of the extreme's magnitude, opposite sign), clamped
        // to 15: one whole step. The f16 scale adds |q - 8| * |d - d_exact|.
        let qb = &q0[b * 18..(b + 1) * 18];
        let d = f16_at(qb, 0);
        let max = block
            .iter()
            .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
        let d_exact = max / -8.0;
        for j in 0..32 {
            let clamped = block[j] / d_exact > 7.5;
            let steps = if clamped { 1.0 } else { 0.5 };
            let bound = steps * d_exact.abs() + 8.0 * (d - d_exact).abs() + max.abs() * 1e-6;
            let err = (block[j] - back0[b * 32 + j]).abs();
            assert!(err <= bound, "q4_0 block {b} elem {j}: {err} > {bound}");
        }
        // Q4_1: d_exact = (max - min) / 15, every x within half a step,
        // plus the f16 rounding of d (times q <= 15) and of m.
        let qb = &q1[b * 20..(b + 1) * 20];
        let (d, m) = (f16_at(qb, 0), f16_at(qb, 2));
        let lo = block.iter().copied().fold(f32::MAX, f32::min);
        let hi = block.iter().copied().fold(-f32::MAX, f32::max);
        let d_exact = (hi - lo) / 15.0;
        for j in 0..32 {
            let bound =
                0.5 * d_exact + 15.0 * (d - d_exact).abs() + (m - lo).abs() + (hi - lo) * 1e-6;
            let err = (block[j] - back1[b * 32 + j]).abs();
            assert!(err <= bound, "q4_1 block {b} elem {j}: {err} > {bound}");
        }
    }
}

#[test]
fn bad_lengths_are_errors() {
    let mut out = [0f32; 32];
    assert!(dequantize_row(DType::Q8_0, &[0u8; 33], &mut out).is_err());
    assert!(dequantize_row(DType::Q4_1, &[0u8; 20], &mut out[..31]).is_err());
    assert!(dequantize_row(DType::F16, &[0u8; 63], &mut out).is_err());
    assert!(dequantize_row(DType::U32, &[0u8; 128], &mut out).is_err());
    assert!(quantize_row_q8_0(&[0f32; 31], &mut [0u8; 34]).is_err());
}
