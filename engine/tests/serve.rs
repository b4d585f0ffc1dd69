//! `pagoda serve` end to end (issue 14): the OpenAI routes against the real
//! default model (text compared with `pagoda generate`), the error shapes
//! and codes, `/metrics` through a Prometheus parser, the telemetry stream
//! replayed, cancellation on disconnect, the API key and graceful shutdown.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use pagoda::telemetry::TelemetryEvent;
use pagoda::telemetry::trace::Trace;
use serde_json::{Value, json};
use support::{Server, eventually};

/// What `pagoda generate --greedy --json` makes of a prompt.
fn generate_greedy(prompt: &str, max_tokens: usize) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(["generate", "--greedy", "--json", "--prompt", prompt])
        .args(["--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn default_model() -> Server {
    Server::start(&["--max-seqs", "4"])
}

fn model_name(s: &Server) -> String {
    let (status, body) = s.client().get("/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    v["data"][0]["id"].as_str().unwrap().to_string()
}

#[test]
fn completions_match_generate_streamed_or_not() {
    let s = default_model();
    let model = model_name(&s);
    let c = s.client();
    let prompt = "The capital of France is";
    let reference = generate_greedy(prompt, 24);
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], reference["text"], "{v}");
    let generated = reference["generated_tokens"].as_array().unwrap().len();
    let prompt_tokens = reference["prompt_tokens"].as_array().unwrap().len();
    assert_eq!(v["usage"]["completion_tokens"], generated);
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["total_tokens"], generated + prompt_tokens);
    let reason = if reference["stop_reason"] == "length" {
        "length"
    } else {
        "stop"
    };
    assert_eq!(v["choices"][0]["finish_reason"], reason);

    // Streamed: the same text in pieces, usage last, then [DONE].
    let (status, mut sse) = c.post_sse(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    assert_eq!(status, 200);
    let events = sse.rest();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, reference["text"].as_str().unwrap());
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], generated);
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null())
    );
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        reason
    );
}

#[test]
fn chat_completions_stream_equals_whole_and_seeds_repeat() {
    let s = default_model();
    let c = s.client();
    let msgs = json!([{"role": "system", "content": "You are brief."},
                      {"role": "user", "content": "Name a colour."}]);
    let body = json!({"messages": msgs, "max_completion_tokens": 20, "seed": 7, "temperature": 0.9, "n": 2});
    let (status, whole) = c.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i);
        assert_eq!(ch["message"]["role"], "assistant");
        assert!(!ch["message"]["content"].as_str().unwrap().is_empty());
    }
    // The same seed gives the same answers.
    let (_, again) = c.post("/v1/chat/completions", &body);
    assert_eq!(again["choices"], whole["choices"]);

    // Streamed with the same seed: the same text per choice.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (status, mut sse) = c.post_sse("/v1/chat/completions", &sbody);
    assert_eq!(status, 200);
    let events = sse.rest();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = [String::new(), String::new()];
    let mut finish = [Value::Null, Value::Null];
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        let ch = &v["choices"][0];
        let i = ch["index"].as_u64().unwrap() as usize;
        if let Some(t) = ch["delta"]["content"].as_str() {
            text[i].push_str(t);
        }
        if !ch["finish_reason"].is_null() {
            finish[i] = ch["finish_reason"].clone();
        }
    }
    for i in 0..2 {
        assert_eq!(text[i], choices[i]["message"]["content"].as_str().unwrap());
        assert_eq!(finish[i], choices[i]["finish_reason"]);
    }
    assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() <= 40);
}

#[test]
fn stop_strings_and_logprobs() {
    let s = default_model();
    let c = s.client();
    let prompt = "1, 2, 3, 4, 5,";
    let (status, v) = c.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 30, "temperature": 0, "logprobs": 5}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), lp["token_logprobs"].as_array().unwrap().len());
    assert_eq!(
        tokens
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        text
    );
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 5);
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        // Greedy: the chosen token is the most likely one.
        assert!((chosen - best).abs() < 1e-5, "{chosen} vs {best}");
        assert!(chosen <= 0.0);
        let mass: f64 = top.values().map(|x| x.as_f64().unwrap().exp()).sum();
        assert!(mass <= 1.0 + 1e-4, "{mass}");
    }

    // A stop string found in that text cuts it there.
    let stop = text.trim_start().chars().take(2).collect::<String>();
    let (_, v) = c.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 30, "temperature": 0, "stop": [stop.clone()]}),
    );
    let cut = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Chat logprobs with 20 alternatives, descending.
    let (status, v) = c.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "logprobs": true, "top_logprobs": 20}),
    );
    assert_eq!(status, 200, "{v}");
    for e in v["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        let top: Vec<f64> = e["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect();
        assert_eq!(top.len(), 20);
        assert!(top.windows(2).all(|w| w[0] >= w[1]));
    }
}

