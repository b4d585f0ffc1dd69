//! Fused contract ops against the unfused sequences they replace, on the
//! CPU backend (the reference every other backend's fused kernels are held
//! to): RMSNorm + several projections, RoPE + KV write, a matmul that
//! accumulates into its output, and device sampling. Random inputs of the
//! real model's shapes and of odd ones; the CPU must match bit for bit.

use std::sync::Arc;

use pagoda_backend::quant::quantize_row;
use pagoda_backend::{
    Backend, BufRef, DType, FaultInjector, KvArenaOps, KvCacheOps, KvLayerRef, KvLayout,
    MatmulDims, MemoryTag, Pool, PoolConfig, Projection, RopeKvDims, SamplingOps, TensorOps,
};
use pagoda_cpu::CpuBackend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Dev {
    b: Arc<CpuBackend>,
    pool: Pool,
    blocks: Vec<pagoda_backend::Block>,
}

impl Dev {
    fn new() -> Dev {
        let b = Arc::new(CpuBackend::new(0).unwrap());
        let pool = Pool::new(
            b.raw_allocator(),
            PoolConfig::default(),
            FaultInjector::new(),
        );
        Dev {
            b,
            pool,
            blocks: Vec::new(),
        }
    }
    fn buf(&mut self, bytes: &[u8]) -> BufRef {
        let blk = self
            .pool
            .alloc(bytes.len() as u64, MemoryTag::Scratch)
            .unwrap();
        let r = blk.buf();
        self.b.upload(r, bytes).unwrap();
        self.blocks.push(blk);
        r
    }
    fn f32s(&mut self, v: &[f32]) -> BufRef {
        self.buf(bytemuck::cast_slice(v))
    }
    fn read(&self, r: BufRef) -> Vec<u8> {
        let mut out = vec![0u8; r.bytes as usize];
        self.b.download(r, &mut out).unwrap();
        out
    }
    fn read_f32(&self, r: BufRef) -> Vec<f32> {
        bytemuck::cast_slice(&self.read(r)).to_vec()
    }
}

fn rand_f32(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// (m, k) weights in `dtype` from random values.
fn weights(rng: &mut ChaCha8Rng, dtype: DType, m: usize, k: usize) -> Vec<u8> {
    let row = dtype.row_bytes(k).unwrap();
    let mut out = vec![0u8; m * row];
    for r in 0..m {
        let v = rand_f32(rng, k, 0.2);
        quantize_row(dtype, &v, &mut out[r * row..(r + 1) * row]).unwrap();
    }
    out
}

#[test]
fn rms_norm_with_projections_equals_norm_then_matmuls() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // (n, k, [m...]): SmolLM2's Q/K/V and gate/up, one token, odd counts.
    let cases: &[(usize, usize, &[usize])] = &[
        (1, 576, &[576, 192, 192]),
        (7, 576, &[1536, 1536]),
        (33, 64, &[32, 96]),
    ];
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
    ] {
        for &(n, k, ms) in cases {
            let mut d = Dev::new();
            let x = d.f32s(&rand_f32(&mut rng, n * k, 2.0));
            let nw = d.f32s(&rand_f32(&mut rng, k, 1.5));
            let h = d.f32s(&vec![0.0; n * k]);
            let mut projs = Vec::new();
            let mut unfused = Vec::new();
            for &m in ms {
                let w = d.buf(&weights(&mut rng, dtype, m, k));
                let out = d.f32s(&vec![0.0; n * m]);
                let out2 = d.f32s(&vec![0.0; n * m]);
                projs.push(Projection {
                    w,
                    dtype,
                    m,
                    out,
                    out_stride: m,
                });
                unfused.push((w, m, out2));
            }
            d.b.rms_norm_matmul(x, nw, h, n, k, 1e-5, &projs).unwrap();
            let h2 = d.f32s(&vec![0.0; n * k]);
            d.b.rms_norm(x, nw, h2, n, k, 1e-5).unwrap();
            for (i, &(w, m, out2)) in unfused.iter().enumerate() {
                d.b.matmul(h2, w, dtype, out2, MatmulDims::new(n, k, m))
                    .unwrap();
                assert_eq!(
                    d.read_f32(projs[i].out),
                    d.read_f32(out2),
                    "{dtype} n={n} k={k} m={m}"
                );
            }
        }
    }
}

#[test]
fn accumulating_matmul_equals_matmul_then_add() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for dtype in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_1] {
        for (n, k, m) in [(1, 576, 576), (5, 1536, 576), (20, 64, 40)] {
            let mut d = Dev::new();
            let x = d.f32s(&rand_f32(&mut rng, n * k, 1.0));
            let w = d.buf(&weights(&mut rng, dtype, m, k));
            let resid = rand_f32(&mut rng, n * m, 3.0);
            let acc = d.f32s(&resid);
            let base = d.f32s(&resid);
            let tmp = d.f32s(&vec![0.0; n * m]);
            let dims = MatmulDims {
                accumulate: true,
                ..MatmulDims::new(n, k, m)
            };
            d.b.matmul(x, w, dtype, acc, dims).unwrap();
            d.b.matmul(x, w, dtype, tmp, MatmulDims::new(n, k, m))
                .unwrap();
            d.b.add_assign(base, tmp, n * m).unwrap();
            assert_eq!(d.read_f32(acc), d.read_f32(base), "{dtype} {n} {k} {m}");
            // A strided output: the same product in columns 3.. of a wider buffer.
            let wide = d.f32s(&vec![0.0; n * (m + 7)]);
            let col = wide.slice(12, ((n - 1) * (m + 7) + m) as u64 * 4).unwrap();
            let dims = MatmulDims {
                out_stride: m + 7,
                ..MatmulDims::new(n, k, m)
            };
            d.b.matmul(x, w, dtype, col, dims).unwrap();
            let got = d.read_f32(wide);
            let dense = d.read_f32(tmp);
            for t in 0..n {
                assert_eq!(
                    &got[t * (m + 7) + 3..t * (m + 7) + 3 + m],
                    &dense[t * m..(t + 1) * m]
                );
            }
        }
    }
}

