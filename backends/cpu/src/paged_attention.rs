//! Causal, ragged, GQA attention over the paged KV cache.
//!
//! One call handles a run of query tokens of one sequence and one KV head:
//! each chunk of K and V rows of that head is decoded once and used by every
//! query head of the group, for up to [`QUERY_TILE`] tokens at a time. Each
//! query visits its keys in position order `0 ..= pos`, whatever pages hold
//! them, in chunks of [`CHUNK`] with an online softmax and its own state, so
//! results depend only on the data, not on page ids, batch composition or
//! which queries share a pass. Dot products and the `Σ p·v` sums use
//! 8-lane accumulators in a fixed order (see [`crate::simd::reduce`]). No
//! heap allocation: all scratch is on the stack; f32 K/V rows are read in
//! place.

use std::ops::Range;

use pagoda_backend::quant::dequantize_row;
use pagoda_backend::{BackendError, DType, KvLayout, Result};

use crate::kv_cache::KvPages;
use crate::simd::{LANES, reduce, scalar};

/// Largest head dimension supported.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest number of query heads per KV head.
pub const MAX_GROUP: usize = 8;
/// Keys scored between two softmax rescales.
pub const CHUNK: usize = 32;
/// Query tokens of one sequence that share a pass over the keys.
pub const QUERY_TILE: usize = 8;

/// Arguments of one attention call, as host slices.
pub struct AttentionArgs<'a> {
    /// (num_tokens, num_heads, head_dim)
    pub q: &'a [f32],
    /// One layer arena, through its page table.
    pub cache: KvPages<'a>,
    /// The cache layout.
    pub layout: &'a KvLayout,
    /// (num_tokens)
    pub positions: &'a [u32],
    /// (num_seqs, max_blocks_per_seq)
    pub block_tables: &'a [u32],
    /// (num_seqs)
    pub context_lens: &'a [u32],
    /// (num_seqs + 1)
    pub query_start_locs: &'a [u32],
    /// Query heads.
    pub num_heads: usize,
    /// Width of a block-table row.
    pub max_blocks_per_seq: usize,
    /// Softmax scale.
    pub scale: f32,
}

impl AttentionArgs<'_> {
    /// Checks shapes and that every position a query may read is covered by
    /// its block table and its context length.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| {
            Err(BackendError::InvalidArgument {
                op: "paged_attention",
                detail,
            })
        };
        let l = self.layout;
        if l.head_dim > MAX_HEAD_DIM
            || l.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(l.num_kv_heads)
        {
            return bad(format!(
                "unsupported heads {} / kv heads {} / head_dim {}",
                self.num_heads, l.num_kv_heads, l.head_dim
            ));
        }
        if self.num_heads / l.num_kv_heads > MAX_GROUP {
            return bad(format!("GQA group larger than {MAX_GROUP}"));
        }
        let num_seqs = self.context_lens.len();
        if self.query_start_locs.len() != num_seqs + 1
            || self.block_tables.len() != num_seqs * self.max_blocks_per_seq
        {
            return bad("query_start_locs / block_tables do not match context_lens".into());
        }
        for s in 0..num_seqs {
            let (a, b) = (
                self.query_start_locs[s] as usize,
                self.query_start_locs[s + 1] as usize,
            );
            let ctx = self.context_lens[s] as usize;
            if a > b
                || b > self.positions.len()
                || ctx.div_ceil(l.page_size) > self.max_blocks_per_seq
            {
                return bad(format!(
                    "sequence {s}: bad query range {a}..{b} or context {ctx}"
                ));
            }
            for t in a..b {
                if self.positions[t] as usize >= ctx {
                    return bad(format!(
                        "token {t} at position {} beyond context length {ctx}",
                        self.positions[t]
                    ));
                }
            }
            for &p in &self.block_tables[s * self.max_blocks_per_seq..][..ctx.div_ceil(l.page_size)]
            {
                if p as usize >= l.num_pages {
                    return bad(format!(
                        "sequence {s}: page {p} outside {} pages",
                        l.num_pages
                    ));
                }
                self.cache.check(p as usize, "paged_attention")?;
            }
        }
        Ok(())
    }
}

