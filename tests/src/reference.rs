//! Whole-model reference checks, generic over the backend.
//!
//! Each function here is the body of one test: the CPU test files
//! (`tests/model_reference.rs`, `tests/engine_reference.rs`,
//! `tests/fault_injection.rs`) call them with the CPU backend, and
//! `tests/cuda_reference.rs` with the CUDA backend (ignored without a GPU).
//! They panic (fail the test) on the first violated bound; every bound is
//! stated beside its assertion.
//!
//! - Forward pass ([`last_logits_match_exact_f64`], [`argmax_at_every_position`],
//!   [`shuffled_and_interleaved_pages_are_bit_identical`]): a
//!   [`ModelRunner`] against `logits_last.json` and `argmax_positions.json`.
//! - Engine ([`greedy_matches_llama_cpp`], [`teacher_forced_argmax_matches_llama_cpp`],
//!   [`perplexity_within_two_percent`], [`batch_invariance`],
//!   [`preemption_keeps_outputs`], [`swapped_requests_match_uninterrupted_runs`],
//!   [`abort_frees_all_pages`]): the whole engine against `greedy.json` and
//!   `ppl_text.txt`.
//! - Across backends ([`greedy_agrees_across_backends`]).
//! - Fault injection on the synthetic tiny model ([`fault_during_build_is_a_clean_error`],
//!   [`fault_during_run_fails_only_that_request`],
//!   [`fault_sweep_with_concurrency_preemption_and_prefix_sharing`]), with a
//!   caller's check that every byte is given back.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use pagoda::model::WorkspaceDims;
use pagoda::model::synthetic::{SyntheticSpec, write_synthetic_gguf};
use pagoda::model_runner::ModelRunner;
use pagoda::perplexity::perplexity_config;
use pagoda::sampler::SamplingParams;
use pagoda::{Completion, Engine, EngineConfig, FinishReason, GenerationParams};
use pagoda_backend::{Backend, DType, FaultInjector};

use crate::{engine_on, fixture, ids, load_fixture, runner_on, single_prefill};

/// Vocabulary of the default model.
const VOCAB: usize = 49152;

/// Greedy decoding margin (top-1 minus top-2 logit, from the fixture) below
/// which two implementations may legitimately pick different tokens.
pub const LOW_MARGIN: f64 = 0.3;

/// Greedy sampling of at most `max_tokens` tokens.
pub fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    }
}

/// A runner on `backend` with f32 activations, `kv` pages, a workspace of
/// `max_tokens` tokens (all of them logits rows) and `pages` KV pages.
pub fn runner<B: Backend>(
    backend: Arc<B>,
    kv: DType,
    max_tokens: usize,
    pages: usize,
) -> ModelRunner<B> {
    let dims = WorkspaceDims {
        max_tokens,
        max_seqs: 4,
        max_blocks_per_seq: pages,
        max_logits_rows: max_tokens,
        max_top_k: pagoda::model::DEVICE_TOP_K,
    };
    runner_on(backend, kv, dims, pages, Vec::new())
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
}

// ---------------------------------------------------------------- forward pass

/// Last-position logits of every `logits_last.json` case: within 1e-3 of the
/// exact float64 reference (first 64 logits, top 20, logsumexp), and the
/// argmax equals llama.cpp's.
pub fn last_logits_match_exact_f64<B: Backend>(backend: Arc<B>) {
    let fx = load_fixture("logits_last.json");
    let mut r = runner(backend, DType::F32, 256, 16);
    let mut worst = 0f64;
    for case in fx["cases"].as_array().unwrap() {
        let toks = ids(&case["prompt_tokens"]);
        let pages: Vec<u32> = (0..toks.len().div_ceil(16) as u32).collect();
        let logits = r
            .logits(&single_prefill(&toks, &pages, 16, false))
            .unwrap()
            .to_vec();
        let ex = &case["exact_f64"];
        for (i, v) in ex["logits_0_63"].as_array().unwrap().iter().enumerate() {
            let d = (logits[i] as f64 - v.as_f64().unwrap()).abs();
            worst = worst.max(d);
        }
        for pair in ex["top20"].as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as usize;
            worst = worst.max((logits[id] as f64 - pair[1].as_f64().unwrap()).abs());
        }
        // Metric: argmax of the last row; bound: equal to llama.cpp's.
        assert_eq!(
            argmax(&logits) as u64,
            case["llama_cpp"]["argmax"].as_u64().unwrap(),
            "case {}",
            case["id"]
        );
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + logits
            .iter()
            .map(|&v| (v as f64 - m).exp())
            .sum::<f64>()
            .ln();
        worst = worst.max((lse - ex["logsumexp"].as_f64().unwrap()).abs());
    }
    eprintln!("max |Δ| vs exact_f64: {worst:.2e}");
    // Metric: max |logit - exact| over the checked logits and logsumexp; bound 1e-3.
    assert!(worst < 1e-3, "max |Δ| vs exact_f64 = {worst}");
}

