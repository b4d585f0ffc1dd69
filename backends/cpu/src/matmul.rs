//! `out (n, m) = x (n, k) · w (m, k)ᵀ` with `w` in any weight dtype, f32 activations.
//!
//! Weights are never dequantized as a whole. For a few tokens (decode), each
//! 32-element block of a weight row is decoded into registers and immediately
//! multiplied with the matching block of the activation rows; from
//! `PREDECODE_MIN_TOKENS` tokens on (prefill), a block of 48 rows is decoded
//! to f32 in a per-thread buffer and shared by all tokens. Either way the work
//! is tiled as `R` weight rows × `T` tokens (each weight vector feeds `T`
//! tokens, each activation vector `R` rows), but every (token, row) dot
//! product has its own 8-lane accumulator
//! that sees the products in one fixed order: block by block, and inside a
//! block the four 8-element chunks in order, `acc = fma(w, x, acc)`; the lanes
//! are summed pairwise at the end ([`crate::simd::reduce`]). So results are
//! bit-identical whatever the batch size, the tile shape or the thread count,
//! and the portable path computes the very same numbers as the AVX2 one.

use std::ops::Range;

use pagoda_backend::DType;
use pagoda_backend::quant::QK;

use crate::par::SharedMut;
use crate::simd::{LANES, reduce, scalar};

/// The output of one matmul, written by several threads at disjoint columns:
/// element `(t, j)` at `t * stride + j`, overwritten or (with `accumulate`)
/// added to.
#[derive(Clone, Copy)]
pub struct OutPtr {
    buf: SharedMut<f32>,
    stride: usize,
    accumulate: bool,
}

impl OutPtr {
    /// A dense `(n, m)` output (stride `m`, taken from the call), overwritten.
    pub fn new(out: &mut [f32]) -> Self {
        OutPtr {
            buf: SharedMut::new(out),
            stride: 0,
            accumulate: false,
        }
    }

    /// The stride for a product of `m` columns: `m` for a dense output.
    fn for_width(mut self, m: usize) -> Self {
        if self.stride == 0 {
            self.stride = m;
        }
        self
    }

    /// An output with row stride `stride`, added to when `accumulate`.
    pub fn strided(buf: SharedMut<f32>, stride: usize, accumulate: bool) -> Self {
        OutPtr {
            buf,
            stride,
            accumulate,
        }
    }

    /// Whether `(n, m)` fits.
    fn holds(&self, n: usize, m: usize) -> bool {
        n == 0 || m == 0 || ((n - 1) * self.stride + m <= self.buf.len() && m <= self.stride)
    }

    /// Stores `v` at `(t, j)`.
    ///
    /// # Safety
    /// No other thread accesses `(t, j)` concurrently.
    #[inline(always)]
    unsafe fn put(&self, t: usize, j: usize, v: f32) {
        let i = t * self.stride + j;
        // SAFETY: exclusive per the contract; bounds asserted by `slice_mut`.
        unsafe {
            if self.accumulate {
                self.buf.slice_mut(i, 1)[0] += v;
            } else {
                self.buf.write(i, v);
            }
        }
    }
}

/// Most tokens that share one decoded weight block.
pub const TOKEN_TILE: usize = 8;

/// Weight rows visited for every token tile before moving on (keeps them in
/// L1/L2 while the activations stream past).
const ROW_BLOCK: usize = 64;

/// From this many tokens on, weight rows are decoded to f32 once per block
/// of rows and shared by all tokens (same results, less decoding).
const PREDECODE_MIN_TOKENS: usize = 16;

/// Weight rows decoded at a time on that path.
const DECODE_BLOCK: usize = 48;

/// `acc += w · x` over one block, 8 lanes (the portable path).
#[inline(always)]
fn fma_block(acc: &mut [f32; LANES], w: &[f32; QK], x: &[f32]) {
    let x = &x[..QK];
    for c in 0..QK / LANES {
        for l in 0..LANES {
            acc[l] = w[c * LANES + l].mul_add(x[c * LANES + l], acc[l]);
        }
    }
}