fn assert_error(status: u16, v: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.as_object().unwrap().contains_key("code"), "{v}");
    match param {
        Some(p) => assert_eq!(e["param"], p, "{v}"),
        None => assert!(e.as_object().unwrap().contains_key("param"), "{v}"),
    }
}

#[test]
fn errors_are_openai_shaped_with_the_right_codes() {
    let s = Server::start(&[
        "--dummy-weights",
        "tiny",
        "--ctx",
        "64",
        "--max-body",
        "2KiB",
    ]);
    // Loopback unless --host says otherwise.
    assert!(s.addr.starts_with("127.0.0.1:"), "{}", s.addr);
    let c = s.client();
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": "hi"}]);

    let (st, body) = c.post_raw(chat, b"{not json");
    assert_error(st, &serde_json::from_str(&body).unwrap(), 400, None);
    let (st, v) = c.post(chat, &json!({"messages": user, "temperature": "warm"}));
    assert_error(st, &v, 400, Some("temperature"));
    let (st, v) = c.post(chat, &json!({"messages": "hi"}));
    assert_error(st, &v, 400, Some("messages"));
    let (st, v) = c.post(chat, &json!({"messages": []}));
    assert_error(st, &v, 400, Some("messages"));
    let (st, v) = c.post(
        chat,
        &json!({"messages": user, "tools": [{"type": "function"}]}),
    );
    assert_error(st, &v, 400, Some("tools"));
    let (st, v) = c.post(chat, &json!({"messages": user, "model": "gpt-4o"}));
    assert_error(st, &v, 404, Some("model"));

    // Longer than the context of 64 tokens.
    let long = "a b c d e f g h ".repeat(20);
    let (st, v) = c.post("/v1/completions", &json!({"prompt": long}));
    assert_error(st, &v, 400, Some("prompt"));
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // max_tokens beyond what the context leaves.
    let (st, v) = c.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 64}),
    );
    assert_error(st, &v, 400, Some("max_tokens"));
    let (st, v) = c.post(
        chat,
        &json!({"messages": user, "max_completion_tokens": 500}),
    );
    assert_error(st, &v, 400, Some("max_completion_tokens"));

    // Above the body limit of 2 KiB.
    let big = json!({"prompt": "x".repeat(4096)}).to_string();
    let (st, body) = c.post_raw("/v1/completions", big.as_bytes());
    assert_error(st, &serde_json::from_str(&body).unwrap(), 413, None);

    let (st, body) = c.get("/v1/nothing");
    assert_error(st, &serde_json::from_str(&body).unwrap(), 404, None);

    // Nothing refused above is held, and the server still serves.
    let (st, v) = c.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 3}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.metrics().value("pagoda_server_requests_held", &[]), 0.0);
}

#[test]
fn a_full_queue_is_a_429() {
    // One sequence at once plus one waiting: two engine requests held at most.
    let s = Server::start(&["--max-seqs", "1", "--max-queue", "1"]);
    let c = s.client();
    let long = long_stream();
    // Two long streams (~20 s each) hold both places until they end or are dropped.
    let (st1, mut a) = c.post_sse("/v1/completions", &long);
    let (st2, mut b) = c.post_sse("/v1/completions", &long);
    assert_eq!((st1, st2), (200, 200));
    assert!(a.next_data().is_some());
    assert_eq!(s.metrics().value("pagoda_server_requests_held", &[]), 2.0);
    let (st, v) = c.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_error(st, &v, 429, None);
    assert_eq!(v["error"]["code"], "queue_full");
    // n = 2 asks for two places at once.
    drop(a);
    assert!(eventually(Duration::from_secs(10), || {
        s.metrics().value("pagoda_server_requests_held", &[]) == 1.0
    }));
    let (st, v) = c.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 2, "n": 2}),
    );
    assert_error(st, &v, 429, None);
    // The waiting stream got the sequence; once it is gone too, requests pass.
    assert!(b.next_data().is_some());
    drop(b);
    let (st, v) = c.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        s.metrics()
            .value("pagoda_server_rejected_queue_full_total", &[]),
        2.0
    );
}

