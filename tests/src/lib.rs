//! Shared helpers for Pagoda's integration tests.

pub mod nvrtc;
pub mod parity;
pub mod recording;
pub mod reference;

use std::path::PathBuf;
use std::sync::Arc;

use pagoda_backend::Backend;

use pagoda::{SeqId, StepPlan};

/// Path of the default model (fetched on first use).
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("PAGODA_MODEL") {
        return PathBuf::from(p);
    }
    if let Ok(p) = pagoda::fetch::default_model_path() {
        return p;
    }
    let cache = std::env::var("PAGODA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/pagoda")
        });
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Path of a reference fixture file, copied into the repo.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/reference")
        .join(name)
}

/// Reads and parses a reference fixture.
pub fn load_fixture(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name)).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A plan that prefills `tokens` of one sequence into `pages` (in order),
/// asking for logits at the last position, or at every position.
pub fn single_prefill(
    tokens: &[u32],
    pages: &[u32],
    page_size: usize,
    all_logits: bool,
) -> StepPlan {
    let n = tokens.len();
    let slot = |p: usize| pages[p / page_size] * page_size as u32 + (p % page_size) as u32;
    StepPlan {
        input_ids: tokens.to_vec(),
        positions: (0..n as u32).collect(),
        slot_mapping: (0..n).map(slot).collect(),
        block_tables: pages.to_vec(),
        max_blocks_per_seq: pages.len(),
        context_lens: vec![n as u32],
        query_start_locs: vec![0, n as u32],
        seq_ids: vec![SeqId(0)],
        logits_indices: if all_logits {
            (0..n as u32).collect()
        } else {
            vec![n as u32 - 1]
        },
        sample_rows: vec![Some(if all_logits { n as u32 - 1 } else { 0 })],
        copy_pages: vec![],
        swap_out: vec![],
        swap_in: vec![],
        num_prefill_tokens: n,
        num_decode_tokens: 0,
    }
}

/// The CPU backend with all threads.
pub fn cpu_backend() -> Arc<pagoda_cpu::CpuBackend> {
    Arc::new(pagoda_cpu::CpuBackend::new(0).expect("cpu backend"))
}

/// An engine on the CPU backend with the default model.
pub fn cpu_engine(cfg: pagoda::EngineConfig) -> pagoda::Engine<pagoda_cpu::CpuBackend> {
    engine_on(cpu_backend(), cfg)
}

/// An engine on `backend` with the default model.
pub fn engine_on<B: Backend>(backend: Arc<B>, cfg: pagoda::EngineConfig) -> pagoda::Engine<B> {
    pagoda::Engine::builder()
        .model(model_path())
        .backend(backend)
        .config(cfg)
        .build()
        .expect("engine builds")
}

/// Token ids of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A model runner for the default model on the CPU backend with `threads`
/// threads (0 = all), KV pages of 16 tokens in `kv`, and the given workspace.
pub fn cpu_runner(
    threads: usize,
    kv: pagoda_backend::DType,
    dims: pagoda::model::WorkspaceDims,
    num_pages: usize,
) -> pagoda::model_runner::ModelRunner<pagoda_cpu::CpuBackend> {
    let backend = pagoda_cpu::CpuBackend::new(threads).expect("cpu backend");
    runner_on(backend, kv, dims, num_pages, Vec::new())
}

/// A model runner for the default model on `backend` (a backend or an
/// `Arc` of one), KV pages of 16 tokens in `kv`, `num_pages` pages (plus the
/// null page), the given workspace and padded decode batch sizes; the whole
/// KV arena committed.
pub fn runner_on<B: Backend>(
    backend: impl Into<Arc<B>>,
    kv: pagoda_backend::DType,
    dims: pagoda::model::WorkspaceDims,
    num_pages: usize,
    decode_buckets: Vec<usize>,
) -> pagoda::model_runner::ModelRunner<B> {
    let f = pagoda::gguf::GgufFile::open(model_path()).expect("model opens");
    let cfg = pagoda::model::LlamaConfig::from_gguf(&f).expect("llama config");
    let backend: Arc<B> = backend.into();
    let pool = pagoda_backend::Pool::new(
        backend.raw_allocator(),
        pagoda_backend::PoolConfig {
            max_segment_bytes: backend.info().max_buffer_bytes,
            ..pagoda_backend::PoolConfig::default()
        },
        pagoda_backend::FaultInjector::new(),
    );
    let layout = pagoda_backend::KvLayout {
        num_layers: cfg.num_layers,
        num_pages: num_pages + 1,
        page_size: 16,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        dtype: kv,
    };
    let info = backend.info().clone();
    let geometry = pagoda_backend::KvGeometry::new(
        layout,
        info.max_buffer_bytes,
        info.max_binding_bytes,
        info.kv_commit_granularity,
        pagoda::plan::KV_COMMIT_UNIT_BYTES,
    )
    .expect("kv geometry");
    let r = pagoda::model_runner::ModelRunner::new(
        backend,
        pool,
        &f,
        cfg,
        dims,
        geometry,
        decode_buckets,
        pagoda_backend::FaultInjector::new(),
    )
    .expect("runner builds");
    r.kv_cache().commit_all().expect("kv commits");
    r
}

/// The CUDA backend of device 0, for tests marked `#[ignore = "needs a CUDA GPU"]`:
/// panics (failing the test) when there is no driver, GPU or NVRTC.
pub fn cuda_backend() -> Arc<pagoda_cuda::CudaBackend> {
    match pagoda_cuda::CudaBackend::new(0) {
        Ok(b) => Arc::new(b),
        Err(e) => panic!("this test needs a CUDA GPU: {e}"),
    }
}
