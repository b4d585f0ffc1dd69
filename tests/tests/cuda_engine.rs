//! The engine on the CUDA backend under load (run on the GPU with
//! `--ignored`): decode graphs stay a bounded set while sequences of many
//! lengths generate thousands of tokens, device memory stays flat apart from
//! KV chunk commits, and eight threads submitting through the engine handle
//! get exactly their solo outputs while the KV arena grows and shrinks.
//!
//! `PAGODA_STRESS_SCALE` (default 1.0) scales the request counts (the
//! sanitizer run uses a small scale).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use pagoda::plan::Budget;
use pagoda::sampler::SamplingParams;
use pagoda::{Engine, EngineConfig, EngineHandle, FinishReason, GenerationParams};
use pagoda_backend::{Backend, GraphPlanInput};
use pagoda_cuda::CudaBackend;
use pagoda_tests::{cuda_backend, fixture, model_path};

fn scale(n: usize) -> usize {
    let s: f64 = std::env::var("PAGODA_STRESS_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * s).round() as usize).max(2)
}

fn config() -> EngineConfig {
    EngineConfig {
        ctx: Some(1024),
        max_seqs: Some(8),
        budget: Budget::Bytes(4 << 30),
        // Units are released as soon as their pages are free (no cached prefixes).
        enable_prefix_caching: false,
        ..EngineConfig::default()
    }
}

fn engine(be: &Arc<CudaBackend>) -> Engine<CudaBackend> {
    Engine::builder()
        .model(model_path())
        .backend(be.clone())
        .config(config())
        .build()
        .expect("engine builds on CUDA")
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ignore_eog: true,
        ..GenerationParams::default()
    }
}

/// Prompts of many lengths: slices of the perplexity text.
fn prompts(e: &Engine<CudaBackend>, n: usize) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fixture("ppl_text.txt")).unwrap();
    let toks = e.tokenize(&text);
    (0..n)
        .map(|i| {
            let start = (i * 37) % 1500;
            let len = 3 + (i * 53) % 260;
            toks[start..start + len].to_vec()
        })
        .collect()
}

