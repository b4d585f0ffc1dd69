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
fn trace_file_is_a_replayable_keyframe_and_delta_stream() {
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
    let mems: Vec<_> = lines.iter().filter(|l| l["type"] != "step").collect();
    assert!(steps.len() >= 4 && steps.len() == mems.len());
    for key in [
        "step_id",
        "t_us",
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
    // A keyframe first, then deltas, each right after its step.
    assert_eq!(mems[0]["type"], "keyframe");
    assert_eq!(mems[0]["schema"], pagoda::telemetry::SCHEMA);
    assert!(mems[1..].iter().all(|m| m["type"] == "delta"));
    for (s, m) in steps.iter().zip(&mems) {
        assert_eq!(s["step_id"], m["step_id"]);
    }
    let m = &mems[0]["memory"];
    for key in ["totals", "plan", "segments", "kv_pages"] {
        assert!(m.get(key).is_some(), "keyframe memory lacks {key}");
    }
    // The reader replays it: the state at every step.
    let replay = pagoda::telemetry::trace::Trace::read(text.as_bytes()).unwrap();
    let last = steps.last().unwrap()["step_id"].as_u64().unwrap();
    let state = replay.memory_at(last).unwrap().expect("a state");
    for seg in &state.segments {
        let sum: u64 = seg.blocks.iter().map(|b| b.bytes).sum();
        assert_eq!(sum, seg.bytes, "blocks cover each segment exactly");
        assert_ne!(seg.base_addr, 0);
    }
    assert!(
        state
            .segments
            .iter()
            .flat_map(|s| &s.blocks)
            .any(|b| b.label == "kv.layer.0.page_table")
    );
    assert_eq!(state.kv_pages.len() as u64, state.totals.kv.num_pages);
    let first = steps[0]["step_id"].as_u64().unwrap();
    let at_first = replay.memory_at(first).unwrap().expect("a state");
    assert!(at_first.kv_pages.iter().any(|p| !p.owners.is_empty()));
    assert_eq!(replay.replay().unwrap().len(), mems.len());
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

/// `generate --prompts FILE --max-tokens N --greedy --json` on a scratch file
/// holding `lines`; its JSON document.
fn generate_prompts_json(name: &str, lines: &str, max_tokens: usize) -> serde_json::Value {
    let f = scratch(name);
    std::fs::write(&f, lines).unwrap();
    let n = max_tokens.to_string();
    stdout_json(&pagoda(&[
        "generate",
        "--prompts",
        f.to_str().unwrap(),
        "--max-tokens",
        &n,
        "--greedy",
        "--json",
    ]))
}

#[test]
fn prompts_file_runs_one_request_per_line() {
    let doc = generate_prompts_json(
        "prompts.txt",
        "The sea is\nPaper was first made\n\nIn the year 1450\n",
        6,
    );
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
    // A tensor of a type the engine lacks (Q2_K) in an otherwise complete
    // model: the reader reads it, the loader refuses it, naming it with its type.
    let kq = model_with_ffn_down_as("q2_k-generate.gguf", 10);
    let out = generate_hi_with(&kq);
    assert_clean_failure(&out, "Q2_K");
    assert_clean_failure(&out, "blk.0.ffn_down.weight");
    // The same model with a Q4_K tensor runs.
    let ok = generate_hi_with(&model_with_ffn_down_as("q4_k-generate.gguf", 12));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A file holding only that tensor is read too; what is missing is named.
    let bare = scratch("kquant.gguf");
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", Value::String("llama".into()));
    w.tensor_raw("blk.0.attn_q.weight", &[256, 4], 12, [0u8; 4 * 144]);
    w.write_to(&bare).unwrap();
    assert_clean_failure(&generate_hi_with(&bare), "llama.");
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

#[test]
fn a_wgpu_adapter_no_name_matches_is_one_clear_error_line() {
    // Every known backend is compiled into the default build; an adapter name that
    // matches nothing names the adapters there are.
    let out = pagoda(&["plan", "--backend", "wgpu", "--adapter", "zzz-no-such-gpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: the wgpu backend has no device")
            && err.contains("no adapter's name contains `zzz-no-such-gpu`")
            && err.contains("adapters:"),
        "{err}"
    );
    // A name Pagoda does not know gets clap's error with the compiled-in list.
    let out = pagoda(&["plan", "--backend", "tpu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'tpu'") && err.contains("[possible values: cpu, cuda, wgpu]"),
        "{err}"
    );
}

#[test]
fn devices_lists_every_backend_and_the_cpu_device() {
    let doc = stdout_json(&pagoda(&["devices", "--json"]));
    let backends = doc["backends"].as_array().unwrap();
    let names: Vec<&str> = backends
        .iter()
        .map(|b| b["backend"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cpu", "cuda", "wgpu"]);
    let cpu = &backends[0];
    assert_eq!(cpu["compiled"], true);
    let devs = cpu["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 1);
    let d = &devs[0];
    assert_eq!(d["name"], "cpu:0");
    assert!(!d["device"].as_str().unwrap().is_empty());
    let total = d["total_memory_bytes"].as_u64().unwrap();
    let free = d["free_memory_bytes"].as_u64().unwrap();
    assert!(total > 0 && free <= total, "{d}");
    assert_eq!(d["host_memory"], true);
    let list = |k: &str| -> Vec<String> {
        d[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        list("weight_dtypes"),
        [
            "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"
        ]
    );
    assert!(list("kv_dtypes").contains(&"q8_0".to_string()));
    assert_eq!(d["can_grow_kv"], true);
    assert_eq!(d["supports_graphs"], false);
    assert!(d["alignment"].as_u64().unwrap().is_power_of_two());
    assert_eq!(d["max_top_k"], 1024);
    assert!(d["max_binding_bytes"].as_u64().unwrap() > 0);
    assert!(
        d["kv_commit_granularity_bytes"]
            .as_u64()
            .unwrap()
            .is_power_of_two()
    );
    // CUDA is compiled in; on a machine without a GPU it reports why it has no device.
    let cuda = &backends[1];
    assert_eq!(cuda["compiled"], true);
    if cuda["devices"].as_array().unwrap().is_empty() {
        assert!(
            cuda["error"]
                .as_str()
                .unwrap()
                .contains("cuda backend has no device"),
            "{cuda}"
        );
    }
    // wgpu is compiled in; CI has Mesa's lavapipe, so it finds that adapter.
    let wgpu = &backends[2];
    assert_eq!(wgpu["compiled"], true);
    assert!(!wgpu["adapters"].as_array().unwrap().is_empty(), "{wgpu}");
    let wd = &wgpu["devices"][0];
    assert_eq!(wd["name"], "wgpu:0", "{wgpu}");
    assert!(wd["device"].as_str().unwrap().contains("features:"), "{wd}");
    assert_eq!(wd["can_grow_kv"], false);

    let out = pagoda(&["devices"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cpu:0: "), "{text}");
    for needle in [
        "memory:",
        "weight dtypes: f32",
        "kv dtypes:",
        "can_grow_kv: true",
        "alignment:",
        "largest binding: none",
    ] {
        assert!(text.contains(needle), "lacks {needle:?}: {text}");
    }
    assert!(
        text.contains("wgpu adapters (--adapter NAME picks one): "),
        "{text}"
    );
    assert!(text.contains("wgpu:0: "), "{text}");
}

/// `pagoda bench ... --json`: the array of per-batch objects.
fn bench_json(args: &[&str]) -> Vec<serde_json::Value> {
    let out = pagoda(
        &[
            &["bench", "--reps", "1", "--warmup", "0", "--json"][..],
            args,
        ]
        .concat(),
    );
    stdout_json(&out).as_array().expect("a JSON array").clone()
}

#[test]
fn bench_reports_one_object_per_batch_size() {
    let docs = bench_json(&["--batch", "1,2", "--prompt-len", "8", "--gen-len", "4"]);
    assert_eq!(docs.len(), 2);
    for (d, b) in docs.iter().zip([1u64, 2]) {
        assert_eq!(d["batch"], b);
        assert_eq!(d["backend"], "cpu");
        assert!(!d["device"].as_str().unwrap().is_empty());
        assert_eq!(d["model_source"], "file");
        assert!(d["model"].as_str().unwrap().ends_with(".gguf"), "{d}");
        assert_eq!(d["weight_dtype"], "q4_1");
        assert_eq!(d["kv_dtype"], "f32");
        assert_eq!(
            (d["prompt_len"].as_u64(), d["gen_len"].as_u64()),
            (Some(8), Some(4))
        );
        assert_eq!(d["prefill_tokens"].as_u64(), Some(8 * b));
        assert_eq!(d["decode_tokens"].as_u64(), Some(4 * b));
        for k in [
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "decode_step_ms_mean",
            "decode_step_ms_p50",
            "decode_step_ms_p99",
            "prefill_s",
            "decode_s",
        ] {
            assert!(d[k].as_f64().unwrap() > 0.0, "{k}: {d}");
        }
        assert!(d["decode_step_ms_p50"].as_f64() <= d["decode_step_ms_p99"].as_f64());
        let peak = d["peak_pool_allocated_bytes"].as_u64().unwrap();
        assert!(
            peak > 0 && peak <= d["pool_reserved_bytes"].as_u64().unwrap(),
            "{d}"
        );
        // Peak device memory: the pool plus the KV the arena committed at most,
        // which is more than the idle null page and at most the reservation.
        let kv_peak = d["kv_peak_committed_bytes"].as_u64().unwrap();
        assert!(
            kv_peak > 0 && kv_peak <= d["kv_reserved_bytes"].as_u64().unwrap(),
            "{d}"
        );
        assert_eq!(
            d["peak_device_bytes"].as_u64().unwrap(),
            d["pool_reserved_bytes"].as_u64().unwrap() + kv_peak
        );
        assert_eq!(d["preemptions"], 0);
        assert!(d["threads"].as_u64().unwrap() >= 1);
        let commit = d["commit"].as_str().unwrap();
        assert!(
            commit == "unknown"
                || (commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit())),
            "{commit}"
        );
        let date = d["date"].as_str().unwrap();
        let shape: String = date
            .chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect();
        assert_eq!(shape, "0000-00-00T00:00:00Z", "{date}");
    }
    // Prefill only.
    let docs = bench_json(&["--batch", "1", "--prompt-len", "4", "--gen-len", "0"]);
    assert!(docs[0]["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(docs[0]["decode_tokens_per_s"].is_null());
    assert_clean_failure(&pagoda(&["bench", "--batch", "1,0"]), "--batch");
}

#[test]
fn bench_human_table_has_a_row_per_batch_size() {
    let out = pagoda(&[
        "bench",
        "--batch",
        "1,3",
        "--prompt-len",
        "4",
        "--gen-len",
        "2",
        "--reps",
        "1",
        "--warmup",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pp tok/s") && text.contains("tg tok/s"),
        "{text}"
    );
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<u32>().is_ok())
        })
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
}

#[test]
fn bench_runs_the_default_models_shape_with_dummy_weights() {
    let docs = bench_json(&[
        "--dummy-weights",
        "smollm2-135m",
        "--batch",
        "2",
        "--prompt-len",
        "4",
        "--gen-len",
        "2",
    ]);
    let d = &docs[0];
    assert_eq!(d["model"], "smollm2-135m");
    assert_eq!(d["model_source"], "dummy");
    assert_eq!(d["weight_dtype"], "q4_1");
    assert_eq!(d["decode_tokens"], 4);
    // Same shape as the real model: same KV page and workspace sizes (the
    // weights differ: the real file keeps its embedding in Q8_0).
    let dummy = stdout_json(&pagoda(&[
        "plan",
        "--dummy-weights",
        "smollm2-135m",
        "--json",
    ]));
    let real = stdout_json(&pagoda(&["plan", "--json"]));
    assert_eq!(dummy["fits"], true);
    for k in ["page_bytes", "workspace_bytes", "ctx"] {
        assert_eq!(dummy[k], real[k], "{k}");
    }
    assert_clean_failure(
        &pagoda(&["plan", "--dummy-weights", "llama-9000"]),
        "unknown dummy model",
    );
    assert_clean_failure(
        &pagoda(&["plan", "--dummy-weights", "tiny", "--dummy-dtype", "q2_k"]),
        "--dummy-dtype",
    );
    // A K-quant on a shape whose rows are not whole super-blocks: the advice names one.
    assert_clean_failure(
        &pagoda(&["plan", "--dummy-weights", "tiny", "--dummy-dtype", "q5_k"]),
        "llama2-7b",
    );
    let both = pagoda(&["plan", "--dummy-weights", "tiny", "--model", "x.gguf"]);
    assert!(
        !both.status.success() && String::from_utf8_lossy(&both.stderr).contains("cannot be used")
    );
}

#[test]
fn llama2_7b_dummy_plans_refuses_early_and_runs_two_tokens() {
    // The plan comes from the shape alone: exact Q4_0 weight bytes, nothing generated.
    let plan = stdout_json(&pagoda(&[
        "plan",
        "--dummy-weights",
        "llama2-7b",
        "--dummy-dtype",
        "q4_0",
        "--ctx",
        "64",
        "--max-seqs",
        "1",
        "--json",
    ]));
    let per_layer: u64 = 4 * 4096 * 4096 + 3 * 4096 * 11008;
    let matrices = 32 * per_layer + 2 * 32000 * 4096;
    assert_eq!(
        plan["weights_bytes"].as_u64(),
        Some(matrices / 32 * 18 + 65 * 4096 * 4)
    );
    // f16 weights (12.6 GiB) over a 4 GiB budget: refused before generating a weight.
    let t = std::time::Instant::now();
    let out = pagoda(&[
        "bench",
        "--dummy-weights",
        "llama2-7b",
        "--dummy-dtype",
        "f16",
        "--memory-budget",
        "4GiB",
        "--batch",
        "1",
        "--prompt-len",
        "2",
        "--gen-len",
        "1",
    ]);
    assert_clean_failure(&out, "refused");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("generating"));
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    // A 7B Q4_0 shape generates, loads and decodes on the CPU.
    let d = &bench_json(&[
        "--dummy-weights",
        "llama2-7b",
        "--dummy-dtype",
        "q4_0",
        "--batch",
        "1",
        "--prompt-len",
        "2",
        "--gen-len",
        "2",
        "--threads",
        "0",
    ])[0];
    assert_eq!(d["model"], "llama2-7b");
    assert_eq!(d["weight_dtype"], "q4_0");
    assert_eq!(d["decode_tokens"], 2);
    assert!(
        d["peak_pool_allocated_bytes"].as_u64().unwrap() > 3 << 30,
        "{d}"
    );
}

/// The plan's weights / activations / KV / graphs next to what the pool
/// requested under each tag, from a `generate --json` document.
fn assert_generate_pool_matches_plan(doc: &serde_json::Value) {
    let m = &doc["memory"];
    let plan = &m["plan"];
    // KV: the arena reservation (outside the pool) plus the page tables (pool blocks, tag kv).
    assert_eq!(
        plan["kv_bytes"].as_u64().unwrap(),
        m["kv_reserved_bytes"].as_u64().unwrap()
            + m["pool_requested_by_tag"]["kv"].as_u64().unwrap(),
        "kv: {m}"
    );
    for (field, tag) in [
        ("weights_bytes", "weights"),
        ("workspace_bytes", "activations"),
        ("graph_bytes", "graph"),
    ] {
        assert_eq!(
            plan[field].as_u64().unwrap(),
            m["pool_requested_by_tag"][tag].as_u64().unwrap(),
            "{field} vs the pool's {tag}: {m}"
        );
    }
    // The pool holds more than it was asked for (block rounding); the headroom covers it.
    let held: u64 = ["weights", "activations", "kv", "graph"]
        .iter()
        .map(|t| m["pool_allocated_by_tag"][t].as_u64().unwrap())
        .sum::<u64>()
        + m["kv_reserved_bytes"].as_u64().unwrap();
    let asked: u64 = [
        "weights_bytes",
        "workspace_bytes",
        "kv_bytes",
        "graph_bytes",
    ]
    .iter()
    .map(|f| plan[f].as_u64().unwrap())
    .sum();
    assert!(held >= asked);
    assert!(
        held - asked <= plan["headroom_bytes"].as_u64().unwrap(),
        "{m}"
    );
}

/// The default `generate` (one prompt, so one sequence and one logits row)
/// allocates exactly what it planned, tag by tag; and `pagoda plan` with the
/// same settings prints the plan `generate` builds.
#[test]
fn cli_defaults_allocate_what_they_plan() {
    let out = pagoda(&["generate", "--prompt", "Hi", "--max-tokens", "2", "--json"]);
    let doc = stdout_json(&out);
    assert_generate_pool_matches_plan(&doc);
    assert_eq!(doc["memory"]["plan"]["max_seqs"], 1);
    // Eight sequences on both sides.
    let out = pagoda(&[
        "generate",
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
        "--max-seqs",
        "8",
        "--json",
    ]);
    let gen_doc = stdout_json(&out);
    assert_generate_pool_matches_plan(&gen_doc);
    let plan_doc = stdout_json(&pagoda(&["plan", "--max-seqs", "8", "--json"]));
    for field in [
        "weights_bytes",
        "workspace_bytes",
        "kv_bytes",
        "graph_bytes",
        "num_pages",
        "ctx",
        "max_seqs",
    ] {
        assert_eq!(
            plan_doc[field], gen_doc["memory"]["plan"][field],
            "`pagoda plan` and `generate` disagree on {field}"
        );
    }
    // A byte budget with no --max-seqs derives the count; still exact.
    let out = pagoda(&[
        "generate",
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
        "--ctx",
        "256",
        "--memory-budget",
        "1GiB",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_generate_pool_matches_plan(&doc);
    assert!(doc["memory"]["plan"]["max_seqs"].as_u64().unwrap() > 1);
}

#[test]
fn a_budget_above_the_machine_is_refused_with_both_numbers() {
    let out = pagoda(&["plan", "--memory-budget", "1000TiB"]);
    assert_clean_failure(&out, "more than");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1000.00 TiB") && err.contains("in total") && err.contains("GiB"),
        "{err}"
    );
}

/// `pagoda ARGS` planning against an injected device memory
/// (`PAGODA_DEVICE_MEMORY=TOTAL,FREE`, the binary's test hook), so the
/// numbers do not depend on this machine's RAM.
fn pagoda_on(device: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(args)
        .env("PAGODA_DEVICE_MEMORY", device)
        .output()
        .expect("pagoda runs")
}

/// Issue 9 item 1: on a machine of 23.5 GiB, `--memory-budget 100GiB` is
/// refused before anything is loaded, naming both numbers; a budget above
/// what is free (but within the total) runs, with a warning naming the
/// budget, what is free and the total.
#[test]
fn a_budget_is_checked_against_the_devices_memory_before_loading() {
    let machine = "23.5GiB,20GiB";
    for args in [
        &["plan", "--memory-budget", "100GiB"][..],
        &[
            "generate",
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
            "--memory-budget",
            "100GiB",
        ],
        &[
            "generate",
            "--dummy-weights",
            "tiny",
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
            "--memory-budget",
            "100GiB",
        ],
    ] {
        let out = pagoda_on(machine, args);
        assert_clean_failure(&out, "more than the host RAM in total");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("100.00 GiB") && err.contains("23.50 GiB"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("pagoda: loaded") && !err.contains("generating dummy weights"),
            "refused after loading: {err}"
        );
    }
    // 2 GiB on a machine of 4 GiB with 1 GiB free: accepted, with a warning.
    let small = "4GiB,1GiB";
    let warned = |out: &Output| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        let w = err
            .lines()
            .find(|l| l.starts_with("pagoda: warning:"))
            .unwrap_or_else(|| panic!("no warning: {err}"))
            .to_string();
        for n in ["2.00 GiB", "1.00 GiB", "4.00 GiB", "free"] {
            assert!(w.contains(n), "warning lacks {n}: {w}");
        }
    };
    let out = pagoda_on(
        small,
        &[
            "generate",
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
            "--memory-budget",
            "2GiB",
        ],
    );
    warned(&out);
    let out = pagoda_on(small, &["plan", "--memory-budget", "2GiB", "--json"]);
    warned(&out);
    let doc = stdout_json(&out);
    assert_eq!(doc["device_total_bytes"], 4u64 << 30);
    assert_eq!(doc["device_free_bytes"], 1u64 << 30);
    assert_eq!(doc["warnings"].as_array().unwrap().len(), 1, "{doc}");
    // The hook's own input is checked.
    assert_clean_failure(&pagoda_on("lots", &["plan"]), "PAGODA_DEVICE_MEMORY");
}

/// The `memory` object of `generate --json` on the injected device.
fn generate_memory(device: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["generate", "--prompt", "Hi", "--json"];
    all.extend_from_slice(args);
    stdout_json(&pagoda_on(device, &all))["memory"].clone()
}

/// Issue 9 item 2: start-up cost does not grow with the budget or with
/// `--parallel`: the KV arena is reserved for the whole plan but memory is
/// committed only as pages are used, so a short run commits the same small
/// amount under an 8 GiB budget as under 1 GiB, and 16 sequences do not
/// commit 16 full contexts.
#[test]
fn start_up_commits_nothing_before_use_whatever_the_budget() {
    let device = "16GiB,16GiB";
    let small = generate_memory(device, &["--max-tokens", "4", "--memory-budget", "1GiB"]);
    let big = generate_memory(device, &["--max-tokens", "4", "--memory-budget", "8GiB"]);
    let n = |m: &serde_json::Value, k: &str| m[k].as_u64().unwrap_or_else(|| panic!("{k}: {m}"));
    assert!(n(&big, "kv_reserved_bytes") > 6 << 30, "{big}");
    assert!(n(&big, "kv_reserved_bytes") > 4 * n(&small, "kv_reserved_bytes"));
    assert_eq!(
        n(&big, "kv_peak_committed_bytes"),
        n(&small, "kv_peak_committed_bytes"),
        "committed memory grew with the budget: {small} vs {big}"
    );
    assert!(n(&big, "kv_peak_committed_bytes") < 128 << 20, "{big}");
    let par = generate_memory(device, &["--max-tokens", "4", "--parallel", "16"]);
    let plan = &par["plan"];
    assert_eq!(plan["max_seqs"], 16);
    let one_context = n(plan, "ctx") / n(plan, "page_size") * n(plan, "page_bytes");
    assert!(n(&par, "kv_reserved_bytes") >= 16 * one_context, "{par}");
    assert!(
        n(&par, "kv_peak_committed_bytes") < one_context,
        "16 short sequences committed more than one full context: {par}"
    );
}

/// The plan `pagoda plan --json` prints, without its `fits` field.
fn plan_json(device: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let mut doc = stdout_json(&pagoda_on(device, &all));
    assert_eq!(doc["fits"], true, "{doc}");
    doc.as_object_mut().unwrap().remove("fits");
    // The file's type census is `plan`'s own addition, not part of the plan.
    assert!(doc["tensor_types"].is_object(), "{doc}");
    doc.as_object_mut().unwrap().remove("tensor_types");
    doc
}

/// Issue 9 items 3 and 4: `plan` describes what `generate` will do. For each
/// set of flags, the JSON plan `plan` prints equals the plan `generate`
/// builds (same defaults, same device memory). The workspace is sized by the
/// step limits, not by the number of requests (`--parallel 300 --max-seqs 64
/// --ctx 32` plans 64 sequences); bad limits are refused by both with the
/// same message, before loading, never overflowing.
#[test]
fn plan_prints_the_plan_generate_builds() {
    let device = "16GiB,16GiB";
    // (flags both take, flags only generate takes)
    let cases: &[(&[&str], &[&str])] = &[
        (&[], &[]),
        (&["--max-seqs", "64", "--ctx", "32"], &["--parallel", "300"]),
        (&["--parallel", "16"], &[]),
        (
            &["--max-seqs", "4", "--max-batched-tokens", "64"],
            &["--parallel", "10"],
        ),
        (
            &["--memory-budget", "1GiB", "--ctx", "256"],
            &["--parallel", "3"],
        ),
        (&["--kv-dtype", "q8_0", "--ctx", "1024"], &[]),
    ];
    for (both, gen_only) in cases {
        let planned = plan_json(device, both);
        let mut args = vec!["--max-tokens", "1"];
        args.extend_from_slice(both);
        args.extend_from_slice(gen_only);
        let built = generate_memory(device, &args)["plan"].clone();
        assert_eq!(planned, built, "plan {both:?} vs generate {args:?}");
    }
    // Generate's defaults are the plan's: one sequence of 4096 tokens.
    let d = plan_json(device, &[]);
    assert_eq!(
        (d["max_seqs"].as_u64(), d["ctx"].as_u64()),
        (Some(1), Some(4096))
    );
    // Item 3's numbers: 64 sequences of 32 tokens, a workspace of 64 rows.
    let d = plan_json(device, &["--max-seqs", "64", "--ctx", "32"]);
    assert_eq!(d["max_logits_rows"], 64);
    assert!(d["workspace_bytes"].as_u64().unwrap() < 64 << 20, "{d}");
    for (flags, needle) in [
        (&["--ctx", "0"][..], "--ctx"),
        (&["--ctx", "1"], "--ctx"),
        (&["--max-seqs", "0"], "--max-seqs"),
        (&["--max-seqs", "18446744073709551615"], "--max-seqs"),
        (&["--max-seqs", "65537"], "--max-seqs"),
        (&["--max-batched-tokens", "0"], "--max-batched-tokens"),
        (&["--parallel", "0"], "--parallel"),
    ] {
        let mut p = vec!["plan"];
        p.extend_from_slice(flags);
        let plan_out = pagoda_on(device, &p);
        assert_clean_failure(&plan_out, needle);
        let mut g = vec!["generate", "--prompt", "Hi", "--max-tokens", "1"];
        g.extend_from_slice(flags);
        let gen_out = pagoda_on(device, &g);
        assert_clean_failure(&gen_out, needle);
        let last = |o: &Output| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(last(&plan_out), last(&gen_out), "{flags:?}");
        assert!(!String::from_utf8_lossy(&gen_out.stderr).contains("pagoda: loaded"));
    }
}

/// Issue 9 item 5: a prompts file with more lines than sequences is queued,
/// not refused: 1000 lines at 16 at a time (the old CLI sized the KV cache
/// for 1000 sequences of 4096 tokens and refused); and the trace shows
/// requests admitted while others are still decoding (continuous batching,
/// not one batch after another).
#[test]
fn prompts_beyond_max_seqs_wait_and_are_admitted_as_others_finish() {
    let f = scratch("prompts-1000.txt");
    let lines: Vec<String> = (0..1000).map(|i| format!("Number {i} is")).collect();
    std::fs::write(&f, lines.join("\n")).unwrap();
    let out = pagoda(&[
        "generate",
        "--prompts",
        f.to_str().unwrap(),
        "--parallel",
        "16",
        "--max-tokens",
        "1",
        "--greedy",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_eq!(doc["num_requests"], 1000);
    assert_eq!(doc["memory"]["plan"]["max_seqs"], 16);
    assert!(
        doc["requests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["generated_tokens"].as_array().unwrap().len() == 1)
    );

    // Prompts of different lengths, prefilled in chunks of 16 tokens, so
    // sequences finish at different steps.
    let f = scratch("prompts-staggered.txt");
    let words = "the sea was calm and the ships sailed out of the harbour at dawn";
    let lines: Vec<String> = (1..=12)
        .map(|i| {
            words
                .split(' ')
                .cycle()
                .take(i * 2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    std::fs::write(&f, lines.join("\n")).unwrap();
    let trace = scratch("staggered-trace.jsonl");
    let out = pagoda(&[
        "generate",
        "--prompts",
        f.to_str().unwrap(),
        "--max-seqs",
        "4",
        "--max-batched-tokens",
        "16",
        "--ctx",
        "256",
        "--max-tokens",
        "6",
        "--greedy",
        "--trace",
        trace.to_str().unwrap(),
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_eq!(doc["num_requests"], 12);
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .collect();
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    assert!(steps.iter().all(|s| n(s, "num_running") <= 4));
    assert_eq!(n(&steps[0], "num_waiting"), 8, "all but 4 wait at first");
    // An admission (the queue shrinks) in a step that also decodes for
    // sequences that were already running.
    let overlapped = steps.windows(2).filter(|w| {
        n(&w[1], "num_waiting") < n(&w[0], "num_waiting")
            && n(&w[0], "num_running") > 0
            && n(&w[1], "num_decode_tokens") > 0
    });
    assert!(
        overlapped.count() >= 2,
        "no admission while others decode: {:?}",
        steps
            .iter()
            .map(|s| (
                n(s, "num_waiting"),
                n(s, "num_running"),
                n(s, "num_decode_tokens")
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(n(steps.last().unwrap(), "num_waiting"), 0);
}

/// The `error:` line of a failed run, checked to name no cause twice (as
/// "No such device (os error 19): No such device (os error 19)" did).
fn error_line_without_repeats(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"))
        .to_string();
    let parts: Vec<&str> = line.split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            p.len() < 4 || !parts[i + 1..].contains(p),
            "`{p}` is repeated in: {line}"
        );
    }
    line
}

#[test]
fn stop_strings_take_backslash_escapes() {
    // Greedy, the list goes on with " cherries\n4. ...": `\n` (as a shell
    // passes "\n") must stop at the first newline.
    let out = pagoda(&[
        "generate",
        "--prompt",
        "1. apples\n2. bananas\n3.",
        "--max-tokens",
        "24",
        "--greedy",
        "--stop",
        "\\n",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_eq!(doc["stop_reason"], "stop", "{doc}");
    let text = doc["text"].as_str().unwrap();
    assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
    assert!(
        (doc["generated_tokens"].as_array().unwrap().len()) < 24,
        "{doc}"
    );
    // An unknown escape or a lone trailing backslash is refused by name.
    assert_clean_failure(
        &pagoda(&["generate", "--prompt", "hi", "--stop", "a\\q"]),
        "unknown escape `\\q`",
    );
    assert_clean_failure(
        &pagoda(&["generate", "--prompt", "hi", "--stop", "a\\"]),
        "lone",
    );
}

/// `generate --json` with `extra` flags: (seed reported in JSON, stderr).
fn generate_seed(extra: &[&str]) -> (serde_json::Value, String) {
    let out = pagoda(
        &[
            &[
                "generate",
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "12",
                "--json",
            ][..],
            extra,
        ]
        .concat(),
    );
    let doc = stdout_json(&out);
    (doc, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn default_seed_is_fresh_each_run_and_reported() {
    let (a, err_a) = generate_seed(&[]);
    let (b, err_b) = generate_seed(&[]);
    let (sa, sb) = (a["seed"].as_u64().unwrap(), b["seed"].as_u64().unwrap());
    assert_ne!(sa, sb, "two default runs had the same seed");
    assert!(err_a.contains(&format!("pagoda: seed {sa}\n")), "{err_a}");
    assert!(err_b.contains(&format!("pagoda: seed {sb}\n")), "{err_b}");
    // The reported seed repeats the run.
    let (again, err) = generate_seed(&["--seed", &sa.to_string()]);
    assert_eq!(again["seed"], sa);
    assert!(err.contains(&format!("pagoda: seed {sa}\n")), "{err}");
    assert_eq!(again["generated_tokens"], a["generated_tokens"]);
    let (seven, _) = generate_seed(&["--seed", "7"]);
    assert_eq!(seven["seed"], 7);
}

/// Runs pagoda with stdout a pipe that is closed after `keep` bytes were
/// read; returns (exit status, stderr).
#[cfg(unix)]
fn with_stdout_closed_after(args: &[&str], keep: usize) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pagoda runs");
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; keep];
    stdout.read_exact(&mut buf).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A closed stdout ends pagoda as it ends `cat` or `yes`: killed by SIGPIPE
/// (the shell's exit status 141), with nothing said about it on stderr.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_the_program_quietly() {
    use std::os::unix::process::ExitStatusExt;
    const SIGPIPE: i32 = 13;
    for (args, keep) in [
        // One document printed at the end (`| head -c 0`).
        (
            vec!["logits", "--prompt", "The capital of France is", "--json"],
            0,
        ),
        // Streamed text (`| head -c 1`).
        (
            vec![
                "generate",
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "64",
                "--greedy",
            ],
            1,
        ),
        (vec!["tokenize", "--prompt", "hi"], 0),
    ] {
        let (status, err) = with_stdout_closed_after(&args, keep);
        assert_eq!(
            status.signal(),
            Some(SIGPIPE),
            "{args:?}: {status:?}, stderr: {err}"
        );
        assert!(
            !err.contains("error") && !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn prompts_json_keeps_each_request_under_requests_only() {
    let doc = generate_prompts_json("two-prompts.txt", "The sea is\nPaper was first made\n", 4);
    for key in ["text", "prompt_tokens", "generated_tokens", "stop_reason"] {
        assert!(doc.get(key).is_none(), "top-level `{key}`: {doc}");
        for r in doc["requests"].as_array().unwrap() {
            assert!(r.get(key).is_some(), "request lacks `{key}`: {r}");
        }
    }
    assert_eq!(doc["num_requests"], 2);
    assert!(doc["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(doc["memory"].is_object());
}

#[test]
fn chat_message_json_has_stop_reason_and_token_counts() {
    let out = pagoda(&[
        "chat",
        "--message",
        "Tell me a long story about a dragon.",
        "--greedy",
        "--max-tokens",
        "5",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert!(doc["reply"].is_string(), "{doc}");
    assert_eq!(doc["stop_reason"], "length", "{doc}");
    assert_eq!(doc["generated_tokens"], 5, "{doc}");
    // The chat template wraps the 8-word message in more tokens than it has.
    assert!(doc["prompt_tokens"].as_u64().unwrap() > 10, "{doc}");
    assert!(doc["seed"].is_u64(), "{doc}");
}

#[test]
fn help_shows_the_sampling_defaults() {
    let d = pagoda::sampler::SamplingParams::default();
    for cmd in ["generate", "chat"] {
        let out = pagoda(&[cmd, "--help"]);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        for (flag, default) in [
            ("--temperature", d.temperature.to_string()),
            ("--top-k", d.top_k.to_string()),
            ("--top-p", d.top_p.to_string()),
            ("--min-p", d.min_p.to_string()),
            ("--repeat-penalty", d.repeat_penalty.to_string()),
        ] {
            // The flag's block runs from its line to the next flag's.
            let at = help
                .find(&format!("{flag} <"))
                .unwrap_or_else(|| panic!("{cmd}: no {flag}"));
            let block = &help[at..];
            let end = block[2..].find("\n  -").map_or(block.len(), |e| e + 2);
            assert!(
                block[..end].contains(&format!("[default: {default}]")),
                "{cmd} {flag}: {}",
                &block[..end]
            );
        }
        assert!(help.contains("fresh one each run"), "{cmd}: seed default");
    }
}

#[test]
fn out_of_range_sampling_values_get_the_range_message() {
    for (flag, value, range) in [
        ("--temperature", "-1", ">= 0"),
        ("--top-p", "-0.5", "in (0, 1]"),
        ("--top-p", "0", "in (0, 1]"),
        ("--min-p", "2", "in [0, 1]"),
        ("--repeat-penalty", "-1", "> 0"),
        ("--temperature", "nan", ">= 0"),
    ] {
        let out = pagoda(&["generate", "--prompt", "hi", flag, value]);
        assert_clean_failure(&out, &format!("must be {range}, got {value}"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("unexpected argument"), "{err}");
        // Refused while parsing the command line, before any model is loaded.
        assert!(!err.contains("pagoda: loaded"), "{err}");
    }
    // In range, a negative-looking flag value is still a value.
    let out = pagoda(&[
        "generate",
        "--prompt",
        "hi",
        "--temperature",
        "0",
        "--max-tokens",
        "1",
        "--json",
    ]);
    stdout_json(&out);
}

#[test]
fn a_directory_or_device_as_model_is_named_as_such() {
    let dir = scratch("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    let out = pagoda(&[
        "tokenize",
        "--prompt",
        "hi",
        "--model",
        dir.to_str().unwrap(),
    ]);
    assert_clean_failure(&out, "is a directory");
    let line = error_line_without_repeats(&out);
    assert!(!line.contains("No such device"), "{line}");
    let out = pagoda(&["tokenize", "--prompt", "hi", "--model", "/dev/null"]);
    assert_clean_failure(&out, "not a regular file");
    let line = error_line_without_repeats(&out);
    assert!(!line.contains("No such device"), "{line}");
}

#[test]
fn a_failed_fetch_prints_its_cause_once() {
    // An empty cache and a proxy that refuses every connection: the default
    // model's fetch fails at once, with nothing downloaded.
    let cache = scratch(&format!("empty-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagoda"));
    cmd.args(["tokenize", "--prompt", "hi"])
        .env(pagoda::fetch::CACHE_ENV, &cache)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        cmd.env(var, "http://127.0.0.1:9");
    }
    let out = cmd.output().expect("pagoda runs");
    let _ = std::fs::remove_dir_all(&cache);
    assert_clean_failure(&out, "failed");
    let line = error_line_without_repeats(&out);
    assert_eq!(line.matches("refused").count(), 1, "{line}");
}

#[test]
fn plan_table_rows_line_up_and_try_lists_only_options() {
    let out = pagoda(&["plan"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("component"))
        .take_while(|l| !l.trim_start().starts_with("KV holds"))
        .collect();
    assert!(rows.len() >= 8, "{text}");
    let width = rows[0].chars().count();
    for r in &rows {
        assert_eq!(r.chars().count(), width, "row {r:?} in\n{text}");
    }
    assert!(rows.iter().any(|r| r.contains("kv cache")), "{text}");

    let out = pagoda(&[
        "plan",
        "--ctx",
        "8192",
        "--max-seqs",
        "64",
        "--memory-budget",
        "1GiB",
    ]);
    assert_clean_failure(&out, "refused");
    let err = String::from_utf8_lossy(&out.stderr);
    let bullets: Vec<&str> = err
        .lines()
        .skip_while(|l| !l.contains("Try:"))
        .skip(1)
        .take_while(|l| l.starts_with("  - "))
        .collect();
    assert!(!bullets.is_empty(), "{err}");
    for b in &bullets {
        assert!(!b.ends_with(':'), "bullet {b:?} is not an option:\n{err}");
    }
    assert!(err.contains("KV tokens fit in"), "{err}");
}

/// `--backend cuda` is compiled in: with a GPU it generates; without one
/// (CI) it is one clear error line naming what is missing.
#[test]
fn cuda_backend_generates_or_says_why_not() {
    let devices = pagoda(&["devices", "--backend", "cuda", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&devices.stdout).expect("devices JSON");
    let has_gpu = !doc["backends"][0]["devices"].as_array().unwrap().is_empty();
    let out = pagoda(&[
        "generate",
        "--prompt",
        "hi",
        "--backend",
        "cuda",
        "--max-tokens",
        "4",
        "--greedy",
        "--json",
    ]);
    if has_gpu {
        let g = stdout_json(&out);
        assert_eq!(g["generated_tokens"].as_array().unwrap().len(), 4, "{g}");
        assert_eq!(doc["backends"][0]["devices"][0]["supports_graphs"], true);
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: the cuda backend has no device: "),
            "{err}"
        );
        assert!(!devices.status.success());
    }
}

#[test]
fn tokenize_spm_vocab_only_file_matches_fixture() {
    let vocab = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference/vocab/llama-spm.gguf");
    let vocab = vocab.to_str().unwrap();
    let fx = fixture("tokenization_spm.json");
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 23, "fixture case count");
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let f = scratch(&format!("spm-{}.txt", case["id"].as_str().unwrap()));
        std::fs::write(&f, text).unwrap();
        let file = f.to_str().unwrap();
        let args = ["tokenize", "--model", vocab, "--no-parse-special"];
        // Metric: exact ids; --no-add-special adds no BOS/EOS.
        let out = pagoda(&[&args[..], &["--no-add-special", "--file", file]].concat());
        assert_eq!(
            ids(&stdout_json(&out)),
            ids(&case["ids"]),
            "case {}",
            case["id"]
        );
        // Without it the vocabulary's add_bos (true for llama SPM) holds:
        // BOS (1) first, then the same ids.
        let out = pagoda(&[&args[..], &["--file", file]].concat());
        let with_bos = ids(&stdout_json(&out));
        assert_eq!(with_bos[0], 1, "case {}: BOS first", case["id"]);
        assert_eq!(with_bos[1..], ids(&case["ids"])[..], "case {}", case["id"]);
    }
}

/// A small model 256 wide with `blk.0.ffn_down.weight` stored as ggml type
/// `ggml_type` (zeros), written by the repository's own GGUF writer to scratch
/// file `name` (one per test: tests run in parallel).
fn model_with_ffn_down_as(name: &str, ggml_type: u32) -> PathBuf {
    use pagoda::gguf::{GgufWriter, ggml_block_layout};
    use pagoda::model::synthetic::{SyntheticSpec, synthetic_gguf_file};
    let spec = SyntheticSpec {
        hidden_dim: 256,
        ffn_dim: 256,
        ..SyntheticSpec::tiny()
    };
    let src = synthetic_gguf_file(&spec).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &src.metadata {
        w.metadata(k.clone(), v.clone());
    }
    for t in &src.tensors {
        if t.name == "blk.0.ffn_down.weight" {
            let (block, block_bytes) = ggml_block_layout(ggml_type).unwrap();
            let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            let n = t.num_elements() / block * block_bytes;
            w.tensor_raw(t.name.clone(), &shape, ggml_type, vec![0u8; n]);
        } else {
            w.tensor(
                t.name.clone(),
                &t.shape,
                t.dtype.unwrap(),
                src.tensor_data(t).to_vec(),
            );
        }
    }
    let p = scratch(name);
    w.write_to(&p).unwrap();
    p
}

#[test]
fn plan_lists_tensor_types_and_refuses_an_unsupported_one_by_name() {
    let p = model_with_ffn_down_as("q2_k-plan.gguf", 10);
    let model = p.to_str().unwrap();
    let out = pagoda(&["plan", "--model", model]);
    // Refused cleanly, naming the tensor and its type.
    assert_clean_failure(&out, "blk.0.ffn_down.weight");
    assert_clean_failure(&out, "Q2_K");
    // The types were read and listed first: 2 layers × 2 norms + output
    // norm = 5 F32; 2 × 7 matrices + embedding + output = 16, one of them
    // Q2_K and 15 Q8_0.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("tensor types: F32 5, Q8_0 15, Q2_K 1"),
        "{stdout}"
    );
    let out = pagoda(&["plan", "--model", model, "--json"]);
    assert!(!out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["fits"], false);
    assert_eq!(doc["tensor_types"]["Q2_K"], 1);
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("blk.0.ffn_down.weight"),
        "{doc}"
    );
    // Loading for generation refuses the same way, without a panic.
    let out = pagoda(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]);
    assert_clean_failure(&out, "blk.0.ffn_down.weight");
    // The default model's census (the reference README: 210 Q4_1, 61 F32,
    // 1 Q8_0) in the JSON plan.
    let doc = stdout_json(&pagoda(&["plan", "--json"]));
    assert_eq!(
        doc["tensor_types"],
        serde_json::json!({"F32": 61, "Q4_1": 210, "Q8_0": 1})
    );
}

#[test]
fn quantize_writes_llama_cpps_q4_k_m_and_refuses_bad_input_cleanly() {
    // The default model (fetched on first use), quantized to Q4_K_M.
    let model = pagoda::fetch::default_model_path().expect("default model");
    let model = model.to_str().unwrap().to_string();
    let out_path = scratch("smol-q4_k_m.gguf");
    let out = pagoda(&[
        "quantize",
        &model,
        out_path.to_str().unwrap(),
        "--type",
        "q4_k_m",
        "--json",
    ]);
    let doc = stdout_json(&out);
    assert_eq!(
        doc["tensor_types"],
        serde_json::json!({"F32": 61, "Q8_0": 15, "Q5_0": 166, "Q6_K": 14, "Q4_K": 16})
    );
    // The Q4_1 input is dequantized and quantized again, and stderr says so.
    assert_eq!(doc["requantized"], 210);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("210 tensors are already quantized"), "{err}");
    // The written file plans with those types and generates.
    let p = stdout_json(&pagoda(&[
        "plan",
        "--json",
        "--model",
        out_path.to_str().unwrap(),
    ]));
    assert_eq!(p["tensor_types"], doc["tensor_types"]);
    let g = pagoda(&[
        "generate",
        "--model",
        out_path.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));

    // An unknown type is named with the known ones.
    let o = out_path.to_str().unwrap();
    let bad = pagoda(&["quantize", &model, o, "--type", "q2_k"]);
    assert_clean_failure(&bad, "Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, Q4_1");
    // The input as output is refused before anything is written.
    assert_clean_failure(
        &pagoda(&["quantize", &model, &model, "--type", "q8_0"]),
        "is the input file",
    );
    // A truncated input is a clear error naming the file, and writes nothing.
    let bytes = std::fs::read(&model).unwrap();
    let cut = scratch("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let never = scratch("never-written.gguf");
    let out = pagoda(&[
        "quantize",
        cut.to_str().unwrap(),
        never.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert_clean_failure(&out, "truncated.gguf");
    assert!(!never.exists());
}