/// Logits at every position of the `argmax_positions.json` cases (pages
/// 3, 1, 6, 0): argmax equal to the exact reference's where its margin is
/// above 1e-3, top-1 logit within 1e-3 of it, and argmax equal to
/// llama.cpp's where llama.cpp's margin is at least 0.3.
pub fn argmax_at_every_position<B: Backend>(backend: Arc<B>) {
    let fx = load_fixture("argmax_positions.json");
    let mut r = runner(backend, DType::F32, 64, 8);
    for case in fx["cases"].as_array().unwrap() {
        let toks = ids(&case["prompt_tokens"]);
        let logits = r
            .logits(&single_prefill(&toks, &[3, 1, 6, 0], 16, true))
            .unwrap()
            .to_vec();
        let ex = &case["exact_f64"];
        let ll = &case["llama_cpp"];
        for i in 0..toks.len() {
            let row = &logits[i * VOCAB..(i + 1) * VOCAB];
            let a = argmax(row);
            // f32 activations: equal to the exact reference's argmax where its margin is clear,
            // and its top-1 logit within 1e-3.
            if ex["top1_minus_top2"][i].as_f64().unwrap() > 1e-3 {
                assert_eq!(
                    a as u64,
                    ex["argmax"][i].as_u64().unwrap(),
                    "position {i} vs exact_f64"
                );
            }
            let top1 = ex["top1_logit"][i].as_f64().unwrap();
            assert!(
                (row[a] as f64 - top1).abs() < 1e-3,
                "position {i}: top1 {} vs {top1}",
                row[a]
            );
            // Against llama.cpp only where its margin is at least 0.3.
            if ll["top1_minus_top2"][i].as_f64().unwrap() >= LOW_MARGIN {
                assert_eq!(
                    a as u64,
                    ll["argmax"][i].as_u64().unwrap(),
                    "position {i} vs llama.cpp"
                );
            }
        }
    }
}

