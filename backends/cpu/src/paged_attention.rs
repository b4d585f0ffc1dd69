//! Causal, ragged, GQA attention over the paged KV cache.
//!
//! One task is one (query token, KV head): the K and V rows of that head are
//! decoded once and used by every query head of its group. Keys are visited in
//! position order `0 ..= pos`, whatever pages hold them, in chunks of
//! [`CHUNK`] with an online softmax, so results depend only on the data, not
//! on page ids or batch composition. Dot products and the `Σ p·v` sums use
//! 8-lane accumulators in a fixed order (see [`crate::simd::reduce`]). No
//! heap allocation: all scratch is on the stack; f32 K/V rows are read in
//! place.

use pagoda_backend::quant::dequantize_row;
use pagoda_backend::{BackendError, DType, KvLayout, Result};

use crate::simd::{LANES, reduce};

/// Largest head dimension supported.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest number of query heads per KV head.
pub const MAX_GROUP: usize = 8;
/// Keys scored between two softmax rescales.
pub const CHUNK: usize = 32;

/// Arguments of one attention call, as host slices.
pub struct AttentionArgs<'a> {
    /// (num_tokens, num_heads, head_dim)
    pub q: &'a [f32],
    /// One layer arena.
    pub cache: &'a [u8],
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
        if l.head_dim > MAX_HEAD_DIM || l.num_kv_heads == 0 || self.num_heads % l.num_kv_heads != 0
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
    let offset = |i: usize| {
        let p = c0 + i;
        l.row_offset(table[p / l.page_size] as usize, kv, p % l.page_size, kvh)
    };
    match buf {
        None => {
            let f: &'a [f32] = bytemuck::cast_slice(args.cache);
            for (i, r) in rows.iter_mut().enumerate().take(cn) {
                let o = offset(i) / 4;
                *r = &f[o..o + hd];
            }
        }
        Some(buf) => {
            for (i, b) in buf.iter_mut().enumerate().take(cn) {
                let o = offset(i);
                // Shapes were validated; a decode error cannot happen for a valid layout.
                let _ = dequantize_row(l.dtype, &args.cache[o..o + row], &mut b[..hd]);
            }
            for (r, b) in rows.iter_mut().zip(buf.iter()).take(cn) {
                *r = &b[..hd];
            }
        }
    }
}

/// `a · b` with 8 lane accumulators (element `i` goes to lane `i % 8`, in
/// order), lanes summed pairwise, then the tail (`len % 8` elements) added in order.
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

