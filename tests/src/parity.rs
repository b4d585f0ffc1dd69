//! Parity of EVERY op of the backend contract (`backends/core/src/backend.rs`)
//! between the CPU backend (the reference) and a second backend.
//!
//! The harness, [`check_all_ops`], is generic over the second backend:
//! - `limited_cpu_matches_cpu` (tests/cuda_parity.rs, runs in CI) checks it
//!   against a CPU backend with small device limits, so weights and KV arenas
//!   are split into pieces there and not on the reference: this proves the harness;
//! - `cuda_matches_cpu` (ignored, needs a GPU) checks the CUDA backend;
//! - tests/wgpu_parity.rs checks the wgpu backend (lavapipe in CI).
//!
//! Weight types: those both backends list in `BackendInfo::weight_dtypes`.
//!
//! Every op runs on fresh random inputs (ChaCha8 from a printed seed; set
//! `PAGODA_PARITY_SEED` to replay another), on SmolLM2-135M's shapes (hidden
//! 576, 9 heads, 3 KV heads, head_dim 64, ffn 1536, vocab 49152, RoPE base
//! 1e5, eps 1e-5) and on odd ones. Every output buffer is poisoned (a NaN bit
//! pattern) before the op; every element the op must write is checked to be
//! written, and every element it must not touch to be still poison.
//!
//! The metric is the normalised MSE `nmse(a, b) = mse(a, b) / mse(a, 0)`
//! with `a` the CPU's output (llama.cpp's test-backend-ops metric).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use pagoda_backend::quant::{dequantize_row, quantize_row};
use pagoda_backend::{
    AttentionDims, Backend, Block, BufRef, DType, EmbeddingDims, FaultInjector, KvGeometry,
    KvLayerRef, KvLayout, MatmulDims, MemoryTag, Pool, PoolConfig, Projection, RawSegment,
    RopeDims, RopeKvDims,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bound for float ops: llama.cpp test-backend-ops' `max_nmse_err` (1e-7).
/// Only accumulation order and fused multiply-adds may differ.
const FLOAT_NMSE: f64 = 1e-7;
/// Bound for matmul / embedding with quantized weights (Q8_0, Q4_0, Q4_1):
/// 5e-4, room for a backend that quantizes activations (llama.cpp's q8_1
/// path) even though both backends read the same weight blocks.
const QUANT_NMSE: f64 = 5e-4;

/// Poison of output buffers: a quiet NaN with a payload no op produces.
const POISON: u32 = 0x7FC0_0BAD;
/// Poison byte of KV arenas (0xFF: NaN in f32, f16, bf16 and in a Q8_0 scale).
const KV_POISON: u8 = 0xFF;
/// Pieces of a KV arena are at most this big (or one commit granule) on
/// every backend, so arenas are split into pieces on the GPU too.
const KV_PIECE_CAP: u64 = 256 << 10;
/// Commit unit target of the test arenas.
const KV_UNIT: u64 = 64 << 10;

const HIDDEN: usize = 576;
const FFN: usize = 1536;
const VOCAB: usize = 49152;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const ROPE_BASE: f32 = 100_000.0;
const EPS: f32 = 1e-5;
const PAGE: usize = 16;

const KV_TYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0];

/// The weight types both backends compute with.
fn common_weight_types<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>) -> Vec<DType> {
    a.info()
        .weight_dtypes
        .iter()
        .copied()
        .filter(|d| b.info().supports_weight(*d))
        .collect()
}

/// A weight row width `k` (the shapes here are SmolLM2's, 576 wide) made a whole number of
/// `dtype`'s blocks: the 256-element K-quants get the next multiple of 256 (576 → 768,
/// 64 → 256; 1536 stays), as a model of those types has (llama2-7b: 4096, 11008).
fn kdim(dtype: DType, k: usize) -> usize {
    k.div_ceil(dtype.block_size()) * dtype.block_size()
}

fn weight_bound(dtype: DType) -> f64 {
    if dtype.is_quantized() {
        QUANT_NMSE
    } else {
        FLOAT_NMSE
    }
}

// ---------------------------------------------------------------- device

/// Buffers of one backend: a pool over its raw allocator and KV arenas.
struct Dev<X: Backend> {
    b: Arc<X>,
    pool: Pool,
    blocks: Vec<Block>,
    arenas: Vec<RawSegment>,
}

/// One layer arena: its pieces, page table and geometry.
struct Kv {
    pieces: Vec<BufRef>,
    table: BufRef,
    geo: KvGeometry,
}

impl Kv {
    fn layer(&self) -> KvLayerRef<'_> {
        KvLayerRef {
            pieces: &self.pieces,
            page_table: self.table,
            layout: self.geo.layout,
        }
    }
}

impl<X: Backend> Dev<X> {
    fn new(b: &Arc<X>) -> Self {
        let max = b.info().max_buffer_bytes;
        let pool = Pool::new(
            b.raw_allocator(),
            PoolConfig {
                max_segment_bytes: max,
                min_segment_bytes: (2u64 << 20).min(max),
                ..PoolConfig::default()
            },
            FaultInjector::new(),
        );
        Dev {
            b: b.clone(),
            pool,
            blocks: Vec::new(),
            arenas: Vec::new(),
        }
    }

    fn alloc(&mut self, bytes: usize) -> BufRef {
        let blk = self
            .pool
            .alloc(bytes as u64, MemoryTag::Scratch)
            .expect("pool alloc");
        let r = blk.buf();
        self.blocks.push(blk);
        r
    }

    fn bytes(&mut self, src: &[u8]) -> BufRef {
        let r = self.alloc(src.len());
        self.b.upload(r, src).expect("upload");
        r
    }

    fn f32s(&mut self, v: &[f32]) -> BufRef {
        self.bytes(bytemuck::cast_slice(v))
    }

    fn u32s(&mut self, v: &[u32]) -> BufRef {
        self.bytes(bytemuck::cast_slice(v))
    }

    /// `n` f32 (or u32) elements, every one [`POISON`].
    fn poisoned(&mut self, n: usize) -> BufRef {
        self.u32s(&vec![POISON; n])
    }

    fn read(&self, r: BufRef) -> Vec<u8> {
        let mut out = vec![0u8; r.bytes as usize];
        self.b.download(r, &mut out).expect("download");
        out
    }

    fn read_f32(&self, r: BufRef) -> Vec<f32> {
        self.read_u32(r).into_iter().map(f32::from_bits).collect()
    }

    fn read_u32(&self, r: BufRef) -> Vec<u32> {
        self.read(r)
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// One weight piece of `rows` rows through `upload_weight`.
    fn weight_piece(&mut self, dtype: DType, rows: usize, cols: usize, src: &[u8]) -> BufRef {
        let bytes = self
            .b
            .prepared_weight_bytes(dtype, rows, cols)
            .expect("weight shape");
        let w = self.alloc(bytes as usize);
        self.b
            .upload_weight(w, src, dtype, rows, cols)
            .expect("upload_weight");
        w
    }

    /// A `(rows, cols)` weight split into row pieces under the backend's
    /// binding limit, as the engine splits it: `(first_row, rows, buffer)`.
    fn weight(
        &mut self,
        dtype: DType,
        rows: usize,
        cols: usize,
        src: &[u8],
    ) -> Vec<(usize, usize, BufRef)> {
        let rb = dtype.row_bytes(cols).expect("whole blocks");
        let per = ((self.b.info().max_binding_bytes / rb as u64) as usize).clamp(1, rows.max(1));
        let mut out = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = per.min(rows - r0);
            let w = self.weight_piece(dtype, n, cols, &src[r0 * rb..(r0 + n) * rb]);
            out.push((r0, n, w));
            r0 += n;
        }
        out
    }

