//! The engine on its own thread behind an [`EngineHandle`], on the synthetic
//! tiny model: idle means asleep, finished requests leave no state, many
//! threads at once get exactly what `Engine::generate` gives, refusals come
//! back to the submitter, aborts, faults and shutdown.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use pagoda::model::synthetic::{SyntheticSpec, write_synthetic_gguf};
use pagoda::sampler::SamplingParams;
use pagoda::{
    Engine, EngineConfig, EngineError, EngineHandle, EngineStats, FinishReason, GenerationParams,
    RequestOutput, SeqId,
};
use pagoda_backend::FaultInjector;
use pagoda_cpu::CpuBackend;

/// The tiny synthetic model, written once per test binary.
fn model() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("engine-handle");
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("tiny-{}.gguf", std::process::id()));
        write_synthetic_gguf(&SyntheticSpec::tiny(), &path).expect("synthetic model");
        path
    })
}

fn config(faults: &FaultInjector) -> EngineConfig {
    EngineConfig {
        ctx: Some(128),
        max_seqs: Some(4),
        max_num_batched_tokens: 64,
        max_logits_rows: 4,
        page_size: 16,
        faults: faults.clone(),
        ..EngineConfig::default()
    }
}

fn engine_on(backend: &Arc<CpuBackend>, faults: &FaultInjector) -> Engine<CpuBackend> {
    Engine::builder()
        .model(model())
        .backend(backend.clone())
        .config(config(faults))
        .build()
        .expect("engine builds")
}

fn engine() -> Engine<CpuBackend> {
    engine_on(
        &Arc::new(CpuBackend::new(1).expect("cpu backend")),
        &FaultInjector::new(),
    )
}

/// The default model (SmolLM2-135M): slow enough per token (milliseconds)
/// that a request of a few hundred tokens is surely still running when a
/// test aborts it or shuts the engine down.
fn slow_engine() -> Engine<CpuBackend> {
    pagoda_tests::cpu_engine(EngineConfig {
        ctx: Some(512),
        max_seqs: Some(2),
        max_logits_rows: 2,
        faults: FaultInjector::new(),
        ..EngineConfig::default()
    })
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        // Fixed lengths: the random model may well pick an end-of-generation token.
        ignore_eog: true,
        ..GenerationParams::default()
    }
}

fn prompt(r: u32) -> Vec<u32> {
    (0..3 + 4 * (r % 5))
        .map(|j| (r * 31 + j * 11 + 5) % 256)
        .collect()
}

/// What one stream delivered.
#[derive(Debug)]
struct Streamed {
    tokens: Vec<u32>,
    text: String,
    finished: FinishReason,
}

/// Reads a stream to its end; checks that exactly one event, the last, has
/// `finished` set and that the stream is closed after it.
fn collect(id: SeqId, rx: &Receiver<RequestOutput>) -> Streamed {
    let mut tokens = Vec::new();
    let mut text = String::new();
    loop {
        let ev = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the stream ends with a finished event");
        assert_eq!(ev.id, id);
        tokens.extend(ev.token);
        text.push_str(&ev.text);
        if let Some(finished) = ev.finished {
            assert!(
                rx.recv_timeout(Duration::from_secs(10)).is_err(),
                "nothing follows the finished event"
            );
            return Streamed {
                tokens,
                text,
                finished,
            };
        }
    }
}