/// On one backend, the longest `logits_last.json` prompt gives bit-identical
/// last logits on in-order pages, on shuffled page ids, and batched with a
/// second sequence whose pages interleave with its own (and the second
/// sequence's logits equal it run alone): page ids are data, never a reason
/// for a different summation order.
pub fn shuffled_and_interleaved_pages_are_bit_identical<B: Backend>(backend: Arc<B>) {
    let fx = load_fixture("logits_last.json");
    let cases = fx["cases"].as_array().unwrap();
    let mut longest: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_tokens"])).collect();
    longest.sort_by_key(|t| std::cmp::Reverse(t.len()));
    let a = longest[0].clone();
    let b = longest[1].clone();
    // 13 pages are given to `a` (more than it fills: the tail pages are unused).
    assert!(a.len() <= 13 * 16, "{} tokens", a.len());
    let mut r = runner(backend, DType::F32, 512, 64);
    let straight = r
        .logits(&single_prefill(&a, &(0..13).collect::<Vec<_>>(), 16, false))
        .unwrap()
        .to_vec();
    // The same sequence on shuffled page ids.
    let shuffled: Vec<u32> = vec![40, 3, 17, 9, 61, 22, 5, 33, 48, 12, 27, 58, 1];
    let again = r
        .logits(&single_prefill(&a, &shuffled, 16, false))
        .unwrap()
        .to_vec();
    // Metric: the logits row; bound: bit-identical.
    assert_eq!(straight, again, "page ids must not change the logits");
    // Two sequences in one step whose pages interleave.
    let pa: Vec<u32> = (0..13).map(|i| 2 * i + 1).collect();
    let pb: Vec<u32> = (0..b.len().div_ceil(16) as u32).map(|i| 2 * i).collect();
    let mut plan = single_prefill(&a, &pa, 16, false);
    let pb_plan = single_prefill(&b, &pb, 16, false);
    let na = a.len() as u32;
    plan.input_ids.extend(&b);
    plan.positions.extend(&pb_plan.positions);
    plan.slot_mapping.extend(&pb_plan.slot_mapping);
    let width = pa.len().max(pb.len());
    let mut bt = pa.clone();
    bt.resize(width, 0);
    let mut row_b = pb.clone();
    row_b.resize(width, 0);
    bt.extend(row_b);
    plan.block_tables = bt;
    plan.max_blocks_per_seq = width;
    plan.context_lens.push(b.len() as u32);
    plan.query_start_locs.push(na + b.len() as u32);
    plan.seq_ids.push(plan.seq_ids[0]);
    plan.logits_indices = vec![na - 1, na + b.len() as u32 - 1];
    plan.sample_rows = vec![Some(0), Some(1)];
    plan.num_prefill_tokens += b.len();
    let both = r.logits(&plan).unwrap().to_vec();
    // Bit-identical to the sequence alone on in-order pages.
    assert_eq!(
        &both[..VOCAB],
        &straight[..],
        "batched with another sequence on interleaved pages"
    );
    let alone_b = r
        .logits(&single_prefill(
            &b,
            &(0..pb.len() as u32).collect::<Vec<_>>(),
            16,
            false,
        ))
        .unwrap()
        .to_vec();
    // The second sequence: bit-identical to it alone on in-order pages.
    assert_eq!(&both[VOCAB..], &alone_b[..]);
}

// ---------------------------------------------------------------- whole engine