    /// A committed layer arena in pieces of at most `max(KV_PIECE_CAP,
    /// granularity)` bytes (and the backend's limits), every byte [`KV_POISON`].
    fn kv(&mut self, layout: KvLayout) -> Kv {
        let info = self.b.info().clone();
        let g = info.kv_commit_granularity;
        let cap = info.max_binding_bytes.min(KV_PIECE_CAP.max(g));
        let geo =
            KvGeometry::new(layout, info.max_buffer_bytes, cap, g, KV_UNIT).expect("kv geometry");
        let mut pieces = Vec::new();
        for i in 0..geo.num_pieces {
            let bytes = geo.piece_bytes(i);
            let seg = self.b.reserve(bytes).expect("reserve");
            self.arenas.push(seg);
            self.b.commit(seg, 0, bytes).expect("commit");
            pieces.push(BufRef {
                segment: Some(seg.id),
                offset: 0,
                addr: seg.addr,
                bytes: seg.bytes,
            });
        }
        let mut table = Vec::new();
        for p in 0..layout.num_pages {
            let (piece, pip) = geo.locate(p);
            table.extend([piece as u32, pip as u32]);
        }
        let table = self.u32s(&table);
        let kv = Kv { pieces, table, geo };
        self.fill_arena(&kv, &vec![KV_POISON; layout.layer_bytes()]);
        kv
    }

    /// Writes a whole layer (`layer_bytes`, pages in page order) into the pieces.
    fn fill_arena(&self, kv: &Kv, bytes: &[u8]) {
        let pb = kv.geo.layout.page_bytes();
        for (i, piece) in kv.pieces.iter().enumerate() {
            let mut host = vec![KV_POISON; piece.bytes as usize];
            let first = i * kv.geo.pages_per_piece;
            for j in 0..kv.geo.piece_pages(i) {
                host[j * pb..(j + 1) * pb]
                    .copy_from_slice(&bytes[(first + j) * pb..(first + j + 1) * pb]);
            }
            self.b.upload(*piece, &host).expect("upload kv piece");
        }
    }

    /// The whole layer (`layer_bytes`, pages in page order), read back from the pieces.
    fn arena(&self, kv: &Kv) -> Vec<u8> {
        let l = kv.geo.layout;
        let pb = l.page_bytes();
        let pieces: Vec<Vec<u8>> = kv.pieces.iter().map(|p| self.read(*p)).collect();
        let mut out = vec![0u8; l.layer_bytes()];
        for p in 0..l.num_pages {
            let (piece, pip) = kv.geo.locate(p);
            out[p * pb..(p + 1) * pb].copy_from_slice(&pieces[piece][pip * pb..(pip + 1) * pb]);
        }
        out
    }
}

impl<X: Backend> Drop for Dev<X> {
    fn drop(&mut self) {
        self.blocks.clear();
        for a in self.arenas.drain(..) {
            self.b.unreserve(a);
        }
    }
}

// ---------------------------------------------------------------- checks

fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y as f64;
        num += d * d;
        den += x as f64 * x as f64;
    }
    if den == 0.0 {
        if num == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        num / den
    }
}

/// Both outputs fully written (no poison / NaN left) and `nmse(a, b) <= bound`.
fn assert_nmse(what: &str, a: &[f32], b: &[f32], bound: f64) {
    assert_eq!(a.len(), b.len(), "{what}: output lengths");
    if let Some(i) = a.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what}: the CPU left element {i} unwritten or not finite ({})",
            a[i]
        );
    }
    if let Some(i) = b.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what}: the backend left element {i} of {} unwritten or not finite ({}, bits {:#x})",
            b.len(),
            b[i],
            b[i].to_bits()
        );
    }
    let e = nmse(a, b);
    eprintln!("  {what}: nmse {e:.3e}");
    assert!(e <= bound, "{what}: nmse {e:.3e} above the bound {bound:e}");
}

/// Every element still [`POISON`] (an op wrote where it must not).
fn assert_untouched(what: &str, v: &[f32]) {
    if let Some(i) = v.iter().position(|x| x.to_bits() != POISON) {
        panic!("{what}: element {i} must be left untouched, holds {}", v[i]);
    }
}

fn rand_f32(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.random_range(-scale..scale);
            if v == 0.0 { scale * 0.5 } else { v }
        })
        .collect()
}

/// `(rows, cols)` weights of `dtype` from random values (GGUF blocks via
/// `pagoda_backend::quant`; F16/BF16 through `half`).
fn weights(rng: &mut ChaCha8Rng, dtype: DType, rows: usize, cols: usize, scale: f32) -> Vec<u8> {
    let rb = dtype.row_bytes(cols).unwrap();
    let mut out = vec![0u8; rows * rb];
    for r in 0..rows {
        let v = rand_f32(rng, cols, scale);
        quantize_row(dtype, &v, &mut out[r * rb..(r + 1) * rb]).unwrap();
    }
    out
}