#[test]
fn the_api_key_guards_every_route() {
    let s = Server::start(&["--dummy-weights", "tiny", "--api-key", "sesame"]);
    let good = s.client();
    for path in ["/v1/models", "/metrics", "/v1/telemetry"] {
        for bad in [None, Some("open")] {
            let (st, body) = good.with_key(bad).get(path);
            assert_error(st, &serde_json::from_str(&body).unwrap(), 401, None);
        }
    }
    let (st, v) = good.with_key(Some("wrong")).post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "x"}]}),
    );
    assert_error(st, &v, 401, None);
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_eq!(good.get("/v1/models").0, 200);
    assert_eq!(good.get("/metrics").0, 200);
    let (st, v) = good.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(st, 200, "{v}");
}

#[test]
fn metrics_parse_as_prometheus_text() {
    let s = Server::start(&["--dummy-weights", "tiny", "--max-seqs", "2"]);
    let c = s.client();
    let (st, _) = c.post(
        "/v1/completions",
        &json!({"prompt": "hello there", "max_tokens": 8, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    let m = s.metrics();
    assert!(m.value("pagoda_kv_pages_total", &[]) > 0.0);
    assert_eq!(m.value("pagoda_kv_pages_used", &[]), 0.0);
    assert!(m.value("pagoda_kv_tokens_capacity", &[]) >= m.value("pagoda_kv_pages_total", &[]));
    for name in [
        "pagoda_kv_tokens_used",
        "pagoda_kv_token_usage_ratio",
        "pagoda_prefix_cache_hit_rate",
        "pagoda_pool_reserved_bytes",
        "pagoda_pool_allocated_bytes",
        "pagoda_device_memory_total_bytes",
        "pagoda_device_memory_free_bytes",
        "pagoda_kv_reserved_bytes",
        "pagoda_kv_committed_bytes",
        "pagoda_graph_memory_bytes",
        "pagoda_requests_running",
        "pagoda_requests_waiting",
        "pagoda_requests_swapped",
        "pagoda_preemptions_total",
        "pagoda_generation_tokens_per_second",
    ] {
        assert!(m.value(name, &[]).is_finite(), "{name}");
    }
    assert!(m.value("pagoda_pool_allocated_bytes_by_tag", &[("tag", "weights")]) > 0.0);
    assert!(
        m.value(
            "pagoda_pool_allocated_bytes_by_tag",
            &[("tag", "activations")]
        ) > 0.0
    );
    for class in ["small", "large", "all"] {
        let f = m.value("pagoda_pool_fragmentation", &[("class", class)]);
        assert!((0.0..=1.0).contains(&f), "{class}: {f}");
    }
    let small = m.value("pagoda_pool_reserved_bytes_by_class", &[("class", "small")]);
    let large = m.value("pagoda_pool_reserved_bytes_by_class", &[("class", "large")]);
    assert_eq!(small + large, m.value("pagoda_pool_reserved_bytes", &[]));
    assert_eq!(m.value("pagoda_generation_tokens_total", &[]), 8.0);
    assert_eq!(
        m.value("pagoda_requests_total", &[("outcome", "completed")]),
        1.0
    );
    assert_eq!(m.histogram_count("pagoda_time_to_first_token_seconds"), 1);
    assert_eq!(m.histogram_count("pagoda_inter_token_latency_seconds"), 7);
    // A second scrape a little later: a token rate from the scrapes' difference.
    let (st, _) = c.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 8, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    assert!(
        s.metrics()
            .value("pagoda_generation_tokens_per_second", &[])
            > 0.0
    );
}

#[test]
fn the_telemetry_stream_replays_like_a_trace() {
    let s = Server::start(&["--dummy-weights", "tiny", "--max-seqs", "2"]);
    let c = s.client();
    let (st, mut sse) = c.get_sse("/v1/telemetry");
    assert_eq!(st, 200);
    // An idle engine: the keyframe of its memory comes at once, before any step.
    let first: TelemetryEvent = serde_json::from_str(&sse.next_data().unwrap()).unwrap();
    let TelemetryEvent::Keyframe(key) = &first else {
        panic!("the first event is not a keyframe: {first:?}");
    };
    assert_eq!(key.step_id, 0);
    assert!(key.memory.totals.pool.allocated_bytes > 0);
    let mut trace = Trace::default();
    trace.push(first).unwrap();
    let (st, _) = c.post(
        "/v1/completions",
        &json!({"prompt": "one two", "max_tokens": 12, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    let mut steps = 0;
    while steps < 12 {
        let line = sse.next_data().expect("telemetry events");
        let ev: TelemetryEvent = serde_json::from_str(&line).expect("trace schema");
        if matches!(ev, TelemetryEvent::Step(_)) {
            steps += 1;
        }
        trace.push(ev).unwrap();
    }
    let states = trace.replay().expect("keyframe then deltas that follow");
    assert!(states.len() >= 11, "{}", states.len());
    assert!(
        trace
            .events()
            .iter()
            .any(|e| matches!(e, TelemetryEvent::Delta(_)))
    );
}

/// A long generation (ignore_eos, 1500 tokens: ~20 s on 2 cores).
fn long_stream() -> Value {
    json!({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true, "stream": true})
}

#[test]
fn a_client_that_disconnects_has_its_request_cancelled_and_pages_freed() {
    let s = default_model();
    let c = s.client();
    let before = s.metrics();
    assert_eq!(before.value("pagoda_kv_pages_used", &[]), 0.0);
    let (st, mut sse) = c.post_sse("/v1/completions", &long_stream());
    assert_eq!(st, 200);
    for _ in 0..5 {
        sse.next_data().expect("chunks");
    }
    let during = s.metrics();
    assert_eq!(during.value("pagoda_requests_running", &[]), 1.0);
    assert!(during.value("pagoda_kv_pages_used", &[]) > 0.0);
    let t = Instant::now();
    drop(sse);
    assert!(
        eventually(Duration::from_secs(5), || {
            let m = s.metrics();
            m.value("pagoda_kv_pages_used", &[]) == 0.0
                && m.value("pagoda_requests_running", &[]) == 0.0
        }),
        "the request was not cancelled"
    );
    let m = s.metrics();
    assert_eq!(
        m.value("pagoda_requests_total", &[("outcome", "aborted")]),
        1.0
    );
    assert!(m.value("pagoda_generation_tokens_total", &[]) < 1000.0);
    assert_eq!(m.value("pagoda_server_requests_held", &[]), 0.0);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn sigterm_lets_streams_finish_and_refuses_new_connections() {
    let mut s = Server::start(&["--max-seqs", "2", "--shutdown-timeout", "30"]);
    let c = s.client();
    // ~200 tokens: a few seconds at the default model's speed on 2 cores.
    let (st, mut sse) = c.post_sse(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(st, 200);
    sse.next_data().expect("a first chunk");
    s.signal("TERM");
    // The listener closes while the stream goes on.
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            &s.addr
        )
        .is_err()),
        "still accepting connections after SIGTERM"
    );
    let rest = sse.rest();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    let finish: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let status = s.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
}

#[test]
fn after_the_shutdown_timeout_streams_are_cancelled() {
    let mut s = Server::start(&["--max-seqs", "2", "--shutdown-timeout", "0.5"]);
    let c = s.client();
    let (st, mut sse) = c.post_sse("/v1/completions", &long_stream());
    assert_eq!(st, 200);
    sse.next_data().expect("a first chunk");
    let t = Instant::now();
    s.signal("INT");
    let rest = sse.rest();
    let last: Value = serde_json::from_str(rest.last().expect("an error event")).unwrap();
    assert_eq!(last["error"]["code"], "server_shutdown", "{last}");
    assert!(!rest.iter().any(|e| e == "[DONE]"));
    let status = s.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}

#[test]
fn bad_flags_and_a_taken_port_are_clear_errors() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for (args, needle) in [
        (vec!["--max-body", "lots"], "cannot parse --max-body"),
        (
            vec!["--shutdown-timeout", "-1"],
            "--shutdown-timeout must be",
        ),
        (vec!["--api-key", ""], "--api-key cannot be empty"),
        (vec!["--port", port.as_str()], "cannot listen on 127.0.0.1:"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pagoda"))
            .args(["serve", "--dummy-weights", "tiny"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