/// Device bytes in use that are not KV chunks.
fn non_kv_used(be: &CudaBackend) -> u64 {
    let m = be.memory().unwrap();
    (m.total_bytes - m.free_bytes).saturating_sub(be.arena().physical_bytes())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_graphs_stay_bounded_and_memory_flat_over_2000_tokens() {
    let be = cuda_backend();
    let mut e = engine(&be);
    let g = be.graphs().expect("CUDA has graphs");
    let buckets = pagoda_backend::decode_graph_batch_sizes(8);
    let prompts = prompts(&e, scale(48));
    let mut pending: Vec<(Vec<u32>, usize)> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, 20 + (i * 29) % 90))
        .collect();
    pending.reverse();
    let mut generated = 0usize;
    let mut samples: Vec<(usize, u64)> = Vec::new(); // (graphs, non-KV bytes) after each step
    let mut max_graphs = 0;
    let mut in_flight = 0usize;
    while !pending.is_empty() || e.has_unfinished() {
        // Keep 1-8 requests in flight so the padded batch sizes vary.
        while in_flight < 1 + (samples.len() / 7) % 8 {
            let Some((p, n)) = pending.pop() else { break };
            e.add_request(p, greedy(n)).unwrap();
            in_flight += 1;
        }
        for out in e.step().unwrap() {
            generated += out.token.is_some() as usize;
            if let Some(f) = out.finished {
                assert_eq!(f, FinishReason::Length);
                in_flight -= 1;
            }
        }
        max_graphs = max_graphs.max(g.num_graphs());
        assert!(
            g.num_graphs() <= buckets.len(),
            "graphs {} > buckets {buckets:?}",
            g.num_graphs()
        );
        samples.push((g.num_graphs(), non_kv_used(&be)));
    }
    let need = scale(2000).min(2000);
    assert!(generated >= need, "generated {generated} < {need}");
    assert!(
        max_graphs >= 3,
        "the batch sizes varied: {max_graphs} graphs"
    );
    // Flat memory: between steps that captured no new graph, non-KV device
    // memory moves by at most one 2 MiB driver allocation granule.
    let mut drift = 0u64;
    for w in samples.windows(2) {
        if w[0].0 == w[1].0 {
            drift = drift.max(w[1].1.abs_diff(w[0].1));
        }
    }
    let after_last_graph = samples.iter().position(|s| s.0 == max_graphs).unwrap();
    let tail_drift = samples[after_last_graph..]
        .iter()
        .map(|s| s.1.abs_diff(samples[after_last_graph].1))
        .max()
        .unwrap();
    eprintln!(
        "generated {generated} tokens in {} steps; {max_graphs} graphs; step drift {drift} B; drift after the last capture {tail_drift} B; graph memory measured {} B, planned {} B",
        samples.len(),
        g.memory_bytes(),
        e.memory_plan().graph_bytes
    );
    assert!(
        drift <= 2 << 20,
        "non-KV memory moved {drift} bytes in a step"
    );
    assert!(
        tail_drift <= 2 << 20,
        "non-KV memory drifted {tail_drift} bytes"
    );
    // Graph memory: measured after capture, within what the plan reserved.
    let planned_now = be.graph_memory_bytes(&GraphPlanInput {
        batch_sizes: buckets[..max_graphs].to_vec(),
        max_tokens: config().max_num_batched_tokens,
        num_layers: e.model_config().num_layers,
        workspace_bytes: e.memory_plan().workspace_bytes,
    });
    assert!(
        g.memory_bytes() <= planned_now,
        "graphs took {} > planned {planned_now}",
        g.memory_bytes()
    );
    assert_eq!(
        e.memory_plan().graph_bytes,
        be.graph_memory_bytes(&GraphPlanInput {
            batch_sizes: buckets.clone(),
            max_tokens: config().max_num_batched_tokens,
            num_layers: e.model_config().num_layers,
            workspace_bytes: e.memory_plan().workspace_bytes,
        }),
        "the plan counts the graphs of every bucket"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn eight_threads_through_the_handle_get_their_solo_outputs() {
    let be = cuda_backend();
    let mut solo_engine = engine(&be);
    let per_thread = scale(8);
    let all = prompts(&solo_engine, 8 * per_thread);
    let lens: Vec<usize> = (0..all.len()).map(|i| 40 + (i * 17) % 60).collect();
    let solo: Vec<Vec<u32>> = all
        .iter()
        .zip(&lens)
        .map(|(p, &n)| {
            solo_engine
                .generate(vec![p.clone()], greedy(n))
                .unwrap()
                .pop()
                .unwrap()
                .generated_tokens
        })
        .collect();
    let phys_idle = be.arena().physical_bytes();
    let h = EngineHandle::spawn(solo_engine).unwrap();
    let steps0 = h.stats().num_steps;
    // Watch the arena grow and shrink while the threads run.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let shrinks = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (be, stop, peak, shrinks) = (be.clone(), stop.clone(), peak.clone(), shrinks.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let p = be.arena().physical_bytes();
                peak.fetch_max(p, Ordering::Relaxed);
                if p < last {
                    shrinks.fetch_add(1, Ordering::Relaxed);
                }
                last = p;
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let start = Arc::new(Barrier::new(8));
    let got: HashMap<usize, Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let (h, start, all, lens) = (h.clone(), start.clone(), &all, &lens);
                s.spawn(move || {
                    start.wait();
                    let mut out = Vec::new();
                    for r in 0..per_thread {
                        let i = t * per_thread + r;
                        let (id, rx) = h.submit(all[i].clone(), greedy(lens[i])).unwrap();
                        let mut toks = Vec::new();
                        loop {
                            let ev = rx
                                .recv_timeout(Duration::from_secs(120))
                                .expect("stream ends");
                            assert_eq!(ev.id, id);
                            toks.extend(ev.token);
                            if ev.finished.is_some() {
                                break;
                            }
                        }
                        out.push((i, toks));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|j| j.join().unwrap())
            .collect()
    });
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let steps = h.stats().num_steps - steps0;
    for (i, want) in solo.iter().enumerate() {
        assert_eq!(
            &got[&i], want,
            "request {i}: batched through the handle differs from solo"
        );
    }
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "{} requests, {steps} steps; KV physical idle {phys_idle} B, peak {peak} B, {} shrinks seen",
        all.len(),
        shrinks.load(Ordering::Relaxed)
    );
    assert!(steps >= scale(512) as u64, "only {steps} steps");
    if be.arena().is_growable() {
        assert!(peak > phys_idle, "the arena grew under load");
        assert!(
            shrinks.load(Ordering::Relaxed) > 0,
            "the arena shrank while serving"
        );
    }
    h.shutdown().unwrap();
    drop(h);
    // The engine is gone: every chunk unmapped, every reservation freed.
    let t0 = std::time::Instant::now();
    while be.arena().num_reservations() > 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(be.arena().num_reservations(), 0);
    assert_eq!(be.arena().physical_bytes(), 0);
    assert_eq!(be.allocator().live_bytes(), 0, "every pool segment freed");
}