fn seed() -> u64 {
    std::env::var("PAGODA_PARITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_0010)
}

// ---------------------------------------------------------------- harness

type OpCheck<A, B> = fn(&Arc<A>, &Arc<B>, &mut ChaCha8Rng);

/// Runs every op's parity check of `other` against `cpu`, each on its own
/// RNG stream; reports every failing op (not only the first) and panics
/// when any failed.
pub fn check_all_ops<A: Backend, B: Backend>(cpu: &Arc<A>, other: &Arc<B>) {
    check_ops(cpu, other, None)
}

/// [`check_all_ops`] for the ops named in `only` (all when `None`; `PAGODA_PARITY_OPS`, a
/// comma-separated list, narrows either further: a development aid, CI sets none).
pub fn check_ops<A: Backend, B: Backend>(cpu: &Arc<A>, other: &Arc<B>, only: Option<&[&str]>) {
    let checks: [(&str, OpCheck<A, B>); 14] = [
        ("embedding", check_embedding),
        ("matmul", check_matmul),
        ("rms_norm", check_rms_norm),
        ("rms_norm_matmul", check_rms_norm_matmul),
        ("rope", check_rope),
        ("silu_mul", check_silu_mul),
        ("add_assign", check_add_assign),
        ("gather_rows", check_gather_rows),
        ("write_kv", check_write_kv),
        ("rope_write_kv", check_rope_write_kv),
        ("copy_pages", check_copy_pages),
        ("paged_attention", check_paged_attention),
        ("sampling", check_sampling),
        ("zero_sized", check_zero_sized),
    ];
    let seed = seed();
    println!(
        "parity seed {seed} (PAGODA_PARITY_SEED); {} vs {}",
        cpu.info().device,
        other.info().device
    );
    let env = std::env::var("PAGODA_PARITY_OPS").ok();
    let mut failed = Vec::new();
    for (i, (name, check)) in checks.into_iter().enumerate() {
        if only.is_some_and(|o| !o.contains(&name))
            || env
                .as_ref()
                .is_some_and(|e| !e.split(',').any(|o| o.trim() == name))
        {
            continue;
        }
        eprintln!("{name} (seed {seed} + {i})");
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
        let t0 = std::time::Instant::now();
        if catch_unwind(AssertUnwindSafe(|| check(cpu, other, &mut rng))).is_err() {
            failed.push(name);
        }
        eprintln!("{name}: {:.1} s", t0.elapsed().as_secs_f64());
    }
    assert!(
        failed.is_empty(),
        "ops failing parity (seed {seed}): {failed:?}"
    );
}

// ---------------------------------------------------------------- embedding

fn run_embedding<X: Backend>(
    b: &Arc<X>,
    dtype: DType,
    table: &[u8],
    (vocab, dim): (usize, usize),
    ids: &[u32],
    piece: Option<(usize, usize)>,
) -> Vec<f32> {
    let mut d = Dev::new(b);
    let n = ids.len();
    let idb = d.u32s(ids);
    let out = d.poisoned(n * dim);
    let rb = dtype.row_bytes(dim).unwrap();
    let pieces = match piece {
        Some((first, rows)) => {
            let w = d.weight_piece(dtype, rows, dim, &table[first * rb..(first + rows) * rb]);
            vec![(first, rows, w)]
        }
        None => d.weight(dtype, vocab, dim, table),
    };
    for (first_row, num_rows, w) in pieces {
        let dims = EmbeddingDims {
            n,
            dim,
            vocab,
            first_row,
            num_rows,
        };
        d.b.embedding(w, dtype, idb, out, dims).expect("embedding");
    }
    d.read_f32(out)
}

fn check_embedding<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    for dtype in common_weight_types(a, b) {
        // The model's table, ids at both ends and a repeat.
        let hidden = kdim(dtype, HIDDEN);
        let table = weights(rng, dtype, VOCAB, hidden, 1.0);
        let mut ids: Vec<u32> = (0..9).map(|_| rng.random_range(0..VOCAB as u32)).collect();
        ids.extend([0, VOCAB as u32 - 1, ids[2]]);
        let ra = run_embedding(a, dtype, &table, (VOCAB, hidden), &ids, None);
        let rb = run_embedding(b, dtype, &table, (VOCAB, hidden), &ids, None);
        assert_nmse(
            &format!("embedding {dtype} vocab {VOCAB}"),
            &ra,
            &rb,
            weight_bound(dtype),
        );
        // One token of a small table.
        let small = kdim(dtype, 32);
        let table = weights(rng, dtype, 64, small, 3.0);
        let ids = [rng.random_range(0..64u32)];
        let ra = run_embedding(a, dtype, &table, (64, small), &ids, None);
        let rb = run_embedding(b, dtype, &table, (64, small), &ids, None);
        assert_nmse(
            &format!("embedding {dtype} 1 token"),
            &ra,
            &rb,
            weight_bound(dtype),
        );
        // A row piece (rows 64 .. 134 of 200): rows of other ids stay as they were.
        let (vocab, dim, first, rows) = (200, kdim(dtype, 64), 64, 70);
        let table = weights(rng, dtype, vocab, dim, 1.0);
        let mut ids: Vec<u32> = (0..16).map(|_| rng.random_range(0..vocab as u32)).collect();
        ids.extend([63, 64, 133, 134, 0, 199]);
        let ra = run_embedding(a, dtype, &table, (vocab, dim), &ids, Some((first, rows)));
        let rb = run_embedding(b, dtype, &table, (vocab, dim), &ids, Some((first, rows)));
        let (mut wa, mut wb) = (Vec::new(), Vec::new());
        for (i, &id) in ids.iter().enumerate() {
            let r = i * dim..(i + 1) * dim;
            if (first..first + rows).contains(&(id as usize)) {
                wa.extend_from_slice(&ra[r.clone()]);
                wb.extend_from_slice(&rb[r]);
            } else {
                assert_untouched(
                    &format!("embedding {dtype} piece, cpu row {i}"),
                    &ra[r.clone()],
                );
                assert_untouched(
                    &format!("embedding {dtype} piece, row {i} (id {id})"),
                    &rb[r],
                );
            }
        }
        assert_nmse(
            &format!("embedding {dtype} row piece"),
            &wa,
            &wb,
            weight_bound(dtype),
        );
    }
}

// ---------------------------------------------------------------- matmul

fn run_matmul<X: Backend>(
    b: &Arc<X>,
    x: &[f32],
    w: &[u8],
    dtype: DType,
    dims: MatmulDims,
    init: Option<&[f32]>,
) -> Vec<f32> {
    let mut d = Dev::new(b);
    let xb = d.f32s(x);
    let out = match init {
        Some(v) => d.f32s(v),
        None => d.poisoned(dims.n * dims.out_stride),
    };
    for (r0, rows, wb) in d.weight(dtype, dims.m, dims.k, w) {
        let piece = MatmulDims { m: rows, ..dims };
        let o = if piece.out_len() == 0 {
            BufRef::EMPTY
        } else {
            out.slice(r0 as u64 * 4, piece.out_len() as u64 * 4)
                .unwrap()
        };
        d.b.matmul(xb, wb, dtype, o, piece).expect("matmul");
    }
    d.read_f32(out)
}

/// Columns `0 .. m` of every row by nmse; columns `m .. out_stride` must
/// hold what they held before (poison, or `init` when accumulating).
fn compare_strided(
    what: &str,
    ra: &[f32],
    rb: &[f32],
    (n, m, stride): (usize, usize, usize),
    init: Option<&[f32]>,
    bound: f64,
) {
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    for t in 0..n {
        wa.extend_from_slice(&ra[t * stride..t * stride + m]);
        wb.extend_from_slice(&rb[t * stride..t * stride + m]);
        let gap = t * stride + m..(t + 1) * stride;
        match init {
            Some(init) => {
                let same = |v: &[f32]| {
                    v.iter()
                        .zip(&init[gap.clone()])
                        .all(|(x, y)| x.to_bits() == y.to_bits())
                };
                assert!(same(&ra[gap.clone()]), "{what}: CPU wrote row {t} past m");
                assert!(
                    same(&rb[gap.clone()]),
                    "{what}: backend wrote row {t} past m"
                );
            }
            None => {
                assert_untouched(&format!("{what}: CPU row {t} past m"), &ra[gap.clone()]);
                assert_untouched(&format!("{what}: row {t} past m"), &rb[gap]);
            }
        }
    }
    assert_nmse(what, &wa, &wb, bound);
}

fn check_matmul<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    // (n, k, m, out_stride, accumulate)
    let mut cases: Vec<(usize, usize, usize, usize, bool)> = Vec::new();
    let shapes = [
        (HIDDEN, HIDDEN),
        (HIDDEN, 192),
        (HIDDEN, FFN),
        (FFN, HIDDEN),
    ];
    for n in [1, 3, 8, 9, 64] {
        for (k, m) in shapes {
            cases.push((n, k, m, m, false));
        }
    }
    cases.extend([
        (1, HIDDEN, VOCAB, VOCAB, false), // lm_head, one token
        (5, HIDDEN, VOCAB, VOCAB, false), // lm_head, five rows
        (9, HIDDEN, 192, 200, false),     // out_stride > m
        (8, FFN, HIDDEN, HIDDEN, true),   // down projection + residual
        (3, HIDDEN, 192, 577, true),      // accumulate into a strided output
        (1, 32, 1, 1, false),             // one block, one row
        (64, 64, 33, 40, false),          // odd m
    ]);
    for dtype in common_weight_types(a, b) {
        for &(n, k, m, stride, acc) in &cases {
            let k = kdim(dtype, k);
            let x = rand_f32(rng, n * k, 1.0);
            let w = weights(rng, dtype, m, k, 0.2);
            let dims = MatmulDims {
                n,
                k,
                m,
                out_stride: stride,
                accumulate: acc,
            };
            let init = acc.then(|| rand_f32(rng, n * stride, 2.0));
            let ra = run_matmul(a, &x, &w, dtype, dims, init.as_deref());
            let rb = run_matmul(b, &x, &w, dtype, dims, init.as_deref());
            compare_strided(
                &format!("matmul {dtype} n={n} k={k} m={m} stride={stride} acc={acc}"),
                &ra,
                &rb,
                (n, m, stride),
                init.as_deref(),
                weight_bound(dtype),
            );
        }
    }
}