/// Margins of a `greedy.json` case, one per generated token.
fn margins(case: &serde_json::Value) -> Vec<f64> {
    case["top1_minus_top2_logit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// Steps of a `greedy.json` case before the first whose margin is below [`LOW_MARGIN`].
fn clear_steps(case: &serde_json::Value) -> usize {
    let m = margins(case);
    m.iter().position(|&m| m < LOW_MARGIN).unwrap_or(m.len())
}

/// Every `greedy.json` case: the prompt tokenizes to the reference ids, and
/// greedy tokens equal llama.cpp's up to the first step whose margin is
/// below 0.3 (all of them, with the finish reason, when no margin is low).
pub fn greedy_matches_llama_cpp<B: Backend>(backend: Arc<B>) {
    let fx = load_fixture("greedy.json");
    let mut engine = engine_on(backend, EngineConfig::default());
    for case in fx["cases"].as_array().unwrap() {
        let prompt = case["prompt_text"].as_str().unwrap();
        let want_prompt = ids(&case["prompt_tokens"]);
        assert_eq!(engine.tokenize(prompt), want_prompt, "case {}", case["id"]);
        let want = ids(&case["generated_tokens"]);
        let c = engine
            .generate(vec![want_prompt], greedy(32))
            .unwrap()
            .pop()
            .unwrap();
        let checked = clear_steps(case);
        // Metric: generated ids; bound: equal before the first low-margin step.
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

/// [`greedy_matches_llama_cpp`] with every case in one batch (decoded together, as batch
/// invariance allows): the same token checks in one eighth of the steps, and no step past
/// the last one any case compares, for slow backends.
pub fn greedy_matches_llama_cpp_batched<B: Backend>(backend: Arc<B>) {
    let fx = load_fixture("greedy.json");
    let cases = fx["cases"].as_array().unwrap();
    let mut engine = engine_on(
        backend,
        EngineConfig {
            max_seqs: Some(cases.len()),
            ..EngineConfig::default()
        },
    );
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_tokens"])).collect();
    for (case, p) in cases.iter().zip(&prompts) {
        assert_eq!(
            &engine.tokenize(case["prompt_text"].as_str().unwrap()),
            p,
            "case {}",
            case["id"]
        );
    }
    // Tokens after a case's first low-margin step are never compared: generate up to the
    // last compared step of any case (the reference's 32 at most), not beyond.
    let steps = cases
        .iter()
        .map(|c| clear_steps(c).min(ids(&c["generated_tokens"]).len()))
        .max()
        .unwrap_or(0)
        .clamp(1, 32);
    let outs = engine.generate(prompts, greedy(steps)).unwrap();
    assert_eq!(outs.len(), cases.len());
    for (case, c) in cases.iter().zip(&outs) {
        let want = ids(&case["generated_tokens"]);
        let checked = clear_steps(case);
        // Metric: generated ids; bound: equal before the first low-margin step.
        assert_eq!(
            &c.generated_tokens[..checked.min(c.generated_tokens.len())],
            &want[..checked.min(want.len())],
            "case {}",
            case["id"]
        );
    }
}

/// Teacher-forcing each `greedy.json` reference continuation: the argmax
/// equals llama.cpp's at every step whose margin is at least 0.3 (more than
/// 100 such steps).
pub fn teacher_forced_argmax_matches_llama_cpp<B: Backend>(backend: Arc<B>) {
    let fx = load_fixture("greedy.json");
    let mut cfg = EngineConfig::default();
    cfg.max_logits_rows = cfg.max_num_batched_tokens;
    let mut engine = engine_on(backend, cfg);
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
        for (step, m) in margins(case).into_iter().enumerate() {
            if m < LOW_MARGIN {
                continue;
            }
            let row = &logits[(n_prompt - 1 + step) * vocab..(n_prompt + step) * vocab];
            let a = pagoda::sampler::argmax(row);
            // Metric: argmax of the teacher-forced row; bound: equal to llama.cpp's.
            assert_eq!(a, reference[step], "case {} step {step}", case["id"]);
            checked += 1;
        }
    }
    // The check is not vacuous: more than 100 clear steps.
    assert!(checked > 100, "only {checked} steps checked");
}

/// Perplexity of `ppl_text.txt` at context 512 (llama-perplexity's method):
/// 4 chunks of 255 scored tokens, within 2% of llama.cpp's 28.01, and each
/// chunk within 0.01 of the exact float64 reference.
pub fn perplexity_within_two_percent<B: Backend>(backend: Arc<B>) {
    let text = std::fs::read_to_string(fixture("ppl_text.txt")).unwrap();
    let mut engine = engine_on(backend, perplexity_config(512));
    let toks = engine.tokenize(&text);
    assert_eq!(toks.len(), 2052);
    let r = engine.perplexity(&toks, 512).unwrap();
    eprintln!(
        "perplexity {:.4} over {} chunks: {:?}",
        r.ppl, r.n_chunks, r.chunk_ppl
    );
    assert_eq!((r.n_chunks, r.n_scored), (4, 4 * 255));
    // Metric: relative difference to llama.cpp's 28.01; bound 2%.
    assert!((r.ppl - 28.01).abs() / 28.01 < 0.02, "perplexity {}", r.ppl);
    // Per chunk, close to the exact float64 reference (28.0695, 28.2027, 28.6857, 27.1149):
    // |Δ| < 0.01 (about 3.5e-4 relative).
    for (got, want) in r.chunk_ppl.iter().zip([28.0695, 28.2027, 28.6857, 27.1149]) {
        assert!((got - want).abs() < 0.01, "chunk ppl {got} vs exact {want}");
    }
}

/// Perplexity of the first 512-token chunk of `ppl_text.txt` (llama-perplexity's method:
/// 255 scored tokens) within 0.01 of the exact float64 reference's 28.0695 (the per-chunk
/// bound of [`perplexity_within_two_percent`], for backends too slow for all four chunks
/// in CI, such as wgpu on lavapipe).
pub fn first_chunk_perplexity_matches_exact<B: Backend>(backend: Arc<B>) {
    let text = std::fs::read_to_string(fixture("ppl_text.txt")).unwrap();
    let mut engine = engine_on(backend, perplexity_config(512));
    let toks = engine.tokenize(&text);
    let r = engine.perplexity(&toks[..512], 512).unwrap();
    assert_eq!((r.n_chunks, r.n_scored), (1, 255));
    eprintln!("first chunk perplexity {:.4}", r.ppl);
    // Metric: |ppl − exact| of chunk 0; bound 0.01 (about 3.5e-4 relative).
    assert!(
        (r.ppl - 28.0695).abs() < 0.01,
        "chunk 0 perplexity {}",
        r.ppl
    );
}

/// The `greedy.json` prompts run together (24 greedy tokens each) give the
/// same tokens as each run alone.
pub fn batch_invariance<B: Backend>(backend: Arc<B>) {
    let fx = load_fixture("greedy.json");
    let prompts: Vec<Vec<u32>> = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["prompt_tokens"]))
        .collect();
    let mut engine = engine_on(
        backend,
        EngineConfig {
            max_seqs: Some(8),
            max_logits_rows: 8,
            ..EngineConfig::default()
        },
    );
    let together = engine.generate(prompts.clone(), greedy(24)).unwrap();
    for (p, t) in prompts.iter().zip(&together) {
        let alone = engine
            .generate(vec![p.clone()], greedy(24))
            .unwrap()
            .pop()
            .unwrap();
        // Metric: generated ids; bound: identical.
        assert_eq!(alone.generated_tokens, t.generated_tokens);
    }
}

/// Every completion of `together` has `params.max_tokens` tokens equal to
/// its prompt run alone on an engine of `cfg` (a roomy cache: no preemption).
fn assert_equal_to_solo_runs<B: Backend>(
    backend: Arc<B>,
    cfg: EngineConfig,
    prompts: &[Vec<u32>],
    together: &[Completion],
    params: &GenerationParams,
) {
    let mut roomy = engine_on(backend, cfg);
    for (p, t) in prompts.iter().zip(together) {
        let alone = roomy
            .generate(vec![p.clone()], params.clone())
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(t.generated_tokens.len(), params.max_tokens);
        // Metric: generated ids; bound: identical to the uninterrupted run.
        assert_eq!(alone.generated_tokens, t.generated_tokens);
    }
    assert_eq!(roomy.scheduler().stats().num_preemptions, 0);
}

/// Four prompts on 9 KV pages: the scheduler preempts (recompute) instead of
/// failing, every page is back at the end, and every request's 40 tokens
/// equal the request run alone on a roomy cache.
pub fn preemption_keeps_outputs<B: Backend>(backend: Arc<B>) {
    let cfg = EngineConfig {
        ctx: Some(128),
        max_seqs: Some(4),
        num_pages: Some(9),
        enable_prefix_caching: false,
        ..EngineConfig::default()
    };
    let mut tight = engine_on(backend.clone(), cfg.clone());
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
    drop(tight);
    assert_equal_to_solo_runs(
        backend,
        EngineConfig {
            num_pages: None,
            ..cfg
        },
        &prompts,
        &together,
        &params,
    );
}

/// Four longer prompts on 9 KV pages with 64 MiB of swap space (the host
/// tier, [`Backend::alloc_host`]): preempted sequences are swapped out and
/// back in (every swap resumed, as many pages in as out, every slot and
/// page free at the end), and every request's 40 greedy tokens equal the
/// request run alone on a roomy cache without preemption.
pub fn swapped_requests_match_uninterrupted_runs<B: Backend>(backend: Arc<B>) {
    let cfg = EngineConfig {
        ctx: Some(128),
        max_seqs: Some(4),
        num_pages: Some(9),
        enable_prefix_caching: false,
        swap_space_bytes: 64 << 20,
        ..EngineConfig::default()
    };
    let mut tight = engine_on(backend.clone(), cfg.clone());
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
    drop(tight);
    assert_equal_to_solo_runs(
        backend,
        EngineConfig {
            num_pages: None,
            swap_space_bytes: 0,
            ..cfg
        },
        &prompts,
        &together,
        &params,
    );
}

/// Aborting a running request frees all of its pages at once; the other
/// request goes on and generates what it generates alone; every page is
/// free at the end.
pub fn abort_frees_all_pages<B: Backend>(backend: Arc<B>) {
    let mut engine = engine_on(
        backend,
        EngineConfig {
            enable_prefix_caching: false,
            ..EngineConfig::default()
        },
    );
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

// ---------------------------------------------------------------- across backends

/// Greedy generation (32 tokens) of every `greedy.json` prompt with KV pages
/// of `kv`, on backend `a` and on backend `b`: the tokens are equal up to
/// the first step whose reference margin is below [`LOW_MARGIN`] (and up to
/// the shorter output when one stops earlier within the clear steps: then
/// both must have stopped at the same step). Returns the number of tokens
/// compared.
pub fn greedy_agrees_across_backends<A: Backend, B: Backend>(
    a: Arc<A>,
    b: Arc<B>,
    kv: DType,
) -> usize {
    let fx = load_fixture("greedy.json");
    let cases = fx["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_tokens"])).collect();
    let cfg = EngineConfig {
        kv_dtype: kv,
        ..EngineConfig::default()
    };
    let on_a = engine_on(a, cfg.clone())
        .generate(prompts.clone(), greedy(32))
        .unwrap();
    let on_b = engine_on(b, cfg).generate(prompts, greedy(32)).unwrap();
    let mut compared = 0;
    for ((case, x), y) in cases.iter().zip(&on_a).zip(&on_b) {
        let n = clear_steps(case);
        let (xa, yb) = (&x.generated_tokens, &y.generated_tokens);
        // Metric: generated ids; bound: equal before the first low-margin step.
        assert_eq!(
            &xa[..n.min(xa.len())],
            &yb[..n.min(yb.len())],
            "case {} with {kv} KV: tokens differ before step {n}",
            case["id"]
        );
        if xa.len() < n || yb.len() < n {
            assert_eq!(
                xa.len(),
                yb.len(),
                "case {}: stopped at different steps",
                case["id"]
            );
        }
        compared += n.min(xa.len()).min(yb.len());
    }
    eprintln!("{kv} KV: {compared} greedy tokens compared across backends");
    // The comparison is not vacuous.
    assert!(compared >= 20, "only {compared} tokens compared");
    compared
}