/// Scratch for K/V rows that are not stored as f32.
type RowBuf = [[f32; MAX_HEAD_DIM]; CHUNK];

/// Rows `c0 .. c0 + cn` (positions) of K (`kv = 0`) or V (`kv = 1`) of KV
/// head `kvh` as f32 slices of `head_dim`: decoded into `buf` when given,
/// else read in place (the cache holds aligned f32).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn chunk_rows<'a>(
    args: &'a AttentionArgs<'_>,
    table: &[u32],
    kv: usize,
    kvh: usize,
    c0: usize,
    cn: usize,
    buf: Option<&'a mut RowBuf>,
    rows: &mut [&'a [f32]; CHUNK],
) {
    let l = args.layout;
    let (hd, row) = (l.head_dim, l.row_bytes());
    // `l.row_offset(0, kv, p % page_size, kvh)` inside the page, with the constants hoisted.
    let token_stride = l.num_kv_heads * row;
    let base = kv * l.page_size * token_stride + kvh * row;
    let at = |i: usize| {
        let p = c0 + i;
        (
            args.cache.page(table[p / l.page_size] as usize),
            (p % l.page_size) * token_stride + base,
        )
    };
    match buf {
        None => {
            for (i, r) in rows.iter_mut().enumerate().take(cn) {
                let (page, o) = at(i);
                let f: &'a [f32] = bytemuck::cast_slice(page);
                *r = &f[o / 4..o / 4 + hd];
            }
        }
        Some(buf) => {
            for (i, b) in buf.iter_mut().enumerate().take(cn) {
                let (page, o) = at(i);
                // Shapes were validated; a decode error cannot happen for a valid layout.
                let _ = dequantize_row(l.dtype, &page[o..o + row], &mut b[..hd]);
            }
            for (r, b) in rows.iter_mut().zip(buf.iter()).take(cn) {
                *r = &b[..hd];
            }
        }
    }
}

