//! End-to-end tests of the `pagoda` binary: JSON contracts and clear errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn pagoda(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(args)
        .output()
        .expect("pagoda runs")
}

fn stdout_json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8(out.stdout.clone()).expect("utf-8 stdout");
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Exactly one JSON document and nothing else.
    let mut de = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
    let doc = de.next().expect("one document").expect("valid JSON");
    assert!(
        text[de.byte_offset()..].trim().is_empty(),
        "extra output after the JSON: {text:?}"
    );
    doc
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains("error"), "no error message: {err}");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "message lacks {needle:?}: {err}"
    );
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-tests");
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn generate_json_is_one_document_matching_llama_cpp() {
    let fx = fixture("greedy.json");
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "gen05")
        .unwrap();
    let out = pagoda(&[
        "generate",
        "--prompt",
        case["prompt_text"].as_str().unwrap(),
        "--max-tokens",
        "32",
        "--greedy",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_eq!(ids(&doc["prompt_tokens"]), ids(&case["prompt_tokens"]));
    let want = ids(&case["generated_tokens"]);
    let got = ids(&doc["generated_tokens"]);
    let margins = case["top1_minus_top2_logit"].as_array().unwrap();
    let checked = margins
        .iter()
        .position(|m| m.as_f64().unwrap() < 0.3)
        .unwrap_or(want.len());
    assert_eq!(&got[..checked], &want[..checked]);
    assert!(["length", "eog", "stop"].contains(&doc["stop_reason"].as_str().unwrap()));
    assert!(doc["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(doc["text"].is_string());
}

#[test]
fn file_prompt_is_read_byte_exact_and_tokenize_matches_fixtures() {
    let fx = fixture("tokenization.json");
    for case in fx["cases"].as_array().unwrap().iter().take(12) {
        let text = case["text"].as_str().unwrap();
        let f = scratch(&format!("prompt-{}.txt", case["id"].as_str().unwrap()));
        std::fs::write(&f, text).unwrap();
        let out = pagoda(&["tokenize", "--file", f.to_str().unwrap()]);
        assert_eq!(
            ids(&stdout_json(&out)),
            ids(&case["ids_parse_special"]),
            "case {}",
            case["id"]
        );
        let out = pagoda(&[
            "tokenize",
            "--file",
            f.to_str().unwrap(),
            "--no-parse-special",
        ]);
        assert_eq!(
            ids(&stdout_json(&out)),
            ids(&case["ids_no_parse_special"]),
            "case {}",
            case["id"]
        );
    }
}

#[test]
fn logits_json_has_the_summary_schema() {
    let fx = fixture("logits_last.json");
    for case in fx["cases"].as_array().unwrap() {
        let out = pagoda(&[
            "logits",
            "--prompt",
            case["prompt_text"].as_str().unwrap(),
            "--json",
        ]);
        let doc = stdout_json(&out);
        assert_eq!(
            doc["argmax"], case["llama_cpp"]["argmax"],
            "case {}",
            case["id"]
        );
        assert_eq!(doc["top20"].as_array().unwrap().len(), 20);
        let ex = &case["exact_f64"];
        // f32 activations: every summary value within 1e-3 of the exact float64 reference.
        let close = |a: &serde_json::Value, b: &serde_json::Value| {
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-3
        };
        assert!(
            close(&doc["logsumexp"], &ex["logsumexp"]),
            "case {}",
            case["id"]
        );
        let got = doc["logits_0_63"].as_array().unwrap();
        assert_eq!(got.len(), 64);
        for (g, w) in got.iter().zip(ex["logits_0_63"].as_array().unwrap()) {
            assert!(close(g, w), "case {}: {g} vs {w}", case["id"]);
        }
        for (g, w) in doc["top20"]
            .as_array()
            .unwrap()
            .iter()
            .zip(ex["top20"].as_array().unwrap())
        {
            assert!(close(&g[1], &w[1]), "case {}: top20 {g} vs {w}", case["id"]);
        }
    }
}

#[test]
fn bad_input_gives_clear_errors_and_nonzero_exit() {
    assert_clean_failure(
        &pagoda(&[
            "generate",
            "--prompt",
            "hi",
            "--model",
            "/nonexistent/model.gguf",
        ]),
        "does not exist",
    );
    assert_clean_failure(&pagoda(&["generate", "--prompt", ""]), "empty");
    assert_clean_failure(
        &pagoda(&["generate", "--prompt", "hi", "--max-tokens", "0"]),
        "max-tokens",
    );
    let long = "word ".repeat(200);
    assert_clean_failure(
        &pagoda(&["generate", "--prompt", &long, "--ctx", "64"]),
        "context",
    );
    assert_clean_failure(
        &pagoda(&["generate", "--prompt", "hi", "--kv-dtype", "q5_k"]),
        "kv dtype",
    );
    assert_clean_failure(
        &pagoda(&["generate", "--prompt", "hi", "--file", "x"]),
        "cannot be used",
    );
    let junk = scratch("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file at all").unwrap();
    assert_clean_failure(
        &pagoda(&[
            "generate",
            "--prompt",
            "hi",
            "--model",
            junk.to_str().unwrap(),
        ]),
        "not a GGUF file",
    );
    let trunc = scratch("truncated.gguf");
    std::fs::write(&trunc, b"GGUF\x03\x00\x00\x00\x10\x01").unwrap();
    assert_clean_failure(
        &pagoda(&[
            "tokenize",
            "--prompt",
            "hi",
            "--model",
            trunc.to_str().unwrap(),
        ]),
        "truncated",
    );
    assert_clean_failure(
        &pagoda(&["generate", "--file", "/nonexistent/prompt.txt"]),
        "cannot read",
    );
    assert_clean_failure(
        &pagoda(&["perplexity", "--file", "/nonexistent/text.txt"]),
        "cannot read",
    );
    let bad = pagoda(&["generate", "--frobnicate"]);
    assert!(!bad.status.success() && !String::from_utf8_lossy(&bad.stderr).contains("panicked"));
}

#[test]
fn plan_refuses_with_numbers_and_advice_then_fits_with_q8_0() {
    let args = [
        "plan",
        "--ctx",
        "8192",
        "--max-seqs",
        "64",
        "--memory-budget",
        "8GiB",
    ];
    let f16 = pagoda(&[&args[..], &["--kv-dtype", "f16"]].concat());
    assert_clean_failure(&f16, "refused");
    let err = String::from_utf8_lossy(&f16.stderr);
    assert!(
        err.contains("--kv-dtype q8_0")
            && err.contains("GiB")
            && err.contains("Nothing was loaded"),
        "{err}"
    );
    let q8 = pagoda(&[&args[..], &["--kv-dtype", "q8_0", "--json"]].concat());
    let doc = stdout_json(&q8);
    assert_eq!(doc["fits"], true);
    assert!(doc["total_bytes"].as_u64().unwrap() <= doc["budget_bytes"].as_u64().unwrap());
    assert_eq!(doc["num_pages"].as_u64().unwrap(), 64 * 8192 / 16);
}

#[test]
fn plan_shows_the_host_swap_tier_and_refuses_a_bad_swap_size() {
    let args = [
        "plan",
        "--ctx",
        "1024",
        "--max-seqs",
        "4",
        "--memory-budget",
        "2GiB",
    ];
    let json = pagoda(&[&args[..], &["--swap-space", "1GiB", "--json"]].concat());
    let doc = stdout_json(&json);
    let page = doc["page_bytes"].as_u64().unwrap();
    assert_eq!(doc["swap_slots"].as_u64().unwrap(), (1u64 << 30) / page);
    assert_eq!(
        doc["swap_bytes"].as_u64().unwrap(),
        (1u64 << 30) / page * page
    );
    let text = pagoda(&[&args[..], &["--swap-space", "1GiB"]].concat());
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(out.contains("host swap"), "{out}");
    let bad = pagoda(&[&args[..], &["--swap-space", "lots"]].concat());
    assert_clean_failure(&bad, "swap space");
}

#[test]
fn generate_parallel_reports_aggregate_throughput() {
    let out = pagoda(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--parallel",
        "4",
        "--max-tokens",
        "8",
        "--greedy",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_eq!(doc["num_requests"], 4);
    let reqs = doc["requests"].as_array().unwrap();
    // Greedy copies of one prompt give one answer.
    assert!(
        reqs.iter()
            .all(|r| r["generated_tokens"] == reqs[0]["generated_tokens"])
    );
    assert!(doc["aggregate_decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn trace_file_has_documented_step_and_memory_lines() {
    let trace = scratch("trace.jsonl");
    let out = pagoda(&[
        "generate",
        "--prompt",
        "Hello there",
        "--parallel",
        "2",
        "--max-tokens",
        "4",
        "--greedy",
        "--trace",
        trace.to_str().unwrap(),
        "--json",
    ]);
    stdout_json(&out);
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<_> = lines.iter().filter(|l| l["type"] == "step").collect();
    let mems: Vec<_> = lines.iter().filter(|l| l["type"] == "memory").collect();
    assert!(steps.len() >= 4 && steps.len() == mems.len());
    for key in [
        "step",
        "batch_size",
        "num_tokens",
        "num_prefill_tokens",
        "num_decode_tokens",
        "schedule_us",
        "forward_us",
        "step_us",
        "total_preemptions",
        "total_prefix_cache_hit_tokens",
        "num_waiting",
        "num_running",
        "free_pages",
        "num_pages",
    ] {
        assert!(steps[0].get(key).is_some(), "step lacks {key}");
    }
    assert_eq!(
        steps[0]["num_prefill_tokens"].as_u64().unwrap(),
        steps[0]["num_tokens"].as_u64().unwrap()
    );
    assert_eq!(steps.last().unwrap()["batch_size"], 2);
    let m = mems[0];
    for key in [
        "device_total_bytes",
        "pool_reserved_bytes",
        "pool_allocated_bytes",
        "pool_fragmentation",
        "allocated_by_tag",
        "segments",
        "kv_pages",
    ] {
        assert!(m.get(key).is_some(), "memory lacks {key}");
    }
    // Blocks cover each segment exactly.
    for seg in m["segments"].as_array().unwrap() {
        let sum: u64 = seg["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(sum, seg["bytes"].as_u64().unwrap());
    }
    let kv_used: u64 = m["kv_pages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["owners"].as_array().unwrap().is_empty())
        .count() as u64;
    assert!(kv_used >= 1);
}

#[test]
fn chat_message_uses_the_chat_template() {
    let out = pagoda(&[
        "chat",
        "--message",
        "What is 2+2?",
        "--greedy",
        "--max-tokens",
        "24",
        "--json",
    ]);
    let doc = stdout_json(&out);
    let reply = doc["reply"].as_str().unwrap();
    // The template wraps the message in ChatML; the greedy answer contains the sum.
    assert!(
        !reply.is_empty() && !reply.contains("<|im_end|>"),
        "{reply:?}"
    );
    assert!(reply.contains('4'), "{reply:?}");
    assert_clean_failure(&pagoda(&["chat", "--message", ""]), "empty");
}

#[test]
fn prompts_file_runs_one_request_per_line() {
    let f = scratch("prompts.txt");
    std::fs::write(&f, "The sea is\nPaper was first made\n\nIn the year 1450\n").unwrap();
    let out = pagoda(&[
        "generate",
        "--prompts",
        f.to_str().unwrap(),
        "--max-tokens",
        "6",
        "--greedy",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_eq!(doc["num_requests"], 3);
    let reqs = doc["requests"].as_array().unwrap();
    assert_ne!(reqs[0]["prompt_tokens"], reqs[1]["prompt_tokens"]);
    assert!(
        reqs.iter()
            .all(|r| !r["generated_tokens"].as_array().unwrap().is_empty())
    );
}

/// `pagoda generate --prompt hi --model PATH`.
fn generate_hi_with(model: &std::path::Path) -> Output {
    pagoda(&[
        "generate",
        "--prompt",
        "hi",
        "--model",
        model.to_str().unwrap(),
    ])
}

#[test]
fn unknown_quant_type_and_unsupported_architecture_are_clear_errors() {
    use pagoda::gguf::{GgufWriter, Value};
    // A K-quant tensor: named with its type in the error.
    let kq = scratch("kquant.gguf");
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", Value::String("llama".into()));
    w.tensor_raw("blk.0.attn_q.weight", &[256, 4], 12, &[0u8; 4 * 144]);
    w.write_to(&kq).unwrap();
    let out = generate_hi_with(&kq);
    assert_clean_failure(&out, "Q4_K");
    assert_clean_failure(&out, "blk.0.attn_q.weight");
    // A valid GGUF of another architecture: the key is named.
    let spec = pagoda::model::synthetic::SyntheticSpec::tiny();
    let mut w = pagoda::model::synthetic::synthetic_gguf(&spec).unwrap();
    w.metadata("general.architecture", Value::String("mamba".into()));
    let arch = scratch("mamba.gguf");
    w.write_to(&arch).unwrap();
    let out = generate_hi_with(&arch);
    assert_clean_failure(&out, "unsupported architecture `mamba`");
    assert_clean_failure(&out, "general.architecture");
}
