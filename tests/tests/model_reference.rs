//! The CPU forward pass against the reference fixtures (exact_f64 and llama.cpp).

use pagoda::model::WorkspaceDims;
use pagoda::model_runner::ModelRunner;
use pagoda_backend::DType;
use pagoda_cpu::CpuBackend;
use pagoda_tests::{cpu_runner, load_fixture, single_prefill};

fn runner(kv: DType, max_tokens: usize, pages: usize) -> ModelRunner<CpuBackend> {
    let dims = WorkspaceDims {
        max_tokens,
        max_seqs: 4,
        max_blocks_per_seq: pages,
        max_logits_rows: max_tokens,
        max_top_k: pagoda::model::DEVICE_TOP_K,
    };
    cpu_runner(0, kv, dims, pages)
}

#[test]
fn last_logits_match_exact_f64_within_1e3() {
    let fx = load_fixture("logits_last.json");
    let mut r = runner(DType::F32, 256, 16);
    let mut worst = 0f64;
    for case in fx["cases"].as_array().unwrap() {
        let toks: Vec<u32> = case["prompt_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
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
        let argmax = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
        assert_eq!(
            argmax as u64,
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
    assert!(worst < 1e-3, "max |Δ| vs exact_f64 = {worst}");
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
}

#[test]
fn argmax_at_every_position_matches_references() {
    let fx = load_fixture("argmax_positions.json");
    let mut r = runner(DType::F32, 64, 8);
    let vocab = 49152;
    for case in fx["cases"].as_array().unwrap() {
        let toks = ids(&case["prompt_tokens"]);
        let logits = r
            .logits(&single_prefill(&toks, &[3, 1, 6, 0], 16, true))
            .unwrap()
            .to_vec();
        let ex = &case["exact_f64"];
        let ll = &case["llama_cpp"];
        for i in 0..toks.len() {
            let row = &logits[i * vocab..(i + 1) * vocab];
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
            if ll["top1_minus_top2"][i].as_f64().unwrap() >= 0.3 {
                assert_eq!(
                    a as u64,
                    ll["argmax"][i].as_u64().unwrap(),
                    "position {i} vs llama.cpp"
                );
            }
        }
    }
}

#[test]
fn shuffled_interleaved_pages_give_bit_identical_logits() {
    let fx = load_fixture("logits_last.json");
    let cases = fx["cases"].as_array().unwrap();
    let mut longest: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_tokens"])).collect();
    longest.sort_by_key(|t| std::cmp::Reverse(t.len()));
    let a = longest[0].clone(); // 198 tokens: 13 pages
    let b = longest[1].clone();
    let mut r = runner(DType::F32, 512, 64);
    let vocab = 49152;
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
    assert_eq!(
        &both[..vocab],
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
    assert_eq!(&both[vocab..], &alone_b[..]);
}