/// The two inner loops of attention, in a portable and an AVX2 version that
/// give the same bits.
trait Kernels {
    /// `a · b` with 8 lane accumulators (element `i` goes to lane `i % 8`, in
    /// order), lanes summed pairwise, then the tail (`len % 8` elements)
    /// added in order.
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `out[h][i] = (q[h] · k[i]) · scale` for `G` query heads and 4 keys,
    /// each dot exactly as [`Kernels::dot`].
    fn scores<const G: usize>(q: [&[f32]; G], k: [&[f32]; 4], scale: f32) -> [[f32; 4]; G] {
        std::array::from_fn(|h| std::array::from_fn(|i| Self::dot(q[h], k[i]) * scale))
    }
    /// `acc[d] += Σ_i w[i] · rows[i][d]` for every `d < acc.len()`, each
    /// element accumulated in key order `i = 0, 1, ..`.
    fn add_weighted_rows(acc: &mut [f32], w: &[f32], rows: &[&[f32]]);
    /// [`Kernels::add_weighted_rows`] for `G` heads sharing the rows.
    fn add_weighted_rows_g<const G: usize>(acc: [&mut [f32]; G], w: [&[f32]; G], rows: &[&[f32]]) {
        for (a, w) in acc.into_iter().zip(w) {
            Self::add_weighted_rows(a, w, rows);
        }
    }
    /// `x[i] = e^(x[i] − m)` ([`scalar::exp`]).
    fn exp_sub(x: &mut [f32], m: f32) {
        for v in x {
            *v = scalar::exp(*v - m);
        }
    }
    /// Largest element (`-inf` for none).
    fn max(x: &[f32]) -> f32 {
        x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
    /// Lane sums of a chunk: `s[l] = (p[l] + p[8+l]) + (p[16+l] + p[24+l])`.
    fn lane_sums(p: &[f32; CHUNK]) -> [f32; LANES] {
        std::array::from_fn(|l| (p[l] + p[8 + l]) + (p[16 + l] + p[24 + l]))
    }
}

const _: () = assert!(CHUNK == 4 * LANES, "lane_sums assumes 32-key chunks");

/// Plain loops (what the AVX2 version must reproduce).
struct Portable;

impl Kernels for Portable {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n8 = a.len() / LANES * LANES;
        let mut acc = [0f32; LANES];
        for (ca, cb) in a[..n8].chunks_exact(LANES).zip(b[..n8].chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] = ca[l].mul_add(cb[l], acc[l]);
            }
        }
        let mut s = reduce(&acc);
        for (x, y) in a[n8..].iter().zip(&b[n8..]) {
            s = x.mul_add(*y, s);
        }
        s
    }

    #[inline(always)]
    fn add_weighted_rows(acc: &mut [f32], w: &[f32], rows: &[&[f32]]) {
        for (d, a) in acc.iter_mut().enumerate() {
            for (wi, v) in w.iter().zip(rows) {
                *a = wi.mul_add(v[d], *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Kernels;
    use crate::simd::avx2::{exp, reduce};

    /// AVX2/FMA intrinsics; only used inside `attend_avx2`.
    pub(super) struct Avx2;

    /// `acc[d0 .. d0 + 8C] += Σ_i w[i] · rows[i][..]`, `C` vectors at once
    /// (independent chains keep both FMA pipes busy).
    ///
    /// # Safety
    /// `d0 + 8C <= acc.len()` and every row is at least as long as `acc`;
    /// AVX2/FMA available.
    #[inline(always)]
    unsafe fn weighted_block<const C: usize>(
        acc: &mut [f32],
        d0: usize,
        w: &[f32],
        rows: &[&[f32]],
    ) {
        // SAFETY: bounds per the contract above.
        unsafe {
            let ap = acc.as_mut_ptr().add(d0);
            let mut a = [_mm256_setzero_ps(); C];
            for (c, v) in a.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(ap.add(8 * c));
            }
            for (wi, r) in w.iter().zip(rows) {
                let wv = _mm256_set1_ps(*wi);
                let rp = r.as_ptr().add(d0);
                for (c, v) in a.iter_mut().enumerate() {
                    *v = _mm256_fmadd_ps(wv, _mm256_loadu_ps(rp.add(8 * c)), *v);
                }
            }
            for (c, v) in a.iter().enumerate() {
                _mm256_storeu_ps(ap.add(8 * c), *v);
            }
        }
    }

    /// The four lane sums of `a`, each in the order of [`reduce`]:
    /// `((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7))`.
    ///
    /// # Safety
    /// AVX available (only inlined into functions compiled with AVX2/FMA).
    #[inline(always)]
    unsafe fn reduce4(a: &[__m256; 4]) -> __m128 {
        // SAFETY: register-only AVX ops.
        unsafe {
            let half =
                |v: __m256| _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            // s_x = [x0+x4, x1+x5, x2+x6, x3+x7] for x = a, b, c, d.
            let (sa, sb, sc, sd) = (half(a[0]), half(a[1]), half(a[2]), half(a[3]));
            // [sa0+sa2, sb0+sb2, sa1+sa3, sb1+sb3] and the same for c, d.
            let u0 = _mm_add_ps(_mm_unpacklo_ps(sa, sb), _mm_unpackhi_ps(sa, sb));
            let u1 = _mm_add_ps(_mm_unpacklo_ps(sc, sd), _mm_unpackhi_ps(sc, sd));
            // (s0 + s2) + (s1 + s3) for each of a, b, c, d.
            _mm_add_ps(_mm_movelh_ps(u0, u1), _mm_movehl_ps(u1, u0))
        }
    }

    /// `acc[d] += Σ_i w[i] · rows[i][d]` for `d0 <= d < acc.len()`, 8 lanes
    /// then one element at a time, in key order.
    #[inline(always)]
    fn add_weighted_tail(acc: &mut [f32], mut d0: usize, w: &[f32], rows: &[&[f32]]) {
        let hd = acc.len();
        assert!(rows.iter().all(|r| r.len() >= hd));
        // SAFETY: d0 + 8 <= hd <= every row's length (asserted); only inlined into functions compiled with AVX2/FMA.
        unsafe {
            while d0 + 8 <= hd {
                weighted_block::<1>(acc, d0, w, rows);
                d0 += 8;
            }
        }
        for (d, a) in acc.iter_mut().enumerate().skip(d0) {
            for (wi, v) in w.iter().zip(rows) {
                *a = wi.mul_add(v[d], *a);
            }
        }
    }

    impl Kernels for Avx2 {
        #[inline(always)]
        fn max(x: &[f32]) -> f32 {
            let mut chunks = x.chunks_exact(8);
            // SAFETY: 8 floats per load; only inlined into functions compiled with AVX2/FMA.
            let mut m = unsafe {
                let mut v = _mm256_set1_ps(f32::NEG_INFINITY);
                for c in &mut chunks {
                    v = _mm256_max_ps(v, _mm256_loadu_ps(c.as_ptr()));
                }
                let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
            };
            for &v in chunks.remainder() {
                m = m.max(v);
            }
            m
        }

        #[inline(always)]
        fn lane_sums(p: &[f32; super::CHUNK]) -> [f32; 8] {
            let mut out = [0f32; 8];
            // SAFETY: 32 floats in, 8 out; only inlined into functions compiled with AVX2/FMA.
            unsafe {
                let v = |i: usize| _mm256_loadu_ps(p.as_ptr().add(8 * i));
                let s = _mm256_add_ps(_mm256_add_ps(v(0), v(1)), _mm256_add_ps(v(2), v(3)));
                _mm256_storeu_ps(out.as_mut_ptr(), s);
            }
            out
        }

        #[inline(always)]
        fn exp_sub(x: &mut [f32], m: f32) {
            let mut chunks = x.chunks_exact_mut(8);
            for c in &mut chunks {
                // SAFETY: 8 floats in and out; only inlined into functions compiled with AVX2/FMA.
                unsafe {
                    let v = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), _mm256_set1_ps(m));
                    _mm256_storeu_ps(c.as_mut_ptr(), exp(v));
                }
            }
            for v in chunks.into_remainder() {
                *v = crate::simd::scalar::exp(*v - m);
            }
        }

        #[inline(always)]
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let n8 = n / 8 * 8;
            // SAFETY: loads stay below n8 <= both lengths; this is only inlined into functions compiled with AVX2/FMA on CPUs that have them.
            unsafe {
                let mut acc = _mm256_setzero_ps();
                let mut i = 0;
                while i < n8 {
                    let x = _mm256_loadu_ps(a.as_ptr().add(i));
                    acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.as_ptr().add(i)), acc);
                    i += 8;
                }
                let mut s = reduce(acc);
                for (x, y) in a[n8..n].iter().zip(&b[n8..n]) {
                    s = x.mul_add(*y, s);
                }
                s
            }
        }

        #[inline(always)]
        fn scores<const G: usize>(q: [&[f32]; G], k: [&[f32]; 4], scale: f32) -> [[f32; 4]; G] {
            let n = k.iter().chain(&q).fold(usize::MAX, |n, r| n.min(r.len()));
            let n8 = n / 8 * 8;
            let mut out = [[0f32; 4]; G];
            // SAFETY: loads stay below n8 <= every length; this is only inlined into functions compiled with AVX2/FMA on CPUs that have them.
            unsafe {
                // G × 4 independent chains; each q and k vector loaded once.
                let mut acc = [[_mm256_setzero_ps(); 4]; G];
                let mut c = 0;
                while c < n8 {
                    let qv: [__m256; G] =
                        std::array::from_fn(|h| _mm256_loadu_ps(q[h].as_ptr().add(c)));
                    for i in 0..4 {
                        let kv = _mm256_loadu_ps(k[i].as_ptr().add(c));
                        for h in 0..G {
                            acc[h][i] = _mm256_fmadd_ps(qv[h], kv, acc[h][i]);
                        }
                    }
                    c += 8;
                }
                for (o, a) in out.iter_mut().zip(&acc) {
                    _mm_storeu_ps(o.as_mut_ptr(), reduce4(a));
                }
            }
            for (h, o) in out.iter_mut().enumerate() {
                for (i, v) in o.iter_mut().enumerate() {
                    for (x, y) in q[h][n8..n].iter().zip(&k[i][n8..n]) {
                        *v = x.mul_add(*y, *v);
                    }
                    *v *= scale;
                }
            }
            out
        }

        #[inline(always)]
        fn add_weighted_rows_g<const G: usize>(
            mut acc: [&mut [f32]; G],
            w: [&[f32]; G],
            rows: &[&[f32]],
        ) {
            let hd = acc.iter().fold(usize::MAX, |n, a| n.min(a.len()));
            assert!(rows.iter().all(|r| r.len() >= hd) && w.iter().all(|w| w.len() >= rows.len()));
            let mut d0 = 0;
            // d0 + 32 <= hd <= every row's and accumulator's length,
            // i < rows.len() <= every w's length (asserted); this is only
            // inlined into functions compiled with AVX2/FMA.
            // SAFETY: all pointer offsets are in bounds and the CPU has AVX2/FMA (above).
            unsafe {
                while d0 + 32 <= hd {
                    let mut a: [[__m256; 4]; G] = std::array::from_fn(|h| {
                        std::array::from_fn(|c| _mm256_loadu_ps(acc[h].as_ptr().add(d0 + 8 * c)))
                    });
                    for (i, r) in rows.iter().enumerate() {
                        let wb: [__m256; G] =
                            std::array::from_fn(|h| _mm256_set1_ps(*w[h].get_unchecked(i)));
                        #[allow(clippy::needless_range_loop)] // c indexes every head's accumulators
                        for c in 0..4 {
                            let v = _mm256_loadu_ps(r.as_ptr().add(d0 + 8 * c));
                            for h in 0..G {
                                a[h][c] = _mm256_fmadd_ps(wb[h], v, a[h][c]);
                            }
                        }
                    }
                    for (h, ah) in a.iter().enumerate() {
                        for (c, v) in ah.iter().enumerate() {
                            _mm256_storeu_ps(acc[h].as_mut_ptr().add(d0 + 8 * c), *v);
                        }
                    }
                    d0 += 32;
                }
            }
            // The rest (head_dim not a multiple of 32) one head at a time.
            for (a, w) in acc.iter_mut().zip(w) {
                add_weighted_tail(&mut a[..hd], d0, w, rows);
            }
        }

        #[inline(always)]
        fn add_weighted_rows(acc: &mut [f32], w: &[f32], rows: &[&[f32]]) {
            let hd = acc.len();
            assert!(rows.iter().all(|r| r.len() >= hd));
            let mut d0 = 0;
            // SAFETY: d0 + 8C <= hd <= every row's length (asserted); this is only inlined into functions compiled with AVX2/FMA.
            unsafe {
                while d0 + 64 <= hd {
                    weighted_block::<8>(acc, d0, w, rows);
                    d0 += 64;
                }
                while d0 + 8 <= hd {
                    weighted_block::<1>(acc, d0, w, rows);
                    d0 += 8;
                }
            }
            for (d, a) in acc.iter_mut().enumerate().skip(d0) {
                for (wi, v) in w.iter().zip(rows) {
                    *a = wi.mul_add(v[d], *a);
                }
            }
        }
    }
}