/// Waits until the engine thread has published a snapshot that satisfies `ok`.
fn wait_for(h: &EngineHandle, what: &str, ok: impl Fn(&EngineStats) -> bool) -> EngineStats {
    let t0 = Instant::now();
    loop {
        let s = h.stats();
        if ok(&s) {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{what}: {s:#?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn idle(s: &EngineStats) -> bool {
    s.num_requests_held == 0 && s.num_running == 0 && s.num_waiting == 0
}

#[test]
fn an_idle_engine_sleeps_on_its_channel() {
    let h = EngineHandle::spawn(engine()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let s = h.stats();
    assert_eq!(
        (s.num_iterations, s.num_steps),
        (0, 0),
        "no wake-up while idle"
    );
    let (id, rx) = h.submit(prompt(1), greedy(5)).unwrap();
    assert_eq!(collect(id, &rx).tokens.len(), 5);
    let before = wait_for(&h, "request cleaned up", idle);
    assert!(before.num_steps >= 5, "{before:#?}");
    std::thread::sleep(Duration::from_millis(200));
    let after = h.stats();
    assert_eq!(
        (after.num_iterations, after.num_steps),
        (before.num_iterations, before.num_steps),
        "no wake-up in 200 ms of idleness after serving"
    );
}

#[test]
fn fifty_sequential_requests_leave_no_state_behind() {
    let h = EngineHandle::spawn(engine()).unwrap();
    let pool_before = h.stats().pool;
    for r in 0..50 {
        let (id, rx) = h.submit(prompt(r), greedy(3)).unwrap();
        let got = collect(id, &rx);
        assert_eq!(got.finished, FinishReason::Length, "request {r}");
        assert_eq!(got.tokens.len(), 3);
    }
    let s = wait_for(&h, "all 50 cleaned up", |s| {
        idle(s) && s.num_requests_completed == 50
    });
    assert_eq!(s.num_requests_held, 0, "the engine holds no request state");
    assert_eq!(s.num_sequences_held, 0, "the scheduler holds no sequence");
    assert_eq!(s.num_kv_pages_free, s.num_kv_pages, "every KV page is free");
    assert_eq!(s.num_requests_submitted, 50);
    assert_eq!(s.num_generated_tokens, 150);
    assert_eq!(
        s.pool.allocated_bytes, pool_before.allocated_bytes,
        "device memory does not grow with requests served"
    );
}

#[test]
fn eight_threads_at_once_get_what_generate_gives() {
    let prompts: Vec<Vec<u32>> = (0..8).map(prompt).collect();
    let want = engine().generate(prompts.clone(), greedy(12)).unwrap();
    let h = EngineHandle::spawn(engine()).unwrap();
    let start = Arc::new(Barrier::new(prompts.len()));
    let threads: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let (h, start) = (h.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let (id, rx) = h.submit(p, greedy(12)).unwrap();
                collect(id, &rx)
            })
        })
        .collect();
    let got: Vec<Streamed> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.finished, w.finish_reason, "request {i}");
        assert_eq!(g.tokens, w.generated_tokens, "request {i}: tokens");
        assert_eq!(g.text, w.text, "request {i}: text");
    }
    let s = wait_for(&h, "all 8 cleaned up", idle);
    assert_eq!(s.num_requests_completed, 8);
    assert_eq!(s.num_generated_tokens, 8 * 12);
}

#[test]
fn refusals_come_back_to_the_submitter() {
    let h = EngineHandle::spawn(engine()).unwrap();
    let err = h.submit(Vec::<u32>::new(), greedy(4)).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = h.submit(vec![1, 999], greedy(4)).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let err = h.submit(vec![1; 200], greedy(4)).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    let bad_sampling = GenerationParams {
        sampling: SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        },
        ..greedy(4)
    };
    assert!(h.submit(vec![1, 2], bad_sampling).is_err());
    let s = wait_for(&h, "refusals counted", |s| s.num_requests_refused == 4);
    assert_eq!(s.num_requests_submitted, 0);
    assert_eq!(s.num_requests_held, 0);
    // Still serving, and text prompts are tokenized on the caller's side.
    let text = "hello there";
    let (id, rx) = h.submit(text, greedy(2)).unwrap();
    assert_eq!(collect(id, &rx).tokens.len(), 2);
    let direct = engine().tokenize(text);
    assert_eq!(h.tokenize(text), direct);
    assert_eq!(
        wait_for(&h, "prompt counted", |s| s.num_requests_submitted == 1).num_prompt_tokens,
        direct.len() as u64
    );
}

