//! Fault-injection sweeps on the synthetic tiny model.
//!
//! Every pool allocation and every KV page allocation is a fault site,
//! numbered from 1 by one [`FaultInjector`] shared by the engine's pool and
//! its block manager. Each sweep first measures a fault-free run, then fails
//! every site in turn on a fresh engine and checks that
//! - a fault while building is a clean `Err` naming the injected fault, with
//!   all host memory given back;
//! - a fault while running ends exactly the request that wanted the page
//!   (with [`FinishReason::Error`] naming the fault), every other request
//!   generates exactly what it did without the fault (greedy is
//!   batch-invariant), every KV page is free at the end and all host memory
//!   is given back when the engine is dropped.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use pagoda::model::synthetic::{SyntheticSpec, write_synthetic_gguf};
use pagoda::sampler::SamplingParams;
use pagoda::{Completion, Engine, EngineConfig, FinishReason, GenerationParams};
use pagoda_backend::FaultInjector;
use pagoda_cpu::CpuBackend;

/// The tiny synthetic model, written once per test binary.
fn model() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-injection");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("tiny-{}.gguf", std::process::id()));
        write_synthetic_gguf(&SyntheticSpec::tiny(), &path).expect("synthetic model");
        path
    })
}

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new(1).expect("cpu backend"))
}

fn build(
    backend: &Arc<CpuBackend>,
    base: &EngineConfig,
    faults: &FaultInjector,
) -> pagoda::Result<Engine<CpuBackend>> {
    Engine::builder()
        .model(model())
        .backend(backend.clone())
        .config(EngineConfig {
            faults: faults.clone(),
            ..base.clone()
        })
        .build()
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        // Fixed lengths: the random model may well pick an end-of-generation token.
        ignore_eog: true,
        ..GenerationParams::default()
    }
}

/// A small interactive setup on the tiny model (128 tokens of context).
fn small_config() -> EngineConfig {
    EngineConfig {
        ctx: Some(128),
        max_seqs: Some(4),
        max_num_batched_tokens: 64,
        max_logits_rows: 4,
        page_size: 16,
        faults: FaultInjector::new(),
        ..EngineConfig::default()
    }
}

/// Deterministic prompts of token ids: `common` shared ids, then a suffix
/// that differs per request (lengths `3 + 5 * (r % 4)`).
fn prompts(n: usize, common: usize) -> Vec<Vec<u32>> {
    let prefix: Vec<u32> = (0..common as u32).map(|i| (i * 7 + 3) % 256).collect();
    (0..n as u32)
        .map(|r| {
            let mut p = prefix.clone();
            p.extend((0..3 + 5 * (r % 4)).map(|j| (r * 31 + j * 11 + 5) % 256));
            p
        })
        .collect()
}

/// Result of one run: completions in request order and the site counters.
struct Run {
    completions: Vec<Completion>,
    sites_after_build: u64,
    sites_total: u64,
    preemptions: u64,
    prefix_hit_tokens: u64,
}

/// Builds an engine with `faults`, runs every prompt to completion and checks
/// the balance: every KV page free, block-manager invariants intact, and no
/// host segment left once the engine is dropped.
fn run(
    backend: &Arc<CpuBackend>,
    cfg: &EngineConfig,
    faults: &FaultInjector,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Run {
    let mut engine = build(backend, cfg, faults).expect("engine builds");
    let sites_after_build = faults.sites_reached();
    let completions = engine
        .generate(prompts.to_vec(), greedy(max_tokens))
        .expect("generate returns");
    assert_eq!(completions.len(), prompts.len());
    assert!(!engine.has_unfinished());
    let bm = engine.scheduler().block_manager();
    assert_eq!(
        bm.num_free_pages(),
        bm.num_pages(),
        "every KV page is free after the run"
    );
    bm.check_invariants().expect("block manager invariants");
    let stats = engine.scheduler().stats().clone();
    drop(engine);
    assert_eq!(
        backend.live_segments(),
        0,
        "host memory is given back when the engine is dropped"
    );
    Run {
        completions,
        sites_after_build,
        sites_total: faults.sites_reached(),
        preemptions: stats.num_preemptions,
        prefix_hit_tokens: stats.num_prefix_cache_hit_tokens,
    }
}

/// Fails every run-time site of the fault-free run in turn; returns how
/// many sites were swept.
fn sweep_run_sites(cfg: &EngineConfig, prompts: &[Vec<u32>], max_tokens: usize) -> (Run, u64) {
    let backend = backend();
    let clean = run(&backend, cfg, &FaultInjector::new(), prompts, max_tokens);
    for c in &clean.completions {
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.generated_tokens.len(), max_tokens);
    }
    let (s_build, s_total) = (clean.sites_after_build, clean.sites_total);
    assert!(s_total > s_build, "the run allocates KV pages");
    let mut failed_per_request = vec![0usize; prompts.len()];
    for k in s_build + 1..=s_total {
        let faults = FaultInjector::new();
        faults.fail_at(k);
        let r = run(&backend, cfg, &faults, prompts, max_tokens);
        assert_eq!(r.sites_after_build, s_build, "k={k}: build is unchanged");
        assert_eq!(faults.faults_fired(), 1, "k={k}: the fault landed");
        let errors: Vec<usize> = r
            .completions
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c.finish_reason, FinishReason::Error(_)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(errors.len(), 1, "k={k}: exactly one request fails");
        let bad = errors[0];
        failed_per_request[bad] += 1;
        let FinishReason::Error(msg) = &r.completions[bad].finish_reason else {
            unreachable!()
        };
        assert!(
            msg.contains("injected fault") && msg.contains(&format!("#{k} ")),
            "k={k}: the error names the fault: {msg}"
        );
        let (got, want) = (
            &r.completions[bad].generated_tokens,
            &clean.completions[bad].generated_tokens,
        );
        assert!(
            want.starts_with(got),
            "k={k}: the failed request's tokens so far are right"
        );
        for (i, (c, w)) in r.completions.iter().zip(&clean.completions).enumerate() {
            if i != bad {
                assert_eq!(c.finish_reason, w.finish_reason, "k={k}, request {i}");
                assert_eq!(
                    c.generated_tokens, w.generated_tokens,
                    "k={k}, request {i}: same tokens as without the fault"
                );
            }
        }
    }
    eprintln!(
        "sites: {s_build} during build, {} during the run; faults per request: {failed_per_request:?}",
        s_total - s_build
    );
    (clean, s_total - s_build)
}