/// Scores of keys `0..cj` of the chunk for query heads `g0 .. g0 + G`
/// (`q(h)` is head h's query): `sc[h][i] = (q(h) · rows[i]) · scale`.
#[inline(always)]
fn score_heads<'a, K: Kernels, const G: usize>(
    sc: &mut [[f32; CHUNK]; MAX_GROUP],
    g0: usize,
    cj: usize,
    rows: &[&[f32]; CHUNK],
    q: impl Fn(usize) -> &'a [f32],
    scale: f32,
) {
    let qs: [&[f32]; G] = std::array::from_fn(|h| q(g0 + h));
    let mut i = 0;
    while i + 4 <= cj {
        let s = K::scores::<G>(qs, [rows[i], rows[i + 1], rows[i + 2], rows[i + 3]], scale);
        for (h, sh) in s.iter().enumerate() {
            sc[g0 + h][i..i + 4].copy_from_slice(sh);
        }
        i += 4;
    }
    for (h, qh) in qs.iter().enumerate() {
        for (o, k) in sc[g0 + h][i..cj].iter_mut().zip(&rows[i..cj]) {
            *o = K::dot(qh, k) * scale;
        }
    }
}

/// `acc` of heads `g0 .. g0 + G` (`hd` each, from the start of `acc`)
/// `+= Σ_i p_i · v_i` with the heads' probabilities `sc[g0 + h][..rows.len()]`.
#[inline(always)]
fn weigh_heads<K: Kernels, const G: usize>(
    acc: &mut [f32],
    hd: usize,
    sc: &[[f32; CHUNK]; MAX_GROUP],
    g0: usize,
    rows: &[&[f32]],
) {
    let mut it = acc.chunks_exact_mut(hd);
    let a: [&mut [f32]; G] = std::array::from_fn(|_| it.next().expect("G heads of acc"));
    let w: [&[f32]; G] = std::array::from_fn(|h| &sc[g0 + h][..rows.len()]);
    K::add_weighted_rows_g::<G>(a, w, rows);
}