// ---------------------------------------------------------------- norms

fn run_rms_norm<X: Backend>(b: &Arc<X>, x: &[f32], w: &[f32], n: usize, dim: usize) -> Vec<f32> {
    let mut d = Dev::new(b);
    let (xb, wb, out) = (d.f32s(x), d.f32s(w), d.poisoned(n * dim));
    d.b.rms_norm(xb, wb, out, n, dim, EPS).expect("rms_norm");
    d.read_f32(out)
}

fn check_rms_norm<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    for (n, dim, scale) in [
        (1, HIDDEN, 1.0),
        (7, HIDDEN, 30.0),
        (64, HIDDEN, 0.01),
        (3, FFN, 2.0),
        (2, 64, 1.0),
        (5, 8, 4.0),
    ] {
        let x = rand_f32(rng, n * dim, scale);
        let w = rand_f32(rng, dim, 1.5);
        let ra = run_rms_norm(a, &x, &w, n, dim);
        let rb = run_rms_norm(b, &x, &w, n, dim);
        assert_nmse(&format!("rms_norm n={n} dim={dim}"), &ra, &rb, FLOAT_NMSE);
    }
}

/// Projections: (weights, m, first column in the shared output).
type Projs = Vec<(Vec<u8>, usize, usize)>;

fn run_rms_norm_matmul<X: Backend>(
    b: &Arc<X>,
    x: &[f32],
    nw: &[f32],
    (n, k, stride): (usize, usize, usize),
    dtype: DType,
    projs: &Projs,
) -> Vec<f32> {
    let mut d = Dev::new(b);
    let (xb, nwb) = (d.f32s(x), d.f32s(nw));
    let normed = d.poisoned(n * k);
    let out = d.poisoned(n * stride);
    let mut ps = Vec::new();
    for (w, m, col) in projs {
        for (r0, rows, wb) in d.weight(dtype, *m, k, w) {
            let len = if n == 0 { 0 } else { (n - 1) * stride + rows };
            let o = if len == 0 {
                BufRef::EMPTY
            } else {
                out.slice((col + r0) as u64 * 4, len as u64 * 4).unwrap()
            };
            ps.push(Projection {
                w: wb,
                dtype,
                m: rows,
                out: o,
                out_stride: stride,
            });
        }
    }
    d.b.rms_norm_matmul(xb, nwb, normed, n, k, EPS, &ps)
        .expect("rms_norm_matmul");
    d.read_f32(out)
}

fn check_rms_norm_matmul<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    // (n, k, out_stride, [(m, first column)])
    type Case<'a> = (usize, usize, usize, &'a [(usize, usize)]);
    let cases: &[Case] = &[
        (1, HIDDEN, 960, &[(576, 0), (192, 576), (192, 768)]), // Q, K, V in one buffer
        (7, HIDDEN, 2 * FFN, &[(FFN, 0), (FFN, FFN)]),         // gate, up
        (9, HIDDEN, 600, &[(576, 0)]),                         // a gap of 24 columns
        (3, 64, 200, &[(32, 0), (96, 100)]),                   // gaps between projections
        (64, HIDDEN, 384, &[(192, 0), (192, 192)]),
    ];
    for dtype in common_weight_types(a, b) {
        for &(n, k, stride, ms) in cases {
            let k = kdim(dtype, k);
            let x = rand_f32(rng, n * k, 2.0);
            let nw = rand_f32(rng, k, 1.5);
            let projs: Projs = ms
                .iter()
                .map(|&(m, col)| (weights(rng, dtype, m, k, 0.2), m, col))
                .collect();
            let ra = run_rms_norm_matmul(a, &x, &nw, (n, k, stride), dtype, &projs);
            let rb = run_rms_norm_matmul(b, &x, &nw, (n, k, stride), dtype, &projs);
            let mut written = vec![false; stride];
            for &(m, col) in ms {
                written[col..col + m].iter_mut().for_each(|w| *w = true);
                let (mut wa, mut wb) = (Vec::new(), Vec::new());
                for t in 0..n {
                    wa.extend_from_slice(&ra[t * stride + col..t * stride + col + m]);
                    wb.extend_from_slice(&rb[t * stride + col..t * stride + col + m]);
                }
                assert_nmse(
                    &format!("rms_norm_matmul {dtype} n={n} k={k} m={m} at column {col}"),
                    &wa,
                    &wb,
                    weight_bound(dtype),
                );
            }
            for t in 0..n {
                for (c, &w) in written.iter().enumerate() {
                    if !w {
                        let what = format!("rms_norm_matmul {dtype} n={n} row {t} column {c}");
                        assert_untouched(&what, &ra[t * stride + c..][..1]);
                        assert_untouched(&what, &rb[t * stride + c..][..1]);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- rope and elementwise

fn run_rope<X: Backend>(b: &Arc<X>, x: &[f32], pos: &[u32], dims: RopeDims) -> Vec<f32> {
    let mut d = Dev::new(b);
    let (xb, pb) = (d.f32s(x), d.u32s(pos));
    d.b.rope(xb, pb, dims).expect("rope");
    d.read_f32(xb)
}

fn positions(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n).map(|_| rng.random_range(0..=4000)).collect();
    // Both ends of the range when there is room.
    if n >= 3 {
        p[0] = 0;
        p[1] = 4000;
        p[2] = 3999;
    }
    p
}

fn check_rope<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    // (tokens, heads, head_dim, rope_dim, base)
    for (n, heads, hd, rd, base) in [
        (5, HEADS, HEAD_DIM, HEAD_DIM, ROPE_BASE),
        (7, KV_HEADS, HEAD_DIM, HEAD_DIM, ROPE_BASE),
        (1, HEADS, HEAD_DIM, HEAD_DIM, ROPE_BASE),
        (9, 4, 32, 32, 10_000.0),
        (3, 2, 128, 128, 500_000.0),
        (4, 2, 64, 32, 10_000.0), // partial rotation: the last 32 elements stay
    ] {
        let x = rand_f32(rng, n * heads * hd, 1.0);
        let mut pos = positions(rng, n);
        if n == 1 {
            pos[0] = 4000;
        }
        let dims = RopeDims {
            num_tokens: n,
            num_heads: heads,
            head_dim: hd,
            rope_dim: rd,
            freq_base: base,
        };
        let ra = run_rope(a, &x, &pos, dims);
        let rb = run_rope(b, &x, &pos, dims);
        assert_nmse(
            &format!("rope n={n} heads={heads} head_dim={hd} rope_dim={rd}"),
            &ra,
            &rb,
            FLOAT_NMSE,
        );
    }
}

fn run_binary<X: Backend>(b: &Arc<X>, x: &[f32], y: &[f32], silu: bool) -> Vec<f32> {
    let mut d = Dev::new(b);
    let (xb, yb) = (d.f32s(x), d.f32s(y));
    if silu {
        let out = d.poisoned(x.len());
        d.b.silu_mul(xb, yb, out, x.len()).expect("silu_mul");
        d.read_f32(out)
    } else {
        d.b.add_assign(xb, yb, x.len()).expect("add_assign");
        d.read_f32(xb)
    }
}

const LENS: [usize; 5] = [1, 7, HIDDEN * 7, FFN * 64 + 3, 33];

fn check_silu_mul<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    for len in LENS {
        // Gates far into both tails of silu.
        let g = rand_f32(rng, len, 12.0);
        let u = rand_f32(rng, len, 3.0);
        let (ra, rb) = (run_binary(a, &g, &u, true), run_binary(b, &g, &u, true));
        assert_nmse(&format!("silu_mul len={len}"), &ra, &rb, FLOAT_NMSE);
    }
}

fn check_add_assign<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    for len in LENS {
        let x = rand_f32(rng, len, 5.0);
        let y = rand_f32(rng, len, 1.0);
        let (ra, rb) = (run_binary(a, &x, &y, false), run_binary(b, &x, &y, false));
        assert_nmse(&format!("add_assign len={len}"), &ra, &rb, FLOAT_NMSE);
    }
}

fn run_gather<X: Backend>(b: &Arc<X>, x: &[f32], idx: &[u32], dim: usize) -> Vec<f32> {
    let mut d = Dev::new(b);
    let (xb, ib) = (d.f32s(x), d.u32s(idx));
    let out = d.poisoned(idx.len() * dim);
    d.b.gather_rows(xb, ib, out, idx.len(), dim)
        .expect("gather_rows");
    d.read_f32(out)
}

fn check_gather_rows<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    for (n, dim, idx) in [
        (10, HIDDEN, vec![9, 0, 3, 3]),
        (1, HIDDEN, vec![0]),
        (64, 32, (0..64).rev().collect::<Vec<u32>>()),
        (5, 7, vec![4, 4, 4]),
    ] {
        let x = rand_f32(rng, n * dim, 1.0);
        let (ra, rb) = (run_gather(a, &x, &idx, dim), run_gather(b, &x, &idx, dim));
        // A copy: the bound is the float one, and in fact exact.
        assert_nmse(
            &format!("gather_rows n={n} dim={dim}"),
            &ra,
            &rb,
            FLOAT_NMSE,
        );
        for (i, &r) in idx.iter().enumerate() {
            let want = &x[r as usize * dim..(r as usize + 1) * dim];
            assert!(
                rb[i * dim..(i + 1) * dim]
                    .iter()
                    .zip(want)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "gather_rows: row {i} is not a copy of row {r}"
            );
        }
    }
}

