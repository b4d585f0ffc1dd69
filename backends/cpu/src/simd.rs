//! Vector building blocks shared by the kernels: decoding one 32-element
//! weight block into four 8-lane f32 vectors, and the fixed-order lane sum.
//!
//! Every decoder has a scalar twin in [`scalar`] that produces the same
//! floats, so the portable path and the AVX2 path agree on the weights; the
//! AVX2 versions (in [`avx2`]) may only be called from functions compiled with
//! `avx2,fma,f16c` on a CPU that has them (see [`has_avx2_fma_f16c`]).

use pagoda_backend::DType;
use pagoda_backend::kquant;
use pagoda_backend::quant::QK;

/// Lanes of one f32 accumulator (one AVX register).
pub const LANES: usize = 8;

/// Whether the CPU has AVX2, FMA and F16C (checked once, then cached).
#[inline]
pub fn has_avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        // 0 = unknown, 1 = no, 2 = yes.
        static CACHED: AtomicU8 = AtomicU8::new(0);
        match CACHED.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => {
                let yes = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c");
                CACHED.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Pairwise sum of 8 lanes in the fixed order
/// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`, the order
/// [`avx2::reduce`] uses.
#[inline(always)]
pub fn reduce(a: &[f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// Below this, [`scalar::exp`] and [`avx2::exp`] return 0.
const EXP_MIN: f32 = -87.0;
/// Arguments are clamped to at most this (so `2^n` stays a normal float).
const EXP_MAX: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in a part exact in few bits and the rest (Cody–Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Minimax coefficients of `(e^r − 1 − r) / r²` on |r| ≤ ln2/2 (Cephes `expf`).
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// Portable decoders and math: the same floats the AVX2 versions give.
pub mod scalar {
    use super::*;

    /// `e^x` within about 1 ulp, computed as `2^n · e^r` with `r = x − n·ln2`
    /// and a degree-7 polynomial; 0 for `x < −87`, `x` clamped to 88 above.
    /// Operation for operation the same as [`super::avx2::exp`].
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        if x < EXP_MIN {
            return 0.0;
        }
        let x = x.min(EXP_MAX);
        let n = (x * LOG2E).round_ties_even();
        let r = n.mul_add(-LN2_HI, x);
        let r = n.mul_add(-LN2_LO, r);
        let mut p = EXP_POLY[0];
        for c in &EXP_POLY[1..] {
            p = p.mul_add(r, *c);
        }
        let y = p.mul_add(r * r, r) + 1.0;
        y * f32::from_bits(((n as i32 + 127) << 23) as u32)
    }

    #[inline(always)]
    fn f16_at(b: &[u8], i: usize) -> f32 {
        half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
    }

    /// Decodes 32-element block `b` of a weight row: `w = d·q + m` (Q4_1, one rounding),
    /// `w = d·(q − 8)` (Q4_0), `w = d·q` (Q8_0), the stored float, or for Q5_0, Q5_1 and
    /// the K-quants (sub-block `b % 8` of super-block `b / 8`) the reference dequantizer's
    /// values ([`kquant`]).
    #[inline(always)]
    pub fn decode_block(dtype: DType, row: &[u8], b: usize, out: &mut [f32; QK]) {
        match dtype {
            DType::Q4_1 => {
                let blk = &row[b * 20..b * 20 + 20];
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..QK / 2 {
                    let q = blk[4 + j];
                    out[j] = ((q & 0x0F) as f32).mul_add(d, m);
                    out[j + QK / 2] = ((q >> 4) as f32).mul_add(d, m);
                }
            }
            DType::Q4_0 => {
                let blk = &row[b * 18..b * 18 + 18];
                let d = f16_at(blk, 0);
                for j in 0..QK / 2 {
                    let q = blk[2 + j];
                    out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    out[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            DType::Q8_0 => {
                let blk = &row[b * 34..b * 34 + 34];
                let d = f16_at(blk, 0);
                for j in 0..QK {
                    out[j] = (blk[2 + j] as i8) as f32 * d;
                }
            }
            DType::Q5_0 | DType::Q5_1 => {
                let bb = dtype.block_bytes();
                let blk = &row[b * bb..b * bb + bb];
                if dtype == DType::Q5_0 {
                    kquant::dequantize_block_q5_0(blk, out);
                } else {
                    kquant::dequantize_block_q5_1(blk, out);
                }
            }
            DType::Q4_K | DType::Q5_K | DType::Q6_K => {
                let (bb, subs) = (dtype.block_bytes(), dtype.block_size() / QK);
                let at = b / subs * bb;
                kquant::dequantize_sub(dtype, &row[at..at + bb], b % subs, out);
            }
            DType::F32 => {
                for (j, o) in out.iter_mut().enumerate() {
                    let i = (b * QK + j) * 4;
                    *o = f32::from_le_bytes([row[i], row[i + 1], row[i + 2], row[i + 3]]);
                }
            }
            DType::F16 => {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = f16_at(row, (b * QK + j) * 2);
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
}

/// AVX2/FMA/F16C decoders and reductions.
///
/// Every function here is `#[inline(always)]` and uses intrinsics that need
/// `avx2,fma,f16c`: call them only from a function compiled with those
/// features, after [`has_avx2_fma_f16c`] returned true.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    /// One weight format, decoded 32 elements at a time: a whole block, or one
    /// sub-block of a 256-element K-quant super-block.
    pub trait Block {
        /// Bytes of one stored block.
        const BYTES: usize;
        /// 32-element sub-blocks in a stored block (1, or 8 for the K-quants).
        const SUBS: usize = 1;
        /// Decodes sub-block `sub` (< `SUBS`) of the block at `p` into 32 floats
        /// (4 vectors, in element order).
        ///
        /// # Safety
        /// `p` must point at `BYTES` readable bytes; the CPU must have
        /// AVX2, FMA and F16C and the caller must be compiled with them.
        unsafe fn decode(p: *const u8, sub: usize) -> [__m256; 4];
    }

    /// Bytes of a row of `k` elements (a multiple of `32 · F::SUBS`).
    #[inline(always)]
    pub const fn row_bytes<F: Block>(k: usize) -> usize {
        k / (32 * F::SUBS) * F::BYTES
    }

    /// Decodes 32-element block `b` of the row at `row`.
    ///
    /// # Safety
    /// As [`Block::decode`] for the stored block holding `b`.
    #[inline(always)]
    pub unsafe fn decode_at<F: Block>(row: *const u8, b: usize) -> [__m256; 4] {
        // SAFETY: the caller guarantees the stored block b / SUBS is readable, and the features.
        unsafe { F::decode(row.add(b / F::SUBS * F::BYTES), b % F::SUBS) }
    }

    /// Two f16 at `p`, `p + 2` as f32 `[a, b, 0, 0]`.
    #[inline(always)]
    unsafe fn two_f16(p: *const u8) -> __m128 {
        // SAFETY: the caller guarantees 4 readable bytes at p and F16C.
        unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32))) }
    }

    /// One f16 at `p`, broadcast to 8 lanes as f32.
    #[inline(always)]
    unsafe fn f16_splat(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 2 readable bytes at p and F16C.
        unsafe {
            let bits = std::ptr::read_unaligned(p as *const u16) as i32;
            _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
        }
    }

    /// Bytes `p[0..8]` as 8 u32 lanes.
    #[inline(always)]
    unsafe fn bytes8(p: *const u8) -> __m256i {
        // SAFETY: 8 readable bytes at p (caller); AVX2 (caller).
        unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)) }
    }

    /// Bytes `p[0..8]` as 8 u32 lanes: (low nibbles, high nibbles).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> (__m256i, __m256i) {
        // SAFETY: 8 readable bytes at p (caller); AVX2 (caller).
        unsafe {
            let b = bytes8(p);
            (
                _mm256_and_si256(b, _mm256_set1_epi32(0x0F)),
                _mm256_srli_epi32(b, 4),
            )
        }
    }

    /// Bytes `p[0..8]` as 8 u32 lanes: (low nibbles, high nibbles) as f32.
    #[inline(always)]
    unsafe fn nibbles_to_f32(p: *const u8) -> (__m256, __m256) {
        // SAFETY: 8 readable bytes at p (caller); AVX2 (caller).
        unsafe {
            let (lo, hi) = nibbles(p);
            (_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi))
        }
    }

    /// Bits `b0 .. b0 + 8` of `bits`, each as a u32 lane holding 0 or 16.
    #[inline(always)]
    unsafe fn fifth_bits(bits: u32, b0: i32) -> __m256i {
        // SAFETY: register-only AVX2 ops (caller compiled with AVX2).
        unsafe {
            let at = _mm256_add_epi32(
                _mm256_set1_epi32(b0),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            let bit = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(bits as i32), at),
                _mm256_set1_epi32(1),
            );
            _mm256_slli_epi32(bit, 4)
        }
    }

    /// The f16 at `p` as f32 (exact, as `half` converts it).
    #[inline(always)]
    unsafe fn f16_scalar(p: *const u8) -> f32 {
        // SAFETY: 2 readable bytes at p (caller).
        half::f16::from_bits(unsafe { std::ptr::read_unaligned(p as *const u16) }).to_f32()
    }

    /// The 32 five-bit values of a Q5 block (`qh` at `p`, the 16 nibble bytes at `p + 4`),
    /// element order, as i32 lanes 0..32.
    #[inline(always)]
    unsafe fn q5_values(p: *const u8) -> [__m256i; 4] {
        // SAFETY: 20 readable bytes at p (caller); AVX2 (caller).
        unsafe {
            let qh = std::ptr::read_unaligned(p as *const u32);
            let (l0, h0) = nibbles(p.add(4));
            let (l1, h1) = nibbles(p.add(12));
            [
                _mm256_or_si256(l0, fifth_bits(qh, 0)),
                _mm256_or_si256(l1, fifth_bits(qh, 8)),
                _mm256_or_si256(h0, fifth_bits(qh, 16)),
                _mm256_or_si256(h1, fifth_bits(qh, 24)),
            ]
        }
    }

    /// Q4_1: `d: f16, m: f16, qs: [u8; 16]`; element `j < 16` is the low
    /// nibble of `qs[j]`, element `j + 16` its high nibble; `w = fma(q, d, m)`.
    pub struct Q4_1;
    impl Block for Q4_1 {
        const BYTES: usize = 20;
        #[inline(always)]
        unsafe fn decode(p: *const u8, _sub: usize) -> [__m256; 4] {
            // SAFETY: 20 readable bytes at p (caller); AVX2/FMA/F16C (caller).
            unsafe {
                let dm = two_f16(p);
                let d = _mm256_broadcastss_ps(dm);
                let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
                let (q0, q2) = nibbles_to_f32(p.add(4));
                let (q1, q3) = nibbles_to_f32(p.add(12));
                [
                    _mm256_fmadd_ps(q0, d, m),
                    _mm256_fmadd_ps(q1, d, m),
                    _mm256_fmadd_ps(q2, d, m),
                    _mm256_fmadd_ps(q3, d, m),
                ]
            }
        }
    }

    /// Q4_0: `d: f16, qs: [u8; 16]`, nibbles as in Q4_1; `w = (q − 8)·d`.
    pub struct Q4_0;
    impl Block for Q4_0 {
        const BYTES: usize = 18;
        #[inline(always)]
        unsafe fn decode(p: *const u8, _sub: usize) -> [__m256; 4] {
            // SAFETY: 18 readable bytes at p (caller); AVX2/F16C (caller).
            unsafe {
                let d = f16_splat(p);
                let e = _mm256_set1_ps(8.0);
                let (q0, q2) = nibbles_to_f32(p.add(2));
                let (q1, q3) = nibbles_to_f32(p.add(10));
                [
                    _mm256_mul_ps(_mm256_sub_ps(q0, e), d),
                    _mm256_mul_ps(_mm256_sub_ps(q1, e), d),
                    _mm256_mul_ps(_mm256_sub_ps(q2, e), d),
                    _mm256_mul_ps(_mm256_sub_ps(q3, e), d),
                ]
            }
        }
    }

    /// Q8_0: `d: f16, qs: [i8; 32]`; `w = q·d`.
    pub struct Q8_0;
    impl Block for Q8_0 {
        const BYTES: usize = 34;
        #[inline(always)]
        unsafe fn decode(p: *const u8, _sub: usize) -> [__m256; 4] {
            // SAFETY: 34 readable bytes at p (caller); AVX2/F16C (caller).
            unsafe {
                let d = f16_splat(p);
                let q = |i: usize| {
                    let v = _mm_loadl_epi64(p.add(2 + 8 * i) as *const __m128i);
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), d)
                };
                [q(0), q(1), q(2), q(3)]
            }
        }
    }

    /// Q5_0: `d: f16, qh: u32, qs: [u8; 16]`; element `j` is nibble `j` (as in Q4_0) with
    /// bit `j` of `qh` as its fifth bit; `w = (q − 16)·d`.
    pub struct Q5_0;
    impl Block for Q5_0 {
        const BYTES: usize = 22;
        #[inline(always)]
        unsafe fn decode(p: *const u8, _sub: usize) -> [__m256; 4] {
            // SAFETY: 22 readable bytes at p (caller); AVX2/F16C (caller).
            unsafe {
                let d = f16_splat(p);
                let e = _mm256_set1_epi32(16);
                q5_values(p.add(2))
                    .map(|q| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, e)), d))
            }
        }
    }

    /// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`, values as in Q5_0 without the
    /// offset; `w = q·d + m` (two roundings, as the reference dequantizer).
    pub struct Q5_1;
    impl Block for Q5_1 {
        const BYTES: usize = 24;
        #[inline(always)]
        unsafe fn decode(p: *const u8, _sub: usize) -> [__m256; 4] {
            // SAFETY: 24 readable bytes at p (caller); AVX2/F16C (caller).
            unsafe {
                let dm = two_f16(p);
                let d = _mm256_broadcastss_ps(dm);
                let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
                q5_values(p.add(4))
                    .map(|q| _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), m))
            }
        }
    }

    /// Sub-block `j` of a Q4_K (`HIGH = false`) or Q5_K super-block, as
    /// `pagoda_backend::kquant::dequantize_sub`: `w = (d·sc)·q − dmin·m`.
    ///
    /// # Safety
    /// 144 (Q4_K) or 176 (Q5_K) readable bytes at `p`; AVX2/F16C.
    #[inline(always)]
    unsafe fn decode_k4<const HIGH: bool>(p: *const u8, j: usize) -> [__m256; 4] {
        // SAFETY: the stored block is readable (caller); AVX2/F16C (caller).
        unsafe {
            let (d, dmin) = (f16_scalar(p), f16_scalar(p.add(2)));
            let scales = std::slice::from_raw_parts(p.add(4), 12);
            let (sc, m) = pagoda_backend::kquant::scale_min_k4(j, scales);
            let d1 = _mm256_set1_ps(d * sc as f32);
            let mn1 = _mm256_set1_ps(dmin * m as f32);
            let ql = p.add(if HIGH { 48 } else { 16 } + 32 * (j / 2));
            let shift = _mm_cvtsi32_si128(4 * (j % 2) as i32);
            let low4 = _mm256_set1_epi32(0x0F);
            let v = |c: usize| {
                let mut q = _mm256_and_si256(_mm256_srl_epi32(bytes8(ql.add(8 * c)), shift), low4);
                if HIGH {
                    let qh = bytes8(p.add(16 + 8 * c));
                    let bit = _mm256_and_si256(
                        _mm256_srl_epi32(qh, _mm_cvtsi32_si128(j as i32)),
                        _mm256_set1_epi32(1),
                    );
                    q = _mm256_add_epi32(q, _mm256_slli_epi32(bit, 4));
                }
                _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(q)), mn1)
            };
            [v(0), v(1), v(2), v(3)]
        }
    }

    /// Q4_K: super-blocks of 256 (`d, dmin: f16, scales: [u8; 12], qs: [u8; 128]`), decoded
    /// a 32-element sub-block at a time.
    #[allow(non_camel_case_types)]
    pub struct Q4_K;
    impl Block for Q4_K {
        const BYTES: usize = 144;
        const SUBS: usize = 8;
        #[inline(always)]
        unsafe fn decode(p: *const u8, sub: usize) -> [__m256; 4] {
            // SAFETY: 144 readable bytes at p (caller); AVX2/F16C (caller).
            unsafe { decode_k4::<false>(p, sub) }
        }
    }

    /// Q5_K: as Q4_K with `qh: [u8; 32]` (bit `j` of `qh[l]` is the fifth bit of element
    /// `l` of sub-block `j`) before the nibbles.
    #[allow(non_camel_case_types)]
    pub struct Q5_K;
    impl Block for Q5_K {
        const BYTES: usize = 176;
        const SUBS: usize = 8;
        #[inline(always)]
        unsafe fn decode(p: *const u8, sub: usize) -> [__m256; 4] {
            // SAFETY: 176 readable bytes at p (caller); AVX2/F16C (caller).
            unsafe { decode_k4::<true>(p, sub) }
        }
    }

    /// Q6_K: super-blocks of 256 (`ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`),
    /// as `pagoda_backend::kquant::dequantize_sub`: `w = (d·sc)·(q − 32)`.
    #[allow(non_camel_case_types)]
    pub struct Q6_K;
    impl Block for Q6_K {
        const BYTES: usize = 210;
        const SUBS: usize = 8;
        #[inline(always)]
        unsafe fn decode(p: *const u8, sub: usize) -> [__m256; 4] {
            // SAFETY: 210 readable bytes at p (caller); AVX2/F16C (caller).
            unsafe {
                let (n, i) = (sub / 4, sub % 4);
                let ql = p.add(64 * n + 32 * (i & 1));
                let qh = p.add(128 + 32 * n);
                let sc = p.add(192 + 8 * n + 2 * i);
                let d = f16_scalar(p.add(208));
                let ql_shift = _mm_cvtsi32_si128(4 * (i >> 1) as i32);
                let qh_shift = _mm_cvtsi32_si128(2 * i as i32);
                let v = |c: usize| {
                    let lo = _mm256_and_si256(
                        _mm256_srl_epi32(bytes8(ql.add(8 * c)), ql_shift),
                        _mm256_set1_epi32(0x0F),
                    );
                    let hi = _mm256_and_si256(
                        _mm256_srl_epi32(bytes8(qh.add(8 * c)), qh_shift),
                        _mm256_set1_epi32(3),
                    );
                    let q = _mm256_sub_epi32(
                        _mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)),
                        _mm256_set1_epi32(32),
                    );
                    let s = d * (*sc.add(c / 2) as i8) as f32;
                    _mm256_mul_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(q))
                };
                [v(0), v(1), v(2), v(3)]
            }
        }
    }

    /// F32: 32 little-endian floats.
    pub struct F32;
    impl Block for F32 {
        const BYTES: usize = 128;
        #[inline(always)]
        unsafe fn decode(p: *const u8, _sub: usize) -> [__m256; 4] {
            // SAFETY: 128 readable bytes at p (caller); AVX (caller).
            unsafe {
                let f = p as *const f32;
                [
                    _mm256_loadu_ps(f),
                    _mm256_loadu_ps(f.add(8)),
                    _mm256_loadu_ps(f.add(16)),
                    _mm256_loadu_ps(f.add(24)),
                ]
            }
        }
    }

    /// F16: 32 little-endian halves.
    pub struct F16;
    impl Block for F16 {
        const BYTES: usize = 64;
        #[inline(always)]
        unsafe fn decode(p: *const u8, _sub: usize) -> [__m256; 4] {
            // SAFETY: 64 readable bytes at p (caller); F16C (caller).
            unsafe {
                let h =
                    |i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * i) as *const __m128i));
                [h(0), h(1), h(2), h(3)]
            }
        }
    }

    /// BF16: 32 little-endian bfloat16 (the high halves of f32).
    pub struct BF16;
    impl Block for BF16 {
        const BYTES: usize = 64;
        #[inline(always)]
        unsafe fn decode(p: *const u8, _sub: usize) -> [__m256; 4] {
            // SAFETY: 64 readable bytes at p (caller); AVX2 (caller).
            unsafe {
                let h = |i: usize| {
                    let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16 * i) as *const __m128i));
                    _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
                };
                [h(0), h(1), h(2), h(3)]
            }
        }
    }

    /// `e^x` per lane, exactly as [`super::scalar::exp`].
    ///
    /// # Safety
    /// The caller is compiled with AVX2 and FMA, on a CPU that has them.
    #[inline(always)]
    pub unsafe fn exp(x: __m256) -> __m256 {
        use super::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, LOG2E};
        // SAFETY: register-only AVX2/FMA ops; the caller is compiled with them.
        unsafe {
            let tiny = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_LT_OQ);
            let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX));
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
            let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
            let mut p = _mm256_set1_ps(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let y = _mm256_add_ps(
                _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                _mm256_set1_ps(1.0),
            );
            let e = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)))
        }
    }

    /// The lanes of `v` summed in the order of [`super::reduce`].
    ///
    /// # Safety
    /// The caller is compiled with AVX, on a CPU that has it.
    #[inline(always)]
    pub unsafe fn reduce(v: __m256) -> f32 {
        // SAFETY: register-only AVX ops; the caller is compiled with AVX.
        unsafe {
            // [a0+a4, a1+a5, a2+a6, a3+a7]
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            // [(a0+a4)+(a2+a6), (a1+a5)+(a3+a7), ..]
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arguments from −100 to 90 (and a few specials).
    fn args() -> Vec<f32> {
        let mut v: Vec<f32> = (0..190_000).map(|i| -100.0 + i as f32 * 1e-3).collect();
        v.extend([
            0.0,
            -0.0,
            f32::NEG_INFINITY,
            -87.0,
            -86.999,
            88.0,
            1e-30,
            -1e-30,
        ]);
        v
    }

    #[test]
    fn exp_is_within_2_ulp_of_f64() {
        for x in args() {
            let got = scalar::exp(x) as f64;
            if x < EXP_MIN {
                assert_eq!(got, 0.0);
                continue;
            }
            let want = (x.min(EXP_MAX) as f64).exp();
            assert!(
                (got - want).abs() <= 2.5e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_matches_scalar_bit_for_bit() {
        if !has_avx2_fma_f16c() {
            return;
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp8(x: &[f32; 8]) -> [f32; 8] {
            use std::arch::x86_64::*;
            let mut out = [0f32; 8];
            // SAFETY: 8 floats in and out; AVX2/FMA enabled on this function.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp(_mm256_loadu_ps(x.as_ptr()))) };
            out
        }
        for c in args().chunks(8) {
            let mut x = [0f32; 8];
            x[..c.len()].copy_from_slice(c);
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            let v = unsafe { exp8(&x) };
            for (a, b) in x.iter().zip(v) {
                assert_eq!(scalar::exp(*a).to_bits(), b.to_bits(), "exp({a})");
            }
        }
    }
}
