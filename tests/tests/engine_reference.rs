//! The whole engine (tokenizer, scheduler, model, sampler) against the
//! reference fixtures, on the CPU. The fixture checks' bodies are in
//! `pagoda_tests::reference`, shared with `cuda_reference.rs`.

use pagoda::sampler::SamplingParams;
use pagoda::{EngineConfig, FinishReason, GenerationParams};
use pagoda_tests::reference::{self, greedy};
use pagoda_tests::{cpu_backend, cpu_engine, fixture};

/// Greedy tokens equal llama.cpp's up to the first step whose margin is below 0.3,
/// and the prompt tokenizes to the reference ids.
#[test]
fn greedy_generation_matches_llama_cpp_up_to_low_margin_steps() {
    reference::greedy_matches_llama_cpp(cpu_backend());
}

/// Teacher-forcing the reference continuation: the argmax equals llama.cpp's at
/// every step whose margin is at least 0.3.
#[test]
fn teacher_forced_argmax_matches_llama_cpp_where_the_margin_is_clear() {
    reference::teacher_forced_argmax_matches_llama_cpp(cpu_backend());
}

/// Perplexity of ppl_text.txt at context 512 (llama-perplexity's method) within 2% of 28.01.
#[test]
fn perplexity_of_reference_text_is_within_two_percent() {
    reference::perplexity_within_two_percent(cpu_backend());
}

/// N greedy requests run together give the same tokens as each run alone.
#[test]
fn batch_invariance_of_greedy_requests() {
    reference::batch_invariance(cpu_backend());
}

/// Stop strings end generation and are cut from the text; seeded sampling repeats.
#[test]
fn stop_strings_and_seeded_sampling() {
    let mut engine = cpu_engine(EngineConfig::default());
    let prompt = engine.tokenize("One, two, three, four, five,");
    let free = engine
        .generate(vec![prompt.clone()], greedy(12))
        .unwrap()
        .pop()
        .unwrap();
    assert!(free.text.len() > 4, "{:?}", free.text);
    // Stop at the first comma the model writes.
    let params = GenerationParams {
        stop: vec![",".into()],
        ..greedy(12)
    };
    let c = engine
        .generate(vec![prompt.clone()], params)
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert!(!c.text.contains(','), "{:?}", c.text);
    assert!(free.text.starts_with(&c.text));
    let sampled = GenerationParams {
        max_tokens: 16,
        sampling: SamplingParams {
            seed: 7,
            ..Default::default()
        },
        ..Default::default()
    };
    let a = engine
        .generate(vec![prompt.clone()], sampled.clone())
        .unwrap()
        .pop()
        .unwrap();
    let b = engine
        .generate(vec![prompt], sampled)
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(a.generated_tokens, b.generated_tokens);
}

/// Bad requests are errors, and the engine keeps serving.
#[test]
fn bad_requests_are_errors_not_panics() {
    let mut engine = cpu_engine(EngineConfig {
        ctx: Some(64),
        ..EngineConfig::default()
    });
    assert!(engine.add_request(vec![], greedy(4)).is_err());
    assert!(engine.add_request(vec![1, 2], greedy(0)).is_err());
    assert!(
        engine.add_request(vec![7; 64], greedy(4)).is_err(),
        "prompt as long as the context"
    );
    assert!(
        engine.add_request(vec![49152], greedy(4)).is_err(),
        "token outside the vocabulary"
    );
    let bad = GenerationParams {
        sampling: SamplingParams {
            top_p: 2.0,
            ..Default::default()
        },
        ..greedy(4)
    };
    assert!(engine.add_request(vec![1], bad).is_err());
    let ok = engine
        .generate(vec![engine.tokenize("Hello")], greedy(4))
        .unwrap();
    assert_eq!(ok[0].generated_tokens.len(), 4);
}

/// A per-request stream delivers every token in order and ends with `finished`.
#[test]
fn streaming_channel_delivers_tokens_in_order() {
    let mut engine = cpu_engine(EngineConfig::default());
    let prompt = engine.tokenize("The printing press");
    let (id, rx) = engine
        .add_request_stream(prompt.clone(), greedy(10))
        .unwrap();
    let (id2, rx2) = engine
        .add_request_stream(prompt.clone(), greedy(10))
        .unwrap();
    drop(rx2); // a dropped receiver cancels its request
    while engine.has_unfinished() {
        engine.step().unwrap();
    }
    let events: Vec<_> = rx.try_iter().collect();
    assert!(events.iter().all(|e| e.id == id));
    let tokens: Vec<u32> = events.iter().filter_map(|e| e.token).collect();
    let text: String = events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(events.last().unwrap().finished, Some(FinishReason::Length));
    let c = engine.take_completion(id).unwrap();
    assert_eq!(tokens, c.generated_tokens);
    assert_eq!(text, c.text);
    assert_eq!(
        engine.take_completion(id2).unwrap().finish_reason,
        FinishReason::Aborted
    );
}

/// Prefix caching: a second request sharing a 64-token prefix reuses its pages
/// and produces the same tokens as a run without the cache.
#[test]
fn prefix_cache_reuses_pages_and_keeps_tokens() {
    let text = std::fs::read_to_string(fixture("ppl_text.txt")).unwrap();
    let mut with = cpu_engine(EngineConfig::default());
    let base = with.tokenize(&text)[..64].to_vec();
    let mut a = base.clone();
    a.extend(with.tokenize(" The first"));
    let mut b = base.clone();
    b.extend(with.tokenize(" In the end"));
    let first = with.generate(vec![a.clone()], greedy(8)).unwrap();
    let hits_before = with.scheduler().stats().num_prefix_cache_hit_tokens;
    let second = with.generate(vec![b.clone()], greedy(8)).unwrap();
    let hits = with.scheduler().stats().num_prefix_cache_hit_tokens - hits_before;
    assert_eq!(
        hits, 64,
        "the 64-token prefix (4 pages) is served from the cache"
    );
    let mut without = cpu_engine(EngineConfig {
        enable_prefix_caching: false,
        ..EngineConfig::default()
    });
    let plain = without.generate(vec![a, b], greedy(8)).unwrap();
    assert_eq!(first[0].generated_tokens, plain[0].generated_tokens);
    assert_eq!(second[0].generated_tokens, plain[1].generated_tokens);
    assert_eq!(without.scheduler().stats().num_prefix_cache_hit_tokens, 0);
}

/// Too few KV pages: the scheduler preempts (recompute) instead of failing,
/// and every request's output equals the request run alone.
#[test]
fn preemption_with_too_few_pages_keeps_outputs() {
    reference::preemption_keeps_outputs(cpu_backend());
}

/// Too few KV pages with swap space: long preempted sequences are swapped to
/// host memory and back (their K/V copied, not recomputed), and every
/// request's greedy output equals the request run alone with a roomy cache.
#[test]
fn swapped_and_resumed_requests_match_uninterrupted_runs() {
    reference::swapped_requests_match_uninterrupted_runs(cpu_backend());
}

/// Cancellation frees every page of the request at once; the other request
/// goes on unchanged.
#[test]
fn abort_frees_all_pages_at_once() {
    reference::abort_frees_all_pages(cpu_backend());
}