/// Portable version of [`matmul_rows`]: rows `rows` of `w` for all `n`
/// tokens, for `k` a multiple of 32.
///
/// x: (n, k) f32; w: the whole weight, `row_bytes` per row; out: (n, m) f32
/// written through `out` at `(t, j)` for `j` in `rows` only.
#[allow(clippy::too_many_arguments)]
fn rows_portable(
    x: &[f32],
    w: &[u8],
    dtype: DType,
    row_bytes: usize,
    out: OutPtr,
    n: usize,
    k: usize,
    m: usize,
    rows: Range<usize>,
) {
    let out = out.for_width(m);
    let nb = k / QK;
    let mut wb = [0f32; QK];
    let mut t0 = 0;
    while t0 < n {
        let tn = TOKEN_TILE.min(n - t0);
        for j in rows.clone() {
            let row = &w[j * row_bytes..(j + 1) * row_bytes];
            let mut acc = [[0f32; LANES]; TOKEN_TILE];
            for b in 0..nb {
                scalar::decode_block(dtype, row, b, &mut wb);
                for (t, a) in acc.iter_mut().enumerate().take(tn) {
                    let xo = (t0 + t) * k + b * QK;
                    fma_block(a, &wb, &x[xo..xo + QK]);
                }
            }
            for (t, a) in acc.iter().enumerate().take(tn) {
                // SAFETY: (t0 + t, j) is inside (n, m) and column j belongs to this call's `rows` only, so no other thread writes it.
                unsafe { out.put(t0 + t, j, reduce(a)) };
            }
        }
        t0 += tn;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use pagoda_backend::quant::QK;

    use super::{DECODE_BLOCK, OutPtr, PREDECODE_MIN_TOKENS, ROW_BLOCK, TOKEN_TILE};
    use crate::simd::avx2::{Block, decode_at, reduce, row_bytes};

    /// One `R` rows × `T` tokens tile over the whole of `k`.
    ///
    /// x: token `t` of the tile at `x + t·k` (k f32 each); w: row `r` of the
    /// tile at `w + r·row_bytes`; out: (t, j0 + r) written at `t·m + j0 + r`
    /// of `out` (shifted to the tile's first token).
    ///
    /// # Safety
    /// Every address above is in bounds; `out`'s columns `j0 .. j0 + R` are
    /// this thread's; AVX2/FMA/F16C available.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<F: Block, const R: usize, const T: usize>(
        x: *const f32,
        k: usize,
        w: *const u8,
        row_bytes: usize,
        out: OutPtr,
        t0: usize,
        j0: usize,
    ) {
        // SAFETY: the caller guarantees the bounds, the features and the exclusive output columns.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            for b in 0..k / QK {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let wr = w.add(r * row_bytes);
                    _mm_prefetch::<_MM_HINT_T0>(
                        wr.wrapping_add(R * row_bytes + b / F::SUBS * F::BYTES) as *const i8,
                    );
                    let wv = decode_at::<F>(wr, b);
                    for (t, a) in acc_r.iter_mut().enumerate() {
                        let xb = x.add(t * k + b * QK);
                        for (c, wc) in wv.iter().enumerate() {
                            *a = _mm256_fmadd_ps(*wc, _mm256_loadu_ps(xb.add(c * 8)), *a);
                        }
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (t, a) in acc_r.iter().enumerate() {
                    out.put(t0 + t, j0 + r, reduce(*a));
                }
            }
        }
    }

    /// All rows of `rows` for tokens `t0 .. t0 + T`, `R` rows at a time.
    ///
    /// # Safety
    /// As [`rows`], for `t0 + T <= n`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn token_tile<F: Block, const R: usize, const T: usize>(
        x: &[f32],
        w: &[u8],
        out: OutPtr,
        k: usize,
        t0: usize,
        rows: Range<usize>,
    ) {
        let row_bytes = row_bytes::<F>(k);
        let xp = x[t0 * k..].as_ptr();
        let mut j = rows.start;
        // SAFETY: rows.end <= m, w holds m rows and x holds tokens t0..t0+T (checked by `rows`); the caller owns columns `rows`.
        unsafe {
            let wp = w.as_ptr();
            while j + R <= rows.end {
                tile::<F, R, T>(xp, k, wp.add(j * row_bytes), row_bytes, out, t0, j);
                j += R;
            }
            while j < rows.end {
                tile::<F, 1, T>(xp, k, wp.add(j * row_bytes), row_bytes, out, t0, j);
                j += 1;
            }
        }
    }

    /// One `R` rows × `T` tokens tile over the whole of `k`, weights already
    /// decoded to f32: the same products in the same order as [`tile`]
    /// (chunk by chunk, `acc = fma(w, x, acc)`), but the `R` weight vectors
    /// and `T` activation vectors of a chunk are each loaded once.
    ///
    /// x: token `t` at `x + t·k`; wd: row `r` at `wd + r·k` (f32); out as in [`tile`].
    ///
    /// # Safety
    /// As [`tile`].
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn f32_tile<const R: usize, const T: usize>(
        x: *const f32,
        k: usize,
        wd: *const f32,
        out: OutPtr,
        t0: usize,
        j0: usize,
    ) {
        // SAFETY: the caller guarantees the bounds, the features and the exclusive output columns.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let mut c = 0;
            while c < k {
                let mut wv = [_mm256_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(wd.add(r * k + c));
                }
                for t in 0..T {
                    let xv = _mm256_loadu_ps(x.add(t * k + c));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        acc_r[t] = _mm256_fmadd_ps(wv[r], xv, acc_r[t]);
                    }
                }
                c += 8;
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (t, a) in acc_r.iter().enumerate() {
                    out.put(t0 + t, j0 + r, reduce(*a));
                }
            }
        }
    }

    /// Rows `rows` (weights decoded in `wd`, row `j` at `(j − rows.start)·k`)
    /// for tokens `t0 .. t0 + T`, `R` rows at a time.
    ///
    /// # Safety
    /// As [`rows`], for `t0 + T <= n` and `wd` holding `rows.len() · k` floats.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn f32_token_tile<const R: usize, const T: usize>(
        x: &[f32],
        wd: &[f32],
        out: OutPtr,
        k: usize,
        t0: usize,
        rows: Range<usize>,
    ) {
        let xp = x[t0 * k..].as_ptr();
        let mut j = rows.start;
        // SAFETY: per this function's contract.
        unsafe {
            let wp = wd.as_ptr().sub(rows.start * k);
            while j + R <= rows.end {
                f32_tile::<R, T>(xp, k, wp.add(j * k), out, t0, j);
                j += R;
            }
            while j < rows.end {
                f32_tile::<1, T>(xp, k, wp.add(j * k), out, t0, j);
                j += 1;
            }
        }
    }

    thread_local! {
        /// Decoded weight rows of [`rows_predecoded`], kept between calls.
        static DECODED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// [`rows`] for many tokens: each block of [`DECODE_BLOCK`] weight rows is
    /// decoded to f32 once (in a per-thread buffer) and then multiplied with
    /// every token, so the decoding cost is shared by all `n` tokens.
    ///
    /// # Safety
    /// As [`rows`] (whose assertions it relies on).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_predecoded<F: Block>(
        x: &[f32],
        w: &[u8],
        out: OutPtr,
        n: usize,
        k: usize,
        rows: Range<usize>,
    ) {
        let row_bytes = row_bytes::<F>(k);
        DECODED.with_borrow_mut(|wd| {
            if wd.len() < DECODE_BLOCK * k {
                wd.resize(DECODE_BLOCK * k, 0.0);
            }
            let mut r0 = rows.start;
            while r0 < rows.end {
                let rb = r0..(r0 + DECODE_BLOCK).min(rows.end);
                for (i, j) in rb.clone().enumerate() {
                    for b in 0..k / QK {
                        // Row j < m and block b < k/32 lie inside w (asserted
                        // by `rows`); the 32 floats written lie inside wd
                        // (DECODE_BLOCK · k long); features per the contract.
                        // SAFETY: reads and writes are in bounds (above).
                        unsafe {
                            let v = decode_at::<F>(w.as_ptr().add(j * row_bytes), b);
                            let d = wd.as_mut_ptr().add(i * k + b * QK);
                            for (c, vc) in v.iter().enumerate() {
                                _mm256_storeu_ps(d.add(8 * c), *vc);
                            }
                        }
                    }
                }
                let mut t0 = 0;
                while t0 < n {
                    let tn = (n - t0).min(4);
                    let rb = rb.clone();
                    // SAFETY: t0 + tn <= n; wd holds rb's rows; the rest as `rows`.
                    unsafe {
                        match tn {
                            1 => f32_token_tile::<4, 1>(x, wd, out, k, t0, rb),
                            2 => f32_token_tile::<4, 2>(x, wd, out, k, t0, rb),
                            3 => f32_token_tile::<3, 3>(x, wd, out, k, t0, rb),
                            _ => f32_token_tile::<3, 4>(x, wd, out, k, t0, rb),
                        }
                    }
                    t0 += tn;
                }
                r0 = rb.end;
            }
        });
    }

    /// [`super::matmul_rows`] for weights in format `F`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; the caller owns output columns
    /// `rows` (no other thread writes them).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows<F: Block>(
        x: &[f32],
        w: &[u8],
        out: OutPtr,
        n: usize,
        k: usize,
        m: usize,
        rows: Range<usize>,
    ) {
        assert!(k.is_multiple_of(QK * F::SUBS) && rows.end <= m);
        assert!(x.len() >= n * k && w.len() >= m * row_bytes::<F>(k) && out.holds(n, m));
        if n >= PREDECODE_MIN_TOKENS {
            // SAFETY: as this function (bounds asserted above).
            unsafe { rows_predecoded::<F>(x, w, out, n, k, rows) };
            return;
        }
        let mut r0 = rows.start;
        while r0 < rows.end {
            let rb = r0..(r0 + ROW_BLOCK).min(rows.end);
            let mut t0 = 0;
            while t0 < n {
                let tn = (n - t0).min(TOKEN_TILE);
                // SAFETY: bounds asserted above; features and column ownership per this function's contract.
                unsafe {
                    match tn {
                        1 => token_tile::<F, 4, 1>(x, w, out, k, t0, rb.clone()),
                        2 => token_tile::<F, 4, 2>(x, w, out, k, t0, rb.clone()),
                        3 => token_tile::<F, 3, 3>(x, w, out, k, t0, rb.clone()),
                        4 => token_tile::<F, 2, 4>(x, w, out, k, t0, rb.clone()),
                        5 => token_tile::<F, 2, 5>(x, w, out, k, t0, rb.clone()),
                        6 => token_tile::<F, 1, 6>(x, w, out, k, t0, rb.clone()),
                        7 => token_tile::<F, 1, 7>(x, w, out, k, t0, rb.clone()),
                        _ => token_tile::<F, 1, 8>(x, w, out, k, t0, rb.clone()),
                    }
                }
                t0 += tn;
            }
            r0 = rb.end;
        }
    }
}