// ---------------------------------------------------------------- fault injection

/// The synthetic tiny model ([`SyntheticSpec::tiny`]), written once per
/// test binary into the temporary directory.
pub fn tiny_model() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join("pagoda-tests-fault-injection");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("tiny-{}.gguf", std::process::id()));
        write_synthetic_gguf(&SyntheticSpec::tiny(), &path).expect("synthetic model");
        path
    })
}

fn build_tiny<B: Backend>(
    backend: &Arc<B>,
    base: &EngineConfig,
    faults: &FaultInjector,
) -> pagoda::Result<Engine<B>> {
    Engine::builder()
        .model(tiny_model())
        .backend(backend.clone())
        .config(EngineConfig {
            faults: faults.clone(),
            ..base.clone()
        })
        .build()
}

/// Greedy with fixed lengths (the random model may well pick an
/// end-of-generation token).
fn fixed_greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        ignore_eog: true,
        ..greedy(max_tokens)
    }
}

/// A small interactive setup on the tiny model (128 tokens of context).
pub fn small_fault_config() -> EngineConfig {
    EngineConfig {
        ctx: Some(128),
        max_seqs: Some(4),
        max_num_batched_tokens: 64,
        max_logits_rows: 4,
        page_size: 16,
        faults: FaultInjector::new(),
        ..EngineConfig::default()
    }
}

