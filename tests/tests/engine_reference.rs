//! The whole engine (tokenizer, scheduler, model, sampler) against the reference fixtures.

use pagoda::perplexity::perplexity_config;
use pagoda::sampler::SamplingParams;
use pagoda::{EngineConfig, FinishReason, GenerationParams};
use pagoda_tests::{cpu_engine, fixture, ids, load_fixture};

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    }
}

/// Greedy tokens equal llama.cpp's up to the first step whose margin is below 0.3,
/// and the prompt tokenizes to the reference ids.
#[test]
fn greedy_generation_matches_llama_cpp_up_to_low_margin_steps() {
    let fx = load_fixture("greedy.json");
    let mut engine = cpu_engine(EngineConfig::default());
    for case in fx["cases"].as_array().unwrap() {
        let prompt = case["prompt_text"].as_str().unwrap();
        let want_prompt = ids(&case["prompt_tokens"]);
        assert_eq!(engine.tokenize(prompt), want_prompt, "case {}", case["id"]);
        let want = ids(&case["generated_tokens"]);
        let margins: Vec<f64> = case["top1_minus_top2_logit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let c = engine
            .generate(vec![want_prompt], greedy(32))
            .unwrap()
            .pop()
            .unwrap();
        let checked = margins.iter().position(|&m| m < 0.3).unwrap_or(want.len());
        assert_eq!(
            &c.generated_tokens[..checked.min(c.generated_tokens.len())],
            &want[..checked.min(want.len())],
            "case {}",
            case["id"]
        );
        if checked == want.len() {
            assert_eq!(
                c.generated_tokens, want,
                "case {}: whole sequence",
                case["id"]
            );
            let reason = if case["stop_reason"] == "eog" {
                FinishReason::Eog
            } else {
                FinishReason::Length
            };
            assert_eq!(c.finish_reason, reason, "case {}", case["id"]);
        }
    }
}

/// Teacher-forcing the reference continuation: the argmax equals llama.cpp's at
/// every step whose margin is at least 0.3.
#[test]
fn teacher_forced_argmax_matches_llama_cpp_where_the_margin_is_clear() {
    let fx = load_fixture("greedy.json");
    let mut cfg = EngineConfig::default();
    cfg.max_logits_rows = cfg.max_num_batched_tokens;
    let mut engine = cpu_engine(cfg);
    let vocab = engine.model_config().vocab_size;
    let mut checked = 0;
    for case in fx["cases"].as_array().unwrap() {
        let mut toks = ids(&case["prompt_tokens"]);
        let n_prompt = toks.len();
        let reference = ids(&case["generated_tokens"]);
        toks.extend(&reference[..reference.len() - 1]);
        let params = GenerationParams {
            want_all_logits: true,
            ..greedy(1)
        };
        let c = engine
            .generate(vec![toks.clone()], params)
            .unwrap()
            .pop()
            .unwrap();
        let logits = c.prompt_logits.unwrap();
        for (step, m) in case["top1_minus_top2_logit"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            if m.as_f64().unwrap() < 0.3 {
                continue;
            }
            let row = &logits[(n_prompt - 1 + step) * vocab..(n_prompt + step) * vocab];
            let a = pagoda::sampler::argmax(row);
            assert_eq!(a, reference[step], "case {} step {step}", case["id"]);
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} steps checked");
}

/// Perplexity of ppl_text.txt at context 512 (llama-perplexity's method) within 2% of 28.01.
#[test]
fn perplexity_of_reference_text_is_within_two_percent() {
    let text = std::fs::read_to_string(fixture("ppl_text.txt")).unwrap();
    let mut engine = cpu_engine(perplexity_config(512));
    let toks = engine.tokenize(&text);
    assert_eq!(toks.len(), 2052);
    let r = engine.perplexity(&toks, 512).unwrap();
    eprintln!(
        "perplexity {:.4} over {} chunks: {:?}",
        r.ppl, r.n_chunks, r.chunk_ppl
    );
    assert_eq!((r.n_chunks, r.n_scored), (4, 4 * 255));
    assert!((r.ppl - 28.01).abs() / 28.01 < 0.02, "perplexity {}", r.ppl);
    // Per chunk, close to the exact float64 reference (28.0695, 28.2027, 28.6857, 27.1149).
    for (got, want) in r.chunk_ppl.iter().zip([28.0695, 28.2027, 28.6857, 27.1149]) {
        assert!((got - want).abs() < 0.01, "chunk ppl {got} vs exact {want}");
    }
}

/// N greedy requests run together give the same tokens as each run alone.
#[test]
fn batch_invariance_of_greedy_requests() {
    let fx = load_fixture("greedy.json");
    let prompts: Vec<Vec<u32>> = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["prompt_tokens"]))
        .collect();
    let mut engine = cpu_engine(EngineConfig {
        max_seqs: Some(8),
        max_logits_rows: 8,
        ..EngineConfig::default()
    });
    let together = engine.generate(prompts.clone(), greedy(24)).unwrap();
    for (p, t) in prompts.iter().zip(&together) {
        let alone = engine
            .generate(vec![p.clone()], greedy(24))
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(alone.generated_tokens, t.generated_tokens);
    }
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
    let cfg = EngineConfig {
        ctx: Some(128),
        max_seqs: Some(4),
        num_pages: Some(9),
        enable_prefix_caching: false,
        ..EngineConfig::default()
    };
    let mut tight = cpu_engine(cfg.clone());
    let prompts: Vec<Vec<u32>> = [
        "The old lighthouse",
        "In 1450, Gutenberg",
        "Paper was invented",
        "A quick brown fox",
    ]
    .iter()
    .map(|p| tight.tokenize(p))
    .collect();
    let params = GenerationParams {
        ignore_eog: true,
        ..greedy(40)
    };
    let together = tight.generate(prompts.clone(), params.clone()).unwrap();
    assert!(
        tight.scheduler().stats().num_preemptions >= 1,
        "no preemption happened"
    );
    assert_eq!(
        tight.scheduler().block_manager().num_free_pages(),
        9,
        "every page is back"
    );
    let mut roomy = cpu_engine(EngineConfig {
        num_pages: None,
        ..cfg
    });
    for (p, t) in prompts.iter().zip(&together) {
        let alone = roomy
            .generate(vec![p.clone()], params.clone())
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(t.generated_tokens.len(), 40);
        assert_eq!(alone.generated_tokens, t.generated_tokens);
    }
}