/// Computes the rows `rows` of the product (all tokens), with AVX2 when the
/// CPU has it. `k` must be a multiple of 32.
///
/// x: (n, k) f32; w: (m, k) in `dtype`; out: (n, m) f32, of which only the
/// columns `rows` are written (the caller's share).
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows(
    x: &[f32],
    w: &[u8],
    dtype: DType,
    out: OutPtr,
    n: usize,
    k: usize,
    m: usize,
    rows: Range<usize>,
) {
    let out = out.for_width(m);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx2_fma_f16c() {
            use crate::simd::avx2 as f;
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); the caller owns output columns `rows`.
            unsafe {
                match dtype {
                    DType::Q4_1 => x86::rows::<f::Q4_1>(x, w, out, n, k, m, rows),
                    DType::Q4_0 => x86::rows::<f::Q4_0>(x, w, out, n, k, m, rows),
                    DType::Q8_0 => x86::rows::<f::Q8_0>(x, w, out, n, k, m, rows),
                    DType::F32 => x86::rows::<f::F32>(x, w, out, n, k, m, rows),
                    DType::F16 => x86::rows::<f::F16>(x, w, out, n, k, m, rows),
                    DType::BF16 => x86::rows::<f::BF16>(x, w, out, n, k, m, rows),
                    DType::Q5_0 => x86::rows::<f::Q5_0>(x, w, out, n, k, m, rows),
                    DType::Q5_1 => x86::rows::<f::Q5_1>(x, w, out, n, k, m, rows),
                    DType::Q4_K => x86::rows::<f::Q4_K>(x, w, out, n, k, m, rows),
                    DType::Q5_K => x86::rows::<f::Q5_K>(x, w, out, n, k, m, rows),
                    DType::Q6_K => x86::rows::<f::Q6_K>(x, w, out, n, k, m, rows),
                    DType::U32 => rows_portable(x, w, dtype, 0, out, n, k, m, rows),
                }
            }
            return;
        }
    }
    let row_bytes = dtype.row_bytes(k).unwrap_or(0);
    rows_portable(x, w, dtype, row_bytes, out, n, k, m, rows)
}

#[cfg(test)]
mod tests;
