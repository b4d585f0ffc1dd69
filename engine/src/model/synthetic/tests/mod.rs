//! Unit tests of the parent module.

use std::path::PathBuf;
use std::sync::Arc;

use pagoda_cpu::CpuBackend;

use super::*;
use crate::gguf::GgufFile;
use crate::model::LlamaConfig;
use crate::sampler::SamplingParams;
use crate::{Engine, EngineConfig, GenerationParams};

fn tiny_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagoda-synthetic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    write_synthetic_gguf(&SyntheticSpec::tiny(), &path).expect("writes");
    path
}

fn engine(path: &Path) -> Engine<CpuBackend> {
    Engine::builder()
        .model(path)
        .backend(Arc::new(CpuBackend::new(1).expect("cpu backend")))
        .config(EngineConfig {
            max_seqs: Some(2),
            faults: pagoda_backend::FaultInjector::new(),
            ..EngineConfig::default()
        })
        .build()
        .expect("engine builds")
}

#[test]
fn synthetic_file_opens_with_the_spec_hyper_parameters() {
    let spec = SyntheticSpec::tiny();
    let path = tiny_file("opens.gguf");
    let f = GgufFile::open(&path).expect("opens");
    let cfg = LlamaConfig::from_gguf(&f).expect("config");
    assert_eq!(cfg.num_layers, spec.num_layers);
    assert_eq!(cfg.hidden_dim, spec.hidden_dim);
    assert_eq!(cfg.num_heads, spec.num_heads);
    assert_eq!(cfg.num_kv_heads, spec.num_kv_heads);
    assert_eq!(cfg.head_dim, 16);
    assert_eq!(cfg.ffn_dim, spec.ffn_dim);
    assert_eq!(cfg.vocab_size, spec.vocab_size);
    assert_eq!(cfg.context_len, spec.context_len);
    let t = f.tensor("blk.1.attn_q.weight").expect("attn_q");
    assert_eq!(t.shape, vec![64, 64]);
    assert_eq!(t.dtype, Some(DType::Q8_0));
    assert_eq!(
        f.tensor("blk.0.ffn_norm.weight").and_then(|t| t.dtype),
        Some(DType::F32)
    );
}

#[test]
fn same_spec_same_bytes_other_seed_other_weights() {
    let a = synthetic_gguf(&SyntheticSpec::tiny())
        .unwrap()
        .to_bytes()
        .unwrap();
    let b = synthetic_gguf(&SyntheticSpec::tiny())
        .unwrap()
        .to_bytes()
        .unwrap();
    assert_eq!(a, b);
    let other = SyntheticSpec {
        seed: 1,
        ..SyntheticSpec::tiny()
    };
    let c = synthetic_gguf(&other).unwrap().to_bytes().unwrap();
    assert_eq!(a.len(), c.len());
    assert_ne!(a, c);
}

#[test]
fn bad_specs_are_refused() {
    let odd = SyntheticSpec {
        hidden_dim: 48,
        ..SyntheticSpec::tiny()
    };
    assert!(odd.validate().is_err(), "48 is not a multiple of 32");
    let small_vocab = SyntheticSpec {
        vocab_size: 100,
        ..SyntheticSpec::tiny()
    };
    assert!(synthetic_gguf(&small_vocab).is_err());
    let q4 = SyntheticSpec {
        weight_dtype: DType::Q4_1,
        ..SyntheticSpec::tiny()
    };
    assert!(q4.validate().is_ok());
    let q4_odd = SyntheticSpec {
        hidden_dim: 48,
        ..q4
    };
    assert!(q4_odd.validate().is_err(), "48 is not a multiple of 32");
    let u32_weights = SyntheticSpec {
        weight_dtype: DType::U32,
        ..SyntheticSpec::tiny()
    };
    assert!(u32_weights.validate().is_err());
    let empty = SyntheticSpec {
        hidden_dim: 0,
        ..SyntheticSpec::tiny()
    };
    assert!(synthetic_gguf(&empty).is_err());
    assert_eq!(SyntheticSpec::named("tiny"), Some(SyntheticSpec::tiny()));
    assert_eq!(SyntheticSpec::named("huge"), None);
}