/// Accumulator floats of one query tile: `tile · group · head_dim` of them.
const ACC_FLOATS: usize = 4096;

/// One pass over the keys for the queries `tokens` (all of sequence `s`,
/// at most [`QUERY_TILE`] and `ACC_FLOATS / (group · head_dim)` of them).
///
/// Each query keeps its own running max, denominator and accumulator and
/// sees its keys in the same chunks as it would alone: sharing the pass only
/// shares the K/V rows' trip through the caches.
#[inline(always)]
fn tile<K: Kernels>(
    args: &AttentionArgs<'_>,
    s: usize,
    tokens: Range<usize>,
    kvh: usize,
    emit: &mut impl FnMut(usize, &[f32]),
    mut buf: Option<&mut RowBuf>,
) {
    let l = args.layout;
    let hd = l.head_dim;
    let group = args.num_heads / l.num_kv_heads;
    let span = group * hd;
    let table = &args.block_tables[s * args.max_blocks_per_seq..(s + 1) * args.max_blocks_per_seq];
    let qt = tokens.len();
    debug_assert!(qt <= QUERY_TILE && qt * span <= ACC_FLOATS);

    let mut n_keys = [0usize; QUERY_TILE];
    for (n, t) in n_keys.iter_mut().zip(tokens.clone()) {
        *n = args.positions[t] as usize + 1;
    }
    let max_keys = n_keys[..qt].iter().copied().max().unwrap_or(0);
    let mut m = [[f32::NEG_INFINITY; MAX_GROUP]; QUERY_TILE];
    // Softmax denominators, as 8 lanes (summed pairwise at the end).
    let mut denom = [[[0f32; LANES]; MAX_GROUP]; QUERY_TILE];
    let mut scores = [[[0f32; CHUNK]; MAX_GROUP]; QUERY_TILE];
    let mut acc = [0f32; ACC_FLOATS];
    let q = |t: usize, g: usize| {
        let h = kvh * group + g;
        &args.q[(t * args.num_heads + h) * hd..][..hd]
    };

    let mut c0 = 0;
    while c0 < max_keys {
        let cn = CHUNK.min(max_keys - c0);
        // Keys of this chunk each query sees.
        let mut seen = [0usize; QUERY_TILE];
        for (c, n) in seen.iter_mut().zip(&n_keys[..qt]) {
            *c = n.saturating_sub(c0).min(CHUNK);
        }
        // Scores of the chunk's keys for every query head of the group.
        {
            let mut rows: [&[f32]; CHUNK] = [&[]; CHUNK];
            chunk_rows(args, table, 0, kvh, c0, cn, buf.as_deref_mut(), &mut rows);
            for (j, t) in tokens.clone().enumerate() {
                let cj = seen[j];
                let mut g = 0;
                while g < group {
                    let sj = &mut scores[j];
                    match group - g {
                        1 => score_heads::<K, 1>(sj, g, cj, &rows, |h| q(t, h), args.scale),
                        2 => score_heads::<K, 2>(sj, g, cj, &rows, |h| q(t, h), args.scale),
                        _ => score_heads::<K, 3>(sj, g, cj, &rows, |h| q(t, h), args.scale),
                    }
                    g += (group - g).min(3);
                }
            }
        }
        // Online softmax: rescale what came before to the new running max.
        for j in 0..qt {
            let cj = seen[j];
            if cj == 0 {
                continue;
            }
            for g in 0..group {
                let sc = &mut scores[j][g];
                let new_m = m[j][g].max(K::max(&sc[..cj]));
                let corr = scalar::exp(m[j][g] - new_m);
                for a in acc[(j * group + g) * hd..][..hd].iter_mut() {
                    *a *= corr;
                }
                K::exp_sub(&mut sc[..cj], new_m);
                sc[cj..].fill(0.0);
                let sums = K::lane_sums(sc);
                for (d, s) in denom[j][g].iter_mut().zip(sums) {
                    *d = *d * corr + s;
                }
                m[j][g] = new_m;
            }
        }
        // acc += Σ_i p_i · v_i, per element in key order.
        let mut rows: [&[f32]; CHUNK] = [&[]; CHUNK];
        chunk_rows(args, table, 1, kvh, c0, cn, buf.as_deref_mut(), &mut rows);
        for j in 0..qt {
            let cj = seen[j];
            let accj = &mut acc[j * span..][..span];
            let mut g = 0;
            while g < group {
                let (a, sj) = (&mut accj[g * hd..], &scores[j]);
                match group - g {
                    1 => weigh_heads::<K, 1>(a, hd, sj, g, &rows[..cj]),
                    2 => weigh_heads::<K, 2>(a, hd, sj, g, &rows[..cj]),
                    _ => weigh_heads::<K, 3>(a, hd, sj, g, &rows[..cj]),
                }
                g += (group - g).min(3);
            }
        }
        c0 += cn;
    }
    for (j, t) in tokens.enumerate() {
        let out = &mut acc[j * span..][..span];
        for (g, o) in out.chunks_exact_mut(hd).enumerate() {
            let inv = 1.0 / reduce(&denom[j][g]);
            for v in o {
                *v *= inv;
            }
        }
        emit(t, out);
    }
}