/// A KV layer arena of `num_pages` pages in `pieces` pieces, all committed.
fn arena(d: &mut Dev, layout: KvLayout, pieces: usize) -> (Vec<BufRef>, BufRef) {
    let per = layout.num_pages.div_ceil(pieces);
    let pb = layout.page_bytes() as u64;
    let g = d.b.info().kv_commit_granularity;
    let mut bufs = Vec::new();
    let mut table = Vec::new();
    for i in 0..pieces {
        let pages = per.min(layout.num_pages - i * per);
        let bytes = (pages as u64 * pb).div_ceil(g) * g;
        let seg = d.b.reserve(bytes).unwrap();
        d.b.commit(seg, 0, bytes).unwrap();
        bufs.push(BufRef {
            segment: Some(seg.id),
            offset: 0,
            addr: seg.addr,
            bytes: seg.bytes,
        });
        for j in 0..pages {
            table.extend([i as u32, j as u32]);
        }
    }
    let t = d.buf(bytemuck::cast_slice(&table));
    (bufs, t)
}

#[test]
fn rope_and_kv_write_equal_rope_then_write_kv() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for dtype in [DType::F32, DType::F16, DType::Q8_0] {
        for (n, heads, kvh, hd) in [(1, 9, 3, 64), (13, 9, 3, 64), (4, 8, 2, 32)] {
            let mut d = Dev::new();
            let layout = KvLayout {
                num_layers: 1,
                num_pages: 9,
                page_size: 16,
                num_kv_heads: kvh,
                head_dim: hd,
                dtype,
            };
            let (pieces_a, table_a) = arena(&mut d, layout, 3);
            let (pieces_b, table_b) = arena(&mut d, layout, 3);
            let q = rand_f32(&mut rng, n * heads * hd, 1.0);
            let k = rand_f32(&mut rng, n * kvh * hd, 1.0);
            let v = rand_f32(&mut rng, n * kvh * hd, 1.0);
            let positions: Vec<u32> = (0..n as u32).map(|i| 40 + 3 * i).collect();
            let slots: Vec<u32> = (0..n as u32).map(|i| (i * 11) % 144).collect();
            let (q1, k1, v1) = (d.f32s(&q), d.f32s(&k), d.f32s(&v));
            let (q2, k2, v2) = (d.f32s(&q), d.f32s(&k), d.f32s(&v));
            let pos = d.buf(bytemuck::cast_slice(&positions));
            let sl = d.buf(bytemuck::cast_slice(&slots));
            let dims = RopeKvDims {
                num_tokens: n,
                num_heads: heads,
                num_kv_heads: kvh,
                head_dim: hd,
                rope_dim: hd,
                freq_base: 10000.0,
            };
            let a = KvLayerRef {
                pieces: &pieces_a,
                page_table: table_a,
                layout,
            };
            let b = KvLayerRef {
                pieces: &pieces_b,
                page_table: table_b,
                layout,
            };
            d.b.rope_write_kv(q1, k1, v1, pos, sl, a, dims).unwrap();
            d.b.rope(q2, pos, dims.rope(false)).unwrap();
            d.b.rope(k2, pos, dims.rope(true)).unwrap();
            d.b.write_kv(b, k2, v2, sl, n).unwrap();
            assert_eq!(d.read_f32(q1), d.read_f32(q2), "{dtype}: q");
            for (pa, pb) in pieces_a.iter().zip(&pieces_b) {
                assert_eq!(d.read(*pa), d.read(*pb), "{dtype}: kv pages");
            }
        }
    }
}

#[test]
fn device_sampling_matches_the_host_order() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (rows, vocab, k) = (5, 49152, 40);
    let mut d = Dev::new();
    let mut logits: Vec<f32> = (0..rows * vocab)
        .map(|_| (rng.random_range(-200..200) as f32) * 0.05)
        .collect();
    logits[7] = f32::NAN;
    let l = d.f32s(&logits);
    let ids = d.f32s(&vec![0.0; rows]);
    let vals = d.f32s(&vec![0.0; rows * k]);
    let tids = d.f32s(&vec![0.0; rows * k]);
    d.b.argmax_rows(l, ids, rows, vocab).unwrap();
    d.b.top_k_rows(l, vals, tids, rows, vocab, k).unwrap();
    let got_ids: Vec<u32> = bytemuck::cast_slice(&d.read(ids)).to_vec();
    let got_vals = d.read_f32(vals);
    let got_tids: Vec<u32> = bytemuck::cast_slice(&d.read(tids)).to_vec();
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        assert_eq!(got_ids[r], pagoda::sampler::argmax(row), "row {r}");
        let mut all: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for j in 0..k {
            assert_eq!(got_tids[r * k + j], all[j].0, "row {r} rank {j}");
            assert_eq!(got_vals[r * k + j].to_bits(), all[j].1.to_bits());
        }
    }
    // k above the device limit is refused, not truncated.
    assert!(
        d.b.top_k_rows(l, vals, tids, 1, vocab, CpuBackend::MAX_TOP_K + 1)
            .is_err()
    );
}
