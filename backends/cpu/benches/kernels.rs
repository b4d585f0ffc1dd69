//! Single-thread timings of the hot kernels on SmolLM2-135M shapes.
//!
//! `cargo bench -p pagoda-cpu --bench kernels` prints, per case, the median
//! thread-CPU time of one call and the rate in GFLOP/s (multiply-adds count
//! 2). Token counts may be given after `--`; `-- attention` times only the
//! attention.

use std::hint::black_box;
use std::time::{Duration, Instant};

use pagoda_backend::{DType, KvLayout};
use pagoda_cpu::matmul::{OutPtr, matmul_rows};
use pagoda_cpu::paged_attention::{AttentionArgs, attend};

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

unsafe extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of this thread in seconds (the machine is shared: wall time
/// would count other processes' slices).
fn thread_cpu_time() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; 3 is CLOCK_THREAD_CPUTIME_ID on Linux.
    unsafe { clock_gettime(3, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// Median thread CPU seconds of one call of `f`, over about 0.3 s of calls.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) || samples.len() < 5 {
        let t = thread_cpu_time();
        f();
        samples.push(thread_cpu_time() - t);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn weights(dtype: DType, m: usize, k: usize) -> Vec<u8> {
    let rb = dtype.row_bytes(k).expect("row");
    let mut w: Vec<u8> = (0..m * rb)
        .map(|i| ((i * 2654435761usize) >> 7) as u8)
        .collect();
    for blk in w.chunks_exact_mut(dtype.block_bytes()) {
        blk[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        if dtype == DType::Q4_1 {
            blk[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        }
    }
    w
}

fn main() {
    let cases = [
        ("q4_1 ffn up   ", DType::Q4_1, 576, 1536),
        ("q4_1 ffn down ", DType::Q4_1, 1536, 576),
        ("q4_1 kv proj  ", DType::Q4_1, 576, 192),
        ("q8_0 out head ", DType::Q8_0, 576, 49152),
    ];
    // Token counts from the command line (`-- 1 64`), else 1, 4 and 64.
    let mut ns: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let only_attention = std::env::args().any(|a| a == "attention");
    if ns.is_empty() && !only_attention {
        ns = vec![1, 4, 64];
    }
    for n in ns {
        for &(name, dtype, k, m) in &cases {
            let m = if n > 4 && m > 8192 { 8192 } else { m };
            let w = weights(dtype, m, k);
            let x: Vec<f32> = (0..n * k).map(|i| ((i % 17) as f32 - 8.0) * 0.1).collect();
            let mut out = vec![0f32; n * m];
            let o = OutPtr::new(&mut out);
            let s = time(|| matmul_rows(black_box(&x), black_box(&w), dtype, o, n, k, m, 0..m));
            let gflops = 2.0 * (n * k * m) as f64 / s / 1e9;
            println!(
                "{name} n={n:3} k={k:5} m={m:6}: {:9.1} us  {gflops:6.1} GFLOP/s",
                s * 1e6
            );
        }
    }
    attention(512);
}

/// One layer's attention for a `n`-token prefill (9 heads, 3 KV heads,
/// head_dim 64, f32 KV in pages of 16).
fn attention(n: usize) {
    let (heads, kvh, hd) = (9, 3, 64);
    let l = KvLayout {
        num_layers: 1,
        num_pages: n.div_ceil(16),
        page_size: 16,
        num_kv_heads: kvh,
        head_dim: hd,
        dtype: DType::F32,
    };
    // f32 storage keeps the rows aligned, as in the backend's segments.
    let cache: Vec<f32> = (0..l.layer_bytes() / 4)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let cache: &[u8] = bytemuck::cast_slice(&cache);
    let q: Vec<f32> = (0..n * heads * hd)
        .map(|i| ((i * 31) % 97) as f32 * 0.01 - 0.5)
        .collect();
    let positions: Vec<u32> = (0..n as u32).collect();
    let table: Vec<u32> = (0..l.num_pages as u32).collect();
    // One piece; page p at page p of it.
    let page_table: Vec<u32> = (0..l.num_pages as u32).flat_map(|p| [0, p]).collect();
    let mut pieces: [&[u8]; pagoda_backend::MAX_KV_PIECES] = [&[]; pagoda_backend::MAX_KV_PIECES];
    pieces[0] = cache;
    let args = AttentionArgs {
        q: &q,
        cache: pagoda_cpu::kv_cache::KvPages {
            pieces,
            num_pieces: 1,
            table: &page_table,
            layout: l,
        },
        layout: &l,
        positions: &positions,
        block_tables: &table,
        context_lens: &[n as u32],
        query_start_locs: &[0, n as u32],
        num_heads: heads,
        max_blocks_per_seq: l.num_pages,
        scale: 0.125,
    };
    let mut out = vec![0f32; n * heads * hd];
    let s = time(|| {
        for h in 0..kvh {
            attend(&args, 0, 0..n, h, |t, rows| {
                out[(t * heads + h * 3) * hd..][..3 * hd].copy_from_slice(rows)
            });
        }
    });
    let flops = 4.0 * (heads * hd) as f64 * (n * (n + 1) / 2) as f64;
    println!(
        "attention prefill n={n}: {:9.1} us  {:6.1} GFLOP/s",
        s * 1e6,
        flops / s / 1e9
    );
}