/// Deterministic prompts of token ids: `common` shared ids, then a suffix
/// that differs per request (lengths `3 + 5 * (r % 4)`).
pub fn fault_prompts(n: usize, common: usize) -> Vec<Vec<u32>> {
    let prefix: Vec<u32> = (0..common as u32).map(|i| (i * 7 + 3) % 256).collect();
    (0..n as u32)
        .map(|r| {
            let mut p = prefix.clone();
            p.extend((0..3 + 5 * (r % 4)).map(|j| (r * 31 + j * 11 + 5) % 256));
            p
        })
        .collect()
}

/// Result of one fault-injection run.
#[derive(Debug)]
pub struct FaultRun {
    /// Completions in request order.
    pub completions: Vec<Completion>,
    /// Fault sites reached while building.
    pub sites_after_build: u64,
    /// Fault sites reached in all.
    pub sites_total: u64,
    /// Preemptions of the run.
    pub preemptions: u64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_hit_tokens: u64,
}

/// Builds a tiny-model engine with `faults`, runs every prompt to completion
/// and checks the balance: every KV page free, block-manager invariants
/// intact, and `released` (the caller's check that the backend holds no
/// memory of the engine) passes once the engine is dropped.
pub fn fault_run<B: Backend>(
    backend: &Arc<B>,
    cfg: &EngineConfig,
    faults: &FaultInjector,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    released: &dyn Fn(&str),
) -> FaultRun {
    let mut engine = build_tiny(backend, cfg, faults).expect("engine builds");
    let sites_after_build = faults.sites_reached();
    let completions = engine
        .generate(prompts.to_vec(), fixed_greedy(max_tokens))
        .expect("generate returns");
    assert_eq!(completions.len(), prompts.len());
    assert!(!engine.has_unfinished());
    let bm = engine.scheduler().block_manager();
    // Metric: free pages; bound: all of them.
    assert_eq!(
        bm.num_free_pages(),
        bm.num_pages(),
        "every KV page is free after the run"
    );
    bm.check_invariants().expect("block manager invariants");
    let stats = engine.scheduler().stats().clone();
    drop(engine);
    released("after the engine is dropped");
    FaultRun {
        completions,
        sites_after_build,
        sites_total: faults.sites_reached(),
        preemptions: stats.num_preemptions,
        prefix_hit_tokens: stats.num_prefix_cache_hit_tokens,
    }
}