#[test]
fn fault_during_build_is_a_clean_error() {
    let t0 = Instant::now();
    let backend = backend();
    let cfg = small_config();
    let clean = FaultInjector::new();
    let engine = build(&backend, &cfg, &clean).expect("fault-free build");
    let s_build = clean.sites_reached();
    assert!(s_build > 0);
    assert_eq!(clean.faults_fired(), 0);
    drop(engine);
    assert_eq!(backend.live_segments(), 0);

    for k in 1..=s_build {
        let faults = FaultInjector::new();
        faults.fail_at(k);
        let err = build(&backend, &cfg, &faults)
            .err()
            .unwrap_or_else(|| panic!("k={k}: the build must fail"));
        let msg = err.to_string();
        assert!(
            msg.contains("injected fault") && msg.contains(&format!("#{k} ")),
            "k={k}: {msg}"
        );
        assert_eq!(faults.faults_fired(), 1, "k={k}");
        assert_eq!(
            faults.sites_reached(),
            k,
            "k={k}: nothing is allocated after the fault"
        );
        assert_eq!(
            backend.live_segments(),
            0,
            "k={k}: all host memory is given back"
        );
    }

    // One past the build: the build succeeds and the fault waits for the first KV page.
    let faults = FaultInjector::new();
    faults.fail_at(s_build + 1);
    let engine = build(&backend, &cfg, &faults).expect("builds");
    assert_eq!(faults.faults_fired(), 0);
    drop(engine);
    assert_eq!(backend.live_segments(), 0);
    eprintln!("build: {s_build} sites, all swept in {:.2?}", t0.elapsed());
}

#[test]
fn fault_during_run_fails_only_that_request() {
    let t0 = Instant::now();
    let cfg = small_config();
    let prompts = prompts(4, 5);
    let (clean, swept) = sweep_run_sites(&cfg, &prompts, 20);
    assert!(swept >= 4, "every request takes at least one page");
    // The prompts really differ and so do the outputs.
    let distinct: std::collections::HashSet<_> = clean
        .completions
        .iter()
        .map(|c| c.generated_tokens.clone())
        .collect();
    assert!(distinct.len() > 1);
    eprintln!("run sweep: {swept} sites in {:.2?}", t0.elapsed());
}

#[test]
fn fault_sweep_with_concurrency_preemption_and_prefix_sharing() {
    let t0 = Instant::now();
    let cfg = EngineConfig {
        ctx: Some(128),
        max_seqs: Some(12),
        max_num_batched_tokens: 64,
        max_logits_rows: 12,
        page_size: 16,
        enable_prefix_caching: true,
        // 12 requests of up to 86 tokens (6 pages), sharing 3 prompt pages:
        // 39 pages would hold them all at once.
        num_pages: Some(10),
        faults: FaultInjector::new(),
        ..EngineConfig::default()
    };
    let prompts = prompts(12, 48);
    let (clean, swept) = sweep_run_sites(&cfg, &prompts, 20);
    assert!(
        clean.prefix_hit_tokens > 0,
        "prefix caching is active in the fault-free run"
    );
    assert!(
        clean.preemptions > 0,
        "preemption happens in the fault-free run"
    );
    eprintln!(
        "concurrent sweep: {swept} sites ({} preemptions, {} prefix-hit tokens without faults) in {:.2?}",
        clean.preemptions,
        clean.prefix_hit_tokens,
        t0.elapsed()
    );
}