/// Too few KV pages with swap space: long preempted sequences are swapped to
/// host memory and back (their K/V copied, not recomputed), and every
/// request's greedy output equals the request run alone with a roomy cache.
#[test]
fn swapped_and_resumed_requests_match_uninterrupted_runs() {
    let cfg = EngineConfig {
        ctx: Some(128),
        max_seqs: Some(4),
        num_pages: Some(9),
        enable_prefix_caching: false,
        swap_space_bytes: 64 << 20,
        ..EngineConfig::default()
    };
    let mut tight = cpu_engine(cfg.clone());
    let slots = tight.scheduler().num_host_slots();
    assert!(slots >= 16, "64 MiB holds {slots} pages");
    assert_eq!(tight.memory_plan().swap_slots, slots);
    assert_eq!(
        tight.memory_plan().swap_bytes,
        slots as u64 * tight.memory_plan().page_bytes
    );
    let prompts: Vec<Vec<u32>> = [
        "The old lighthouse keeper climbed the stairs every night to light the lamp",
        "In 1450, Gutenberg built a printing press in Mainz that used movable type",
        "Paper was invented in China during the Han dynasty, made from bark and rags",
        "A quick brown fox jumps over the lazy dog while the farmer sleeps in the sun",
    ]
    .iter()
    .map(|p| tight.tokenize(p))
    .collect();
    let params = GenerationParams {
        ignore_eog: true,
        ..greedy(40)
    };
    let together = tight.generate(prompts.clone(), params.clone()).unwrap();
    let st = tight.scheduler().stats().clone();
    assert!(st.num_swap_preemptions >= 1, "no swap happened: {st:?}");
    assert_eq!(st.num_swap_resumes, st.num_swap_preemptions);
    assert_eq!(st.num_swap_in_pages, st.num_swap_out_pages);
    assert_eq!(tight.scheduler().num_host_slots_in_use(), 0);
    assert_eq!(tight.scheduler().block_manager().num_free_pages(), 9);
    let mut roomy = cpu_engine(EngineConfig {
        num_pages: None,
        swap_space_bytes: 0,
        ..cfg
    });
    for (p, t) in prompts.iter().zip(&together) {
        let alone = roomy
            .generate(vec![p.clone()], params.clone())
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(t.generated_tokens.len(), 40);
        assert_eq!(alone.generated_tokens, t.generated_tokens);
    }
    assert_eq!(roomy.scheduler().stats().num_preemptions, 0);
}

/// Cancellation frees every page of the request at once; the other request
/// goes on unchanged.
#[test]
fn abort_frees_all_pages_at_once() {
    let mut engine = cpu_engine(EngineConfig {
        enable_prefix_caching: false,
        ..EngineConfig::default()
    });
    let total = engine.scheduler().block_manager().num_pages();
    let long: Vec<u32> = engine.tokenize(&"The printing press changed Europe. ".repeat(12));
    let short = engine.tokenize("Paper was invented in China");
    let a = engine.add_request(long.clone(), greedy(20)).unwrap();
    let b = engine.add_request(short.clone(), greedy(20)).unwrap();
    for _ in 0..5 {
        engine.step().unwrap();
    }
    let held_before = total - engine.scheduler().block_manager().num_free_pages();
    let pages_of_a = engine.scheduler().get(a).unwrap().block_table.len();
    assert!(pages_of_a >= long.len() / 16);
    engine.abort(a).unwrap();
    let held_after = total - engine.scheduler().block_manager().num_free_pages();
    assert_eq!(
        held_before - held_after,
        pages_of_a,
        "all of the aborted request's pages are free at once"
    );
    while engine.has_unfinished() {
        engine.step().unwrap();
    }
    assert_eq!(
        engine.take_completion(a).unwrap().finish_reason,
        FinishReason::Aborted
    );
    let done_b = engine.take_completion(b).unwrap();
    let alone = engine
        .generate(vec![short], greedy(20))
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(done_b.generated_tokens, alone.generated_tokens);
    assert_eq!(engine.scheduler().block_manager().num_free_pages(), total);
}