/// The body of [`attend`], compiled twice (portable and AVX2/FMA).
#[inline(always)]
fn attend_body(
    args: &AttentionArgs<'_>,
    s: usize,
    t: usize,
    kvh: usize,
    out: &mut [f32],
    mut buf: Option<&mut RowBuf>,
) {
    let l = args.layout;
    let hd = l.head_dim;
    let group = args.num_heads / l.num_kv_heads;
    let table = &args.block_tables[s * args.max_blocks_per_seq..(s + 1) * args.max_blocks_per_seq];
    let n_keys = args.positions[t] as usize + 1;

    let mut m = [f32::NEG_INFINITY; MAX_GROUP];
    let mut denom = [0f32; MAX_GROUP];
    let mut acc = [[0f32; MAX_HEAD_DIM]; MAX_GROUP];
    let mut scores = [[0f32; CHUNK]; MAX_GROUP];
    let q = |g: usize| {
        let h = kvh * group + g;
        &args.q[(t * args.num_heads + h) * hd..(t * args.num_heads + h + 1) * hd]
    };

    let mut c0 = 0;
    while c0 < n_keys {
        let cn = CHUNK.min(n_keys - c0);
        // Scores of the chunk's keys for every query head of the group.
        {
            let mut rows: [&[f32]; CHUNK] = [&[]; CHUNK];
            chunk_rows(args, table, 0, kvh, c0, cn, buf.as_deref_mut(), &mut rows);
            for (i, k) in rows.iter().enumerate().take(cn) {
                for (g, sc) in scores.iter_mut().enumerate().take(group) {
                    sc[i] = dot(q(g), k) * args.scale;
                }
            }
        }
        // Online softmax: rescale what came before to the new running max.
        for g in 0..group {
            let cmax = scores[g][..cn]
                .iter()
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let new_m = m[g].max(cmax);
            let corr = (m[g] - new_m).exp();
            denom[g] *= corr;
            for a in acc[g][..hd].iter_mut() {
                *a *= corr;
            }
            for sc in scores[g][..cn].iter_mut() {
                *sc = (*sc - new_m).exp();
                denom[g] += *sc;
            }
            m[g] = new_m;
        }
        // acc += Σ_i p_i · v_i, per element in key order (8 elements at a time).
        let mut rows: [&[f32]; CHUNK] = [&[]; CHUNK];
        chunk_rows(args, table, 1, kvh, c0, cn, buf.as_deref_mut(), &mut rows);
        for g in 0..group {
            let (sc, ag) = (&scores[g][..cn], &mut acc[g][..hd]);
            let mut d0 = 0;
            while d0 + LANES <= hd {
                let mut a = [0f32; LANES];
                a.copy_from_slice(&ag[d0..d0 + LANES]);
                for (w, v) in sc.iter().zip(&rows) {
                    let v = &v[d0..d0 + LANES];
                    for l in 0..LANES {
                        a[l] = w.mul_add(v[l], a[l]);
                    }
                }
                ag[d0..d0 + LANES].copy_from_slice(&a);
                d0 += LANES;
            }
            for d in d0..hd {
                for (w, v) in sc.iter().zip(&rows) {
                    ag[d] = w.mul_add(v[d], ag[d]);
                }
            }
        }
        c0 += cn;
    }
    for g in 0..group {
        let inv = 1.0 / denom[g];
        for d in 0..hd {
            out[g * hd + d] = acc[g][d] * inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    args: &AttentionArgs<'_>,
    s: usize,
    t: usize,
    kvh: usize,
    out: &mut [f32],
    buf: Option<&mut RowBuf>,
) {
    attend_body(args, s, t, kvh, out, buf)
}

/// Computes the output rows of (token `t` in sequence `s`, KV head `kvh`):
/// out: (group, head_dim) for query heads `kvh*group .. (kvh+1)*group`.
pub fn attend(args: &AttentionArgs<'_>, s: usize, t: usize, kvh: usize, out: &mut [f32]) {
    // f32 rows are read in place; other dtypes are decoded a chunk at a time.
    let in_place = args.layout.dtype == DType::F32
        && bytemuck::try_cast_slice::<u8, f32>(args.cache).is_ok();
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
            unsafe { attend_avx2(args, s, t, kvh, out, buf) };
            return;
        }
    }
    attend_body(args, s, t, kvh, out, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::write_kv;
    use rand::{Rng, SeedableRng};

    /// Attention of every query over its sequence, in f64 over the rows as
    /// stored (decoded). q: (n, heads, hd); returns (n, heads, hd).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        cache: &[u8],
        l: &KvLayout,
        positions: &[u32],
        tables: &[Vec<u32>],
        qsl: &[u32],
        heads: usize,
        scale: f32,
    ) -> Vec<f64> {
        let hd = l.head_dim;
        let group = heads / l.num_kv_heads;
        let mut out = vec![0f64; q.len()];
        let row = |p: u32, kv, pos: usize, h| {
            let o = l.row_offset(p as usize, kv, pos % l.page_size, h);
            let mut r = vec![0f32; hd];
            dequantize_row(l.dtype, &cache[o..o + l.row_bytes()], &mut r).unwrap();
            r
        };
        for (s, table) in tables.iter().enumerate() {
            for t in qsl[s] as usize..qsl[s + 1] as usize {
                for h in 0..heads {
                    let kvh = h / group;
                    let qh = &q[(t * heads + h) * hd..][..hd];
                    let n = positions[t] as usize + 1;
                    let sc: Vec<f64> = (0..n)
                        .map(|p| {
                            let k = row(table[p / l.page_size], 0, p, kvh);
                            let d: f64 = qh.iter().zip(&k).map(|(a, b)| *a as f64 * *b as f64).sum();
                            d * scale as f64
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (p, w) in e.iter().enumerate() {
                        let v = row(table[p / l.page_size], 1, p, kvh);
                        for d in 0..hd {
                            out[(t * heads + h) * hd + d] += w / z * v[d] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    /// Two sequences (lengths 45 and 70, the second prefilled 5 tokens at a
    /// time here), written at the pages of `tables`; returns the attention
    /// output of all queries.
    fn run(dtype: DType, hd: usize, tables: &[Vec<u32>], check: bool) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (heads, kvh, lens) = (6, 2, [45usize, 70]);
        let l = KvLayout {
            num_layers: 1,
            num_pages: 32,
            page_size: 4,
            num_kv_heads: kvh,
            head_dim: hd,
            dtype,
        };
        let mut cache = vec![0u8; l.layer_bytes()];
        for (s, &len) in lens.iter().enumerate() {
            let k: Vec<f32> = (0..len * kvh * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..len * kvh * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
            let slots: Vec<u32> = (0..len)
                .map(|p| tables[s][p / l.page_size] * l.page_size as u32 + (p % l.page_size) as u32)
                .collect();
            write_kv(&mut cache, &l, &k, &v, &slots).unwrap();
        }
        // Queries: the last 3 positions of sequence 0, the last 5 of sequence 1.
        let positions: Vec<u32> = [42u32, 43, 44, 65, 66, 67, 68, 69].to_vec();
        let qsl = [0u32, 3, 8];
        let n = positions.len();
        let q: Vec<f32> = (0..n * heads * hd).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mbps = 18;
        let mut bt = vec![0u32; 2 * mbps];
        for (s, t) in tables.iter().enumerate() {
            bt[s * mbps..s * mbps + t.len()].copy_from_slice(t);
        }
        let args = AttentionArgs {
            q: &q,
            cache: &cache,
            layout: &l,
            positions: &positions,
            block_tables: &bt,
            context_lens: &[lens[0] as u32, lens[1] as u32],
            query_start_locs: &qsl,
            num_heads: heads,
            max_blocks_per_seq: mbps,
            scale: 0.3,
        };
        args.validate().unwrap();
        let group = heads / kvh;
        let mut out = vec![0f32; n * heads * hd];
        for t in 0..n {
            let s = usize::from(t >= 3);
            for h in 0..kvh {
                let o = &mut out[(t * heads + h * group) * hd..][..group * hd];
                attend(&args, s, t, h, o);
            }
        }
        if check {
            // The portable body gives the same bits as the dispatched one.
            let mut portable = vec![0f32; n * heads * hd];
            let mut scratch = [[0f32; MAX_HEAD_DIM]; CHUNK];
            for t in 0..n {
                let s = usize::from(t >= 3);
                for h in 0..kvh {
                    let o = &mut portable[(t * heads + h * group) * hd..][..group * hd];
                    attend_body(&args, s, t, h, o, Some(&mut scratch));
                }
            }
            assert_eq!(out, portable, "{dtype}: portable path");
            let want = reference(&q, &cache, &l, &positions, tables, &qsl, heads, 0.3);
            for (a, b) in out.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 2e-6, "{dtype}: {a} vs {b}");
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_and_ignores_page_ids() {
        let straight: Vec<Vec<u32>> = vec![(0..12).collect(), (12..30).collect()];
        // A fixed permutation of the 32 pages (7 is coprime with 32).
        let perm: Vec<u32> = (0..32).map(|i| (i * 7 + 3) % 32).collect();
        let shuffled: Vec<Vec<u32>> = vec![perm[..12].to_vec(), perm[12..30].to_vec()];
        for (dtype, hd) in [
            (DType::F32, 40),
            (DType::F32, 64),
            (DType::F16, 36),
            (DType::BF16, 64),
            (DType::Q8_0, 64),
        ] {
            let a = run(dtype, hd, &straight, true);
            let b = run(dtype, hd, &shuffled, false);
            assert_eq!(a, b, "{dtype} hd={hd}");
        }
    }
}
