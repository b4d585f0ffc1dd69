//! Rotary position embedding, llama.cpp NORM mode: adjacent pairs
//! `(x[2i], x[2i+1])` of each head rotate by `θ_i = pos · base^(-2i/rope_dim)`.
//!
//! Angles are computed in f64 (then cast), so positions in the thousands keep
//! full f32 accuracy.

/// Largest `rope_dim / 2` supported without allocation.
pub const MAX_PAIRS: usize = 256;

/// Rotates all heads of one token in place. x: (num_heads, head_dim) f32.
#[inline]
pub fn rope_token(
    x: &mut [f32],
    pos: u32,
    num_heads: usize,
    head_dim: usize,
    rope_dim: usize,
    base: f32,
) {
    let freqs = Freqs::new(rope_dim, base);
    rope_token_with(x, pos, num_heads, head_dim, &freqs)
}

/// The per-pair frequencies `base^(-2i/rope_dim)` (f64), computed once per
/// call instead of once per token.
pub struct Freqs {
    pairs: usize,
    inv: [f64; MAX_PAIRS],
}

impl Freqs {
    /// Frequencies of the first `min(rope_dim / 2, MAX_PAIRS)` pairs.
    pub fn new(rope_dim: usize, base: f32) -> Freqs {
        let pairs = (rope_dim / 2).min(MAX_PAIRS);
        let mut inv = [0f64; MAX_PAIRS];
        for (i, f) in inv.iter_mut().enumerate().take(pairs) {
            *f = (base as f64).powf(-2.0 * i as f64 / rope_dim as f64);
        }
        Freqs { pairs, inv }
    }
}

/// [`rope_token`] with precomputed frequencies (the same bits).
#[inline]
pub fn rope_token_with(x: &mut [f32], pos: u32, num_heads: usize, head_dim: usize, f: &Freqs) {
    let pairs = f.pairs;
    let mut cos = [0f32; MAX_PAIRS];
    let mut sin = [0f32; MAX_PAIRS];
    for i in 0..pairs {
        let theta = pos as f64 * f.inv[i];
        cos[i] = theta.cos() as f32;
        sin[i] = theta.sin() as f32;
    }
    for h in 0..num_heads {
        let head = &mut x[h * head_dim..(h + 1) * head_dim];
        for i in 0..pairs {
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * cos[i] - b * sin[i];
            head[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_pairs_rotate() {
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        rope_token(&mut x, 0, 1, 4, 4, 10000.0);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        let mut y = [1.0f32, 0.0, 1.0, 0.0];
        rope_token(&mut y, 1, 1, 4, 4, 10000.0);
        // Pair 0 rotates by 1 rad, pair 1 by 10000^(-1/2) = 0.01 rad.
        assert!((y[0] - 1f32.cos()).abs() < 1e-6 && (y[1] - 1f32.sin()).abs() < 1e-6);
        assert!((y[2] - 0.01f32.cos()).abs() < 1e-6 && (y[3] - 0.01f32.sin()).abs() < 1e-6);
    }
}
