//! Elementwise ops: SwiGLU's `silu(gate) * up`, residual add.

use crate::simd::scalar;

/// `silu(g) · u = g / (1 + e^-g) · u` for one element, with
/// [`scalar::exp`] (the AVX2 path computes the same bits).
#[inline(always)]
fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + scalar::exp(-g)) * u
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(gate.len()).min(up.len());
    let n8 = n / 8 * 8;
    let mut i = 0;
    // SAFETY: every access is below n8 <= the three lengths; AVX2/FMA are enabled on this function and the caller checked the CPU has them.
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let one = _mm256_set1_ps(1.0);
        while i < n8 {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let e = crate::simd::avx2::exp(_mm256_xor_ps(g, sign));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(s, u));
            i += 8;
        }
    }
    for j in n8..n {
        out[j] = silu_mul_one(gate[j], up[j]);
    }
}

/// `out = silu(gate) * up`, with `silu(g) = g / (1 + e^-g)`.
#[inline]
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx2_fma_f16c() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { silu_mul_avx2(gate, up, out) };
            return;
        }
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_mul_one(g, u);
    }
}

/// `x += y`.
#[inline]
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_of_zero_is_zero_and_large_is_identity() {
        let mut out = [0f32; 3];
        silu_mul(&[0.0, 20.0, -20.0], &[1.0, 2.0, 1.0], &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 40.0).abs() < 1e-4);
        assert!(out[2].abs() < 1e-6);
    }

    #[test]
    fn vector_path_matches_scalar_and_f64() {
        let g: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let u: Vec<f32> = (0..1003).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut out = vec![0f32; g.len()];
        silu_mul(&g, &u, &mut out);
        for ((o, &g), &u) in out.iter().zip(&g).zip(&u) {
            assert_eq!(o.to_bits(), silu_mul_one(g, u).to_bits(), "silu({g})");
            let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (*o as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "silu({g})"
            );
        }
    }
}
