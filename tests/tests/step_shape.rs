//! Fixed-shape steps: padded decode batches, device limits (pieces) and
//! device sampling give exactly the reference results.

use pagoda::model::{DEVICE_TOP_K, WorkspaceDims};
use pagoda::model_runner::ModelRunner;
use pagoda::sampler::{Sampler, SamplingParams};
use pagoda::sequence::SeqId;
use pagoda::step_plan::StepPlan;
use pagoda_backend::DType;
use pagoda_cpu::CpuBackend;
use pagoda_tests::{runner_on, single_prefill};
use rand::{Rng, SeedableRng};

fn dims() -> WorkspaceDims {
    WorkspaceDims {
        max_tokens: 64,
        max_seqs: 8,
        max_blocks_per_seq: 8,
        max_logits_rows: 64,
        max_top_k: DEVICE_TOP_K,
    }
}

/// One decode step of three sequences of 5, 9 and 17 tokens (in pages
/// [0], [1], [2, 3]), each adding its next token.
fn decode_of_three() -> StepPlan {
    let lens = [5u32, 9, 17];
    let tables: [&[u32]; 3] = [&[0], &[1], &[2, 3]];
    let width = 2;
    let mut bt = vec![0u32; 3 * width];
    for (i, t) in tables.iter().enumerate() {
        bt[i * width..i * width + t.len()].copy_from_slice(t);
    }
    StepPlan {
        input_ids: vec![11, 22, 33],
        positions: lens.to_vec(),
        slot_mapping: (0..3)
            .map(|i| tables[i][lens[i] as usize / 16] * 16 + lens[i] % 16)
            .collect(),
        block_tables: bt,
        max_blocks_per_seq: width,
        context_lens: lens.iter().map(|l| l + 1).collect(),
        query_start_locs: vec![0, 1, 2, 3],
        seq_ids: vec![SeqId(0), SeqId(1), SeqId(2)],
        logits_indices: vec![0, 1, 2],
        sample_rows: vec![Some(0), Some(1), Some(2)],
        copy_pages: vec![],
        swap_out: vec![],
        swap_in: vec![],
        num_prefill_tokens: 0,
        num_decode_tokens: 3,
    }
}

/// Prefills the three sequences, then runs the decode step; its logits.
fn run(r: &mut ModelRunner<CpuBackend>) -> Vec<f32> {
    let prompts: [(&[u32], &[u32]); 3] = [
        (&[1, 2, 3, 4, 5], &[0]),
        (&[9, 8, 7, 6, 5, 4, 3, 2, 1], &[1]),
        (&(100..117).collect::<Vec<u32>>(), &[2, 3]),
    ];
    for (toks, pages) in prompts {
        r.logits(&single_prefill(toks, pages, 16, false)).unwrap();
    }
    r.logits(&decode_of_three()).unwrap().to_vec()
}

/// Item 1: padding a decode batch of 3 to 4 and to 8 (padded rows on the
/// null page) gives bit-identical logits for the real rows.
#[test]
fn padded_decode_batches_give_identical_logits() {
    let plain = run(&mut runner_on(
        CpuBackend::new(0).unwrap(),
        DType::F32,
        dims(),
        16,
        vec![],
    ));
    for bucket in [4, 8] {
        let mut r = runner_on(
            CpuBackend::new(0).unwrap(),
            DType::F32,
            dims(),
            16,
            vec![bucket],
        );
        let padded = run(&mut r);
        assert_eq!(padded, plain, "padded to {bucket}");
        assert_eq!(r.decode_buckets(), &[bucket]);
    }
    assert!(decode_of_three().is_decode_only());
    assert!(!single_prefill(&[1, 2], &[0], 16, false).is_decode_only());
}

/// Item 5: with an artificial 1 MiB binding limit, weights (the 17.7 MiB
/// token embedding, tied output head) and KV arenas are split into pieces,
/// and the logits are bit-identical.
#[test]
fn a_one_mib_binding_limit_gives_identical_logits() {
    let pages = 100; // 2.4 MiB of f32 KV per layer: 3 pieces
    // Activation buffers are not split: keep the (rows, vocab) logits below 1 MiB.
    let d = WorkspaceDims {
        max_seqs: 4,
        max_logits_rows: 4,
        ..dims()
    };
    let plain = run(&mut runner_on(
        CpuBackend::new(0).unwrap(),
        DType::F32,
        d,
        pages,
        vec![],
    ));
    let small = CpuBackend::with_limits(0, 1 << 20, 1 << 20).unwrap();
    let mut r = runner_on(small, DType::F32, d, pages, vec![]);
    assert!(
        r.kv_cache().geometry.num_pieces >= 3,
        "{:?}",
        r.kv_cache().geometry
    );
    let pool = r.pool().snapshot();
    assert!(pool.segments.iter().all(|s| s.bytes <= 1 << 20));
    let limited = run(&mut r);
    assert_eq!(limited, plain);
}

/// Item 3: the host sampler on the device's top-k candidates gives the same
/// tokens, with the same RNG use, as the host sampler on the full row.
#[test]
fn sampling_from_device_candidates_equals_the_host_sampler() {
    let vocab = 4096;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let settings = [
        (0.8, 40, 0.95, 0.05),
        (1.0, 10, 1.0, 0.0),
        (0.3, 64, 0.5, 0.1),
        (1.5, 2, 0.9, 0.0),
        (0.7, 1, 1.0, 0.0),
    ];
    for (t, k, p, min_p) in settings {
        let params = SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p,
            seed: 1234,
            ..SamplingParams::default()
        };
        let mut host = Sampler::new(params.clone(), vocab);
        let mut device = Sampler::new(params.clone(), vocab);
        for step in 0..200 {
            // Ties and repeated values on purpose.
            let row: Vec<f32> = (0..vocab)
                .map(|_| (rng.random_range(-40..40) as f32) * 0.25)
                .collect();
            let mut vals = vec![0f32; k];
            let mut ids = vec![0u32; k];
            pagoda_cpu::sampling::top_k(&row, k, &mut vals, &mut ids);
            let a = host.sample(&row, &[]);
            let b = device.sample_candidates(&vals, &ids);
            assert_eq!(a, b, "T={t} k={k} p={p} min_p={min_p} step {step}");
        }
    }
    // Greedy: the device argmax is the host argmax (ties to the lower id).
    let row = [1.0f32, 3.0, 3.0, f32::NAN, -1.0];
    assert_eq!(
        pagoda_cpu::sampling::argmax(&row),
        pagoda::sampler::argmax(&row)
    );
}
