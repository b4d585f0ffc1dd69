//! `pagoda compare --backends cpu,wgpu --json` on the CI's Vulkan driver (Mesa lavapipe):
//! one JSON document, and the wgpu backend within stated bounds of the CPU.

use std::process::Command;

#[test]
fn compare_cpu_and_wgpu_json_within_bounds() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("compare-test");
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "The capital of France is\n\ndef add(a, b):\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args([
            "compare",
            "--backends",
            "cpu,wgpu",
            "--max-tokens",
            "4",
            "--json",
            "--prompts",
        ])
        .arg(&prompts)
        .output()
        .expect("pagoda runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["prompts"], 2, "the blank line is skipped");
    assert_eq!(doc["reference"], "cpu");
    let backends = doc["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    let cpu = &backends[0];
    assert_eq!(cpu["backend"], "cpu");
    assert_eq!(cpu["max_kl"], 0.0, "the CPU against itself");
    let w = &backends[1];
    assert_eq!(w["backend"], "wgpu");
    assert_eq!(w["steps"], 8);
    // Bounds: KL(CPU ‖ wgpu) per step below 1e-6 (f32 arithmetic in another order), every
    // greedy token the same, logits within 1e-2.
    let f = |k: &str| w[k].as_f64().unwrap_or_else(|| panic!("{k}: {w}"));
    assert!(f("max_kl") < 1e-6, "{w}");
    assert_eq!(f("greedy_agreement"), 1.0, "{w}");
    assert!(f("max_abs_logit_diff") < 1e-2, "{w}");
    assert!(f("prefill_tokens_per_s") > 0.0 && f("decode_tokens_per_s") > 0.0);
    assert!(f("peak_memory_bytes") > 0.0);
    assert!(w["device"].as_str().unwrap().contains("features"), "{w}");
}

#[test]
fn compare_refuses_bad_input_cleanly() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pagoda"))
            .args(args)
            .output()
            .expect("pagoda runs")
    };
    let out = run(&["compare", "--backends", "cpu,nope"]);
    assert!(!out.status.success());
    let out = run(&["compare", "--max-tokens", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--max-tokens"),
        "{err}"
    );
    let out = run(&["compare", "--prompts", "/nonexistent/prompts.txt"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("/nonexistent/prompts.txt")
            && !err.contains("panicked"),
        "{err}"
    );
}