// ---------------------------------------------------------------- KV writes

fn layout(num_pages: usize, kvh: usize, hd: usize, dtype: DType) -> KvLayout {
    KvLayout {
        num_layers: 1,
        num_pages,
        page_size: PAGE,
        num_kv_heads: kvh,
        head_dim: hd,
        dtype,
    }
}

/// Host inputs of a KV write.
#[derive(Clone)]
struct KvWrite {
    layout: KvLayout,
    heads: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
}

impl KvWrite {
    /// `n` tokens at distinct random slots outside the null page, then
    /// `padded` padded rows at the null slot with identical K/V (so their
    /// order of writes cannot matter).
    fn random(rng: &mut ChaCha8Rng, l: KvLayout, heads: usize, n: usize, padded: usize) -> Self {
        let mut all: Vec<u32> = (0..l.null_slot()).collect();
        all.shuffle(rng);
        let mut slots = all[..n].to_vec();
        let row = l.num_kv_heads * l.head_dim;
        let mut k = rand_f32(rng, n * row, 2.0);
        let mut v = rand_f32(rng, n * row, 2.0);
        let (pk, pv) = (rand_f32(rng, row, 2.0), rand_f32(rng, row, 2.0));
        for _ in 0..padded {
            slots.push(l.null_slot());
            k.extend_from_slice(&pk);
            v.extend_from_slice(&pv);
        }
        let t = n + padded;
        let mut positions = positions(rng, t);
        for p in &mut positions[n..] {
            *p = 0;
        }
        KvWrite {
            layout: l,
            heads,
            q: rand_f32(rng, t * heads * l.head_dim, 1.0),
            k,
            v,
            positions,
            slots,
        }
    }

    fn tokens(&self) -> usize {
        self.slots.len()
    }
}

/// The arena after the write, and q, k after it (rotated when `fused`).
fn run_write_kv<X: Backend>(b: &Arc<X>, w: &KvWrite, fused: bool) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let mut d = Dev::new(b);
    let kv = d.kv(w.layout);
    let (qb, kb, vb) = (d.f32s(&w.q), d.f32s(&w.k), d.f32s(&w.v));
    let (pb, sb) = (d.u32s(&w.positions), d.u32s(&w.slots));
    if fused {
        let dims = RopeKvDims {
            num_tokens: w.tokens(),
            num_heads: w.heads,
            num_kv_heads: w.layout.num_kv_heads,
            head_dim: w.layout.head_dim,
            rope_dim: w.layout.head_dim,
            freq_base: ROPE_BASE,
        };
        d.b.rope_write_kv(qb, kb, vb, pb, sb, kv.layer(), dims)
            .expect("rope_write_kv");
    } else {
        d.b.write_kv(kv.layer(), kb, vb, sb, w.tokens())
            .expect("write_kv");
    }
    (d.arena(&kv), d.read_f32(qb), d.read_f32(kb))
}

fn decode(l: &KvLayout, row: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; l.head_dim];
    dequantize_row(l.dtype, row, &mut out).unwrap();
    out
}

/// Written rows of two arenas by nmse (and Q8_0 block scales); every
/// unwritten row still poison on both.
fn compare_arenas(
    what: &str,
    l: &KvLayout,
    slots: &[u32],
    ra: &[u8],
    rb: &[u8],
    exact_scales: bool,
) {
    let rbytes = l.row_bytes();
    let mut written = vec![false; l.num_pages * l.page_size];
    for &s in slots {
        written[s as usize] = true;
    }
    let (mut va, mut vb) = (Vec::new(), Vec::new());
    for (slot, &w) in written.iter().enumerate() {
        let (page, t) = (slot / l.page_size, slot % l.page_size);
        for kv in 0..2 {
            for h in 0..l.num_kv_heads {
                let off = l.row_offset(page, kv, t, h);
                let (xa, xb) = (&ra[off..off + rbytes], &rb[off..off + rbytes]);
                if !w {
                    assert!(
                        xa.iter().chain(xb).all(|&x| x == KV_POISON),
                        "{what}: unwritten row (slot {slot}, kv {kv}, head {h}) was written"
                    );
                    continue;
                }
                va.extend(decode(l, xa));
                vb.extend(decode(l, xb));
                if l.dtype == DType::Q8_0 {
                    for blk in 0..l.head_dim / 32 {
                        let (sa, sb) = (&xa[blk * 34..blk * 34 + 2], &xb[blk * 34..blk * 34 + 2]);
                        let (da, db) = (decode_f16(sa), decode_f16(sb));
                        if exact_scales {
                            // Same input, same `amax / 127` rounded to f16: the same bits.
                            assert_eq!(
                                sa, sb,
                                "{what}: Q8_0 scale of slot {slot} kv {kv} head {h} block {blk}"
                            );
                        } else {
                            // After RoPE the inputs may differ in the last
                            // bit, so the f16 scale may be one step apart.
                            assert!(
                                (da - db).abs() <= da.abs() * 2e-3,
                                "{what}: Q8_0 scale {da} vs {db} at slot {slot}"
                            );
                        }
                    }
                }
            }
        }
    }
    // f32/f16/bf16: the same conversion of the same values; Q8_0: the same
    // blocks. The float bound holds for every KV dtype.
    assert_nmse(what, &va, &vb, FLOAT_NMSE);
}

