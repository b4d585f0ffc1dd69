//! RMSNorm: `out[i] = x[i] / sqrt(mean(x[i]²) + eps) * weight`.
//!
//! The mean square is accumulated in f64 so the result does not depend on
//! summation order (and matches an exact reference closely).

/// One row. x, weight, out: (dim) f32.
#[inline]
pub fn rms_norm_row(x: &[f32], weight: &[f32], out: &mut [f32], eps: f32) {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let scale = (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32;
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_weight_gives_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut out = [0f32; 4];
        rms_norm_row(&x, &[1.0; 4], &mut out, 0.0);
        let rms: f32 = (out.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
        assert!((out[0] - 3.0 / (50.0f32 / 4.0).sqrt()).abs() < 1e-6);
    }
}
