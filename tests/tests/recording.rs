//! The engine's step contract, checked with a recording backend double
//! (`pagoda_tests::recording`): one upload per step, fixed forward
//! arguments per padded batch size (across sequence lengths and KV growth),
//! at most 8 ops per layer, graphs captured once per batch size and replayed
//! exactly, and memory given back only after the queue is idle.

use std::sync::Arc;

use pagoda::sampler::SamplingParams;
use pagoda::{Engine, EngineConfig, GenerationParams};
use pagoda_cpu::CpuBackend;
use pagoda_tests::model_path;
use pagoda_tests::recording::{Call, RecordingBackend};

fn cfg() -> EngineConfig {
    EngineConfig {
        ctx: Some(512),
        max_seqs: Some(4),
        // 64 KiB units: 3 pages (48 tokens) of f32 KV per layer, so the
        // arena grows every few dozen decode steps.
        kv_commit_unit_bytes: 64 << 10,
        enable_prefix_caching: false,
        ..EngineConfig::default()
    }
}

fn params(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        ignore_eog: true,
        ..GenerationParams::default()
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![(1..6).collect(), (100..109).collect(), (200..217).collect()]
}

fn recording_engine(
    graphs: bool,
    cfg: EngineConfig,
) -> (Engine<RecordingBackend>, Arc<RecordingBackend>) {
    let backend = Arc::new(RecordingBackend::new(CpuBackend::new(0).unwrap(), graphs));
    let engine = Engine::builder()
        .model(model_path())
        .backend(backend.clone())
        .config(cfg)
        .build()
        .unwrap();
    (engine, backend)
}

/// Forward-op signatures of a step's log.
fn forward_ops(log: &[Call]) -> Vec<&Call> {
    log.iter().filter(|c| c.is_forward_op()).collect()
}

/// Item 2: decode steps of one padded batch size make identical forward
/// calls at every sequence length and before and after the KV arena grows;
/// every step uploads exactly once; a layer takes at most 8 ops.
#[test]
fn decode_steps_of_one_padded_size_make_identical_forward_calls() {
    let (mut e, b) = recording_engine(
        false,
        EngineConfig {
            decode_buckets: Some(vec![4]),
            ..cfg()
        },
    );
    let layers = e.model_config().num_layers;
    b.take_log();
    for p in prompts() {
        e.add_request(p, params(70)).unwrap();
    }
    let mut decode_forwards: Vec<Vec<Call>> = Vec::new();
    let mut grew_between_decodes = false;
    let mut steps = 0;
    while e.has_unfinished() {
        e.step().unwrap();
        steps += 1;
        let log = b.take_log();
        let uploads = log.iter().filter(|c| c.op == "upload").count();
        assert_eq!(uploads, 1, "step {steps}: one upload per step");
        let fwd = forward_ops(&log);
        assert!(
            fwd.len() <= 8 * layers,
            "step {steps}: {} ops for {layers} layers",
            fwd.len()
        );
        // A padded decode step: every row one token, 4 rows.
        if fwd[0].args.contains("n: 4,") && fwd.len() > 1 {
            if log.iter().any(|c| c.op == "commit") && !decode_forwards.is_empty() {
                grew_between_decodes = true;
            }
            decode_forwards.push(fwd.into_iter().cloned().collect());
        }
    }
    assert!(
        decode_forwards.len() >= 60,
        "{} decode steps",
        decode_forwards.len()
    );
    assert!(
        grew_between_decodes,
        "the KV arena grew during the decode steps"
    );
    for (i, f) in decode_forwards.iter().enumerate() {
        assert_eq!(
            f, &decode_forwards[0],
            "decode step {i} made other forward calls"
        );
    }
    // Seven ops per layer plus embedding and the head.
    assert_eq!(decode_forwards[0].len(), 7 * layers + 4);
}

