//! Item 3: sampling on the device gives exactly what the host sampler gave
//! on full logits rows before it — greedy on every reference fixture prompt,
//! and seeded sampling at several temperature / top-k / top-p / min-p
//! settings (and a repetition penalty, which takes the full-row path).
//!
//! The reference is a hand-driven loop over the model runner that downloads
//! every full logits row and calls `Sampler::sample` on it (the pre-device
//! path); the engine under test picks greedy rows with `argmax_rows` and
//! sampled rows from `top_k_rows` candidates.

use pagoda::model::{DEVICE_TOP_K, WorkspaceDims};
use pagoda::sampler::{Sampler, SamplingParams};
use pagoda::sequence::SeqId;
use pagoda::step_plan::StepPlan;
use pagoda::{EngineConfig, GenerationParams};
use pagoda_backend::DType;
use pagoda_tests::{cpu_engine, cpu_runner, load_fixture, single_prefill};

/// A decode step of one sequence: token `tok` at position `pos`, in `pages`.
fn single_decode(tok: u32, pos: usize, pages: &[u32]) -> StepPlan {
    let n_pages = (pos + 1).div_ceil(16);
    StepPlan {
        input_ids: vec![tok],
        positions: vec![pos as u32],
        slot_mapping: vec![pages[pos / 16] * 16 + (pos % 16) as u32],
        block_tables: pages[..n_pages].to_vec(),
        max_blocks_per_seq: n_pages,
        context_lens: vec![pos as u32 + 1],
        query_start_locs: vec![0, 1],
        seq_ids: vec![SeqId(0)],
        logits_indices: vec![0],
        sample_rows: vec![Some(0)],
        copy_pages: vec![],
        swap_out: vec![],
        swap_in: vec![],
        num_prefill_tokens: 0,
        num_decode_tokens: 1,
    }
}

/// The pre-device reference: full rows to the host, `Sampler::sample`.
fn host_reference(prompt: &[u32], params: &SamplingParams, max_tokens: usize) -> Vec<u32> {
    let dims = WorkspaceDims {
        max_tokens: 512,
        max_seqs: 1,
        max_blocks_per_seq: 64,
        max_logits_rows: 1,
        max_top_k: DEVICE_TOP_K,
    };
    let mut r = cpu_runner(0, DType::F32, dims, 64);
    let vocab = r.config.vocab_size;
    let pages: Vec<u32> = (0..64).collect();
    let mut sampler = Sampler::new(params.clone(), vocab);
    let mut history = prompt.to_vec();
    let logits = r
        .logits(&single_prefill(prompt, &pages, 16, false))
        .unwrap()
        .to_vec();
    let mut tok = sampler.sample(&logits, &history);
    let mut out = vec![tok];
    while out.len() < max_tokens {
        history.push(tok);
        let pos = history.len() - 1;
        let logits = r.logits(&single_decode(tok, pos, &pages)).unwrap().to_vec();
        tok = sampler.sample(&logits, &history);
        out.push(tok);
    }
    out
}

fn engine_tokens(prompt: &[u32], params: &SamplingParams, max_tokens: usize) -> Vec<u32> {
    let mut e = cpu_engine(EngineConfig {
        ctx: Some(1024),
        max_seqs: Some(1),
        ..EngineConfig::default()
    });
    let gp = GenerationParams {
        max_tokens,
        sampling: params.clone(),
        ignore_eog: true,
        ..GenerationParams::default()
    };
    let c = e.generate(vec![prompt.to_vec()], gp).unwrap();
    c[0].generated_tokens.clone()
}

#[test]
fn greedy_on_every_reference_prompt_equals_host_argmax_of_full_rows() {
    let fx = load_fixture("greedy.json");
    for case in fx["cases"].as_array().unwrap() {
        let prompt = pagoda_tests::ids(&case["prompt_tokens"]);
        let n = case["generated_tokens"].as_array().unwrap().len().min(24);
        let want = host_reference(&prompt, &SamplingParams::greedy(), n);
        let got = engine_tokens(&prompt, &SamplingParams::greedy(), n);
        assert_eq!(got, want, "case {}", case["id"]);
    }
}

#[test]
fn seeded_sampling_equals_the_host_sampler_on_full_rows() {
    let prompt: Vec<u32> = vec![1, 504, 3458, 282, 5765, 28, 253, 2436, 5013, 411];
    let settings = [
        // (temperature, top_k, top_p, min_p, repeat_penalty, seed)
        (0.8, 40, 0.95, 0.05, 1.0, 7),
        (1.2, 10, 1.0, 0.0, 1.0, 11),
        (0.5, 64, 0.9, 0.1, 1.0, 3),
        (1.0, 0, 0.95, 0.02, 1.0, 5),   // top_k = 0: full rows
        (1.0, 200, 1.0, 0.0, 1.0, 9),   // above the device limit: full rows
        (0.9, 40, 0.95, 0.05, 1.1, 13), // repetition penalty: full rows
    ];
    for (t, k, p, min_p, rp, seed) in settings {
        let params = SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p,
            repeat_penalty: rp,
            seed,
            ..SamplingParams::default()
        };
        let want = host_reference(&prompt, &params, 32);
        let got = engine_tokens(&prompt, &params, 32);
        assert_eq!(got, want, "{params:?}");
    }
}