#[test]
fn abort_and_a_dropped_stream_end_requests() {
    let h = EngineHandle::spawn(slow_engine()).unwrap();
    let (id, rx) = h.submit(prompt(2), greedy(100)).unwrap();
    let first = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.finished.is_none());
    h.abort(id).unwrap();
    let rest = collect(id, &rx);
    assert_eq!(rest.finished, FinishReason::Aborted);
    assert!(rest.tokens.len() < 99, "it stopped early");
    // A dropped receiver aborts its request too.
    let (_, rx) = h.submit(prompt(3), greedy(100)).unwrap();
    rx.recv_timeout(Duration::from_secs(30)).unwrap();
    drop(rx);
    let s = wait_for(&h, "both aborted and cleaned up", |s| {
        idle(s) && s.num_requests_aborted == 2
    });
    assert_eq!(s.num_kv_pages_free, s.num_kv_pages);
    assert!(s.num_generated_tokens < 150, "{s:#?}");
    // The id is gone now.
    assert!(matches!(
        h.abort(id),
        Err(EngineError::UnknownSequence(x)) if x == id
    ));
}

#[test]
fn the_handle_survives_an_injected_fault() {
    let faults = FaultInjector::new();
    let backend = Arc::new(CpuBackend::new(1).unwrap());
    let engine = engine_on(&backend, &faults);
    // The next fault site is the first KV page of the first request.
    faults.fail_at(faults.sites_reached() + 1);
    let h = EngineHandle::spawn(engine).unwrap();
    let (id, rx) = h.submit(prompt(4), greedy(6)).unwrap();
    let got = collect(id, &rx);
    let FinishReason::Error(msg) = &got.finished else {
        panic!("the faulted request fails: {got:?}")
    };
    assert!(msg.contains("injected fault"), "{msg}");
    assert_eq!(faults.faults_fired(), 1);
    // The engine keeps serving, with every page back.
    let (id, rx) = h.submit(prompt(4), greedy(6)).unwrap();
    let ok = collect(id, &rx);
    assert_eq!(ok.finished, FinishReason::Length);
    assert_eq!(ok.tokens.len(), 6);
    let s = wait_for(&h, "both cleaned up", |s| {
        idle(s) && s.num_requests_failed == 1 && s.num_requests_completed == 1
    });
    assert_eq!(s.num_kv_pages_free, s.num_kv_pages);
    drop(h);
    assert_eq!(
        backend.live_segments(),
        0,
        "dropping the last handle stops the engine and gives its memory back"
    );
}

#[test]
fn shutdown_aborts_in_flight_requests_and_joins() {
    let h = EngineHandle::spawn(slow_engine()).unwrap();
    let other = h.clone();
    let (id, rx) = h.submit(prompt(5), greedy(100)).unwrap();
    rx.recv_timeout(Duration::from_secs(30)).unwrap();
    h.shutdown().unwrap();
    assert_eq!(collect(id, &rx).finished, FinishReason::Aborted);
    let s = other.stats();
    assert!(s.stopped);
    assert_eq!(s.num_requests_aborted, 1);
    assert!(matches!(
        other.submit(prompt(5), greedy(1)),
        Err(EngineError::Stopped(_))
    ));
    other.shutdown().unwrap();
}

#[test]
fn telemetry_and_chat_are_reachable_from_any_thread() {
    let h = EngineHandle::spawn(engine()).unwrap();
    let events = h.subscribe_telemetry(64, false).unwrap();
    let h2 = h.clone();
    let rendered = std::thread::spawn(move || {
        h2.render_chat(&[pagoda::chat::Message::new("user", "hi")])
            .unwrap()
    })
    .join()
    .unwrap();
    assert!(rendered.contains("hi"), "{rendered}");
    let (id, rx) = h.submit(prompt(6), greedy(3)).unwrap();
    collect(id, &rx);
    let steps = events.try_iter().count();
    assert_eq!(steps, 3, "one StepStats per step");
    assert_eq!(h.info().ctx, 128);
}
