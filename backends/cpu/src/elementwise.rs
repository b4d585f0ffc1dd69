//! Elementwise ops: SwiGLU's `silu(gate) * up`, residual add.

/// `out = silu(gate) * up`, with `silu(g) = g / (1 + e^-g)`.
#[inline]
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
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
}