/// The body of [`attend`], compiled twice (portable and AVX2/FMA).
#[inline(always)]
fn attend_body<K: Kernels>(
    args: &AttentionArgs<'_>,
    s: usize,
    tokens: Range<usize>,
    kvh: usize,
    emit: &mut impl FnMut(usize, &[f32]),
    mut buf: Option<&mut RowBuf>,
) {
    let span = args.num_heads / args.layout.num_kv_heads * args.layout.head_dim;
    let per_tile = (ACC_FLOATS / span.max(1)).clamp(1, QUERY_TILE);
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        let t1 = (t0 + per_tile).min(tokens.end);
        tile::<K>(args, s, t0..t1, kvh, emit, buf.as_deref_mut());
        t0 = t1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    args: &AttentionArgs<'_>,
    s: usize,
    tokens: Range<usize>,
    kvh: usize,
    emit: &mut impl FnMut(usize, &[f32]),
    buf: Option<&mut RowBuf>,
) {
    attend_body::<x86::Avx2>(args, s, tokens, kvh, emit, buf)
}

/// Attention of the query tokens `tokens` (all of sequence `s`) for KV head
/// `kvh`: calls `emit(t, out)` once per token with out: (group, head_dim),
/// the rows of query heads `kvh*group .. (kvh+1)*group`. Each token's result
/// is the same whichever range it is computed in.
pub fn attend(
    args: &AttentionArgs<'_>,
    s: usize,
    tokens: Range<usize>,
    kvh: usize,
    mut emit: impl FnMut(usize, &[f32]),
) {
    // f32 rows are read in place; other dtypes are decoded a chunk at a time.
    let in_place = args.layout.dtype == DType::F32 && args.cache.f32_aligned();
    let mut scratch;
    let buf = if in_place {
        None
    } else {
        scratch = [[0f32; MAX_HEAD_DIM]; CHUNK];
        Some(&mut scratch)
    };
    #[cfg(target_arch = "x86_64")]
    {
        if crate::simd::has_avx2_fma_f16c() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { attend_avx2(args, s, tokens, kvh, &mut emit, buf) };
            return;
        }
    }
    attend_body::<Portable>(args, s, tokens, kvh, &mut emit, buf)
}

#[cfg(test)]
mod tests;
