//! The CPU forward pass against the reference fixtures (exact_f64 and llama.cpp).

use std::sync::Arc;

use pagoda::gguf::GgufFile;
use pagoda::model::{LlamaConfig, WorkspaceDims};
use pagoda::model_runner::ModelRunner;
use pagoda_backend::{Backend, DType, FaultInjector, KvLayout, Pool, PoolConfig};
use pagoda_cpu::CpuBackend;
use pagoda_tests::{load_fixture, model_path, single_prefill};

fn runner(kv: DType, max_tokens: usize, pages: usize) -> ModelRunner<CpuBackend> {
    let f = GgufFile::open(model_path()).unwrap();
    let cfg = LlamaConfig::from_gguf(&f).unwrap();
    let backend = Arc::new(CpuBackend::new(0).unwrap());
    let pool = Pool::new(
        backend.raw_allocator(),
        PoolConfig::default(),
        FaultInjector::new(),
    );
    let layout = KvLayout {
        num_layers: cfg.num_layers,
        num_pages: pages,
        page_size: 16,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        dtype: kv,
    };
    let dims = WorkspaceDims {
        max_tokens,
        max_seqs: 4,
        max_blocks_per_seq: pages,
        max_logits_rows: max_tokens,
    };
    ModelRunner::new(backend, pool, &f, cfg, dims, layout).unwrap()
}

#[test]
fn last_logits_match_exact_f64_within_1e3() {
    let fx = load_fixture("logits_last.json");
    let mut r = runner(DType::F32, 256, 16);
    let mut worst = 0f64;
    for case in fx["cases"].as_array().unwrap() {
        let toks: Vec<u32> = case["prompt_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let pages: Vec<u32> = (0..toks.len().div_ceil(16) as u32).collect();
        let logits = r
            .execute(&single_prefill(&toks, &pages, 16, false))
            .unwrap()
            .to_vec();
        let ex = &case["exact_f64"];
        for (i, v) in ex["logits_0_63"].as_array().unwrap().iter().enumerate() {
            let d = (logits[i] as f64 - v.as_f64().unwrap()).abs();
            worst = worst.max(d);
        }
        for pair in ex["top20"].as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as usize;
            worst = worst.max((logits[id] as f64 - pair[1].as_f64().unwrap()).abs());
        }
        let argmax = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
        assert_eq!(
            argmax as u64,
            case["llama_cpp"]["argmax"].as_u64().unwrap(),
            "case {}",
            case["id"]
        );
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + logits
            .iter()
            .map(|&v| (v as f64 - m).exp())
            .sum::<f64>()
            .ln();
        worst = worst.max((lse - ex["logsumexp"].as_f64().unwrap()).abs());
    }
    eprintln!("max |Δ| vs exact_f64: {worst:.2e}");
    assert!(worst < 1e-3, "max |Δ| vs exact_f64 = {worst}");
}