/// Item 2 with graphs: a decode step's forward is captured once per padded
/// batch size and replayed; the tokens equal the plain CPU engine's.
#[test]
fn graphs_are_captured_once_per_batch_size_and_replay_exactly() {
    let want: Vec<Vec<u32>> = {
        let mut e = pagoda_tests::cpu_engine(cfg());
        let mut ids = Vec::new();
        for (i, p) in prompts().into_iter().enumerate() {
            ids.push(e.add_request(p, params(20 + 15 * i)).unwrap());
        }
        while e.has_unfinished() {
            e.step().unwrap();
        }
        ids.into_iter()
            .map(|id| e.take_completion(id).unwrap().generated_tokens)
            .collect()
    };
    let (mut e, b) = recording_engine(true, cfg());
    assert_eq!(e.runner().decode_buckets(), &[1, 2, 4]);
    b.take_log();
    let mut ids = Vec::new();
    for (i, p) in prompts().into_iter().enumerate() {
        ids.push(e.add_request(p, params(20 + 15 * i)).unwrap());
    }
    let (mut replays, mut eager_decodes) = (0, 0);
    while e.has_unfinished() {
        e.step().unwrap();
        let log = b.take_log();
        if log.iter().any(|c| c.op == "replay") {
            replays += 1;
            // Outside a capture, a replayed step runs no forward op itself.
            let captured = log.iter().any(|c| c.op == "begin_capture");
            if !captured {
                assert!(forward_ops(&log).is_empty(), "a replayed step ran ops");
            }
        } else if !forward_ops(&log).is_empty() && forward_ops(&log)[0].args.contains("n: 1,") {
            eager_decodes += 1;
        }
    }
    let got: Vec<Vec<u32>> = ids
        .into_iter()
        .map(|id| e.take_completion(id).unwrap().generated_tokens)
        .collect();
    assert_eq!(got, want, "replayed graphs give the CPU's tokens");
    assert!(replays >= 40, "{replays} replays");
    assert_eq!(eager_decodes, 0, "every decode step replays a graph");
    // Batch sizes 4 (three requests, padded), 2 and 1 as they finish: three graphs.
    assert_eq!(e.runner().num_graphs(), 3);
}

/// Item 8: KV units and pool segments go back only after the queued work
/// that may touch them has finished (a blocking read-back or a wait).
#[test]
fn memory_is_given_back_only_after_the_queue_is_idle() {
    let (mut e, b) = recording_engine(false, cfg());
    for (i, p) in prompts().into_iter().enumerate() {
        e.add_request(p, params(30 + 30 * i)).unwrap();
    }
    while e.has_unfinished() {
        e.step().unwrap();
    }
    drop(e);
    let log = b.take_log();
    let decommits = log.iter().filter(|c| c.op == "decommit").count();
    let frees = log.iter().filter(|c| c.op == "free_segment").count();
    assert!(
        decommits > 0 && frees > 0,
        "{decommits} decommits, {frees} frees"
    );
    let blocking = |c: &Call| matches!(c.op, "download" | "synchronize" | "wait_idle");
    for (i, c) in log.iter().enumerate() {
        if !matches!(c.op, "decommit" | "free_segment" | "unreserve") {
            continue;
        }
        let last_op = log[..i]
            .iter()
            .rposition(|c| c.is_forward_op() || c.op == "copy_pages");
        let last_wait = log[..i].iter().rposition(blocking);
        assert!(
            last_op.is_none() || last_wait > last_op,
            "{} at {i} without a wait after the op at {last_op:?}",
            c.op
        );
    }
}

/// Item 4: a backend that repacks weights at load states their size, and the
/// plan counts that size: here every weight piece grows by 4 KiB, and the
/// plan's weights and the pool's requests both grow by exactly that.
#[test]
fn the_plan_counts_the_backends_prepared_weight_bytes() {
    let plain = pagoda_tests::cpu_engine(cfg());
    let backend = Arc::new(
        RecordingBackend::new(CpuBackend::new(0).unwrap(), false).with_weight_padding(4096),
    );
    let padded = Engine::builder()
        .model(model_path())
        .backend(backend)
        .config(cfg())
        .build()
        .unwrap();
    let tensors = 2 + 9 * plain.model_config().num_layers as u64; // token_embd, output_norm, 9 per layer
    assert_eq!(
        padded.memory_plan().weights_bytes,
        plain.memory_plan().weights_bytes + tensors * 4096
    );
    let requested = padded
        .runner()
        .pool()
        .stats()
        .requested(pagoda_backend::MemoryTag::Weights);
    assert_eq!(requested, padded.memory_plan().weights_bytes);
    // And it still computes the same thing.
    let p = prompts()[0].clone();
    let mut a = plain;
    let mut b = padded;
    let ta = a.generate(vec![p.clone()], params(8)).unwrap();
    let tb = b.generate(vec![p], params(8)).unwrap();
    assert_eq!(ta[0].generated_tokens, tb[0].generated_tokens);
}