#[test]
fn engine_builds_and_tokenizer_round_trips() {
    let path = tiny_file("roundtrip.gguf");
    let e = engine(&path);
    let tok = e.tokenizer();
    assert_eq!(tok.vocab_size(), 300);
    for text in [
        "hello world, the end",
        "in the string of things\n\ttabs  and  spaces",
        "héllo wörld ✓ 日本語 🦀",
        "",
    ] {
        let ids = e.tokenize(text);
        assert_eq!(tok.decode(&ids), text.as_bytes(), "{text:?}");
    }
    // Merges apply: " the" is one token.
    assert_eq!(e.tokenize(" the"), vec![tok.token_to_id("Ġthe").unwrap()]);
    // Control tokens are parsed whole.
    assert_eq!(
        e.tokenize("<|im_start|>hi<|im_end|>"),
        vec![IM_START_ID, u32::from(b'h'), u32::from(b'i'), IM_END_ID]
    );
    assert!(tok.eog_ids().contains(&IM_END_ID));
    assert!(tok.eog_ids().contains(&ENDOFTEXT_ID));
    let chat = e
        .render_chat(&[crate::chat::Message {
            role: "user".into(),
            content: "hi".into(),
        }])
        .expect("chat template");
    assert_eq!(
        chat,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn greedy_generation_is_deterministic() {
    let path = tiny_file("greedy.gguf");
    let params = GenerationParams {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        ignore_eog: true,
        ..GenerationParams::default()
    };
    let run = || {
        let mut e = engine(&path);
        let prompt = e.tokenize("hello world");
        e.generate(vec![prompt], params.clone())
            .expect("generates")
            .pop()
            .expect("one completion")
            .generated_tokens
    };
    let a = run();
    assert_eq!(a.len(), 8);
    assert!(a.iter().all(|&t| (t as usize) < 300));
    assert_eq!(a, run());
    // Not a constant: the model looks at its input.
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert!(distinct.len() > 1, "{a:?}");
}

/// The tiny shape in `dtype`, widened to 256 / 512 for the 256-element K-quants.
fn tiny_in(dtype: DType) -> SyntheticSpec {
    let tiny = SyntheticSpec::tiny();
    let (hidden_dim, ffn_dim) = if dtype.block_size() > tiny.hidden_dim {
        (256, 512)
    } else {
        (tiny.hidden_dim, tiny.ffn_dim)
    };
    SyntheticSpec {
        weight_dtype: dtype,
        hidden_dim,
        ffn_dim,
        ..tiny
    }
}

/// The tiny shape with each weight type, tied and untied.
fn tiny_variants() -> Vec<SyntheticSpec> {
    let mut v = Vec::new();
    for dtype in DType::WEIGHT_TYPES {
        for tie_embeddings in [false, true] {
            v.push(SyntheticSpec {
                tie_embeddings,
                ..tiny_in(dtype)
            });
        }
    }
    v
}

#[test]
fn in_memory_file_equals_the_written_one() {
    for spec in tiny_variants() {
        let w = synthetic_gguf(&spec).expect("writer");
        let written =
            GgufFile::from_bytes("written", w.to_bytes().expect("bytes")).expect("parses");
        let mem = synthetic_gguf_file(&spec).expect("in memory");
        assert_eq!(mem.file_bytes(), written.file_bytes(), "{spec:?}");
        assert_eq!(mem.file_bytes(), spec.file_bytes().expect("file bytes"));
        assert_eq!(mem.metadata, written.metadata);
        assert_eq!(mem.tensors, written.tensors);
        for t in &mem.tensors {
            assert_eq!(mem.tensor_data(t), written.tensor_data(t), "{}", t.name);
        }
        assert_eq!(
            mem.tensor("output.weight").is_some(),
            !spec.tie_embeddings,
            "{spec:?}"
        );
    }
}

#[test]
fn weights_bytes_from_the_shape_equal_the_files_plan() {
    for spec in tiny_variants() {
        let f = synthetic_gguf_file(&spec).expect("in memory");
        let cfg = LlamaConfig::from_gguf(&f).expect("config");
        // The CPU keeps GGUF blocks as they are: its prepared bytes are the file's.
        let cpu = pagoda_cpu::CpuBackend::new(1).expect("cpu backend");
        let planned = crate::model::LlamaWeights::planned_bytes(&f, &cfg, &cpu).expect("plan");
        assert_eq!(spec.weights_bytes(), planned, "{spec:?}");
    }
}

#[test]
fn named_shapes_have_their_published_dimensions() {
    let s = SyntheticSpec::named("llama2-7b").expect("llama2-7b");
    let cfg = LlamaConfig::from_gguf(&s.header_file().expect("header")).expect("config");
    assert_eq!(
        (
            cfg.num_layers,
            cfg.hidden_dim,
            cfg.num_heads,
            cfg.num_kv_heads
        ),
        (32, 4096, 32, 32)
    );
    assert_eq!(
        (cfg.ffn_dim, cfg.vocab_size, cfg.context_len, cfg.head_dim),
        (11008, 32000, 4096, 128)
    );
    // Q4_0: 18 bytes per 32 weights; 7 matrices per layer, embedding and
    // output 32000 x 4096; 65 f32 norms of 4096.
    let per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008;
    let matrices: u64 = 32 * per_layer + 2 * 32000 * 4096;
    assert_eq!(s.weights_bytes(), matrices / 32 * 18 + 65 * 4096 * 4);
    assert_eq!(s.weight_dtype, DType::Q4_0);

    let s = SyntheticSpec::named("smollm2-135m").expect("smollm2-135m");
    let cfg = LlamaConfig::from_gguf(&s.header_file().expect("header")).expect("config");
    assert_eq!(
        (
            cfg.num_layers,
            cfg.hidden_dim,
            cfg.num_heads,
            cfg.num_kv_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (cfg.ffn_dim, cfg.vocab_size, cfg.context_len, cfg.head_dim),
        (1536, 49152, 8192, 64)
    );
    assert!(s.tie_embeddings);
    for name in SyntheticSpec::NAMES {
        let spec = SyntheticSpec::named(name).expect("named");
        spec.validate().expect("valid");
        assert_eq!(spec.header_file().expect("header").tensors.len(), 0);
    }
}

#[test]
fn every_weight_type_builds_in_memory_and_generates() {
    let params = GenerationParams {
        max_tokens: 6,
        sampling: SamplingParams::greedy(),
        ignore_eog: true,
        ..GenerationParams::default()
    };
    for spec in tiny_variants() {
        let mut e: Engine<CpuBackend> = Engine::builder()
            .gguf(synthetic_gguf_file(&spec).expect("in memory"))
            .backend(Arc::new(CpuBackend::new(1).expect("cpu backend")))
            .config(EngineConfig {
                max_seqs: Some(1),
                faults: pagoda_backend::FaultInjector::new(),
                ..EngineConfig::default()
            })
            .build()
            .expect("engine builds");
        assert_eq!(e.memory_plan().weights_bytes, spec.weights_bytes());
        let prompt = e.tokenize("hello world");
        let c = e.generate(vec![prompt], params.clone()).expect("generates");
        let toks = &c[0].generated_tokens;
        assert_eq!(toks.len(), 6, "{spec:?}");
        // Untied, the model looks at its input. (Tied random embeddings
        // make a token's own row its best logit, so it repeats.)
        let distinct: std::collections::HashSet<_> = toks.iter().collect();
        assert!(
            spec.tie_embeddings || distinct.len() > 1,
            "{spec:?}: {toks:?}"
        );
    }
}

#[test]
fn random_matrices_span_their_scale_with_uniform_variance() {
    // ffn_down has fan-in 128: values uniform in +-1/sqrt(128), variance
    // scale^2 / 3, for every type (quantized ones on their grid).
    for dtype in DType::WEIGHT_TYPES {
        let spec = tiny_in(dtype);
        let f = synthetic_gguf_file(&spec).expect("in memory");
        let t = f.tensor("blk.0.ffn_down.weight").expect("ffn_down");
        let mut x = vec![0f32; t.num_elements()];
        pagoda_backend::quant::dequantize_row(dtype, f.tensor_data(t), &mut x).expect("dequantize");
        let scale = 1.0 / (spec.ffn_dim as f32).sqrt();
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max <= scale * 1.01, "{dtype}: max {max} > {scale}");
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / x.len() as f32;
        let want = scale * scale / 3.0;
        // Q4_0's grid d * (q - 8), q in 0..=15, is centred at -d/2 = -scale/16.
        assert!(
            mean.abs() < scale / 16.0 + 0.02 * scale,
            "{dtype}: mean {mean}"
        );
        assert!(
            (var / want - 1.0).abs() < 0.15,
            "{dtype}: variance {var} vs {want}"
        );
    }
}
