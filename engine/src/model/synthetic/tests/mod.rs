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
    assert_eq!(t.dtype, DType::Q8_0);
    assert_eq!(
        f.tensor("blk.0.ffn_norm.weight").map(|t| t.dtype),
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
    assert!(q4.validate().is_err());
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