/// Fails every run-time fault site of the fault-free run in turn, each on a
/// fresh engine: exactly the request that wanted the memory ends with an
/// error naming the fault (its tokens so far right), every other request
/// generates exactly what it did without the fault, and everything is
/// given back ([`fault_run`]). Returns the fault-free run and the number of
/// sites swept.
pub fn sweep_run_sites<B: Backend>(
    backend: &Arc<B>,
    cfg: &EngineConfig,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    released: &dyn Fn(&str),
) -> (FaultRun, u64) {
    let clean = fault_run(
        backend,
        cfg,
        &FaultInjector::new(),
        prompts,
        max_tokens,
        released,
    );
    for c in &clean.completions {
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.generated_tokens.len(), max_tokens);
    }
    let (s_build, s_total) = (clean.sites_after_build, clean.sites_total);
    assert!(s_total > s_build, "the run allocates KV pages");
    let mut failed_per_request = vec![0usize; prompts.len()];
    for k in s_build + 1..=s_total {
        let faults = FaultInjector::new();
        faults.fail_at(k);
        let r = fault_run(backend, cfg, &faults, prompts, max_tokens, &|what: &str| {
            released(&format!("k={k}: {what}"))
        });
        assert_eq!(r.sites_after_build, s_build, "k={k}: build is unchanged");
        assert_eq!(faults.faults_fired(), 1, "k={k}: the fault landed");
        let errors: Vec<usize> = r
            .completions
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c.finish_reason, FinishReason::Error(_)))
            .map(|(i, _)| i)
            .collect();
        // Metric: requests ending in an error; bound: exactly one.
        assert_eq!(errors.len(), 1, "k={k}: exactly one request fails");
        let bad = errors[0];
        failed_per_request[bad] += 1;
        let FinishReason::Error(msg) = &r.completions[bad].finish_reason else {
            unreachable!()
        };
        assert!(
            msg.contains("injected fault") && msg.contains(&format!("#{k} ")),
            "k={k}: the error names the fault: {msg}"
        );
        let (got, want) = (
            &r.completions[bad].generated_tokens,
            &clean.completions[bad].generated_tokens,
        );
        assert!(
            want.starts_with(got),
            "k={k}: the failed request's tokens so far are right"
        );
        for (i, (c, w)) in r.completions.iter().zip(&clean.completions).enumerate() {
            if i != bad {
                assert_eq!(c.finish_reason, w.finish_reason, "k={k}, request {i}");
                assert_eq!(
                    c.generated_tokens, w.generated_tokens,
                    "k={k}, request {i}: same tokens as without the fault"
                );
            }
        }
    }
    eprintln!(
        "sites: {s_build} during build, {} during the run; faults per request: {failed_per_request:?}",
        s_total - s_build
    );
    (clean, s_total - s_build)
}

