//! A bounded load test of `pagoda serve` on loopback (issue 14, item 5):
//! 64 concurrent streaming clients send 400 requests of up to 64 tokens, a
//! tenth of them disconnecting after a few chunks, within 5 minutes. Every
//! request must be answered in full or cleanly refused (a 429 in OpenAI's
//! shape; the client sends it again after a pause, so all 400 are answered), and afterwards no request, KV page or pool byte may be left held.
//! The tiny dummy model keeps it fast on 2 cores (the server, the HTTP path
//! and the scheduler are what is under test, not the model's speed). Prints
//! throughput and latency percentiles (`notes/benchmarks.md`).

mod support;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Server, eventually};

const CLIENTS: usize = 64;
const REQUESTS: usize = 400;
const MAX_TOKENS: usize = 64;
/// A refused client's pause before it sends the request again.
const REFUSED_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Tally {
    answered: usize,
    refused: usize,
    disconnected: usize,
    tokens: usize,
    /// Seconds: send to first token, send to the end.
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    failures: Vec<String>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn one_request(c: &support::Client, i: usize, tally: &Mutex<Tally>) {
    // Lengths 1..=64 spread over the requests; every tenth disconnects early.
    let max_tokens = 1 + (i * 37) % MAX_TOKENS;
    let disconnect = i % 10 == 9;
    let body = json!({
        "prompt": format!("request {i}: a story about the number {}", i % 7),
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0.8,
        "seed": i,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let t0 = Instant::now();
    // A refused request is sent again after a pause, as clients do on a 429.
    let mut sse = loop {
        let (status, mut sse) = c.post_sse("/v1/completions", &body);
        if status != 429 {
            if status != 200 {
                tally
                    .lock()
                    .unwrap()
                    .failures
                    .push(format!("request {i}: status {status}"));
                return;
            }
            break sse;
        }
        // Not SSE: the OpenAI error body, read through the same reader.
        let text = sse.text();
        let mut t = tally.lock().unwrap();
        if !text.contains("queue_full") {
            t.failures.push(format!("request {i}: 429 body {text}"));
        }
        t.refused += 1;
        drop(t);
        std::thread::sleep(REFUSED_BACKOFF);
    };
    let mut first_token = None;
    let mut chunks = 0;
    let mut usage = None;
    let mut done = false;
    while let Some(d) = sse.next_data() {
        if d == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        if v.get("error").is_some() {
            tally
                .lock()
                .unwrap()
                .failures
                .push(format!("request {i}: {v}"));
            return;
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        if v["choices"][0]["text"].is_string() {
            chunks += 1;
            first_token.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        }
        if disconnect && chunks == 1 {
            drop(sse);
            tally.lock().unwrap().disconnected += 1;
            return;
        }
    }
    let mut t = tally.lock().unwrap();
    let completion = usage.as_ref().and_then(|u| u["completion_tokens"].as_u64());
    if !done || completion != Some(max_tokens as u64) {
        t.failures.push(format!(
            "request {i}: done {done}, usage {usage:?}, wanted {max_tokens}"
        ));
        return;
    }
    t.answered += 1;
    t.tokens += max_tokens;
    t.ttft.extend(first_token);
    t.e2e.push(t0.elapsed().as_secs_f64());
}

#[test]
fn sixty_four_streaming_clients_400_requests() {
    // 16 sequences at once and 40 waiting: 56 places for 64 clients, so some
    // requests are refused with a 429 while the queue is full.
    // PAGODA_SERVE_LOAD_MODEL=default runs it on the default model instead
    // (for the figures in notes/benchmarks.md; too slow for CI on 2 cores).
    let model: &[&str] = match std::env::var("PAGODA_SERVE_LOAD_MODEL").as_deref() {
        Ok("default") => &[],
        _ => &["--dummy-weights", "tiny"],
    };
    let s = Server::start(&[model, &["--max-seqs", "16", "--max-queue", "40"]].concat());
    let before = s.metrics();
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (c, next, tally) = (s.client(), next.clone(), tally.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= REQUESTS {
                        return;
                    }
                    // A connection of its own per request, as separate clients have.
                    one_request(&c.fresh(), i, &tally);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let mut t = Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();
    assert!(t.failures.is_empty(), "{:#?}", t.failures);
    assert_eq!(t.answered + t.disconnected, REQUESTS);
    assert_eq!(t.disconnected, REQUESTS / 10);
    assert!(elapsed < 300.0, "{elapsed:.1} s");

    // Everything given back: no request held, no KV page used, the pool as before.
    assert!(eventually(Duration::from_secs(5), || {
        let m = s.metrics();
        m.value("pagoda_server_requests_held", &[]) == 0.0
            && m.value("pagoda_requests_running", &[]) == 0.0
            && m.value("pagoda_requests_waiting", &[]) == 0.0
            && m.value("pagoda_kv_pages_used", &[]) == 0.0
    }));
    let after = s.metrics();
    for name in ["pagoda_pool_allocated_bytes", "pagoda_kv_tokens_used"] {
        assert_eq!(after.value(name, &[]), before.value(name, &[]), "{name}");
    }
    for tag in ["weights", "activations", "kv"] {
        let l = [("tag", tag)];
        assert_eq!(
            after.value("pagoda_pool_allocated_bytes_by_tag", &l),
            before.value("pagoda_pool_allocated_bytes_by_tag", &l),
            "{tag}"
        );
    }
    let submitted = after.value("pagoda_requests_total", &[("outcome", "submitted")]);
    assert_eq!(submitted as usize, t.answered + t.disconnected);
    assert_eq!(
        after.value("pagoda_server_rejected_queue_full_total", &[]) as usize,
        t.refused
    );

    let tps = t.tokens as f64 / elapsed;
    let ms = |v: f64| v * 1000.0;
    let (tt50, tt90, tt99) = (
        percentile(&mut t.ttft, 50.0),
        percentile(&mut t.ttft, 90.0),
        percentile(&mut t.ttft, 99.0),
    );
    let (e50, e90, e99) = (
        percentile(&mut t.e2e, 50.0),
        percentile(&mut t.e2e, 90.0),
        percentile(&mut t.e2e, 99.0),
    );
    eprintln!(
        "serve load: {REQUESTS} requests from {CLIENTS} clients in {elapsed:.2} s: {} answered, {} disconnected, {} refusals (429, retried); {} tokens, {tps:.0} tokens/s; TTFT p50 {:.1} / p90 {:.1} / p99 {:.1} ms; end-to-end p50 {:.1} / p90 {:.1} / p99 {:.1} ms",
        t.answered,
        t.disconnected,
        t.refused,
        t.tokens,
        ms(tt50),
        ms(tt90),
        ms(tt99),
        ms(e50),
        ms(e90),
        ms(e99)
    );
}
