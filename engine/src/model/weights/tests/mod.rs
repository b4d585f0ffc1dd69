//! Unit tests of the parent module: the loader decides which tensor types
//! it can use (the GGUF reader reads them all).

use pagoda_backend::{FaultInjector, MemoryTag, Pool, PoolConfig};
use pagoda_cpu::CpuBackend;

use super::*;
use crate::gguf::{GgufWriter, ggml_block_layout};
use crate::model::synthetic::{SyntheticSpec, synthetic_gguf_file};

/// A small model 256 wide (so every matrix is a whole number of 256-element
/// super-blocks), with tensor `name` rewritten as ggml type `ggml_type`.
fn model_with(name: &str, ggml_type: u32) -> GgufFile {
    let spec = SyntheticSpec {
        hidden_dim: 256,
        ffn_dim: 256,
        ..SyntheticSpec::tiny()
    };
    let src = synthetic_gguf_file(&spec).expect("synthetic model");
    let mut w = GgufWriter::new();
    for (k, v) in &src.metadata {
        w.metadata(k.clone(), v.clone());
    }
    let mut found = false;
    for t in &src.tensors {
        if t.name == name {
            let (block, block_bytes) = ggml_block_layout(ggml_type).expect("known layout");
            let n = t.num_elements() / block * block_bytes;
            let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            w.tensor_raw(t.name.clone(), &shape, ggml_type, vec![0u8; n]);
            found = true;
        } else {
            let dtype = t.dtype.expect("synthetic types are the engine's");
            w.tensor(t.name.clone(), &t.shape, dtype, src.tensor_data(t).to_vec());
        }
    }
    assert!(found, "no tensor {name}");
    GgufFile::from_bytes("q4k-model.gguf", w.to_bytes().expect("write")).expect("reads")
}

fn cpu() -> CpuBackend {
    CpuBackend::new(1).expect("cpu backend")
}

/// `model_with(name, id)` is refused by `b` before any upload, and by the plan, with a
/// message naming the tensor and `ty`.
fn refused(b: &CpuBackend, name: &str, id: u32, ty: &str) {
    let f = model_with(name, id);
    // The reader read it; the census counts it.
    assert_eq!(f.tensor(name).map(|t| t.ggml_type), Some(id));
    assert!(f.type_counts().contains(&(ty.to_string(), 1)));
    let cfg = LlamaConfig::from_gguf(&f).expect("config");
    let pool = Pool::new(
        b.raw_allocator(),
        PoolConfig::default(),
        FaultInjector::new(),
    );
    let msg = match LlamaWeights::load(&f, &cfg, b, &pool) {
        Ok(_) => panic!("{name} as {ty} loaded"),
        Err(e) => e.to_string(),
    };
    // Metric: the message names the tensor and the type.
    assert!(msg.contains(name) && msg.contains(ty), "{msg}");
    // Metric: 0 weight bytes were allocated (nothing uploaded).
    assert_eq!(pool.stats().allocated(MemoryTag::Weights), 0, "{name}");
    // The plan's figure refuses the same way.
    let msg = LlamaWeights::planned_bytes(&f, &cfg, b)
        .map(|_| String::new())
        .unwrap_or_else(|e| e.to_string());
    assert!(msg.contains(name) && msg.contains(ty), "{msg}");
}

#[test]
fn a_type_the_engine_lacks_is_refused_by_name_before_any_upload() {
    // token_embd is loaded last, so a loader that checked as it went would
    // have uploaded every other tensor first.
    for (name, id, ty) in [
        ("token_embd.weight", 10u32, "Q2_K"),
        ("blk.1.ffn_down.weight", 11, "Q3_K"),
        ("blk.0.attn_q.weight", 23, "IQ4_XS"),
    ] {
        refused(&cpu(), name, id, ty);
    }
}

#[test]
fn a_type_the_backend_lacks_is_refused_by_name_before_any_upload() {
    // A device with only the 32-element types (as the CUDA backend today).
    let legacy = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
    ];
    let b = cpu().with_weight_dtypes(&legacy);
    for (name, id, ty) in [
        ("token_embd.weight", 12u32, "Q4_K"),
        ("blk.1.ffn_down.weight", 14, "Q6_K"),
        ("blk.0.attn_q.weight", 6, "Q5_0"),
    ] {
        refused(&b, name, id, ty);
        // The full CPU backend loads the same file.
        let f = model_with(name, id);
        let cfg = LlamaConfig::from_gguf(&f).expect("config");
        let full = cpu();
        let pool = Pool::new(
            full.raw_allocator(),
            PoolConfig::default(),
            FaultInjector::new(),
        );
        LlamaWeights::load(&f, &cfg, &full, &pool).unwrap_or_else(|e| panic!("{ty}: {e}"));
    }
}

#[test]
fn the_same_file_with_engine_types_loads() {
    // Control for the test above: the untouched model loads (Q8_0 matrices).
    let b = cpu();
    let spec = SyntheticSpec {
        hidden_dim: 256,
        ffn_dim: 256,
        ..SyntheticSpec::tiny()
    };
    let f = synthetic_gguf_file(&spec).expect("synthetic model");
    let cfg = LlamaConfig::from_gguf(&f).expect("config");
    let pool = Pool::new(
        b.raw_allocator(),
        PoolConfig::default(),
        FaultInjector::new(),
    );
    let w = LlamaWeights::load(&f, &cfg, &b, &pool).expect("loads");
    assert_eq!(w.layers.len(), 2);
    assert!(pool.stats().allocated(MemoryTag::Weights) > 0);
}