fn decode_f16(b: &[u8]) -> f32 {
    let mut out = [0f32];
    dequantize_row(DType::F16, b, &mut out).unwrap();
    out[0]
}

/// (tokens, padded rows, heads, kv heads, head_dim, pages)
const KV_CASES: [(usize, usize, usize, usize, usize, usize); 5] = [
    (13, 2, HEADS, KV_HEADS, HEAD_DIM, 40),
    (1, 0, HEADS, KV_HEADS, HEAD_DIM, 3),
    (1, 1, HEADS, KV_HEADS, HEAD_DIM, 1), // one page: the null page only
    (40, 1, 4, 4, 32, 30),                // GQA group 1, head_dim 32
    (300, 3, 6, 2, 128, 30),              // 300 tokens over many pages, head_dim 128
];

fn check_kv_write<A: Backend, B: Backend>(
    a: &Arc<A>,
    b: &Arc<B>,
    rng: &mut ChaCha8Rng,
    fused: bool,
) {
    let op = if fused { "rope_write_kv" } else { "write_kv" };
    for dtype in KV_TYPES {
        for (n, padded, heads, kvh, hd, pages) in KV_CASES {
            let l = layout(pages, kvh, hd, dtype);
            // A one-page arena has only the null page: padded rows only.
            let n = n.min(l.null_slot() as usize);
            let w = KvWrite::random(rng, l, heads, n, padded);
            let (aa, qa, ka) = run_write_kv(a, &w, fused);
            let (ab, qb, kb) = run_write_kv(b, &w, fused);
            let what = format!("{op} {dtype} tokens={n}+{padded} kv_heads={kvh} head_dim={hd}");
            compare_arenas(&what, &l, &w.slots, &aa, &ab, !fused);
            if fused {
                assert_nmse(&format!("{what}: q"), &qa, &qb, FLOAT_NMSE);
                assert_nmse(&format!("{what}: k"), &ka, &kb, FLOAT_NMSE);
            }
        }
    }
}

fn check_write_kv<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    check_kv_write(a, b, rng, false)
}

fn check_rope_write_kv<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    check_kv_write(a, b, rng, true)
}

fn run_copy_pages<X: Backend>(
    b: &Arc<X>,
    l: KvLayout,
    bytes: &[u8],
    pairs: &[(u32, u32)],
) -> Vec<u8> {
    let mut d = Dev::new(b);
    let kv = d.kv(l);
    d.fill_arena(&kv, bytes);
    d.b.copy_pages(kv.layer(), pairs).expect("copy_pages");
    d.arena(&kv)
}

fn check_copy_pages<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    for dtype in KV_TYPES {
        for (pages, kvh, hd, copies) in
            [(60, KV_HEADS, HEAD_DIM, 12), (2, 1, 32, 1), (25, 2, 128, 7)]
        {
            let l = layout(pages, kvh, hd, dtype);
            // Arbitrary bytes: copy_pages moves bytes, whatever they encode.
            let bytes: Vec<u8> = (0..l.layer_bytes()).map(|_| rng.random()).collect();
            let mut order: Vec<u32> = (0..pages as u32).collect();
            order.shuffle(rng);
            // Sources and destinations disjoint, so the pairs commute.
            let pairs: Vec<(u32, u32)> =
                (0..copies).map(|i| (order[i], order[copies + i])).collect();
            let mut want = bytes.clone();
            let pb = l.page_bytes();
            for &(s, t) in &pairs {
                let (s, t) = (s as usize, t as usize);
                want.copy_within(s * pb..(s + 1) * pb, t * pb);
            }
            let ra = run_copy_pages(a, l, &bytes, &pairs);
            let rb = run_copy_pages(b, l, &bytes, &pairs);
            // Bytes, so the bound is identity.
            assert!(
                ra == want,
                "copy_pages {dtype} pages={pages}: the CPU differs from the host copy"
            );
            for p in 0..pages {
                assert!(
                    rb[p * pb..(p + 1) * pb] == want[p * pb..(p + 1) * pb],
                    "copy_pages {dtype} pages={pages} pairs={pairs:?}: page {p} differs"
                );
            }
            // No pairs: nothing changes.
            let rb = run_copy_pages(b, l, &bytes, &[]);
            assert!(
                rb == bytes,
                "copy_pages {dtype}: an empty call changed the arena"
            );
        }
    }
}

// ---------------------------------------------------------------- attention

/// A paged attention step: sequences of `(context, query tokens)` (the
/// queries are the last positions of the context), plus padded rows that
/// read and write the null page only.
struct AttnCase {
    layout: KvLayout,
    heads: usize,
    /// K/V of every stored token, written by `write_kv` first.
    kv: KvWrite,
    q: Vec<f32>,
    positions: Vec<u32>,
    block_tables: Vec<u32>,
    context_lens: Vec<u32>,
    query_start_locs: Vec<u32>,
    max_blocks: usize,
}

