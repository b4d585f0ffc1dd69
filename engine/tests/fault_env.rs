//! `PAGODA_FAULT_ALLOC=k` reaches the engine built by the `pagoda` binary:
//! the k-th allocation fails, with one clear message and a non-zero exit.

use std::path::PathBuf;
use std::process::{Command, Output};

use pagoda::model::synthetic::{SyntheticSpec, write_synthetic_gguf};
use pagoda_backend::fault::FAULT_ENV;

fn tiny_model() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-env");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("tiny-{}.gguf", std::process::id()));
    write_synthetic_gguf(&SyntheticSpec::tiny(), &path).unwrap();
    path
}

/// `pagoda generate` on `model`, with `PAGODA_FAULT_ALLOC` set to `fault`
/// or removed.
fn generate(model: &PathBuf, fault: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pagoda"));
    cmd.args(["generate", "--model"]).arg(model).args([
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
        "--greedy",
        "--threads",
        "1",
        "--json",
    ]);
    match fault {
        Some(k) => cmd.env(FAULT_ENV, k),
        None => cmd.env_remove(FAULT_ENV),
    };
    cmd.output().expect("pagoda runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn pagoda_fault_alloc_fails_the_kth_allocation_cleanly() {
    let model = tiny_model();

    let ok = generate(&model, None);
    assert!(ok.status.success(), "without faults: {}", stderr(&ok));
    let doc: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("one JSON document");
    assert!(doc["generated_tokens"].is_array());

    // Sites past the last one, and values that are not a site, change nothing.
    for v in ["1000000", "0", "not-a-number"] {
        let out = generate(&model, Some(v));
        assert!(out.status.success(), "{FAULT_ENV}={v}: {}", stderr(&out));
    }

    // Every build-time site fails the build; the first site after it is the
    // request's first KV page, which fails the request.
    let mut k = 1u64;
    loop {
        let out = generate(&model, Some(&k.to_string()));
        let err = stderr(&out);
        assert!(!out.status.success(), "{FAULT_ENV}={k} succeeded: {err}");
        assert!(!err.contains("panicked"), "{FAULT_ENV}={k}: {err}");
        assert!(
            err.contains("error: "),
            "{FAULT_ENV}={k}: no error line: {err}"
        );
        assert!(
            err.contains(&format!("injected fault at allocation site #{k} (")),
            "{FAULT_ENV}={k}: {err}"
        );
        assert!(out.stdout.is_empty(), "{FAULT_ENV}={k}: no JSON on failure");
        if err.contains("kv page") {
            assert!(
                err.contains("request 0 failed"),
                "{FAULT_ENV}={k}: a run-time fault fails the request: {err}"
            );
            break;
        }
        k += 1;
        assert!(k < 500, "no KV-page site reached");
    }
    assert!(k > 1, "the build allocates before the first KV page");
    eprintln!(
        "{} build-time sites failed the build; site {k} failed the request",
        k - 1
    );
}