/// Fails every fault site of building a tiny-model engine in turn: each is a
/// clean `Err` naming the fault, nothing is allocated after it, and
/// `released` passes; one site past the build, the build succeeds and the
/// fault waits for the first KV page.
pub fn fault_during_build_is_a_clean_error<B: Backend>(backend: &Arc<B>, released: &dyn Fn(&str)) {
    let t0 = Instant::now();
    let cfg = small_fault_config();
    let clean = FaultInjector::new();
    let engine = build_tiny(backend, &cfg, &clean).expect("fault-free build");
    let s_build = clean.sites_reached();
    assert!(s_build > 0);
    assert_eq!(clean.faults_fired(), 0);
    drop(engine);
    released("fault-free build dropped");

    for k in 1..=s_build {
        let faults = FaultInjector::new();
        faults.fail_at(k);
        let err = build_tiny(backend, &cfg, &faults)
            .err()
            .unwrap_or_else(|| panic!("k={k}: the build must fail"));
        let msg = err.to_string();
        assert!(
            msg.contains("injected fault") && msg.contains(&format!("#{k} ")),
            "k={k}: {msg}"
        );
        assert_eq!(faults.faults_fired(), 1, "k={k}");
        assert_eq!(
            faults.sites_reached(),
            k,
            "k={k}: nothing is allocated after the fault"
        );
        released(&format!("k={k}: after the failed build"));
    }

    // One past the build: the build succeeds and the fault waits for the first KV page.
    let faults = FaultInjector::new();
    faults.fail_at(s_build + 1);
    let engine = build_tiny(backend, &cfg, &faults).expect("builds");
    assert_eq!(faults.faults_fired(), 0);
    drop(engine);
    released("build with a later fault dropped");
    eprintln!("build: {s_build} sites, all swept in {:.2?}", t0.elapsed());
}

/// The run-time sweep ([`sweep_run_sites`]) of 4 requests of 20 tokens on
/// the small setup: at least 4 sites, distinct outputs.
pub fn fault_during_run_fails_only_that_request<B: Backend>(
    backend: &Arc<B>,
    released: &dyn Fn(&str),
) {
    let t0 = Instant::now();
    let (clean, swept) = sweep_run_sites(
        backend,
        &small_fault_config(),
        &fault_prompts(4, 5),
        20,
        released,
    );
    assert!(swept >= 4, "every request takes at least one page");
    // The prompts really differ and so do the outputs.
    let distinct: std::collections::HashSet<_> = clean
        .completions
        .iter()
        .map(|c| c.generated_tokens.clone())
        .collect();
    assert!(distinct.len() > 1);
    eprintln!("run sweep: {swept} sites in {:.2?}", t0.elapsed());
}

/// The run-time sweep ([`sweep_run_sites`]) of 12 requests sharing a
/// 48-token prefix on 10 KV pages: prefix caching and preemption both
/// happen in the fault-free run.
pub fn fault_sweep_with_concurrency_preemption_and_prefix_sharing<B: Backend>(
    backend: &Arc<B>,
    released: &dyn Fn(&str),
) {
    let t0 = Instant::now();
    let cfg = EngineConfig {
        ctx: Some(128),
        max_seqs: Some(12),
        max_num_batched_tokens: 64,
        max_logits_rows: 12,
        page_size: 16,
        enable_prefix_caching: true,
        // 12 requests of up to 86 tokens (6 pages), sharing 3 prompt pages:
        // 39 pages would hold them all at once.
        num_pages: Some(10),
        faults: FaultInjector::new(),
        ..EngineConfig::default()
    };
    let (clean, swept) = sweep_run_sites(backend, &cfg, &fault_prompts(12, 48), 20, released);
    assert!(
        clean.prefix_hit_tokens > 0,
        "prefix caching is active in the fault-free run"
    );
    assert!(
        clean.preemptions > 0,
        "preemption happens in the fault-free run"
    );
    eprintln!(
        "concurrent sweep: {swept} sites ({} preemptions, {} prefix-hit tokens without faults) in {:.2?}",
        clean.preemptions,
        clean.prefix_hit_tokens,
        t0.elapsed()
    );
}