impl AttnCase {
    fn new(
        rng: &mut ChaCha8Rng,
        (heads, kvh, hd, dtype): (usize, usize, usize, DType),
        seqs: &[(usize, usize)],
        padded: usize,
    ) -> AttnCase {
        let need: usize = seqs.iter().map(|s| s.0.div_ceil(PAGE)).sum();
        let l = layout(need + 6, kvh, hd, dtype);
        // Pages shuffled: no sequence's pages are contiguous or ordered.
        let mut free: Vec<u32> = (0..l.null_page()).collect();
        free.shuffle(rng);
        let max_blocks = seqs.iter().map(|s| s.0.div_ceil(PAGE)).max().unwrap_or(1);
        let (mut block_tables, mut slots, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        let (mut context_lens, mut qsl) = (Vec::new(), vec![0u32]);
        for &(ctx, nq) in seqs {
            let pages: Vec<u32> = free.drain(..ctx.div_ceil(PAGE)).collect();
            let mut row = pages.clone();
            row.resize(max_blocks, l.null_page());
            block_tables.extend(row);
            slots.extend((0..ctx).map(|p| pages[p / PAGE] * PAGE as u32 + (p % PAGE) as u32));
            positions.extend((ctx - nq..ctx).map(|p| p as u32));
            context_lens.push(ctx as u32);
            qsl.push(qsl.last().unwrap() + nq as u32);
        }
        let row = kvh * hd;
        let stored = slots.len();
        let mut kv = KvWrite {
            layout: l,
            heads,
            q: Vec::new(),
            k: rand_f32(rng, stored * row, 2.0),
            v: rand_f32(rng, stored * row, 2.0),
            positions: Vec::new(),
            slots,
        };
        let (pk, pv) = (rand_f32(rng, row, 2.0), rand_f32(rng, row, 2.0));
        for _ in 0..padded {
            // A padded row: context 1 at the null page, position 0.
            kv.slots.push(l.null_slot());
            kv.k.extend_from_slice(&pk);
            kv.v.extend_from_slice(&pv);
            block_tables.extend(vec![l.null_page(); max_blocks]);
            positions.push(0);
            context_lens.push(1);
            qsl.push(qsl.last().unwrap() + 1);
        }
        let t = positions.len();
        AttnCase {
            layout: l,
            heads,
            kv,
            q: rand_f32(rng, t * heads * hd, 1.5),
            positions,
            block_tables,
            context_lens,
            query_start_locs: qsl,
            max_blocks,
        }
    }
}

fn run_attention<X: Backend>(b: &Arc<X>, c: &AttnCase) -> Vec<f32> {
    run_attentions(b, &[c]).pop().expect("one output")
}

/// Every launch of `cases` on one device: the stored K/V (the same in every case: the first
/// case's, checked) written once, then each case's launch recorded on its own poisoned output,
/// and the outputs read back after the last launch.
fn run_attentions<X: Backend>(b: &Arc<X>, cases: &[&AttnCase]) -> Vec<Vec<f32>> {
    let first = cases[0];
    for c in cases {
        assert!(
            c.layout == first.layout
                && c.heads == first.heads
                && c.kv.slots == first.kv.slots
                && c.kv.k == first.kv.k
                && c.kv.v == first.kv.v,
            "launches of one device share the stored K/V"
        );
    }
    let mut d = Dev::new(b);
    let kv = d.kv(first.layout);
    // The stored tokens in several write_kv calls of at most 256 tokens
    // (as prefill chunks would, and under a 1 MiB binding).
    let row = first.layout.num_kv_heads * first.layout.head_dim;
    let stored = &first.kv;
    for t0 in (0..stored.slots.len()).step_by(256) {
        let t1 = (t0 + 256).min(stored.slots.len());
        let kb = d.f32s(&stored.k[t0 * row..t1 * row]);
        let vb = d.f32s(&stored.v[t0 * row..t1 * row]);
        let sb = d.u32s(&stored.slots[t0..t1]);
        d.b.write_kv(kv.layer(), kb, vb, sb, t1 - t0)
            .expect("write_kv");
    }
    let mut outs = Vec::new();
    for c in cases {
        let q = d.f32s(&c.q);
        let pos = d.u32s(&c.positions);
        let bt = d.u32s(&c.block_tables);
        let cl = d.u32s(&c.context_lens);
        let qsl = d.u32s(&c.query_start_locs);
        let out = d.poisoned(c.q.len());
        let dims = AttentionDims {
            num_tokens: c.positions.len(),
            num_seqs: c.context_lens.len(),
            num_heads: c.heads,
            max_blocks_per_seq: c.max_blocks,
            scale: 1.0 / (c.layout.head_dim as f32).sqrt(),
        };
        d.b.paged_attention(q, kv.layer(), pos, bt, cl, qsl, out, dims)
            .expect("paged_attention");
        outs.push(out);
    }
    outs.into_iter().map(|o| d.read_f32(o)).collect()
}

fn check_paged_attention<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    // (heads, kv heads, head_dim): the model (GQA group 3), group 1, head_dim 128 and 32.
    let heads = [
        (HEADS, KV_HEADS, HEAD_DIM),
        (4, 4, HEAD_DIM),
        (6, 2, 128),
        (8, 2, 32),
    ];
    // Prefill, ragged: a fresh sequence, a short chunk after a context, and
    // a long chunk after 300 tokens (22 pages).
    let prefill: &[(usize, usize)] = &[(17, 17), (41, 3), (350, 50)];
    // Decode: one token per sequence, 1 to 700 tokens of context (44 pages),
    // plus two padded rows.
    let decode: &[(usize, usize)] = &[(1, 1), (16, 1), (17, 1), (345, 1), (700, 1)];
    for dtype in KV_TYPES {
        for (h, kvh, hd) in heads {
            for (name, seqs, padded) in [("prefill", prefill, 0), ("decode", decode, 2)] {
                let c = AttnCase::new(rng, (h, kvh, hd, dtype), seqs, padded);
                // The step, then every token of a sequence alone (a one-token launch) and,
                // for decode, a batch of copies of it big enough to fill the device (the
                // other path): all on the same stored K/V, on one device.
                let singles = single_tokens(&c);
                let copies = 200usize.div_ceil(h);
                let many: Vec<AttnCase> = if name == "decode" {
                    singles.iter().map(|(_, s)| replicated(s, copies)).collect()
                } else {
                    Vec::new()
                };
                let mut launches = vec![&c];
                launches.extend(singles.iter().map(|(_, s)| s));
                launches.extend(&many);
                let ra = run_attention(a, &c);
                let outs = run_attentions(b, &launches);
                assert_eq!(outs.len(), 1 + singles.len() + many.len());
                let (rb, ones) = (&outs[0], &outs[1..1 + singles.len()]);
                // Both backends attend over the same stored (rounded) K/V,
                // so the float bound holds for every KV dtype.
                assert_nmse(
                    &format!("paged_attention {name} kv={dtype} heads={h}/{kvh} head_dim={hd}"),
                    &ra,
                    rb,
                    FLOAT_NMSE,
                );
                // Metric: each token's output row; bound: bit-identical alone (a one-token
                // launch) and in the step (a backend may split keys for short launches or
                // share K/V loads between the queries of a prefill).
                let n = h * hd;
                for ((t, _), one) in singles.iter().zip(ones) {
                    assert_eq!(
                        one[..],
                        rb[t * n..(t + 1) * n],
                        "{name} token {t} alone vs in the step, kv={dtype} heads={h}/{kvh} head_dim={hd}"
                    );
                }
                let batches = &outs[1 + singles.len()..];
                for (((t, _), one), many) in singles.iter().zip(ones).zip(batches) {
                    for r in 0..copies {
                        assert_eq!(
                            &many[r * n..(r + 1) * n],
                            &one[..],
                            "decode token {t} alone vs {copies} copies, kv={dtype} heads={h}/{kvh} head_dim={hd}"
                        );
                    }
                }
            }
        }
    }
}

/// `copies` sequences that are all the one sequence of `c` (sharing its pages).
fn replicated(c: &AttnCase, copies: usize) -> AttnCase {
    AttnCase {
        layout: c.layout,
        heads: c.heads,
        kv: c.kv.clone(),
        q: c.q.repeat(copies),
        positions: c.positions.repeat(copies),
        block_tables: c.block_tables.repeat(copies),
        context_lens: c.context_lens.repeat(copies),
        query_start_locs: (0..=copies as u32).collect(),
        max_blocks: c.max_blocks,
    }
}

/// Every query token of `c` that belongs to a sequence, as a one-token case (same stored
/// K/V and pages): `(token index, case)`.
fn single_tokens(c: &AttnCase) -> Vec<(usize, AttnCase)> {
    let n = c.heads * c.layout.head_dim;
    let mut out = Vec::new();
    for i in 0..c.context_lens.len() {
        for t in c.query_start_locs[i] as usize..c.query_start_locs[i + 1] as usize {
            out.push((
                t,
                AttnCase {
                    layout: c.layout,
                    heads: c.heads,
                    kv: c.kv.clone(),
                    q: c.q[t * n..(t + 1) * n].to_vec(),
                    positions: vec![c.positions[t]],
                    block_tables: c.block_tables[i * c.max_blocks..(i + 1) * c.max_blocks].to_vec(),
                    context_lens: vec![c.context_lens[i]],
                    query_start_locs: vec![0, 1],
                    max_blocks: c.max_blocks,
                },
            ));
        }
    }
    out
}

// ---------------------------------------------------------------- sampling

