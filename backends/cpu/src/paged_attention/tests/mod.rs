//! Unit tests of the parent module.

use super::*;
use crate::kv_cache::{KvPagesMut, write_kv};
use pagoda_backend::MAX_KV_PIECES;
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
fn run(dtype: DType, hd: usize, heads: usize, tables: &[Vec<u32>], check: bool) -> Vec<f32> {
    let a = run_in_pieces(dtype, hd, heads, tables, check, 32);
    // The same cache cut into pieces of 10, 10, 10 and 2 pages: same bits.
    let b = run_in_pieces(dtype, hd, heads, tables, false, 10);
    assert_eq!(a, b, "{dtype}: pieces");
    a
}

fn run_in_pieces(
    dtype: DType,
    hd: usize,
    heads: usize,
    tables: &[Vec<u32>],
    check: bool,
    pages_per_piece: usize,
) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (kvh, lens) = (2, [45usize, 70]);
    let l = KvLayout {
        num_layers: 1,
        num_pages: 32,
        page_size: 4,
        num_kv_heads: kvh,
        head_dim: hd,
        dtype,
    };
    let mut cache = vec![0u8; l.layer_bytes()];
    let table: Vec<u32> = (0..l.num_pages)
        .flat_map(|p| [(p / pages_per_piece) as u32, (p % pages_per_piece) as u32])
        .collect();
    let mut chunks: Vec<&mut [u8]> = cache.chunks_mut(pages_per_piece * l.page_bytes()).collect();
    let num_pieces = chunks.len();
    let mut pieces: [&mut [u8]; MAX_KV_PIECES] = std::array::from_fn(|_| <&mut [u8]>::default());
    for (i, c) in chunks.drain(..).enumerate() {
        pieces[i] = c;
    }
    let mut kv = KvPagesMut {
        pieces,
        num_pieces,
        table: &table,
        layout: l,
    };
    for (s, &len) in lens.iter().enumerate() {
        let k: Vec<f32> = (0..len * kvh * hd)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let v: Vec<f32> = (0..len * kvh * hd)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let slots: Vec<u32> = (0..len)
            .map(|p| tables[s][p / l.page_size] * l.page_size as u32 + (p % l.page_size) as u32)
            .collect();
        write_kv(&mut kv, &k, &v, &slots, |_, _, _| Ok(())).unwrap();
    }
    let mut views: [&[u8]; MAX_KV_PIECES] = [&[]; MAX_KV_PIECES];
    for (i, c) in cache.chunks(pages_per_piece * l.page_bytes()).enumerate() {
        views[i] = c;
    }
    let pages = crate::kv_cache::KvPages {
        pieces: views,
        num_pieces,
        table: &table,
        layout: l,
    };
    // Queries: the last 3 positions of sequence 0, the last 5 of sequence 1.
    let positions: Vec<u32> = [42u32, 43, 44, 65, 66, 67, 68, 69].to_vec();
    let qsl = [0u32, 3, 8];
    let n = positions.len();
    let q: Vec<f32> = (0..n * heads * hd)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let mbps = 18;
    let mut bt = vec![0u32; 2 * mbps];
    for (s, t) in tables.iter().enumerate() {
        bt[s * mbps..s * mbps + t.len()].copy_from_slice(t);
    }
    let args = AttentionArgs {
        q: &q,
        cache: pages,
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
    // Sequence 0 one query at a time, sequence 1 in one call.
    for h in 0..kvh {
        let mut emit = |t: usize, o: &[f32]| {
            out[(t * heads + h * group) * hd..][..group * hd].copy_from_slice(o)
        };
        for t in 0..3 {
            attend(&args, 0, t..t + 1, h, &mut emit);
        }
        attend(&args, 1, 3..8, h, &mut emit);
    }
    if check {
        // The portable body gives the same bits as the dispatched one.
        let mut portable = vec![0f32; n * heads * hd];
        let mut scratch = [[0f32; MAX_HEAD_DIM]; CHUNK];
        for h in 0..kvh {
            let mut emit = |t: usize, o: &[f32]| {
                portable[(t * heads + h * group) * hd..][..group * hd].copy_from_slice(o)
            };
            attend_body::<Portable>(&args, 0, 0..3, h, &mut emit, Some(&mut scratch));
            for t in 3..8 {
                attend_body::<Portable>(&args, 1, t..t + 1, h, &mut emit, Some(&mut scratch));
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
    // Groups of 1, 2, 3 and 5 query heads per KV head (2 KV heads).
    for (dtype, hd, heads) in [
        (DType::F32, 40, 6),
        (DType::F32, 64, 6),
        (DType::F32, 64, 2),
        (DType::F32, 72, 4),
        (DType::F32, 32, 10),
        (DType::F16, 36, 6),
        (DType::BF16, 64, 4),
        (DType::Q8_0, 64, 6),
    ] {
        let a = run(dtype, hd, heads, &straight, true);
        let b = run(dtype, hd, heads, &shuffled, false);
        assert_eq!(a, b, "{dtype} hd={hd} heads={heads}");
    }
}