fn run_sampling<X: Backend>(
    b: &Arc<X>,
    logits: &[f32],
    (rows, vocab, k): (usize, usize, usize),
) -> (Vec<u32>, Vec<f32>, Vec<u32>) {
    let mut d = Dev::new(b);
    let l = d.f32s(logits);
    let ids = d.u32s(&vec![u32::MAX; rows]);
    let vals = d.poisoned(rows * k);
    let tids = d.u32s(&vec![u32::MAX; rows * k]);
    d.b.argmax_rows(l, ids, rows, vocab).expect("argmax_rows");
    d.b.top_k_rows(l, vals, tids, rows, vocab, k)
        .expect("top_k_rows");
    (d.read_u32(ids), d.read_f32(vals), d.read_u32(tids))
}

/// Rows with ties, signed zeros, NaNs and infinities.
fn logits(rng: &mut ChaCha8Rng, rows: usize, vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let mut row: Vec<f32> = match r % 5 {
            // Few levels: ties everywhere, at the top too.
            0 => (0..vocab)
                .map(|_| rng.random_range(-200..200) as f32 * 0.05)
                .collect(),
            // Distinct values with NaNs (never at id 0).
            1 => {
                let mut v = rand_f32(rng, vocab, 20.0);
                v[7 % vocab] = f32::NAN;
                v[vocab / 2] = f32::NAN;
                v
            }
            // All negative but for -0.0 and +0.0 at several ids: the top is a zero.
            2 => {
                let mut v: Vec<f32> = (0..vocab)
                    .map(|_| -rng.random_range(0.5..30.0f32))
                    .collect();
                for (i, z) in [(5, -0.0), (10, 0.0), (3, -0.0), (vocab - 1, 0.0)] {
                    v[i % vocab] = z;
                }
                v
            }
            // One value everywhere, some -inf.
            3 => {
                let mut v = vec![1.5f32; vocab];
                for _ in 0..vocab / 8 {
                    let i = rng.random_range(0..vocab);
                    v[i] = f32::NEG_INFINITY;
                }
                v
            }
            // +inf, a negative NaN and large magnitudes.
            _ => {
                let mut v = rand_f32(rng, vocab, 1e30);
                v[vocab / 3] = f32::INFINITY;
                v[vocab / 4] = -f32::NAN;
                v
            }
        };
        out.append(&mut row);
    }
    out
}

fn check_sampling<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, rng: &mut ChaCha8Rng) {
    // (rows, vocab, k)
    let mut cases = vec![
        (5, VOCAB, 1),
        (5, VOCAB, 40),
        (5, VOCAB, 64),
        (3, 64, 64),
        (7, 100, 40),
        (1, 1, 1),
    ];
    cases.push((10, 4096, 64));
    for (rows, vocab, k) in cases {
        let l = logits(rng, rows, vocab);
        let (ia, va, ta) = run_sampling(a, &l, (rows, vocab, k));
        let (ib, vb, tb) = run_sampling(b, &l, (rows, vocab, k));
        let what = format!("sampling rows={rows} vocab={vocab} k={k}");
        // Ids must be EXACTLY equal (a sampled token is a token).
        assert_eq!(ia, ib, "{what}: argmax_rows ids");
        assert_eq!(ta, tb, "{what}: top_k_rows ids");
        for r in 0..rows {
            assert!((ia[r] as usize) < vocab, "{what}: argmax row {r} unwritten");
            for j in 0..k {
                let id = tb[r * k + j] as usize;
                assert!(id < vocab, "{what}: top-k row {r} rank {j} unwritten");
                // Values are the logits themselves, bit for bit.
                let want = l[r * vocab + id].to_bits();
                assert_eq!(
                    va[r * k + j].to_bits(),
                    want,
                    "{what}: CPU value row {r} rank {j}"
                );
                assert_eq!(
                    vb[r * k + j].to_bits(),
                    want,
                    "{what}: value row {r} rank {j}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- zero-sized calls

fn run_zero_sized<X: Backend>(b: &Arc<X>) {
    let mut d = Dev::new(b);
    let e = BufRef::EMPTY;
    let w = weights(&mut ChaCha8Rng::seed_from_u64(0), DType::Q8_0, 32, 64, 1.0);
    let wb = d.weight_piece(DType::Q8_0, 32, 64, &w);
    let nw = d.f32s(&[1.0; 64]);
    let emb = EmbeddingDims {
        n: 0,
        dim: 64,
        vocab: 32,
        first_row: 0,
        num_rows: 32,
    };
    d.b.embedding(wb, DType::Q8_0, e, e, emb)
        .expect("embedding n=0");
    d.b.matmul(e, wb, DType::Q8_0, e, MatmulDims::new(0, 64, 32))
        .expect("matmul n=0");
    d.b.rms_norm(e, nw, e, 0, 64, EPS).expect("rms_norm n=0");
    let p = Projection {
        w: wb,
        dtype: DType::Q8_0,
        m: 32,
        out: e,
        out_stride: 32,
    };
    d.b.rms_norm_matmul(e, nw, e, 0, 64, EPS, &[p])
        .expect("rms_norm_matmul n=0");
    let rope = RopeDims {
        num_tokens: 0,
        num_heads: HEADS,
        head_dim: HEAD_DIM,
        rope_dim: HEAD_DIM,
        freq_base: ROPE_BASE,
    };
    d.b.rope(e, e, rope).expect("rope n=0");
    d.b.silu_mul(e, e, e, 0).expect("silu_mul len=0");
    d.b.add_assign(e, e, 0).expect("add_assign len=0");
    d.b.gather_rows(e, e, e, 0, 64).expect("gather_rows m=0");
    for dtype in KV_TYPES {
        let kv = d.kv(layout(4, KV_HEADS, HEAD_DIM, dtype));
        d.b.write_kv(kv.layer(), e, e, e, 0).expect("write_kv n=0");
        let dims = RopeKvDims {
            num_tokens: 0,
            num_heads: HEADS,
            num_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            rope_dim: HEAD_DIM,
            freq_base: ROPE_BASE,
        };
        d.b.rope_write_kv(e, e, e, e, e, kv.layer(), dims)
            .expect("rope_write_kv n=0");
        d.b.copy_pages(kv.layer(), &[])
            .expect("copy_pages, no pairs");
        let qsl = d.u32s(&[0]);
        let dims = AttentionDims {
            num_tokens: 0,
            num_seqs: 0,
            num_heads: HEADS,
            max_blocks_per_seq: 1,
            scale: 0.125,
        };
        d.b.paged_attention(e, kv.layer(), e, e, e, qsl, e, dims)
            .expect("paged_attention, no tokens");
        // Nothing was written.
        assert!(
            d.arena(&kv).iter().all(|&x| x == KV_POISON),
            "zero-sized KV ops wrote to the {dtype} arena"
        );
    }
    d.b.argmax_rows(e, e, 0, VOCAB).expect("argmax_rows rows=0");
    d.b.top_k_rows(e, e, e, 0, VOCAB, 40)
        .expect("top_k_rows rows=0");
    d.b.upload(e, &[]).expect("upload of nothing");
    d.b.download(e, &mut []).expect("download of nothing");
    d.b.copy(e, e).expect("copy of nothing");
    d.b.synchronize().expect("synchronize");
}

fn check_zero_sized<A: Backend, B: Backend>(a: &Arc<A>, b: &Arc<B>, _rng: &mut ChaCha8Rng) {
    run_zero_sized(a);
    run_zero_sized(b);
}
